"""Federated cross-domain UniCDR: each client is a domain and holds only its own data.

The model is :mod:`fedrec.models.unicdr` (Cao et al., WSDM 2023). A client is one domain (a
business line or partner platform: cross-silo, many users per client), so this algorithm
trains like a silo, not like the one-client-per-user engine of
:mod:`fedrec.federated.algorithm`: every round each client takes ``local-steps`` epochs over
its own training examples in minibatches of ``batch-size`` with a fresh Adam (``lr``,
``weight-decay``), and uploads what it shares. It implements the same interface
(``initial_global`` / ``initial_local`` / ``client_update`` / ``aggregate`` /
``client_evaluate``), so the Flower apps in ``clients/`` and ``server/`` run it unchanged.

What travels (parameter roles):

=========================  =======================  ==============================================
parameter                   role                     aggregation
=========================  =======================  ==============================================
``user_shared.weight``      ``aligned``              row by row over the domains holding the user,
                                                     weighted by the user's training interactions
                                                     in each domain; a client sends only the rows
                                                     of common users it trained this round
``agg_shared.*``            ``public``               weighted by each domain's training examples
everything else             ``private``              never leaves its domain: the item table, the
                                                     domain's user table, aggregator and
                                                     discriminator
=========================  =======================  ==============================================

The shared aggregator reads the client's **own** context (model option ``shared-context =
own``, the federated variant: a domain never sees another domain's interactions; ``other``
is refused), so
knowledge crosses domains only through the common users' shared rows and the shared
aggregator. Rows of users only one domain holds stay private to it.

Common users are found by a private set intersection before the first round
(:mod:`fedrec.federated.psi`): each domain learns which of its users the other holds, the
server only the set sizes and the size of the intersection. The shared table's rows are the
common users in the order of their doubly blinded ids, the same on both sides and not
linkable to users by the server. What the server does learn per shared row (a pseudonym):
each round, which domains sent it and with what weight (the user's training interactions in
that domain). Cold-start users of a domain (no training interaction there) are scored with
the shared row learned in the other domain.

Structures (model option ``structure``): ``unicdr`` (the default); ``pooled`` — one user
table and one aggregator for every domain, each domain training them on its own context,
the user table aligned and the aggregator averaged: **FedAvg of the single-domain model
across domains** (centrally, ``pooled`` reads the union of both domains' contexts); and
``single`` — everything private: each domain alone, no federation.

The one-user engine's ``weighting`` and ``chunk-size`` do not apply here: the shared
aggregator is always weighted by each domain's training examples, and a domain trains in
minibatches of ``batch-size``.

Differential privacy of the uploads (``noise-multiplier`` or ``target-epsilon``, with
``max-grad-norm`` and ``delta`` as on the MRFF path, :class:`~fedrec.federated.privacy.UserLevelDP`):
each round, a domain clips every shared row it sends, *per row*, to a change of at most
``max-grad-norm`` from the row's global value (in pseudo-gradient units, change / ``lr``),
clips the shared aggregator's change, as one vector, the same way, and adds Gaussian noise
``lr * noise-multiplier * max-grad-norm`` to every coordinate of both. The accountant
(Opacus RDP or PRV, sampling rate 1) counts two releases per round, and ``target-epsilon``
is calibrated for ``2 * rounds`` of them. **What the guarantee says, exactly** (``privacy.kind``
= row level): for one common user, the sequence of released values of *that user's shared
row*, and of the domain's shared aggregator, is (epsilon, delta)-DP with respect to that
row's change being present or not (the row staying at its global value), and to the whole
domain's aggregator change being present or not. It is **not** user-level DP of the whole
upload: a user's interactions also move the domain's private item table, which every other
user's row is trained against, so each other released row moves by up to its clipping
bound too, and over all rows those contributions compose. What stays unprotected: which
rows a domain sends and their weights (the users' interaction counts), as without DP.
Training losses are not reported under DP. A user-level guarantee needs per-user clipping of
every step of the domain's local training (DP-SGD over the item table): not built.

Not supported, each refused with a one-line error: secure aggregation and central DP (SecAgg+
needs fixed-length vectors, and the rows a domain sends depend on its users), more than two
domains (the intersection is pairwise), ``fraction`` < 1, and an optimizer other than Adam.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedrec.data.batching import ExampleSet, build_examples, iterate_batches
from fedrec.data.samplers import UniformNegativeSampler
from fedrec.data.split import SplitData
from fedrec.errors import ConfigError
from fedrec.federated.algorithm import LocalState, Params, Shard, Upload, aggregate_uploads
from fedrec.federated.config import FederatedConfig
from fedrec.federated.evaluation import combine_ranking
from fedrec.federated.layout import Layout
from fedrec.federated.privacy import UserLevelDP, privacy_from_config
from fedrec.models.base import ALIGNED, PRIVATE, PUBLIC, ModelData, ParamRole
from fedrec.device import resolve_device, to_device
from fedrec.models.registry import create_model

__all__ = ["FedUniCDR", "domain_ranking_summary"]

_SHARED_TABLES = ("user_shared.weight",)
_ALIGN_KEY = "align.rows"


def domain_ranking_summary(ranks: np.ndarray, domains: np.ndarray, names: list[str], cold: np.ndarray,
                           ks=(5, 10, 20), *, like_ranks: np.ndarray | None = None,
                           liked: np.ndarray | None = None) -> dict[str, float | int]:
    """One client's summary of cross-domain ranks: per domain (``NAME/``) and per domain's
    cold-start examples (``NAME/cold/``) the sums of HR@K, NDCG@K and reciprocal rank and
    the count ``n`` (pooled by :func:`fedrec.federated.evaluation.combine_ranking`); with
    ``like_ranks`` and ``liked`` (data with ratings), ``NAME/like/`` over the liked examples."""
    from fedrec.federated.evaluation import ranking_summary

    out: dict[str, float | int] = {"n": int(len(ranks))}
    for k, name in enumerate(names):
        sel = domains == k
        if not sel.any():
            continue
        out.update({f"{name}/{key}": v for key, v in ranking_summary(ranks[sel], ks).items()})
        if (sel & cold).any():
            out.update({f"{name}/cold/{key}": v for key, v in ranking_summary(ranks[sel & cold], ks).items()})
        if like_ranks is not None and (sel & liked).any():
            out.update({f"{name}/like/{key}": v for key, v in ranking_summary(like_ranks[sel & liked], ks).items()})
    return out


@dataclass
class _Shard(Shard):
    """A domain client's examples: training contexts of ``max_len``, evaluation ones of
    ``eval_len``."""

    eval_len: int = 50


class FedUniCDR:
    """Federated UniCDR, one client per domain (see the module docstring)."""

    name = "unicdr"
    default_model = "unicdr"
    #: what the transport cannot carry for this algorithm (checked on the run spec, before
    #: any node is contacted): the rows a domain sends depend on its users
    unsupported_transport = ("secure-aggregation", "central-dp")

    def __init__(self, split: SplitData, *, task: str, model: str | None = None,
                 model_options: dict[str, Any] | None = None, config: FederatedConfig | None = None) -> None:
        if task != "cdr":
            raise ConfigError(f"algorithm 'unicdr' trains the cdr task (got task {task!r}; use --task cdr)")
        self.split, self.task = split, task
        self.config = cfg = config or FederatedConfig()
        self.model_name = model or self.default_model
        if self.model_name != "unicdr":
            raise ConfigError(f"algorithm 'unicdr' trains the 'unicdr' model (got model '{self.model_name}')")
        if not split.domains:
            raise ConfigError("algorithm 'unicdr' needs multi-domain data (e.g. cdr:DIR)")
        if len(split.domains) != 2:
            raise ConfigError(f"algorithm 'unicdr': the user intersection is pairwise, so two domains are supported "
                              f"(the data has {len(split.domains)}: {', '.join(split.domains)})")
        if cfg.fraction < 1.0:
            raise ConfigError("algorithm 'unicdr': every domain trains every round (fraction must be 1)")
        if cfg.item_aggregation == "touched":
            raise ConfigError("algorithm 'unicdr': each domain keeps its own item table (nothing item-indexed is "
                              f"averaged), so item-aggregation {cfg.item_aggregation!r} does not apply (use 'all' or 'auto')")
        if cfg.optimizer != "adam":
            raise ConfigError("algorithm 'unicdr': each domain trains with Adam (sparse tables: SparseAdam); "
                              f"optimizer {cfg.optimizer!r} is not supported")
        self.model_options = self.check_options(dict(model_options or {}))
        data = ModelData.from_split(split)
        torch.manual_seed(cfg.seed)
        self.model = create_model(self.model_name, data, self.model_options, task=task)
        self._canonical_init(data)
        self.layout = Layout.from_roles(self.model, self.roles(self.model))
        self.max_len = self.model.cfg.max_len
        self.eval_len = self.model.cfg.eval_len
        self.model.prepare(split)
        self._rows: np.ndarray | None = None  # shared row of every local user (0: not common)
        self.privacy = self._make_privacy()

    #: what the DP guarantee protects (the result JSON's ``privacy.kind``)
    dp_kind = "local (row level: each shared row, and each domain's shared aggregator)"
    dp_neighbouring = ("zero-out one shared row's clipped change, or one domain aggregator's (which rows a domain "
                       "sends, and their weights, are public)")
    #: Gaussian releases per round under DP: each shared row and the shared aggregator
    RELEASES_PER_ROUND = 2

    def _make_privacy(self) -> UserLevelDP | None:
        """The clipping, noise and accounting of the shared rows and the shared aggregator
        (None without DP; see the module docstring): calibrated, when ``target_epsilon`` is
        given, for :attr:`RELEASES_PER_ROUND` releases per round."""
        return privacy_from_config(self.config, releases_per_round=self.RELEASES_PER_ROUND)

    # -- options and roles ----------------------------------------------------------------
    @property
    def needs_alignment(self) -> bool:
        """Whether the server runs a private set intersection of the nodes' users before the
        first round: when some table is aligned (``unicdr`` and ``pooled``; not ``single``)."""
        return bool(self.layout.aligned)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The federated variant reads its own domain's context through the shared
        aggregator (``shared-context = own``, set when not given); ``other`` needs another
        domain's rows and is refused."""
        norm = {k.replace("_", "-"): v for k, v in options.items()}
        if str(norm.get("shared-context", "own")) != "own":
            raise ConfigError("algorithm 'unicdr': model option 'shared-context' must be 'own' (a domain cannot read "
                              "another domain's interactions)")
        return {**options, "shared-context": "own"} if "shared-context" not in norm else options

    def roles(self, model) -> dict[str, ParamRole]:
        """``unicdr``: ``user_shared`` aligned, ``agg_shared`` public, the rest private;
        ``pooled``: the one user table aligned and the one aggregator public (FedAvg of
        the single-domain model); ``single``: everything private (no federation)."""
        structure = model.cfg.structure
        out = {}
        for name, _ in model.named_parameters():
            if (structure == "unicdr" and name in _SHARED_TABLES) or (structure == "pooled" and name == "user_spec.0.weight"):
                out[name] = ALIGNED
            elif (structure == "unicdr" and name.startswith("agg_shared.")) or (structure == "pooled"
                                                                                and name.startswith("agg.")):
                out[name] = PUBLIC
            else:
                out[name] = PRIVATE
        return out

    def _canonical_init(self, data: ModelData) -> None:
        """The parameters that travel start the same on every node, whatever its users: they
        come from the seeded model built for one user (as in the one-user engine)."""
        import dataclasses

        torch.manual_seed(self.config.seed)
        one = create_model(self.model_name, dataclasses.replace(data, n_users=1), self.model_options, task=self.task)
        ref = dict(one.named_parameters())
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if p.shape == ref[n].shape:
                    p.copy_(ref[n])

    # -- alignment ------------------------------------------------------------------------
    def raw_users(self) -> np.ndarray:
        """This client's users' raw ids (local user ``u`` is entry ``u - 1``): its input
        to the private set intersection."""
        return np.asarray(self.split.user_raw[1:], dtype=np.int64)

    def set_alignment(self, rows: np.ndarray) -> None:
        """The shared row of each local user (``(n_users,)``, 0 for users the other domain
        does not hold), from the private set intersection."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.shape != (self.split.n_users,):
            raise ConfigError(f"alignment: expected one row per user ({self.split.n_users}), got {rows.shape[0]}")
        self._rows = np.concatenate([[0], rows])

    @property
    def n_shared(self) -> int:
        """Rows of the shared table (the common users)."""
        self._require_alignment()
        return int(self._rows.max()) if len(self._rows) else 0

    def _require_alignment(self) -> None:
        if self._rows is None and not self.layout.aligned:  # nothing shared row-wise: no alignment
            self._rows = np.zeros(self.split.n_users + 1, dtype=np.int64)
        if self._rows is None:
            raise ConfigError("algorithm 'unicdr': the users common to the domains are not known yet (the server "
                              "runs the private set intersection before the first round)")

    # -- state ----------------------------------------------------------------------------
    def initial_global(self) -> Params:
        """Shared aggregator and the shared rows of the common users (row 0: padding)."""
        self._require_alignment()
        params = dict(self.model.named_parameters())
        out = {n: params[n].detach().clone() for n in self.layout.shared}
        common = np.flatnonzero(self._rows > 0)
        raw = self.split.user_raw[common]
        for k, n in enumerate(self.layout.aligned):
            # the same on every node (whichever the server asks) and whatever the numbering (fresh
            # keys number the rows anew each run): each common user's row is drawn from the seed
            # and the user's id, which both nodes hold, as the model draws its rows (N(0, 1/dim))
            table = params[n].detach()
            dim = int(np.prod(table.shape[1:]))
            g = torch.zeros((self.n_shared + 1,) + tuple(table.shape[1:]), dtype=table.dtype)
            values = np.stack([np.random.default_rng([self.config.seed, k, int(r) % 2**63]).standard_normal(dim)
                               for r in raw]) if len(raw) else np.zeros((0, dim))
            g[torch.from_numpy(self._rows[common])] = torch.from_numpy(
                values * dim**-0.5).to(table.dtype).view((-1,) + tuple(table.shape[1:]))
            out[n] = g
        return out

    def initial_group_counts(self) -> torch.Tensor:
        """No groups: an empty ``(0, 0)`` tensor."""
        return torch.zeros(0, 0, dtype=torch.float64)

    def initial_local(self, users: np.ndarray) -> LocalState:
        """The domain's private parameters (whole tables: the rows of users the other
        domain does not hold never leave) and its alignment."""
        self._require_alignment()
        users = np.unique(np.asarray(users, dtype=np.int64))
        tensors = {n: p.detach().clone() for n, p in self.model.named_parameters() if n not in self.layout.shared}
        tensors[_ALIGN_KEY] = torch.from_numpy(self._rows.copy())
        return LocalState(users, tensors)

    def make_shard(self, users: np.ndarray) -> Shard:
        """The client's examples (its whole domain: ``users`` are all its users)."""
        users = np.unique(np.asarray(users, dtype=np.int64))
        stages = {}
        for stage, width in (("train", self.max_len), ("valid", self.eval_len), ("test", self.eval_len)):
            full = self.split.cached(("examples", "cdr", stage, width),
                                     lambda stage=stage, width=width: build_examples(self.split, task="cdr",
                                                                                      stage=stage, max_len=width))
            stages[stage] = full.subset(users)
        # random draws keyed on the shard's first user and its domain (two domains holding the
        # same users must not draw the same negatives and dropout masks)
        first = int(self.split.user_raw[users[0]]) if users.size else 0
        key = (first * 1_000_003 + 7919 * (self.domain + 1)) % 2**62
        return _Shard(users, stages["train"], stages["valid"], stages["test"], {}, key, self.eval_len)

    # -- training -------------------------------------------------------------------------
    def _working_model(self, global_params: Params, state: LocalState):
        """The domain's model: its private tensors, the global shared parameters, and the
        global rows of its common users written into its shared table."""
        rows = state.tensors.get(_ALIGN_KEY)
        if rows is None:
            raise ConfigError("algorithm 'unicdr': the client's state has no alignment (the state of another algorithm?)")
        rows = rows.numpy() if torch.is_tensor(rows) else np.asarray(rows)
        self._rows = rows
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.layout.shared:
                    p.copy_(global_params[n])
                else:
                    p.copy_(state.tensors[n])
            common = np.flatnonzero(rows > 0)
            for n in self.layout.aligned:
                p = model.get_parameter(n)
                g = global_params[n]
                if g.shape[0] != int(rows.max()) + 1:
                    raise ConfigError(f"algorithm 'unicdr': the global {n} has {g.shape[0] - 1} rows, this client's "
                                      f"alignment {int(rows.max())}")
                p[torch.from_numpy(common)] = g[torch.from_numpy(rows[common])].to(p.dtype)
        return model, rows

    def client_update(self, global_params: Params, state: LocalState, shard: Shard, *, round: int,
                      group_counts: torch.Tensor | None = None) -> tuple[Upload, LocalState, dict[str, float]]:
        """``local-steps`` epochs over the domain's training examples; the upload holds the
        shared aggregator (times the domain's examples) and, for every common user trained,
        its shared rows times its training interactions in the domain."""
        from fedrec.train import TrainConfig, _optimizers, train_epoch

        cfg = self.config
        model, rows = self._working_model(global_params, state)
        device = resolve_device(cfg.device)
        model.to(device)
        model.train()
        opts = _optimizers(model, TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size))
        seed = (cfg.seed * 1_000_003 + round * 7919 + shard.key) % 2**63
        torch.manual_seed(seed)
        sampler = UniformNegativeSampler.for_training(self.split, seed=seed)
        losses = []
        n_examples = len(shard.train)
        for epoch in range(cfg.local_steps):
            losses += train_epoch(model, opts, (to_device(b, device) for b in iterate_batches(
                shard.train, batch_size=cfg.batch_size, shuffle=True, seed=seed + epoch, num_negatives=cfg.negatives,
                sampler=sampler)))
        model.cpu()  # what is uploaded and kept stays on the CPU
        params = dict(model.named_parameters())
        weight = float(n_examples)
        # common users trained this round, weighted by their training interactions here
        counts = np.bincount(shard.train.users, minlength=self.split.n_users + 1)
        sent = np.flatnonzero((rows > 0) & (counts > 0))
        shared = {n: params[n].detach().to(torch.float64).clone() for n in self.layout.shared}
        values = {n: params[n].detach()[torch.from_numpy(sent)].to(torch.float64) for n in self.layout.aligned}
        privacy = None
        if self.privacy is not None:
            privacy = self._privatise(shared, values, global_params, rows[sent], state.privacy, round=round, key=shard.key)
        sums = {n: v * weight for n, v in shared.items()}
        upload_rows = {}
        for n in self.layout.aligned:
            w = torch.from_numpy(counts[sent].astype(np.float64))
            sums[n] = values[n] * w.view((-1,) + (1,) * (values[n].dim() - 1))
            upload_rows[n] = (torch.from_numpy(rows[sent]), w)
        new_state = LocalState(state.users, {**{n: p.detach().clone() for n, p in params.items()
                                                 if n not in self.layout.shared},
                                             _ALIGN_KEY: torch.from_numpy(rows.copy())},
                               raw_users=state.raw_users)
        users = int((counts > 0).sum())
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        metrics = {"loss": mean_loss, "users": float(users), "rows-sent": float(len(sent))}
        if privacy is not None:
            new_state.privacy, report = privacy
            mean_loss = float("nan")  # data-dependent: not reported under DP
            metrics = {"users": float(users), "rows-sent": float(len(sent)), **report}
        upload = Upload(sums, weight, torch.zeros(0, 0, dtype=torch.float64), users, n_examples,
                        mean_loss * users, privacy=privacy[1] if privacy is not None else None, rows=upload_rows)
        return upload, new_state, metrics

    def _privatise(self, shared: Params, values: Params, global_params: Params, global_rows: np.ndarray,
                   history: torch.Tensor, *, round: int, key: int):
        """Clip and noise, in place, what a domain uploads (see the module docstring): each
        sent shared row's change from its global value, per row, and the shared aggregator's
        change, as one vector; two Gaussian releases per round in the accountant. Returns
        the new accountant history and the privacy report."""
        dp = self.privacy
        gen = dp.generator(seed=self.config.seed, round=round, shard_key=key)
        idx = torch.from_numpy(np.asarray(global_rows, dtype=np.int64))
        for n, v in values.items():  # (R, ...): one user per row, clipped on its own
            dp.clip_({n: v}, {n: global_params[n][idx].to(v.dtype)}, {n: None})
            dp.add_noise(values, [n], gen)
        if shared:  # the aggregator: one vector for the whole domain
            batch = {n: v.unsqueeze(0) for n, v in shared.items()}
            dp.clip_(batch, {n: global_params[n].to(torch.float64).unsqueeze(0) for n in shared}, {n: None for n in shared})
            dp.add_noise(shared, list(shared), gen)
        for _ in range(self.RELEASES_PER_ROUND):
            history = dp.step(history)
        report = {"epsilon": dp.epsilon(history), "noise-multiplier": dp.noise_multiplier, "delta": dp.delta}
        return history, report

    def aggregate(self, global_params: Params, uploads: list[Upload]) -> tuple[Params, torch.Tensor, dict[str, float]]:
        """Role-aware aggregation (:func:`~fedrec.federated.algorithm.aggregate_uploads`)."""
        return aggregate_uploads(self.layout, global_params, uploads)

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def _ranks(self, model, examples: ExampleSet) -> dict[str, np.ndarray]:
        """Ranks per behaviour (``main``; also ``like`` on data with ratings)."""
        from fedrec.train import _ranks

        from fedrec.train import cdr_behaviours

        return _ranks(model, examples, protocol=self.config.protocol, batch_size=512,
                      eval_seed=self.config.eval_seed, behaviours=cdr_behaviours(examples.split))

    def client_evaluate(self, global_params: Params, state: LocalState, shard: Shard, *, stage: str,
                        group_counts: torch.Tensor | None = None) -> dict[str, Any]:
        """The domain's ranking summary for ``stage``, per domain and for its cold-start
        users (see :func:`domain_ranking_summary`)."""
        from fedrec.train import cold_start_mask, liked_mask

        if stage not in ("valid", "test"):
            raise ConfigError(f"stage must be valid or test (got {stage!r})")
        examples = getattr(shard, stage)
        if len(examples) == 0:
            return {"n": 0}
        model, _ = self._working_model(global_params, state)
        model.to(resolve_device(self.config.device)).eval()
        ranks = self._ranks(model, examples)
        return domain_ranking_summary(ranks["main"], examples.domains, list(self.split.domains),
                                      cold_start_mask(examples), self.config.topk, like_ranks=ranks.get("like"),
                                      liked=liked_mask(examples))

    def score_items(self, global_params: Params, state: LocalState, users: np.ndarray, *,
                    group_counts: torch.Tensor | None = None) -> torch.Tensor:
        """``(len(users), n_items + 1)`` scores of the items of the client's domain after each
        user's training items there (other domains' items get ``-inf``; for ``fedrec
        recommend``)."""
        from fedrec.recommend import cdr_batch

        model, _ = self._working_model(global_params, state)
        device = resolve_device(self.config.device)
        model.to(device).eval()
        with torch.no_grad():
            batch = to_device(cdr_batch(self.split, users, self.domain, eval_len=self.eval_len), device)
            return model.score_all(batch).cpu()

    @property
    def domain(self) -> int:
        """The index of this client's domain (the domain of its rows)."""
        doms = np.unique(self.split.seq_domain)
        if len(doms) != 1:
            raise ConfigError(f"algorithm 'unicdr': a client holds one domain (this one has {len(doms)})")
        return int(doms[0])

    def combine(self, summaries: list[dict[str, Any]]) -> dict[str, float | None]:
        """Pooled metrics from the clients' summaries."""
        return combine_ranking(summaries)
