"""The centralised trainer: batched, seeded, early stopping on the validation metric, test
reported at the best validation epoch, checkpoints, a progress bar.

Protocols (name them next to every number):

* ``ctr`` — AUC / LogLoss (and GAUC when users have several test impressions) over the
  pooled held-out impressions; model selection on validation AUC.
* ``next_item`` with ``protocol="full"`` — the held-out item ranked against every item, the
  user's history items excluded; ``"sampled-99"`` / ``"sampled-999"`` — against 99 / 999
  distinct uniform items the user never interacted with (fixed by ``eval_seed``), or
  against the fixed negatives of a ``negatives_file`` (a paper's published candidates, see
  :class:`~fedrec.data.samplers.FixedNegatives`). HR@K, NDCG@K, Recall@K, Precision@K,
  MAP@K for K in ``topk`` (default 5, 10, 20), MRR, and under full ranking item
  coverage@K (:func:`~fedrec.metrics.topk_metrics`); model selection on validation NDCG@10
  (NDCG at the list's first K when ``topk`` lacks 10). Under a time-ordered ratio split a
  user holds out several items, and full ranking scores them as one set per user
  (RecBole's convention, :func:`~fedrec.data.batching.target_groups`); a sampled protocol
  ranks each held-out item against its own negatives. Training negatives exclude only the
  user's training items (:meth:`~fedrec.data.samplers.UniformNegativeSampler.for_training`).

Results carry ``population`` (:func:`~fedrec.data.batching.evaluation_population`): the
rule that decides who is evaluated and how many users are, per stage (next item on
labelled data evaluates only users whose held-out interaction is a positive).

:func:`evaluate_saved` scores a saved model (a ``checkpoint`` or ``resume`` file) again, on
any protocol, without training.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedrec.config import canonical_options
from fedrec.data.batching import (ExampleSet, build_examples, check_task, evaluation_population, iterate_batches,
                                  target_groups)
from fedrec.data.samplers import FixedNegatives, StageNegativeSampler, UniformNegativeSampler
from fedrec.data.split import SplitData
from fedrec.device import device_rng_state, place, resolve_device, set_device_rng_state, to_cpu, to_device
from fedrec.errors import ConfigError
from fedrec.files import atomic_path
from fedrec.logs import RunLog
from fedrec.metrics import (DEFAULT_TOPK, ctr_metrics, domain_ranking_metrics, full_ranking_ranks, parse_topk,
                            sampled_ranking_ranks, top_k_items, topk_metrics)
from fedrec.models.base import ModelData, RecModel
from fedrec.models.registry import create_model

__all__ = ["TrainConfig", "train", "train_epoch", "evaluate", "evaluate_saved", "load_saved", "describe_saved",
           "model_max_len",
           "selection_metric",
           "PROTOCOLS"]

PROTOCOLS = ("full", "sampled-99", "sampled-999")


@dataclass
class TrainConfig:
    """Options of :func:`train` (flat keys in the ``[train]`` table of a config file)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5
    protocol: str = "full"
    negatives: int = 1
    eval_batch_size: int = 512
    seed: int = 0
    eval_seed: int = 2024
    checkpoint: str = ""
    #: file of the whole training state (model, optimisers, RNG and sampler states, history,
    #: best epoch), written atomically after every epoch; when it exists, training resumes
    #: from it and ends exactly as an uninterrupted run would. It must come from the same
    #: model, task, options, config and data; a finished run's file returns its result again.
    #: ``epochs`` and ``patience`` may be raised: a finished run then continues, as if it had
    #: had the larger budget from the start (lowering them below where the run already is
    #: is an error). Models that do not train (popularity, user click rate) ignore it.
    resume: str = ""
    progress: bool = True
    #: extra ranking protocols (comma-separated, e.g. ``"full"``) also evaluated on the test
    #: set at the best validation epoch; reported under ``test_by_protocol``.
    also_test: str = ""
    #: file of fixed sampled-ranking negatives per user (``user neg_1 ... neg_N``, raw ids,
    #: e.g. S3-Rec's ``LastFM_sample.txt``): sampled protocols with ``N`` negatives (valid
    #: and test) rank against these instead of uniform draws; another sampled protocol
    #: alongside it is an error.
    negatives_file: str = ""
    #: data with stage samples only (RecFlow); 0 = none. Next item: of the ``negatives`` per
    #: target, this many from the target's own request's stage samples (RecFlow's hard
    #: negatives). CTR: this many of each impression's request's stage samples as extra
    #: non-clicks, trained by ``stage_loss``
    stage_negatives: int = 0
    #: the least stage (1 pre-ranking .. 4 re-ranking) a stage sample must have reached
    stage_min: int = 1
    #: stage negatives only among items the user did not consume in training (RecFlow's
    #: baseline keeps them: false = as the paper)
    stage_unseen: bool = False
    #: CTR with ``stage_negatives``: ``bce`` (the stage samples are non-clicks: a BCE term
    #: over them, RecFlow's data-distribution-shift baseline) or ``fsltr`` (RecFlow's
    #: full-stage learning to rank: a pairwise logistic loss over each request's stage
    #: priorities, click > exposed > re-ranking cut > ranking cut > coarse cut > pre-ranking
    #: cut); either is added to the impressions' own BCE
    stage_loss: str = "bce"
    #: weight of the ``stage_loss`` term
    stage_weight: float = 1.0
    #: where the model and its batches compute: ``auto`` (a GPU when present), ``cpu``,
    #: ``cuda``, ``cuda:N`` or ``mps`` (:func:`fedrec.device.resolve_device`); results and
    #: checkpoints are the same files whichever device wrote them
    device: str = "auto"
    #: directory of the experiment log (``metrics.jsonl`` per epoch, TensorBoard events when
    #: installed: :mod:`fedrec.logs`); "" = none
    log_dir: str = ""
    #: the K list of the ranking metrics (``hr@K``, ``ndcg@K``, ``recall@K``,
    #: ``precision@K``, ``map@K``, ``coverage@K``): a list of positive integers, or a
    #: comma-separated string (``"5,10,20,50"``)
    topk: tuple[int, ...] = DEFAULT_TOPK

    def __post_init__(self) -> None:
        try:
            self.topk = parse_topk(self.topk)
        except ValueError as exc:
            raise ConfigError(f"train option 'topk': {exc}") from None
        for name in ("epochs", "batch_size", "eval_batch_size", "negatives"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train option '{name}' must be >= 1 (got {getattr(self, name)})")
        if self.patience < 0:
            raise ConfigError(f"train option 'patience' must be >= 0 (got {self.patience})")
        for name in ("seed", "eval_seed"):  # numpy's generators take non-negative seeds only
            if getattr(self, name) < 0:
                raise ConfigError(f"train option '{name.replace('_', '-')}' must be >= 0 (got {getattr(self, name)})")
        if not self.weight_decay >= 0:
            raise ConfigError(f"train option 'weight-decay' must be >= 0 (got {self.weight_decay})")
        if self.lr <= 0:
            raise ConfigError(f"train option 'lr' must be > 0 (got {self.lr})")
        if self.stage_negatives < 0:
            raise ConfigError(f"train option 'stage-negatives' must be >= 0 (got {self.stage_negatives})")
        if self.stage_loss not in STAGE_LOSSES:
            raise ConfigError(f"train option 'stage-loss' must be one of {', '.join(STAGE_LOSSES)} "
                              f"(got {self.stage_loss!r})")
        if not self.stage_weight > 0:
            raise ConfigError(f"train option 'stage-weight' must be > 0 (got {self.stage_weight})")
        if not 1 <= self.stage_min <= 4:
            raise ConfigError(f"train option 'stage-min' must be in 1..4 (got {self.stage_min})")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {self.protocol!r})")
        for extra in self.extra_protocols():
            if extra not in PROTOCOLS:
                raise ConfigError(f"train option 'also_test': unknown protocol {extra!r} "
                                  f"(expected some of {', '.join(PROTOCOLS)})")

    def extra_protocols(self) -> list[str]:
        """The protocols named by ``also_test``, without the selection protocol itself."""
        names = [p.strip() for p in self.also_test.split(",") if p.strip()]
        return [p for p in dict.fromkeys(names) if p != self.protocol]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (or buffers; the CPU for a model with neither, or
    for a scorer that is no module)."""
    if not isinstance(model, nn.Module):
        return torch.device("cpu")
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _dev(batch: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``batch`` on the device of ``model`` (the same dict on the CPU)."""
    return to_device(batch, model_device(model))


