"""Per-dataset defaults: one set for ``fedrec train``, ``fedrec simulate`` and ``fedrec compare``,
so that a bare command on a dataset gives the best setting the recorded runs know, and a bare
``train`` / ``simulate`` pair on the same data trains the same model.

Three layers per data format (the part of a spec before ``:``):

``data``
    Task and evaluation protocol; shared by every runtime.
``model``
    Model options, shared by every runtime, and set only for a model whose config has the
    option (``popularity`` gets no ``dim``; ``item-repr`` goes to every model that has it).
``centralised`` / ``federated``
    The training budget of each runtime: ``fedrec train`` (:class:`~fedrec.train.TrainConfig`
    keys) and ``fedrec simulate`` (run-config keys). A ``model.KEY`` here is the runtime's
    training objective (``next-loss``), not the model's shape: full cross-entropy reads every
    item, which the federated engine's compact per-user item tables cannot, so federated
    next-item training uses sampled negatives. Budgets are not set for models that do not
    train (``popularity``, ``user_ctr``).

A few models have their own budget on top (``per_model``). The user's keys always win: a
config file, ``--set`` and explicit flags are applied over these, key by key. Every run's
result JSON records what took effect under ``resolved``: ``options`` (the keys set, from
defaults or the user), ``defaults`` (those that came from here) and ``user``.
``fedrec defaults SPEC`` prints the resolved options without training.

Every value below names the recorded run it came from (``simulations/configs/<name>.toml``,
results in ``simulations/results/<name>.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedrec.errors import ConfigError

__all__ = ["FORMATS", "RUNTIMES", "FormatDefaults", "Resolved", "algorithm_model", "default_algorithm", "defaults",
           "defaults_for",
           "format_of", "markdown_table", "resolve"]

RUNTIMES = ("centralised", "federated")
#: keys that are where files go on this machine, not options of the run: not recorded in results
_NOT_RECORDED = ("resume", "progress", "log-dir", "log_dir", "checkpoint")


@dataclass(frozen=True)
class FormatDefaults:
    """The defaults of one data format (see the module docstring); flat kebab-case keys."""

    data: Mapping[str, Any]
    model: Mapping[str, Any] = field(default_factory=dict)
    centralised: Mapping[str, Any] = field(default_factory=dict)
    federated: Mapping[str, Any] = field(default_factory=dict)
    #: model name -> layer name -> keys over the format's layer
    per_model: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    #: the recorded runs (simulations/configs/<name>.toml) the values come from
    recorded: tuple[str, ...] = ()
    #: the federated algorithm of a bare ``fedrec simulate`` on this format
    algorithm: str = "mrff"


# next item on S3-Rec-style files (one user per line / one pair per line): model widths of the
# best recorded next-item run, shared by both formats
_NEXT_ITEM = FormatDefaults(
    data={
        "task": "next_item",  # the only task of implicit feedback (no labels)
        "protocol": "sampled-99",  # beauty_next, lastfm_next: the published S3-Rec protocol
    },
    model={
        "dim": 64,  # beauty_next: S3-Rec's SASRec widths (SASRec test HR@10 0.5152)
        "heads": 2,  # beauty_next
        "dropout": 0.5,  # beauty_next
        "max-len": 50,  # beauty_next
    },
    centralised={
        "epochs": 200,  # beauty_next (30 epochs under-trained: HR@10 0.4234, issue 14)
        "patience": 20,  # beauty_next
        "batch-size": 128,  # beauty_next
        "lr": 0.001,  # beauty_next
        "model.next-loss": "ce",  # beauty_next: full cross-entropy 0.5152 vs BCE 0.4930
    },
    federated={
        # the federated next-item protocol of issue 14 (item 3); no recorded run yet
        "shards": 1,  # one vectorised shard, one-client-per-user semantics
        "fraction": 1.0,  # all clients every round
        "negatives": 4,  # training negatives per positive
        "model.next-loss": "bce",  # sampled negatives: CE cannot use the compact item tables
        "rounds": 100,
        # fed_next_item: each item row averaged over the users that read it; over all users a
        # row read by few moves by almost nothing (LastFM FedMF test HR@10 0.2688 -> see the
        # table; Amazon Video 0.1667, below popularity's 0.5919)
        "item-aggregation": "auto",  # touched where allowed (not with DP, SecAgg+, robust; compact tables)
    },
    per_model={
        # beauty_next "MRFF hard" row: MRFF leaves its early plateau after ~40 epochs
        "mrff": {"centralised": {"patience": 40}},
        # lastfm_seed_models: with patience 20 BERT4Rec (cloze) stopped at epoch 53 on the
        # popularity-level plateau (valid NDCG@10 ~0.185) that SASRec leaves after ~30 epochs
        "bert4rec": {"centralised": {"patience": 40}},
        # lastfm_seed_models: DimeRec likewise stopped at epoch 58 on that plateau (valid
        # NDCG@10 ~0.178) with patience 20
        "dimerec": {"centralised": {"patience": 40}},
    },
    recorded=("beauty_next", "lastfm_next", "lastfm_seed_models"),
)

# RecBole's atomic files (atomic: / recbole:): RecBole's own setting is implicit feedback (no
# label field: every interaction a positive) ranked against every item, so next item under full
# ranking; the model widths and budget are those of the next-item formats above (beauty_next),
# not tuned on atomic data (no recorded run on these files yet)
_ATOMIC = FormatDefaults(
    data={
        "task": "next_item",  # RecBole's default: every interaction an implicit positive
        "protocol": "full",  # RecBole's default evaluation: full ranking (eval_args mode: full)
    },
    model=dict(_NEXT_ITEM.model),  # beauty_next
    centralised=dict(_NEXT_ITEM.centralised),  # beauty_next
    federated=dict(_NEXT_ITEM.federated),  # the federated next-item protocol of issue 14
    per_model=_NEXT_ITEM.per_model,  # beauty_next, lastfm_seed_models
)

# UniCDR's settings on cross-domain data (the ``cdr`` format's, from its sweep below), also
# given to ``unicdr`` on multi-domain synthetic data (cdr_synthetic_behaviour)
_UNICDR_MODEL = {"rec-weight": 0.8, "item-bias": True}
_UNICDR_TRAIN = {"batch-size": 1024, "lr": 0.01, "weight-decay": 1e-5, "negatives": 10}

FORMATS: dict[str, FormatDefaults] = {
    # the embedded default: small enough to finish in a few minutes on 2 cores
    "synthetic": FormatDefaults(
        data={"task": "ctr"},  # fed_synthetic (the data has click labels)
        centralised={
            "epochs": 20,  # fed_synthetic [train]
            "patience": 5,  # fed_synthetic [train]
        },
        federated={
            "rounds": 40,  # fed_synthetic [federated]
            "shards": 4,  # fed_synthetic [federated]
            "eval-every": 5,  # fed_synthetic [federated]
        },
        per_model={
            # multi-domain synthetic data (domains=2): the cdr task and UniCDR's settings, one
            # client per domain (cdr_synthetic_behaviour)
            "unicdr": {
                "data": {"task": "cdr"},
                "model": _UNICDR_MODEL,
                "centralised": {**_UNICDR_TRAIN, "patience": 3},
                "federated": {**_UNICDR_TRAIN, "partition": "domain", "shards": 2, "eval-every": 1,
                              "patience": 3, "rounds": 20},
            },
        },
        recorded=("fed_synthetic", "cdr_synthetic_behaviour"),
    ),
    "kuaisar": FormatDefaults(
        data={"task": "ctr"},  # kuaisar_ctr, fed_kuaisar: MRFF's protocol
        model={
            # the MRFF reference: item attributes only, no item-id table (kuaisar_ctr: MRFF hard
            # 0.7037, user click rate 0.6870; issue 14: with the id table of item-repr=auto, 0.6481)
            "item-repr": "attributes",
        },
        centralised={
            "epochs": 40,  # kuaisar_ctr [train]
            "patience": 5,  # kuaisar_ctr [train]
            "batch-size": 64,  # kuaisar_ctr [train]
            "lr": 0.001,  # kuaisar_ctr [train]
        },
        federated={
            "rounds": 60,  # fed_kuaisar [federated]: the best validation round came at 45-50
            "shards": 1,  # fed_kuaisar [federated]
            "eval-every": 5,  # fed_kuaisar [federated]
            # fed_kuaisar "federated MRFF, item rows over readers" (touched) against
            # "federated MRFF" (all): attribute-code rows averaged over their readers
            "item-aggregation": "auto",
        },
        recorded=("kuaisar_ctr", "fed_kuaisar"),
    ),
    "movielens": FormatDefaults(
        data={"task": "ctr"},  # ml100k_ctr, fed_ml100k: label = rating >= 4
        model={"max-len": 50},  # ml100k_ctr, fed_ml100k (every row)
        centralised={
            "epochs": 120,  # ml100k_ctr [train] (at 40 most best epochs sat at the cap)
            "patience": 10,  # ml100k_ctr [train]
            "batch-size": 64,  # ml100k_ctr [train]
            "lr": 0.001,  # ml100k_ctr [train]
        },
        federated={
            "rounds": 60,  # fed_ml100k [federated]
            "shards": 1,  # fed_ml100k [federated]
            "eval-every": 5,  # fed_ml100k [federated]
            # fed_ml100k "... item rows over readers" (touched) against the rows over all users
            "item-aggregation": "auto",
        },
        per_model={
            # CRM retrieves the next item conditioned on its rating (issue 17): next item, with
            # the next-item budget of seq: (ml100k_crm)
            "crm": {"data": {"task": "next_item"},
                    "centralised": {"epochs": 200, "patience": 20, "batch-size": 128}},
        },
        recorded=("ml100k_ctr", "fed_ml100k", "ml100k_crm"),
    ),
    "csv": FormatDefaults(data={"task": "ctr"}),  # labelled logs; no recorded run
    # exposures labelled by effective views: CTR; the real data is not here, so no recorded
    # run (recflow_synthetic_stages ran on its generator, synthetic:kind=recflow)
    "recflow": FormatDefaults(data={"task": "ctr"}),
    "parquet": FormatDefaults(data={"task": "ctr"}),  # labelled logs; no recorded run
    "seq": _NEXT_ITEM,
    "pairs": _NEXT_ITEM,
    "atomic": _ATOMIC,
    "recbole": _ATOMIC,  # the alias of atomic:
    # cross-domain (UniCDR's protocol): issue 15, tuned on validation of Sport-Cloth
    "cdr": FormatDefaults(
        data={
            "task": "cdr",  # the only task of these files (implicit, per-domain items)
            "protocol": "sampled-999",  # UniCDR / DisenCDR / CDRIB: 1 held-out item vs 999
        },
        model={
            # issue 15 sweep, Sport-Cloth validation NDCG@10 after 5 epochs at lr 0.01: UniCDR's
            # 0.4 rec / 0.6 contrastive 0.033 (still climbing: it needs UniCDR's ~50k steps),
            # rec-weight 0.8 0.053; an item bias 0.043 (UniCDR) and 0.054 (single-domain, vs 0.052)
            "rec-weight": 0.8,
            "item-bias": True,
        },
        centralised={
            "epochs": 40,  # the sweep's curves were still rising at 5 epochs
            "patience": 3,  # single-domain peaks at epoch 2-4 (cdr_sport_cloth)
            "batch-size": 1024,  # UniCDR's batch
            "lr": 0.01,  # issue 15 sweep: 1e-3 (UniCDR's) 0.007 -> 0.017 in 3 epochs, 0.003 0.039 in 5, 0.01 0.053
            "weight-decay": 1e-5,  # UniCDR (1e-4: single-domain 0.019 after 5 epochs, against 0.054)
            "negatives": 10,  # UniCDR
        },
        federated={
            "rounds": 40,  # one local epoch per round: the centralised budget
            "patience": 3,  # as centralised
            "eval-every": 1,
            "lr": 0.01,  # as centralised
            "weight-decay": 1e-5,  # as centralised
            "negatives": 10,  # as centralised
        },
        per_model={
            "unicdr": {"federated": {
                "partition": "domain",  # one client per domain
                "shards": 2,  # the two domains of a cdr:DIR pair
            }},
        },
        recorded=("cdr_sport_cloth", "cdr_game_video"),
        algorithm="unicdr",  # each domain one client
    ),
}


def format_of(data: str) -> str:
    """The format of a data spec (``kuaisar:DIR`` -> ``kuaisar``; ``""`` without a ``:``)."""
    fmt, sep, _ = str(data).partition(":")
    return fmt.strip().lower() if sep else ""


def _kebab(key: str) -> str:
    key = str(key)
    if key.startswith("model."):
        return "model." + key[len("model."):].replace("_", "-")
    return key.replace("_", "-")


def _model_keys(model: str) -> tuple[set[str], bool]:
    """The option names model ``model`` accepts (kebab-case) and whether it trains; an
    unknown model is a one-line error listing the known ones."""
    from fedrec.models.registry import MODELS

    spec = MODELS.create(model)
    trains = getattr(spec.model, "trainable", True)
    if spec.config is None:
        return set(), trains
    fixed = {k for k, _ in spec.fixed} | {"task"}
    return {f.name.replace("_", "-") for f in dataclasses.fields(spec.config) if f.init and f.name not in fixed}, trains


def algorithm_model(algorithm: str) -> str:
    """The model a federated algorithm trains by default (an unknown one is a one-line error)."""
    from fedrec.federated.registry import ALGORITHMS

    return ALGORITHMS.create(algorithm).default_model


def defaults(data: str, *, runtime: str, model: str) -> dict[str, Any]:
    """The default flat keys for ``model`` on ``data`` in ``runtime`` (``centralised`` or
    ``federated``): ``task`` / ``protocol``, the runtime's budget keys and ``model.KEY``
    options, only those ``model`` accepts. Empty for a format without defaults."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)} (got {runtime!r})")
    entry = FORMATS.get(format_of(data))
    accepted, trains = _model_keys(model)
    if entry is None:
        return {}
    own = entry.per_model.get(model, {})
    out: dict[str, Any] = dict(entry.data)
    out.update(own.get("data", {}))
    for key, value in {**entry.model, **own.get("model", {})}.items():
        if key in accepted:
            out[f"model.{key}"] = value
    if trains:
        for key, value in {**getattr(entry, runtime), **own.get(runtime, {})}.items():
            if not key.startswith("model.") or key[len("model."):] in accepted:
                out[key] = value
    return out