def selection_metric(task: str, topk=DEFAULT_TOPK) -> str:
    """The validation metric that selects the best epoch: ``auc`` (CTR), else ``ndcg@10``,
    or NDCG at the first K of ``topk`` when the list lacks 10."""
    if task == "ctr":
        return "auc"
    ks = parse_topk(topk)
    return f"ndcg@{10 if 10 in ks else ks[0]}"


def _clean(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if v is None or (isinstance(v, float) and np.isnan(v)) else round(float(v), 6)) for k, v in metrics.items()}


@torch.no_grad()
def evaluate(model: RecModel, examples: ExampleSet, *, task: str, protocol: str = "full",
             batch_size: int = 512, eval_seed: int = 2024,
             negatives: FixedNegatives | None = None, topk=DEFAULT_TOPK) -> dict[str, float | None]:
    """Metrics of ``model`` on ``examples`` (a valid or test :class:`ExampleSet`).

    Sampled protocols draw distinct uniform negatives from ``eval_seed`` (see
    :meth:`~fedrec.data.batching.ExampleSet.candidates`), or take them from ``negatives``
    (fixed per user) when given. Ranking metrics are computed at every K of ``topk``
    (:func:`~fedrec.metrics.topk_metrics`; ``coverage@K`` under full ranking of next items
    only); under full ranking a user with several held-out items (a ratio split) is scored
    on the set of them (:func:`~fedrec.data.batching.target_groups`).
    """
    ks = parse_topk(topk)
    model.eval()
    if len(examples) == 0:
        raise ConfigError(f"no {examples.stage} examples to evaluate")
    if task == "ctr":
        probs, labels, users = [], [], []
        for batch in iterate_batches(examples, batch_size=batch_size):
            probs.append(model.predict_ctr(_dev(batch, model)).cpu().double().numpy())
            labels.append(batch["target_labels"][:, -1].numpy())
            users.append(batch["user"].numpy())
        labels_all, users_all, probs_all = np.concatenate(labels), np.concatenate(users), np.concatenate(probs)
        several = np.bincount(users_all).max() > 1
        out = ctr_metrics(labels_all, probs_all, users_all if several else None)
        if examples.split.domains:  # multi-domain data: also each domain's own AUC
            domains = examples.domains
            for d, name in enumerate(examples.split.domains):
                mine = domains == d
                if len(np.unique(labels_all[mine])) == 2:
                    out[f"{name}/auc"] = ctr_metrics(labels_all[mine], probs_all[mine])["auc"]
        if examples.split.stage_user is not None:  # RecFlow-style data: also rank within each request
            out.update(stage_ranking_metrics(model, examples, batch_size=batch_size, ks=ks))
        return _clean(out)
    if task == "cdr":
        ranks = _ranks(model, examples, protocol=protocol, batch_size=batch_size, eval_seed=eval_seed,
                       negatives=negatives, behaviours=cdr_behaviours(examples.split))
        return _clean(cdr_metrics(examples, ranks["main"], ranks.get("like"), ks=ks))
    top: list[np.ndarray] | None = [] if protocol == "full" else None
    ranks = _ranks(model, examples, protocol=protocol, batch_size=batch_size, eval_seed=eval_seed, negatives=negatives,
                   top=top, top_k=max(ks))
    return _clean(next_item_metrics(examples, ranks, ks, None if top is None else np.concatenate(top),
                                    grouped=protocol == "full"))


def stage_ranking_metrics(model: RecModel, examples: ExampleSet, *, batch_size: int = 512,
                          ks=DEFAULT_TOPK) -> dict[str, float]:
    """CTR on data with stage samples (RecFlow): ``stage/hr@K``, ``stage/ndcg@K`` and
    ``stage/n``: each held-out *click* ranked by the model's click probability among the
    candidates its own request's funnel filtered out (every stage sample of the same user and
    time), as RecFlow ranks each request's stage candidates. Examples whose request has no
    stage sample, and non-clicks, are not ranked; nothing when no example is ranked."""
    from fedrec.data.samplers import StageIndex

    index = StageIndex(examples.split)
    rows = examples.target_rows[:, -1]
    clicked = (rows >= 0) & (examples.split.label[np.maximum(rows, 0)] > 0)
    lo, hi = index.requests(rows)
    keep = np.flatnonzero(clicked & (hi > lo))
    if len(keep) == 0:
        return {}
    ranks = []
    for start in range(0, len(keep), batch_size):
        part = keep[start:start + batch_size]
        chunk = replace(examples, seq=examples.seq[part], input_rows=examples.input_rows[part],
                        target_rows=examples.target_rows[part])
        batch = next(iterate_batches(chunk, batch_size=len(part)))
        items, _ = index.padded(examples.target_rows[part, -1])
        target = batch["target_items"][:, -1:]
        cand = torch.cat([target, torch.from_numpy(items)], dim=1)
        with torch.no_grad():
            probs = model.predict_ctr_candidates(_dev(batch, model), cand.to(model_device(model))).cpu().double().numpy()
        neg = np.where(items > 0, probs[:, 1:], -np.inf)
        ranks.append(sampled_ranking_ranks(probs[:, 0], neg))
    metrics = topk_metrics(np.concatenate(ranks), parse_topk(ks))
    out = {f"stage/{k}": v for k, v in metrics.items() if k.startswith(("hr@", "ndcg@", "mrr"))}
    out["stage/n"] = int(len(keep))
    return out


def next_item_metrics(examples: ExampleSet, ranks: np.ndarray, ks=DEFAULT_TOPK, top_items: np.ndarray | None = None,
                      *, grouped: bool = True) -> dict[str, float]:
    """The next-item metrics of ``ranks`` (one per example of ``examples``) at every K of
    ``ks``; ``top_items`` (each example's top list, full ranking) adds ``coverage@K``. With
    ``grouped`` and several held-out items per user (:func:`~fedrec.data.batching.target_groups`),
    each user counts once, scored on the set of its items."""
    groups = target_groups(examples) if grouped else None
    if groups is None:
        return topk_metrics(ranks, ks, top_items=top_items, n_items=examples.split.n_items)
    seq, keep = groups
    return topk_metrics(ranks[keep], ks, groups=seq, top_items=top_items, n_items=examples.split.n_items)


def cdr_metrics(examples: ExampleSet, ranks: np.ndarray, like_ranks: np.ndarray | None = None,
                ks=DEFAULT_TOPK) -> dict[str, float]:
    """Cross-domain metrics of ``ranks`` (one per example of ``examples``): per domain
    ``DOMAIN/hr@K``, ``DOMAIN/ndcg@K``, ``DOMAIN/mrr``, and ``DOMAIN/cold/...`` over the
    examples whose user has no training interaction in that domain (cold-start users),
    where there are any; unprefixed keys are the mean over domains (the selection metric
    reads ``ndcg@10``). With ``like_ranks`` (data with ratings: the ranks under the like
    behaviour's score), ``DOMAIN/like/...`` over the examples whose held-out item the user
    liked (:func:`liked_mask`)."""
    out = domain_ranking_metrics(ranks, examples.domains, examples.split.domains, cold_start_mask(examples), ks=ks)
    if like_ranks is not None:
        liked = liked_mask(examples)
        names = examples.split.domains
        per = domain_ranking_metrics(like_ranks[liked], examples.domains[liked], names, ks=ks)
        out.update({f"{k.split('/', 1)[0]}/like/{k.split('/', 1)[1]}": v for k, v in per.items() if "/" in k})
    return out


def cdr_behaviours(split: SplitData) -> tuple[str, ...]:
    """The behaviours cross-domain evaluation ranks: ``main``, and ``like`` on data with ratings."""
    return ("main", "like") if split.rating is not None else ("main",)


def liked_mask(examples: ExampleSet) -> np.ndarray:
    """Whether each example's held-out item was rated at least
    :data:`~fedrec.data.batching.LIKE_THRESHOLD` (False without a rating)."""
    from fedrec.data.batching import LIKE_THRESHOLD

    rating = examples.split.rating
    if rating is None:
        return np.zeros(len(examples), dtype=bool)
    r = rating[examples.target_rows[:, -1]]
    return np.isfinite(r) & (r >= LIKE_THRESHOLD)


def cold_start_mask(examples: ExampleSet) -> np.ndarray:
    """Whether each example's user has no training interaction in the example's domain."""
    sp = examples.split
    from fedrec.data.split import TRAIN

    counts = np.bincount(sp.row_seq[sp.part == TRAIN], minlength=sp.n_sequences)
    return counts[examples.seq] == 0


def _ranks(model: RecModel, examples: ExampleSet, *, protocol: str, batch_size: int, eval_seed: int,
           negatives: FixedNegatives | None = None, behaviours: tuple[str, ...] | None = None,
           top: list | None = None, top_k: int = 0):
    """0-based rank of every example's held-out item under ``protocol`` (ranking tasks).

    With ``behaviours`` (cross-domain data with ratings: ``("main", "like")``), a dict of
    ranks per behaviour from one pass; a model without a score of its own for a behaviour
    (no ``behaviours`` attribute naming it) ranks it with its main score. With ``top`` (a
    list; full ranking), each batch's ``top_k`` best items per example (its history items
    excluded, :func:`~fedrec.metrics.top_k_items`) are appended to it."""
    wanted = behaviours or ("main",)
    own = set(getattr(model, "behaviours", ("main",)))
    ranks: dict[str, list] = {b: [] for b in wanted}
    if protocol == "full":
        indptr, indices = examples.exclusions()
        for start, batch in zip(range(0, len(examples), batch_size), iterate_batches(examples, batch_size=batch_size)):
            main = None
            for b in wanted:
                if b == "main" or b not in own:
                    main = model.score_all(_dev(batch, model)).cpu().double().numpy() if main is None else main
                    scores = main
                else:
                    scores = model.score_all(_dev(batch, model), behaviour=b).cpu().double().numpy()
                stop = start + scores.shape[0]
                sub_ptr = indptr[start : stop + 1] - indptr[start]
                exclude = (sub_ptr, indices[indptr[start] : indptr[stop]])
                ranks[b].append(full_ranking_ranks(scores, batch["target_items"][:, -1].numpy(), exclude=exclude))
                if top is not None and b == "main":
                    top.append(top_k_items(scores, top_k, exclude=exclude))
    else:
        n = int(protocol.split("-")[1])
        sampler = negatives if negatives is not None else UniformNegativeSampler(examples.split, seed=eval_seed)
        for batch in iterate_batches(examples, batch_size=batch_size, num_negatives=n, sampler=sampler):
            main = None
            for b in wanted:
                if b == "main" or b not in own:
                    if main is None:
                        dev = _dev(batch, model)
                        main = model.score_candidates(dev, dev["candidates"]).cpu().double().numpy()
                    scores = main
                else:
                    dev = _dev(batch, model)
                    scores = model.score_candidates(dev, dev["candidates"], behaviour=b).cpu().double().numpy()
                ranks[b].append(sampled_ranking_ranks(scores[:, 0], scores[:, 1:]))
    out = {b: np.concatenate(r) for b, r in ranks.items()}
    return out if behaviours else out["main"]


def _fixed_negatives(path: str, split: SplitData, task: str, protocols: list[str],
                     examples: list[ExampleSet]) -> FixedNegatives | None:
    """The fixed negatives of ``path`` (None without one), checked against the protocols
    they will serve and the users of ``examples``, before any training."""
    if not path:
        return None
    if task != "next_item":
        raise ConfigError(f"negatives file {path}: only for next_item ranking (task is {task})")
    fixed = FixedNegatives(path, split)
    sampled = [p for p in protocols if p.startswith("sampled-")]
    if not sampled:
        raise ConfigError(f"negatives file {path}: needs a sampled protocol (sampled-99 or sampled-999), "
                          f"not {', '.join(protocols)}")
    for name in sampled:
        if int(name.split("-")[1]) != fixed.n:
            raise ConfigError(f"{fixed.path}: holds {fixed.n} negatives per user, protocol {name} needs "
                              f"{name.split('-')[1]}")
    for ex in examples:
        fixed.require(ex.users)
    return fixed