def default_algorithm(data: str) -> str:
    """The federated algorithm of a bare ``fedrec simulate --data SPEC``: the format's own
    (``unicdr`` on ``cdr:``), else ``mrff``."""
    entry = FORMATS.get(format_of(data))
    return entry.algorithm if entry is not None else "mrff"


def defaults_for(data: str) -> dict[str, Any]:
    """Default run-config keys of a bare ``fedrec simulate --data SPEC`` (the format's
    default algorithm and its model; empty for a format without defaults)."""
    return defaults(data, runtime="federated", model=algorithm_model(default_algorithm(data)))


@dataclass
class Resolved:
    """The flat keys a run uses: ``options`` (from the defaults and the user, the user's
    winning), ``defaults`` (those the per-dataset defaults set) and ``user`` (the user's own:
    config file, ``--set`` and flags)."""

    format: str
    runtime: str
    model: str
    options: dict[str, Any]
    defaults: dict[str, Any]
    user: dict[str, Any]

    def model_options(self) -> dict[str, Any]:
        """The model options in effect (``model.KEY`` keys, without the prefix)."""
        return {k[len("model."):]: v for k, v in self.options.items() if k.startswith("model.")}

    def record(self) -> dict[str, Any]:
        """What a result JSON keeps under ``resolved`` (without where a training state lives
        or whether a progress bar is drawn: not options of the run, and no paths in results)."""
        def kept(keys: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in keys.items() if k not in _NOT_RECORDED}

        return {"format": self.format, "runtime": self.runtime, "model": self.model, "options": kept(self.options),
                "defaults": kept(self.defaults), "user": kept(self.user)}


def _expand(user: Mapping[str, Any]) -> dict[str, Any]:
    """User keys in kebab case, a ``model-options = "k=v,..."`` string as ``model.k`` keys."""
    out: dict[str, Any] = {}
    for key, value in user.items():
        if key == "model-options":
            for item in str(value).replace(",", " ").split():
                k, sep, v = item.partition("=")
                if not sep or not k:
                    raise ConfigError(f"run config 'model-options': expected KEY=VALUE items, got {item!r}")
                out[_kebab(f"model.{k.strip()}")] = v.strip()
            continue
        out[_kebab(key)] = value
    return out


def resolve(data: str, *, runtime: str, user: Mapping[str, Any], model: str | None = None) -> Resolved:
    """Merge the defaults of ``data`` under the user's flat keys (the user's win, key by key;
    ``-`` and ``_`` are the same key). ``model`` is the model trained; for the ``federated``
    runtime it defaults to the user's ``model`` key, else the ``algorithm``'s own model."""
    given = _expand(user)
    if model is None:
        if runtime != "federated":
            raise ConfigError("resolve: a centralised run needs its model")
        model = str(given.get("model") or algorithm_model(str(given.get("algorithm") or default_algorithm(data))))
    base = defaults(data, runtime=runtime, model=model)
    if runtime == "federated" and default_algorithm(data) != "mrff":
        base = {"algorithm": default_algorithm(data), **base}  # the format's own algorithm (unicdr on cdr:)
    taken = {k: v for k, v in base.items() if k not in given}
    return Resolved(format=format_of(data), runtime=runtime, model=model, options={**taken, **given}, defaults=taken,
                    user=given)