def _file_digest(path: str) -> str:
    """``sha256:<hex>`` of a file's bytes (how a resume state names a data file, so the same
    file under another path spelling is still the same run)."""
    import hashlib

    from fedrec.data.io import resolve_file

    digest = hashlib.sha256()
    with open(resolve_file(path), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


class _SparseAdamL2(torch.optim.SparseAdam):
    """SparseAdam with L2 weight decay on the rows a step touches: ``weight_decay * row`` is
    added to each touched row's gradient, as :class:`torch.optim.Adam` adds it to a dense
    gradient (rows the batch does not read are left alone, like SparseAdam's moments)."""

    def __init__(self, params, *, lr: float, weight_decay: float) -> None:
        super().__init__(params, lr=lr)
        self.weight_decay = weight_decay

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - see the class docstring
        if self.weight_decay:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g = p.grad.coalesce()
                    rows = g.indices()[0]
                    p.grad = torch.sparse_coo_tensor(g.indices(), g.values() + self.weight_decay * p[rows],
                                                     g.shape, check_invariants=False).coalesce()
        return super().step(closure)


def _optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Adam for dense parameters; SparseAdam for sparse embedding tables (per-user private
    parameters), so a step moves only the rows of the batch's users. ``weight_decay``
    reaches both (on the sparse tables, the rows a step touches); the model's
    :meth:`~fedrec.models.base.RecModel.lr_scales` give some parameters their own rate."""
    sparse = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse}
    scales = model.lr_scales() if hasattr(model, "lr_scales") else {}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    dense_groups: dict[float, list[nn.Parameter]] = {}
    for n, p in named:
        if id(p) not in sparse:
            dense_groups.setdefault(float(scales.get(n, 1.0)), []).append(p)
    sparse_params = [p for _, p in named if id(p) in sparse]
    if any(n in scales for n, p in named if id(p) in sparse):
        raise ConfigError("a learning-rate multiplier on a sparse per-user table is not supported")
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(
        [{"params": ps, "lr": cfg.lr * scale} for scale, ps in sorted(dense_groups.items())],
        lr=cfg.lr, weight_decay=cfg.weight_decay)]
    if sparse_params:
        opts.append(_SparseAdamL2(sparse_params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    return opts


@torch.no_grad()
def routing_stats(model: nn.Module, examples: ExampleSet, previous: np.ndarray | None = None, *,
                  batch_size: int = 1024) -> tuple[dict[str, Any], np.ndarray] | None:
    """Where a grouped model (one with ``route``, e.g. MRFF) routes the users of
    ``examples`` (first example of each user, as evaluation sees it): per layer the share
    of users in each group and, against ``previous`` routes, the share whose group changed.
    Returns ``(record, routes)``, or None for a model without groups."""
    if not hasattr(model, "route") or len(examples) == 0:
        return None
    model.eval()
    _, first = np.unique(examples.users, return_index=True)
    examples = examples.subset(examples.users[np.sort(first)])
    routes = np.concatenate([model.route(_dev(b, model)).cpu().numpy() for b in iterate_batches(examples, batch_size=batch_size)])
    groups = int(model.cfg.groups)
    share = [(np.bincount(routes[:, layer], minlength=groups) / len(routes)).round(4).tolist()
             for layer in range(routes.shape[1])]
    record: dict[str, Any] = {"share": share}
    if previous is not None and previous.shape == routes.shape:
        record["changed"] = (routes != previous).mean(0).round(4).tolist()
    return record, routes


def _save_atomic(obj: Any, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:  # the mode open() would give, not mkstemp's 0600
            torch.save(obj, tmp)
    except OSError as exc:  # checked up front, but a file system can still refuse it (full, read-only)
        raise ConfigError(f"{path}: cannot be written ({exc.strerror or type(exc).__name__})") from exc


#: options that do not change what is trained (a run may resume on another device, or log elsewhere)
_RESUME_IGNORED = ("progress", "resume", "checkpoint", "device", "log_dir")
#: options that are not recorded in results and checkpoints (paths of this machine, the device)
_NOT_RECORDED = ("progress", "resume", "log_dir", "checkpoint")
#: options that only decide where training stops: a state may be resumed with other values
#: (a longer budget continues a finished run), as long as the run has not gone past the
#: point where the new values would have stopped it
_RESUME_EXTENDABLE = ("epochs", "patience")


_STATE_KEYS = ("epoch", "finished", "model_state", "optimizers", "sampler", "torch_rng", "numpy_rng", "history",
               "best_state", "best_epoch", "best_valid", "best_score", "stale", "seconds")


def _split_fingerprint(split: SplitData) -> dict[str, Any]:
    """Sizes that tell one split from another (the data's name alone may not: a library
    caller may pass none, and a results table names its data with a ``{data_root}``)."""
    return {"n_users": int(split.n_users), "n_items": int(split.n_items),
            "rows_per_part": [int(c) for c in np.bincount(split.part, minlength=3)[:3]],
            "item_sum": int(split.item.sum())}


def _short(value: Any, width: int = 40) -> str:
    """``repr(value)`` cut to ``width`` characters in the middle (for one-line messages: the
    start and the end of a path or a spec are what tell two apart)."""
    text = repr(value)
    if len(text) <= width:
        return text
    head = (width - 3) // 2
    return text[:head] + "..." + text[len(text) - (width - 3 - head):]


def _split_difference(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between two split fingerprints (:func:`_split_fingerprint`), in words:
    ``"users 1,090 (saved) vs 788 (this data); train/valid/test rows ..."``."""
    parts = []
    for key, name in (("n_users", "users"), ("n_items", "items")):
        if saved.get(key) != now.get(key):
            parts.append(f"{name} {saved.get(key, '?'):,} (saved) vs {now.get(key, '?'):,} (this data)")
    if saved.get("rows_per_part") != now.get("rows_per_part"):
        rows = ["/".join(f"{int(c):,}" for c in fp.get("rows_per_part") or []) or "?" for fp in (saved, now)]
        parts.append(f"train/valid/test rows {rows[0]} (saved) vs {rows[1]} (this data)")
    if not parts:  # the same sizes, other items
        parts.append("the same sizes but other items (their index sums differ)")
    return "; ".join(parts)


def _difference(key: str, saved: Any, now: Any) -> str:
    """One field of two runs' identities that differs, readable: a split by
    :func:`_split_difference`, a dict by its first differing keys, else both values shortened."""
    if key == "split" and isinstance(saved, dict) and isinstance(now, dict):
        return f"split: {_split_difference(saved, now)}"
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = [k for k in dict.fromkeys([*saved, *now]) if saved.get(k, _MISSING) != now.get(k, _MISSING)]
        shown = ", ".join(f"'{k}' {_short(saved.get(k, _MISSING), 24)} (saved) vs "
                          f"{_short(now.get(k, _MISSING), 24)} (this run)" for k in keys[:3])
        return f"{key} {shown}" + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")
    return f"{key} {_short(saved, 60)}, this run {_short(now, 60)}"


class _Missing:
    def __repr__(self) -> str:
        return "(not set)"


_MISSING = _Missing()


def _resume_identity(model_name: str, task: str, data_name: str, model_options: dict[str, Any] | None,
                     cfg: TrainConfig, split: SplitData) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the state file."""
    train_opts = {k: v for k, v in asdict(cfg).items() if k not in _RESUME_IGNORED}
    if train_opts.get("negatives_file"):  # the file's content, not how its path is spelled
        train_opts["negatives_file"] = _file_digest(train_opts["negatives_file"])
    return {"model": model_name, "task": task, "data": data_name, "split": _split_fingerprint(split),
            "model_options": {str(k): v for k, v in (model_options or {}).items()}, "train": train_opts}


def _load_resume(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The saved training state at ``path`` (None when there is none yet); a state from a
    different run is an error naming the first field that differs."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unreadable file gets the same message
        raise ConfigError(f"{path}: not a readable training state ({type(exc).__name__})") from exc
    saved = state.get("identity") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a training state written by --resume (a --checkpoint file?)")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ConfigError(f"{path}: incomplete training state (no {', '.join(missing)})")
    # states written before the split fingerprint existed carry none: their data name is checked
    keys = ("model", "task", "data", "split", "model_options") if "split" in saved else ("model", "task", "data", "model_options")
    for key in keys:
        if key == "model_options":  # a state written before --set values were typed holds {"groups": "2"}
            if canonical_options(saved.get(key)) != canonical_options(identity[key]):
                raise ConfigError(f"{path}: written by another run ({_difference(key, saved.get(key), identity[key])})")
            continue
        if saved.get(key) != identity[key]:
            raise ConfigError(f"{path}: written by another run ({_difference(key, saved.get(key), identity[key])})")
    # train options added after a state was written take their default there
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for key, value in identity["train"].items():
        if key in _RESUME_EXTENDABLE:
            continue
        before = saved.get("train", {}).get(key, defaults.get(key))
        if before != value:
            raise ConfigError(f"{path}: written by another run (train option '{key}' = {_short(before)}, this run "
                              f"{_short(value)})")
    return state


def _check_stage_options(cfg: TrainConfig, task: str, model_name: str, model: RecModel, split: SplitData) -> None:
    """The stage-sample options, refused before any work where they cannot apply or would be
    ignored."""
    given = [f"'{name}'" for name, value, default in (("stage-loss", cfg.stage_loss, "bce"),
                                                      ("stage-weight", cfg.stage_weight, 1.0))
             if value != default]
    if not cfg.stage_negatives:
        if given:
            raise ConfigError(f"train option {given[0]} needs 'stage-negatives' > 0")
        return
    if task == "next_item" and cfg.stage_negatives > cfg.negatives:
        raise ConfigError(f"train option 'stage-negatives' must be in 0..negatives ({cfg.negatives}) "
                          f"(got {cfg.stage_negatives})")
    if task not in ("next_item", "ctr"):
        raise ConfigError(f"train option 'stage-negatives' is for the next_item and ctr tasks (got {task})")
    if task == "next_item" and given:
        raise ConfigError(f"train option {given[0]} is for the ctr task (next item trains stage samples as its "
                          "negatives, with the model's own loss)")
    if not getattr(model, "trainable", True):
        raise ConfigError(f"train option 'stage-negatives': model '{model_name}' is fitted by counting, not trained")
    if task == "ctr" and not getattr(model, "ctr_stage_negatives", False):
        raise ConfigError(f"train option 'stage-negatives': model '{model_name}' does not score stage samples in CTR "
                          "training (models that do: the sequence backbone's, e.g. sasrec, mrff)")
    if split.stage_user is None:
        raise ConfigError("train option 'stage-negatives' needs data with stage samples (recflow:DIR with its "
                          "all_stage/ folder, or synthetic:kind=recflow)")


def _check_both_classes(*stages: ExampleSet) -> None:
    """CTR: each evaluation stage needs clicks and non-clicks (AUC is undefined otherwise);
    refused before training rather than after its first epoch."""
    for ex in stages:
        labels = np.unique(ex.split.label[ex.target_rows[:, -1]]) if len(ex) else np.zeros(0)
        if len(labels) == 1:
            raise ConfigError(f"task 'ctr': every {ex.stage} impression has label {int(labels[0])}, so AUC is "
                              "undefined; the data needs both clicks (1) and non-clicks (0) in its held-out rows "
                              "(or use --task next_item)")


def _stop_epoch(scores: list[float | None], patience: int, epochs: int) -> int | None:
    """The epoch at which training with these validation scores (one per epoch) stops under
    ``patience`` and ``epochs``; None if it would go on past them."""
    best, stale = -np.inf, 0
    for epoch, value in enumerate(scores, start=1):
        score = value if value is not None else -np.inf
        if score > best:
            best, stale = score, 0
        else:
            stale += 1
        if stale > patience or epoch == epochs:
            return epoch
    return None


def train(
    model_name: str,
    split: SplitData,
    *,
    task: str,
    model_options: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    data_name: str = "",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``model_name`` on ``split`` and return its validation and test metrics.

    The test metrics are those of the epoch with the best validation metric
    (:func:`selection_metric`). Returns a JSON-ready dict with ``model``, ``data``, ``task``,
    ``protocol``, ``population`` (who is evaluated, see
    :func:`~fedrec.data.batching.evaluation_population`), ``valid``, ``test``,
    ``best_epoch``, ``history``, ``seconds``, ``parameters`` and the configs;
    ``model_state`` holds the best weights (not JSON).
    """
    cfg = config or TrainConfig()
    check_task(split, task)  # e.g. ctr on implicit feedback: refused before anything trains
    start = time.perf_counter()
    earlier_seconds = 0.0  # spent before a resume
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    data = ModelData.from_split(split)
    model = create_model(model_name, data, model_options, task=task)
    _check_stage_options(cfg, task, model_name, model, split)
    max_len = getattr(getattr(model, "cfg", None), "max_len", 1)
    eval_len = getattr(model, "eval_max_len", max_len)  # cdr: evaluation contexts may be longer
    valid = build_examples(split, task=task, stage="valid", max_len=eval_len)
    test = build_examples(split, task=task, stage="test", max_len=eval_len)
    if task == "ctr":
        _check_both_classes(valid, test)
    metric = selection_metric(task, cfg.topk)
    protocol = "pooled" if task == "ctr" else cfg.protocol
    eval_args = dict(task=task, protocol=cfg.protocol, batch_size=cfg.eval_batch_size, eval_seed=cfg.eval_seed,
                     topk=cfg.topk,
                     negatives=_fixed_negatives(cfg.negatives_file, split, task, [cfg.protocol, *cfg.extra_protocols()],
                                                [valid, test]))
    history: list[dict[str, Any]] = []
    if task in ("next_item", "cdr") and eval_args["negatives"] is None:
        # draw the sampled protocols' candidates once before training: a user with too few
        # unseen items is an error now, not after the first epoch
        checks = [(cfg.protocol, valid), (cfg.protocol, test)] + [(p, test) for p in cfg.extra_protocols()]
        for name, ex in checks:
            if name.startswith("sampled-") and len(ex):
                ex.candidates(int(name.split("-")[1]), seed=cfg.eval_seed)

    if not getattr(model, "trainable", True):
        model.fit(split)
        place(model, device)
        best_state, best_epoch = copy.deepcopy(model.state_dict()), 0
        best_valid = evaluate(model, valid, **eval_args)
    else:
        train_ex = build_examples(split, task=task, stage="train", max_len=max_len)
        if len(train_ex) == 0:
            raise ConfigError("no training examples (every user has fewer than two training interactions)")
        if hasattr(model, "prepare"):  # what a model fits on the training split before its first step
            model.prepare(split)
        place(model, device)  # after prepare: what it fitted moves too
        opts = _optimizers(model, cfg)
        sampler = UniformNegativeSampler.for_training(split, seed=cfg.seed) if task in ("next_item", "cdr") else None
        if cfg.stage_negatives:
            sampler = StageNegativeSampler(split, seed=cfg.seed, stage=cfg.stage_negatives, min_stage=cfg.stage_min,
                                           unseen_only=cfg.stage_unseen)
        extra_loss = stage_ctr_loss(cfg) if task == "ctr" and cfg.stage_negatives else None
        best_state, best_epoch, best_valid, best_score, stale = None, 0, {}, -np.inf, 0
        first, finished, earlier_seconds = 1, False, 0.0
        identity = _resume_identity(model_name, task, data_name, model_options, cfg, split)
        saved = _load_resume(Path(cfg.resume), identity) if cfg.resume else None
        if saved is not None:
            model.load_state_dict(saved["model_state"])
            model.to(device)  # extra state (e.g. fitted codes) is loaded on the CPU
            for opt, opt_state in zip(opts, saved["optimizers"], strict=True):
                opt.load_state_dict(opt_state)
            if sampler is not None:
                sampler.rng.bit_generator.state = saved["sampler"]
            torch.set_rng_state(saved["torch_rng"])
            set_device_rng_state(device, saved.get("device_rng"))
            np.random.set_state(saved["numpy_rng"])
            history = saved["history"]
            best_state, best_epoch, best_valid = saved["best_state"], saved["best_epoch"], saved["best_valid"]
            best_score, stale = saved["best_score"], saved["stale"]
            first, earlier_seconds = saved["epoch"] + 1, saved["seconds"]
            # epochs / patience may differ from the saved run's: where would these stop?
            stop = _stop_epoch([h["valid"].get(metric) for h in history], cfg.patience, cfg.epochs)
            if stop is not None and stop < saved["epoch"]:
                raise ConfigError(f"{cfg.resume}: the saved run reached epoch {saved['epoch']}, but with epochs "
                                  f"{cfg.epochs} and patience {cfg.patience} it would have stopped at epoch {stop}")
            finished = stop == saved["epoch"]

        def save_state(epoch: int, done: bool) -> None:
            if cfg.resume:
                _save_atomic({"identity": identity, "epoch": epoch, "finished": done,
                              "model_state": to_cpu(model.state_dict()),  # loads where there is no GPU
                              "optimizers": [to_cpu(o.state_dict()) for o in opts],
                              "sampler": sampler.rng.bit_generator.state if sampler is not None else None,
                              "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                              "device_rng": device_rng_state(device),
                              "history": history, "best_state": best_state, "best_epoch": best_epoch,
                              "best_valid": best_valid, "best_score": best_score, "stale": stale,
                              "seconds": earlier_seconds + time.perf_counter() - start}, Path(cfg.resume))

        last_routes: np.ndarray | None = None  # the previous epoch's routing of the validation users
        # the log opens only now, when every check has passed and a resumed state was read
        # (a refused run leaves an earlier run's log as it was); it is closed however the loop ends
        run_log = RunLog(cfg.log_dir or None, kind="epoch", run={
            "command": "train", "model": model_name, "data": data_name, "task": task, "seed": cfg.seed,
            "device": str(device), "model_options": dict(model_options or {}),
            "train": {k: v for k, v in asdict(cfg).items() if k not in _NOT_RECORDED}})
        bar = _progress(cfg.epochs, f"{model_name} {task}", cfg.progress, initial=first - 1)
        try:
            for epoch in range(first, 0 if finished else cfg.epochs + 1):
                model.train()
                losses = train_epoch(model, opts, (to_device(b, device) for b in iterate_batches(
                    train_ex, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch,
                    num_negatives=cfg.negatives if task in ("next_item", "cdr") else cfg.stage_negatives,
                    sampler=sampler)), extra_loss=extra_loss)
                scores = evaluate(model, valid, **eval_args)
                record = {"epoch": epoch, "loss": round(float(np.mean(losses)), 6), "valid": scores}
                routed = routing_stats(model, valid, last_routes)
                if routed is not None:
                    record["routing"], last_routes = routed
                history.append(record)
                if on_epoch is not None:
                    on_epoch(record)
                score = scores[metric] if scores[metric] is not None else -np.inf
                bar.update(1)
                bar.set_postfix(loss=record["loss"], **{f"valid_{metric}": scores[metric]})
                if score > best_score:
                    best_score, best_epoch, best_valid, stale = score, epoch, scores, 0
                    best_state = to_cpu(copy.deepcopy(model.state_dict()))
                    if cfg.checkpoint:
                        _save_atomic({"model": model_name, "task": task, "epoch": epoch, "state": best_state,
                                      "model_options": model_options or {},
                                      "train": {k: v for k, v in asdict(cfg).items() if k not in _NOT_RECORDED},
                                      "split": _split_fingerprint(split), "data": data_name}, Path(cfg.checkpoint))
                else:
                    stale += 1
                done = stale > cfg.patience or epoch == cfg.epochs
                save_state(epoch, done)
                # logged after the state is saved: a run killed in between repeats no line on resume
                run_log.write(epoch, record, total=cfg.epochs)
                if done:
                    break
        finally:
            bar.close()
            run_log.close()
        model.load_state_dict(best_state)
        model.to(device)
    test_scores = evaluate(model, test, **eval_args)
    by_protocol = {}
    if task != "ctr":
        by_protocol[cfg.protocol] = test_scores
        for extra in cfg.extra_protocols():
            by_protocol[extra] = evaluate(model, test, **{**eval_args, "protocol": extra})
    result = {
        "model": model_name,
        "data": data_name,
        "task": task,
        "protocol": protocol,
        "population": evaluation_population(split, task, {"valid": valid, "test": test}),
        "selection": f"valid {metric}",
        "valid": best_valid,
        "test": test_scores,
        "test_by_protocol": by_protocol,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "history": history,
        "seconds": round(earlier_seconds + time.perf_counter() - start, 2),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "private_parameters_per_user": (model.private_parameters_per_user()
                                        if hasattr(model, "private_parameters_per_user") else 0),
        "seed": cfg.seed,
        "device": str(device),
        "model_options": dict(model_options or {}),
        # where the state and log files live is not a training option (and would put a path in results)
        "train": {k: v for k, v in asdict(cfg).items() if k not in _NOT_RECORDED},
        "model_state": to_cpu(best_state),
    }
    return result


#: the ``stage_loss`` values of :class:`TrainConfig`
STAGE_LOSSES = ("bce", "fsltr")


def stage_priorities(labels: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RecFlow's FSLTR priorities: of an impression ``6`` when clicked, else ``5``; of a stage
    sample its deepest stage, ``1`` (cut at pre-ranking) .. ``4`` (cut at re-ranking)."""
    return 5 + (labels > 0.5).long(), levels.long()


def stage_ctr_loss(cfg: TrainConfig) -> Callable[[dict, dict], torch.Tensor]:
    """The stage term of CTR training with ``stage_negatives`` (:class:`TrainConfig`), as
    ``fn(batch, outputs)``: ``stage_weight`` times

    * ``bce``: the mean BCE of the batch's stage samples (``negatives``, item 0 = none) as
      non-clicks;
    * ``fsltr``: the mean pairwise logistic loss ``log(1 + exp(s_j - s_i))`` over every pair
      of the same position (the impression and its request's stage samples) whose
      priorities (:func:`stage_priorities`) differ, ``i`` the higher.

    A position without stage samples adds nothing."""
    weight, kind = float(cfg.stage_weight), cfg.stage_loss

    def fn(batch: dict, out: dict) -> torch.Tensor:
        neg = out.get("neg_logits")
        if neg is None:
            raise ConfigError("this model does not score stage samples in CTR training")
        have = (batch["negatives"] > 0) & batch["target_mask"].unsqueeze(-1)  # (B, T, n)
        if kind == "bce":
            per = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="none")
            return weight * (per * have).sum() / have.sum().clamp(min=1)
        pos, lev = stage_priorities(batch["target_labels"], batch["negative_levels"])
        scores = torch.cat([out["logits"].unsqueeze(-1), neg], dim=-1)  # (B, T, 1 + n)
        prio = torch.cat([pos.unsqueeze(-1), lev], dim=-1)
        valid = torch.cat([batch["target_mask"].unsqueeze(-1), have], dim=-1)
        higher = (prio.unsqueeze(-1) > prio.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)
        diff = scores.unsqueeze(-1) - scores.unsqueeze(-2)  # s_i - s_j
        per = F.softplus(-diff)
        return weight * (per * higher).sum() / higher.sum().clamp(min=1)

    return fn


def train_epoch(model: nn.Module, opts: list[torch.optim.Optimizer], batches, *,
                extra_loss: Callable[[dict, dict], torch.Tensor] | None = None) -> list[float]:
    """One pass of ``model`` (in train mode) over ``batches``: a step of every optimiser per
    batch; returns the batch losses. ``extra_loss(batch, outputs)`` is added to the model's
    own loss (e.g. :func:`stage_ctr_loss`)."""
    losses = []
    for batch in batches:
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        out = model(batch)
        loss = model.loss(batch, out)
        if extra_loss is not None:
            loss = loss + extra_loss(batch, out)
        loss.backward()
        for opt in opts:
            opt.step()
        losses.append(float(loss.detach()))
    return losses


def model_max_len(model: nn.Module) -> int:
    """The history length a model reads (its ``cfg.max_len``; 1 for the counting baselines)."""
    return getattr(getattr(model, "cfg", None), "max_len", 1)


def _read_saved(path: Path) -> dict[str, Any]:
    """What a ``checkpoint`` file or a ``resume`` training state at ``path`` holds, in one
    form: ``model``, ``task``, ``model_options``, ``train`` (options), ``state`` (the best
    weights; None when a state's run finished no epoch yet), ``best_epoch``, ``finished``
    (None for a checkpoint), ``split`` (the split fingerprint, None in old files), ``data``
    (the run's data spec, None in old files) and ``kind`` (``checkpoint`` or ``state``).
    Anything else is a one-line error."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unreadable file gets the same message
        raise ConfigError(f"{path}: not a readable checkpoint or training state ({type(exc).__name__})") from exc
    if isinstance(saved, dict) and isinstance(saved.get("identity"), dict):  # a resume state
        ident = saved["identity"]
        return {"kind": "state", "model": ident["model"], "task": ident["task"],
                "model_options": ident["model_options"], "train": ident["train"], "state": saved.get("best_state"),
                "best_epoch": saved.get("best_epoch"), "finished": saved.get("finished"), "split": ident.get("split"),
                "data": ident.get("data")}
    if isinstance(saved, dict) and {"model", "task", "state"} <= set(saved):  # a checkpoint
        return {"kind": "checkpoint", "model": saved["model"], "task": saved["task"],
                "model_options": saved.get("model_options", {}), "train": saved.get("train", {}),
                "state": saved["state"], "best_epoch": saved.get("epoch"), "finished": None,
                "split": saved.get("split"), "data": saved.get("data")}
    raise ConfigError(f"{path}: neither a --checkpoint file nor a --resume training state")


def describe_saved(path: str | Path) -> dict[str, Any]:
    """Facts about a ``checkpoint`` file or a ``resume`` training state, without rebuilding
    its model: ``model`` (name), ``task``, ``kind``, ``best_epoch``, ``finished``,
    ``model_options``, ``train`` and ``data`` (the run's data spec; None in old files). A
    file that is neither is a one-line :class:`~fedrec.errors.ConfigError`."""
    saved = _read_saved(Path(path))
    return {key: saved[key] for key in ("model", "task", "kind", "best_epoch", "finished", "model_options", "train",
                                        "data")}


def _check_saved_split(path: Path, saved: dict[str, Any], split: SplitData) -> None:
    """Refuse a saved model of another split (by its fingerprint) or one with no weights yet."""
    fingerprint = saved["split"]
    if fingerprint is not None and fingerprint != _split_fingerprint(split):
        ran_on = f"; its data was {_short(saved['data'], 80)}" if saved.get("data") else ""
        differs = _split_difference(fingerprint, _split_fingerprint(split))
        raise ConfigError(f"{path}: trained on another split ({differs}{ran_on}): give the --data (and --config "
                          "[split] table) of its run")
    if saved["state"] is None:
        raise ConfigError(f"{path}: the run finished no epoch yet; nothing to evaluate")


def _restore_model(path: Path, saved: dict[str, Any], split: SplitData, device: str | torch.device = "cpu") -> RecModel:
    """The model of ``saved`` (see :func:`_read_saved`) built for ``split``, with its
    weights, on ``device``."""
    model = create_model(saved["model"], ModelData.from_split(split), saved["model_options"], task=saved["task"])
    try:
        model.load_state_dict(saved["state"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: the saved weights do not fit this data ({first})") from exc
    if hasattr(model, "prepare"):  # what the model fits on the training split (not saved)
        model.prepare(split)
    return place(model, resolve_device(device))


def load_saved(path: str | Path, split: SplitData, *, device: str | torch.device = "cpu") -> tuple[RecModel, dict[str, Any]]:
    """The model saved at ``path`` (a ``checkpoint`` file, or a ``resume`` training state's
    best weights) rebuilt for ``split``, in eval mode on ``device`` (see
    :func:`fedrec.device.resolve_device`), and facts about it.

    The same reading and checks as :func:`evaluate_saved`: a file that is neither, a model
    of another split, weights that do not fit the data, or a state whose run finished no
    epoch yet is a one-line :class:`~fedrec.errors.ConfigError`. The facts: ``model``
    (name), ``task``, ``kind`` (``checkpoint`` or ``state``), ``best_epoch``, ``finished``
    (whether a state's run had ended; None for a checkpoint), ``max_len`` (the history
    length the model reads), ``model_options`` and ``train`` (the run's options).
    """
    path = Path(path)
    saved = _read_saved(path)
    _check_saved_split(path, saved, split)
    model = _restore_model(path, saved, split, device)
    model.eval()
    info = {key: saved[key] for key in ("model", "task", "kind", "best_epoch", "finished", "model_options", "train")}
    return model, {**info, "max_len": model_max_len(model)}


def evaluate_saved(path: str | Path, split: SplitData, *, protocols: list[str] | None = None,
                   negatives_file: str | None = None, stages: tuple[str, ...] = ("valid", "test"),
                   skip_unfinished: bool = False, device: str | torch.device = "cpu", topk=None) -> dict[str, Any]:
    """Score the model saved at ``path`` again on ``split``, without training (on
    ``device``; the metrics do not depend on it beyond float rounding).

    ``path`` is a ``checkpoint`` file (the best weights) or a ``resume`` training state (its
    best weights are used). ``protocols`` (next item only) default to the run's own
    (``protocol`` plus ``also_test``). Sampled protocols use the run's ``eval_seed`` and
    ``eval_batch_size``; ``negatives_file`` gives fixed negatives instead, ``""`` asks for
    uniform draws, and ``None`` (default) means the run's own choice: a checkpoint names its
    file, a training state only its digest, so for a state trained with one the file must be
    passed. Returns ``model``, ``task``, ``best_epoch``, ``finished`` (whether a training
    state's run had ended; None for a checkpoint), ``population`` (who is evaluated, see
    :func:`~fedrec.data.batching.evaluation_population`) and ``by_protocol``:
    ``{protocol: {stage: metrics}}`` (CTR: one entry, ``pooled``). With ``skip_unfinished``,
    a state whose run has not ended returns without ``by_protocol`` (nothing is scored).
    ``topk`` (a K list, :func:`~fedrec.metrics.parse_topk`) defaults to the run's own
    (``[5, 10, 20]`` for files written before the option existed); the result records it.
    """
    path = Path(path)
    saved = _read_saved(path)
    model_name, task, train_opts = saved["model"], saved["task"], saved["train"]
    result = {"model": model_name, "task": task, "best_epoch": saved["best_epoch"], "finished": saved["finished"]}
    if skip_unfinished and saved["finished"] is False:
        return result
    _check_saved_split(path, saved, split)
    for stage in stages:
        if stage not in ("valid", "test"):
            raise ConfigError(f"stage must be valid or test (got {stage!r})")
    defaults = TrainConfig()
    try:
        ks = parse_topk(train_opts.get("topk", defaults.topk) if topk is None else topk)
    except ValueError as exc:
        raise ConfigError(f"topk: {exc}") from None
    if task == "ctr":
        if protocols:
            raise ConfigError(f"{path}: a CTR model is scored on pooled impressions; ranking protocols do not apply")
        if topk is not None:
            raise ConfigError(f"{path}: a CTR model is scored on pooled impressions; --topk does not apply")
        protocols = ["pooled"]
    elif protocols is None:
        extra = [p.strip() for p in train_opts.get("also_test", "").split(",") if p.strip()]
        protocols = list(dict.fromkeys([train_opts.get("protocol", defaults.protocol), *extra]))
    for name in protocols:
        if task != "ctr" and name not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {name!r})")
    if negatives_file is None:  # the run's own
        negatives_file = train_opts.get("negatives_file", "") or ""
        if negatives_file.startswith("sha256:") or (negatives_file and not Path(negatives_file).exists()):
            raise ConfigError(f"{path}: the run ranked against a negatives file ({negatives_file}); "
                              "pass it with --negatives-file, or --negatives-file '' for uniform draws")
    model = _restore_model(path, saved, split, device)
    max_len = getattr(model, "eval_max_len", model_max_len(model))
    examples = {stage: build_examples(split, task=task, stage=stage, max_len=max_len) for stage in stages}
    fixed = _fixed_negatives(negatives_file, split, task, protocols, list(examples.values())) if negatives_file else None
    eval_seed = train_opts.get("eval_seed", defaults.eval_seed)
    batch_size = train_opts.get("eval_batch_size", defaults.eval_batch_size)
    result["by_protocol"] = {
        name: {stage: evaluate(model, ex, task=task, protocol="full" if name == "pooled" else name,
                               batch_size=batch_size, eval_seed=eval_seed,
                               negatives=fixed if name.startswith("sampled-") else None, topk=ks)
               for stage, ex in examples.items()} for name in protocols}
    return {**result, "population": evaluation_population(split, task, examples), "eval_seed": eval_seed,
            "negatives_file": negatives_file, "topk": list(ks)}


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="epoch", disable=not enabled, leave=False)