def _cell(keys: Mapping[str, Any]) -> str:
    def plain(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    return ", ".join(f"`{k}={plain(v)}`" for k, v in keys.items()) or "-"


def markdown_table() -> str:
    """The README's table of per-format defaults (rendered from :data:`FORMATS`)."""
    header = ("| format | task, protocol | model options (train and simulate) | `fedrec train` | `fedrec simulate` "
              "| recorded runs |")
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    for name, entry in FORMATS.items():
        extra = "".join(f"; {m}: {_cell(layer)}" for m, layers in entry.per_model.items()
                        for rt, layer in layers.items() if rt == "centralised")
        fed_extra = "".join(f"; {m}: {_cell(layer)}" for m, layers in entry.per_model.items()
                            for rt, layer in layers.items() if rt == "federated")
        model_extra = "".join(f"; {m}: {_cell(layer)}" for m, layers in entry.per_model.items()
                              for rt, layer in layers.items() if rt == "model")
        recorded = ", ".join(f"`{r}`" for r in entry.recorded) or "-"
        lines.append(f"| `{name}` | {_cell(entry.data)} | {_cell(entry.model)}{model_extra} | {_cell(entry.centralised)}{extra} "
                     f"| {_cell(entry.federated)}{fed_extra} | {recorded} |")
    return "\n".join(lines) + "\n"
