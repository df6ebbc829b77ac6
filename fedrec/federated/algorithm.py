"""The federated algorithm interface and its vectorised implementation.

An :class:`Algorithm` is transport-free: the Flower apps in ``clients/`` and ``server/`` (or
any other transport) only move its inputs and outputs.

* :meth:`Algorithm.initial_global` — the server's starting parameters (public + groups).
* :meth:`Algorithm.initial_local` — a client's private state for its users.
* :meth:`Algorithm.client_update` ``(global, local_state, shard, round, group_share) ->
  (upload, local_state, metrics)`` — every participating user of the shard starts from the
  global parameters plus its own private ones, takes ``local_steps`` steps on its own
  training sequence, and contributes to the upload: a **weighted sum** of its public
  parameters, and for each group it was routed to, that group's parameters (with counts).
* :meth:`Algorithm.aggregate` ``(global, uploads) -> (global, group_counts, metrics)`` —
  public = sum / weight; each group = sum over its members / members (unchanged when nobody
  chose it). The per-layer group counts go back to clients as the next round's share ``f``
  in the balance loss.
* :meth:`Algorithm.client_evaluate` — summaries (:mod:`fedrec.federated.evaluation`) of
  the shard's users' predictions on the valid or test stage, each user with its own model.

**Vectorised shards.** A shard of N users is processed as a batch, with the semantics of N
one-user clients kept exactly (up to random draws: dropout masks and next-item negatives are
drawn per shard and chunk, so with dropout the result depends on the sharding and
``chunk_size``, as it would on real devices; without dropout it does not): every user gets its own copy of the trained parameters as a
row of a stacked ``(N, ...)`` tensor, gradients come from ``torch.func.vmap`` over users
(one user per slice, so nothing — batch statistics, balance loss, optimiser state — mixes
users), and the optimiser is applied elementwise to the stacked tensors. Per-user private
tables are sliced to the shard's rows; inside the vmap each user sees a two-row table
``[padding, its own row]``. :mod:`fedrec.federated.reference` is the one-user-at-a-time loop
this is tested against.

**Compact item tables.** A user's training example reads only a few rows of the item tables
(its history, targets and negatives; through them, a few codes of each attribute-field
table). When the model says so (:meth:`~fedrec.models.base.RecModel.item_tables`) and those
tables are public, each user's copy holds only those rows: item indices are renumbered per
user, the model looks its local indices up through ``batch["item_maps"]``, and the upload
adds each user's change row by row (``index_add``) to ``weight * global``. Rows a user does
not read get no gradient, so plain SGD and Adam leave them exactly unchanged: the result is
the one of full copies (tested), but memory and time no longer grow with ``chunk_size x
catalogue``. A next-item loss with full cross-entropy reads every row; it trains full copies.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedrec.data.batching import ExampleSet, build_examples, iterate_batches, target_groups
from fedrec.data.samplers import UniformNegativeSampler
from fedrec.data.split import SplitData
from fedrec.errors import ConfigError
from fedrec.federated.config import FederatedConfig
from fedrec.federated.evaluation import combine_ctr, combine_ranking, ctr_summary, topk_summary
from fedrec.federated.layout import Layout
from fedrec.federated.privacy import UserLevelDP, privacy_from_config
from fedrec.device import resolve_device, to_cpu, to_device
from fedrec.metrics import full_ranking_ranks, sampled_ranking_ranks, top_k_items
from fedrec.models.base import ModelData, ParamRole, RecModel
from fedrec.models.layers import MaskDropout, SelfAttention
from fedrec.models.registry import create_model

__all__ = ["Algorithm", "Shard", "LocalState", "Upload", "participants", "make_shard", "aggregate_uploads"]

Params = dict[str, torch.Tensor]
_ADAM = (0.9, 0.999, 1e-8)  # torch.optim.Adam defaults


# -- shards and state --------------------------------------------------------------------
@dataclass
class Shard:
    """One client's users (global user indices, sorted) and their examples per stage."""

    users: np.ndarray
    train: ExampleSet
    valid: ExampleSet
    test: ExampleSet
    #: sampled-ranking candidates per stage, drawn on the algorithm's whole split (a node's
    #: own split in a federation; on one split of all users, identical to the centralised
    #: evaluation's), rows aligned with the stage's examples
    candidates: dict[str, np.ndarray] = field(default_factory=dict)
    #: what the shard's random draws (dropout, negatives, DP noise) are keyed on besides the
    #: seed and round: the raw id of its first user, a fact of the shard alone (so a node
    #: holding only these users draws the same as a simulation of them)
    key: int = 0


def make_shard(split: SplitData, users: np.ndarray, *, task: str, max_len: int, protocol: str = "full",
               eval_seed: int = 2024) -> Shard:
    """The shard of ``users`` (global indices): their train/valid/test examples."""
    users = np.unique(np.asarray(users, dtype=np.int64))
    if users.size and (users.min() < 1 or users.max() > split.n_users):
        raise ConfigError(f"shard users must be in 1..{split.n_users} (got {users.min()}..{users.max()})")
    stages = {}
    candidates = {}
    for stage in ("train", "valid", "test"):
        full = split.cached(("examples", task, stage, max_len), lambda stage=stage: build_examples(
            split, task=task, stage=stage, max_len=max_len))
        keep = np.isin(full.users, users)
        stages[stage] = full if keep.all() else full.subset(users)  # a shard of every user: no second copy
        if stage != "train" and task == "next_item" and protocol.startswith("sampled"):
            n = int(protocol.split("-")[1])
            all_cands = split.cached(("candidates", task, stage, max_len, n, eval_seed),
                                     lambda full=full, n=n: full.candidates(n, seed=eval_seed))
            candidates[stage] = all_cands[keep]
    key = int(split.user_raw[users[0]]) % 2**62 if users.size else 0
    return Shard(users, stages["train"], stages["valid"], stages["test"], candidates, key)


_M64 = 0xFFFFFFFFFFFFFFFF


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (a well-mixed hash, vectorised)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def participants(raw_users: np.ndarray, *, seed: int, round: int, fraction: float) -> np.ndarray:
    """Boolean mask of the users (given by **raw** id) taking part in ``round``: a hash of
    (seed, round, raw id), so a user's draw is the same whichever node holds it, in any
    runtime, and no node needs to know the other nodes' users."""
    raw_users = np.asarray(raw_users, dtype=np.int64)
    if fraction >= 1.0:
        return np.ones(raw_users.shape, dtype=bool)
    # one 64-bit key per (seed, round), mixed with each raw id (two's complement for negatives)
    key = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 + round * 0xBF58476D1CE4E5B9 + 7) & _M64], dtype=np.uint64))
    h = _mix64(raw_users.view(np.uint64) ^ key)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53) < fraction


@dataclass
class LocalState:
    """A client's private state: per-user private tensors stacked over its ``users``, and
    (with differential privacy) the accountant's history ``(k, 3)``: rows ``noise
    multiplier, sampling rate, steps`` as Opacus's accountants keep them."""

    users: np.ndarray
    tensors: Params
    privacy: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.float64))
    #: the users' raw ids (set by a node, so a saved state can be checked against its data)
    raw_users: np.ndarray | None = None
    #: ``(len(users), layers)`` group each user was routed to in its last round (-1: none
    #: yet), to report how many users change group between rounds
    routes: np.ndarray | None = None

    def state_dict(self) -> dict[str, Any]:
        """Plain dict (tensors, the user array and the accountant history)."""
        out = {"users": torch.from_numpy(self.users.copy()), **{f"p.{k}": v for k, v in self.tensors.items()}}
        if self.privacy.numel():
            out["dp.history"] = self.privacy.clone()
        if self.raw_users is not None:
            out["raw_users"] = torch.from_numpy(np.asarray(self.raw_users, dtype=np.int64).copy())
        if self.routes is not None:
            out["routes"] = torch.from_numpy(np.asarray(self.routes, dtype=np.int64).copy())
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "LocalState":
        """Inverse of :meth:`state_dict`."""
        users = np.asarray(state["users"].numpy() if torch.is_tensor(state["users"]) else state["users"], dtype=np.int64)
        out = cls(users, {k[2:]: torch.as_tensor(v) for k, v in state.items() if k.startswith("p.")})
        if "dp.history" in state:
            out.privacy = torch.as_tensor(state["dp.history"], dtype=torch.float64).reshape(-1, 3)
        if "raw_users" in state:
            raw = state["raw_users"]
            out.raw_users = np.asarray(raw.numpy() if torch.is_tensor(raw) else raw, dtype=np.int64)
        if "routes" in state:
            routes = state["routes"]
            out.routes = np.asarray(routes.numpy() if torch.is_tensor(routes) else routes, dtype=np.int64)
        return out


@dataclass
class Upload:
    """What one client sends after training (sums over its participating users).

    ``sums``: per shared name, the ``weight``-weighted sum of its users' parameters; per
    group name, the sum over the users routed to that group. ``group_counts`` ``(layers,
    G)``: users per group; ``group_changed`` ``(layers,)``: users whose group (first of
    top-k) differs from their previous round's, out of ``routed_before`` users that had one. ``users``/``examples``: participating users and their target
    positions; ``loss_sum``: sum over users of their first-step loss (NaN under differential
    privacy); ``privacy``: under differential privacy, the client's ``epsilon`` spent so far,
    its ``noise-multiplier`` and ``delta`` (None without DP).
    """

    sums: Params
    weight: float
    group_counts: torch.Tensor
    users: int
    examples: int
    loss_sum: float
    privacy: dict[str, float] | None = None
    group_changed: torch.Tensor | None = None
    routed_before: int = 0
    #: aligned tables (see :class:`~fedrec.federated.layout.Layout`): name -> ``(rows,
    #: weights)``, the rows sent (int64) and their weights (float64); ``sums[name]`` then
    #: holds ``weight * row`` for those rows only, ``(len(rows), ...)``
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    #: ``item-aggregation = touched``: per compact public item table, ``(n_rows,)`` float64,
    #: the total weight of the users whose local update read each row (``sums`` unchanged:
    #: ``weight * global`` plus the users' changes); the server averages each read row's
    #: change over these weights
    touched: dict[str, torch.Tensor] | None = None


# -- the algorithm -----------------------------------------------------------------------
class Algorithm:
    """Federated training of one model (see the module docstring).

    Parameters
    ----------
    split:
        The data (each client uses only its shard's rows of it).
    task:
        ``ctr`` or ``next_item``.
    model, model_options:
        Registered model name and its options.
    config:
        :class:`FederatedConfig`.
    """

    name = "base"
    default_model = "mrff"

    def __init__(self, split: SplitData, *, task: str, model: str | None = None,
                 model_options: dict[str, Any] | None = None, config: FederatedConfig | None = None) -> None:
        self.split, self.task = split, task
        self.config = config or FederatedConfig()
        self.model_name = model or self.default_model
        self.model_options = self.check_options(dict(model_options or {}))
        data = ModelData.from_split(split)
        torch.manual_seed(self.config.seed)
        self.model: RecModel = create_model(self.model_name, data, self.model_options, task=task)
        if not getattr(self.model, "trainable", True):
            raise ConfigError(f"model '{self.model_name}' has no trainable parameters to federate")
        self.layout = Layout.from_roles(self.model, self.roles(self.model))
        self._canonical_init(data)
        self.max_len = self.model.cfg.max_len
        # the working copy for torch.func: dense embedding gradients, vmap-safe loss
        self.template = copy.deepcopy(self.model)
        _swap_dropout(self.template)
        for m in self.template.modules():
            if isinstance(m, nn.Embedding):
                m.sparse = False
            if isinstance(m, SelfAttention):
                m.explicit = True
        self.template.vmap_safe = True
        # inside the vmap each user sees a two-row private table [padding, its own row], passed
        # in by functional_call: the template's own per-user tables are never read, so they keep
        # two rows, not one per user of the split (memory no longer grows with the users)
        with torch.no_grad():
            for n in self.layout.per_user:
                table = self.template.get_parameter(n)
                table.data = table.data[:2].clone()
        #: learning-rate multipliers by parameter name (the model's, e.g. MRFF's router_lr)
        self._lr_scales = dict(self.model.lr_scales())
        self._init = {n: p.detach().clone() for n, p in self.model.named_parameters() if n not in self.layout.per_user}
        self._init.update({n: self.model.get_parameter(n).detach()[1].clone() for n in self.layout.per_user})
        self._user_codes = (torch.from_numpy(np.ascontiguousarray(split.user_features))
                            if split.user_features is not None else None)
        self.privacy = self._make_privacy()
        #: per-user compact item tables (see the module docstring); tests switch it off to
        #: compare with the full per-user copies
        self.compact = True
        #: where the clients compute (``device`` option): the template and every per-user
        #: tensor live there during a round; what a client keeps and uploads is on the CPU
        self.device = resolve_device(self.config.device)
        self.template.to(self.device)
        #: what a simulated malicious client does to its training batch before training
        #: (:func:`fedrec.federated.robust.poison_batch`); None: trains on its data as it is
        self.batch_transform = None
        self._item_tables = {n: (key, None if r is None else r.to(self.device))
                             for n, (key, r) in self._compact_tables().items()}
        if self.config.item_aggregation == "touched" and not self._item_tables:
            raise ConfigError(f"federated option 'item-aggregation' touched needs public item tables read through "
                              f"item indices; model '{self.model_name}' has none here (a full cross-entropy or softmax "
                              "reads every row; some models keep no public item-indexed table): use "
                              "item-aggregation=all or auto")
        #: the item aggregation in effect (``auto`` resolved: ``touched`` where the model has
        #: compact public item tables and DP is off, ``all`` otherwise)
        self.item_aggregation = self.config.item_aggregation
        if self.item_aggregation == "auto":
            self.item_aggregation = "touched" if self._item_tables and not self.config.dp else "all"

    def _canonical_init(self, data: ModelData) -> None:
        """Make the initial parameters independent of how many users this split holds.

        The model is built once more, with the same seed, for a single user, and its
        parameters replace the model's: the shared ones (so every node, whatever its users,
        starts from the same global parameters, and the server can take them from any node)
        and the private ones, every user's per-user rows included (every user starts from the
        same private values, as when each client copies the initial model).
        """
        import dataclasses

        torch.manual_seed(self.config.seed)
        one = create_model(self.model_name, dataclasses.replace(data, n_users=1), self.model_options, task=self.task)
        ref = dict(one.named_parameters())
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in self.layout.per_user:
                    p.copy_(ref[n][1].expand_as(p))
                else:
                    p.copy_(ref[n])

    def _compact_tables(self) -> dict[str, tuple[str, torch.Tensor | None]]:
        """The model's item-indexed tables that can be trained as compact per-user copies:
        all of them must be public (uploaded as sums); otherwise none is compacted."""
        tables = self.template.item_tables() or {}
        if not tables or not all(n in self.layout.shared for n in tables):
            return {}
        return dict(tables)

    def _make_privacy(self) -> UserLevelDP | None:
        """User-level DP from the config (None when off); the noise is calibrated here, the
        same on every client, when ``target_epsilon`` is given."""
        cfg = self.config
        if not cfg.dp:
            return None
        if not self.layout.global_names:
            raise ConfigError(f"differential privacy: algorithm '{self.name}' uploads no parameters to protect")
        return privacy_from_config(cfg)

    # -- hooks for subclasses ----------------------------------------------------------
    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Validate or complete model options (subclasses fix some)."""
        return options

    def roles(self, model: RecModel) -> dict[str, ParamRole]:
        """Parameter roles used for federation (default: the model's own)."""
        return model.parameter_roles()

    # -- state -------------------------------------------------------------------------
    def initial_global(self) -> Params:
        """The server's initial parameters (shared + groups), from the seeded model."""
        return {n: self._init[n].clone() for n in self.layout.global_names}

    def initial_group_counts(self) -> torch.Tensor:
        """``(layers, G)`` zeros (no round yet): the first round's share is uniform."""
        return torch.zeros(self.layout.layers, self.layout.n_groups, dtype=torch.float64)

    def initial_local(self, users: np.ndarray) -> LocalState:
        """Private state of a client holding ``users``: every user starts from the
        initial model's private values (its own rows of per-user tables)."""
        users = np.unique(np.asarray(users, dtype=np.int64))
        tensors = {n: self._init[n].unsqueeze(0).repeat(len(users), 1) for n in self.layout.per_user}
        for n in self.layout.private:
            tensors[n] = self._init[n].unsqueeze(0).repeat(len(users), *([1] * self._init[n].dim()))
        return LocalState(users, tensors)

    def make_shard(self, users: np.ndarray) -> Shard:
        """The shard of ``users`` for this algorithm's task and model."""
        return make_shard(self.split, users, task=self.task, max_len=self.max_len, protocol=self.config.protocol,
                          eval_seed=self.config.eval_seed)

    @staticmethod
    def group_share(group_counts: torch.Tensor) -> torch.Tensor:
        """Per-layer share of users per group from counts (uniform where a layer has none)."""
        counts = group_counts.to(torch.float32)
        total = counts.sum(-1, keepdim=True)
        uniform = torch.full_like(counts, 1.0 / max(1, counts.shape[-1]))
        return torch.where(total > 0, counts / total.clamp(min=1.0), uniform)

    # -- per-user tensors ---------------------------------------------------------------
    def _positions(self, state: LocalState, users: np.ndarray) -> torch.Tensor:
        pos = np.searchsorted(state.users, users)
        if np.any(pos >= len(state.users)) or np.any(state.users[np.minimum(pos, len(state.users) - 1)] != users):
            missing = users[(pos >= len(state.users)) | (state.users[np.minimum(pos, len(state.users) - 1)] != users)]
            raise ConfigError(f"the client state has no private parameters for users {missing[:5].tolist()}")
        return torch.from_numpy(pos)

    def _user_params(self, global_params: Params, state: LocalState, pos: torch.Tensor, *, copy_global: bool,
                     rows: dict[str, torch.Tensor] | None = None) -> tuple[Params, Params]:
        """(per-user params stacked over ``pos``, shared params). With ``copy_global`` the
        global parameters are copied per user (training); otherwise passed once. ``rows``:
        name -> ``(C, K)`` rows of the compact copy of an item table (training only)."""
        C = len(pos)
        per_user: Params = {}
        shared: Params = {}
        dev = self.device
        for n in self.layout.global_names:
            if rows and n in rows:
                per_user[n] = global_params[n][rows[n]]  # (C, K, D): a copy of the touched rows
            elif copy_global:
                per_user[n] = global_params[n].unsqueeze(0).repeat(C, *([1] * global_params[n].dim()))
            else:
                shared[n] = global_params[n]
        for n in self.layout.per_user:
            own = state.tensors[n][pos].to(dev)  # (C, D)
            per_user[n] = torch.stack([torch.zeros_like(own), own], dim=1)  # (C, 2, D): [padding, own row]
        for n in self.layout.private:
            per_user[n] = state.tensors[n][pos].to(dev, copy=True)
        return per_user, shared

    def _per_user_batch(self, batch: dict[str, torch.Tensor], users: np.ndarray) -> dict[str, torch.Tensor]:
        """A batch (one example per user) as vmap inputs: users renumbered to 1 (their row
        of the two-row private tables), profile codes passed explicitly."""
        keep = ("items", "labels", "target_items", "target_labels", "target_mask", "negatives", "candidates",
                "ratings", "target_ratings", "values", "target_values")
        out = {k: v for k, v in batch.items() if k in keep}
        out["user"] = torch.ones(len(users), dtype=torch.long)
        if self._user_codes is not None:
            out["user_codes"] = self._user_codes[torch.from_numpy(users)]
        return to_device(out, self.device)

    def _on_device(self, params: Params) -> Params:
        """``params`` (the global parameters, on the CPU) on the clients' device."""
        return {n: t.to(self.device) for n, t in params.items()}

    def _compact_batch(self, ex: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Compact item tables for a chunk of users (one example each).

        Each user's item indices (history, targets, negatives; candidates, when scoring
        them with a personalised copy) are renumbered to local ones
        (``0`` stays the padding item); for every item table, the user's copy holds only the
        rows its local items read. Returns the batch with local indices and
        ``item_maps`` (key -> ``(C, K_items)`` local item -> local row), and name -> ``(C,
        K)`` the global rows of each compact copy. Users with fewer rows are padded with a
        repeat of a row they have; the repeat is never read, so its gradient, its update and
        its change are exactly zero.
        """
        fields = [k for k in ("items", "target_items", "negatives", "candidates") if k in ex]
        C = ex["items"].shape[0]
        flat = torch.cat([ex[k].reshape(C, -1) for k in fields], dim=1)
        # item 0 (padding) first in every row, so local index 0 is the padding item
        local_items, inverse = _row_unique(torch.cat([flat.new_zeros(C, 1), flat], dim=1))  # (C, K_items)
        local = inverse[:, 1:]
        out: dict[str, Any] = dict(ex)
        start = 0
        for k in fields:
            size = ex[k][0].numel()
            out[k] = local[:, start:start + size].reshape(ex[k].shape)
            start += size
        maps: dict[str, torch.Tensor] = {}
        key_rows: dict[str, torch.Tensor] = {}
        for key, row_of_item in {key: r for key, r in self._item_tables.values()}.items():
            if row_of_item is None:
                key_rows[key] = local_items
                maps[key] = torch.arange(local_items.shape[1], device=local_items.device).expand(C, -1)
                continue
            key_rows[key], maps[key] = _row_unique(row_of_item[local_items])  # (C, K), (C, K_items)
        out["item_maps"] = maps
        return out, {n: key_rows[key] for n, (key, _) in self._item_tables.items()}

    # -- training ------------------------------------------------------------------------
    def _loss_fn(self):
        template = self.template

        def user_loss(params: Params, shared: Params, example: dict[str, torch.Tensor], share: torch.Tensor):
            # item_maps (compact tables) index local items directly: no batch dimension
            batch = {k: (v.unsqueeze(0) if torch.is_tensor(v) else v) for k, v in example.items()}
            if share.numel():  # no groups federated (e.g. local-only): the model's own share
                batch["group_share"] = share
            # the loss must be computed inside the reparametrised call: a full cross-entropy
            # reads the item table, which has to be the user's copy, not the template's
            loss, out = functional_call(template, {**shared, **params}, (batch,), {"mode": "loss"})
            routing = out["context"]["routing"]
            choice = (torch.stack([r["choice"][0] for r in routing]) if routing
                      else torch.zeros(0, 1, dtype=torch.long, device=loss.device))
            return loss, choice

        return user_loss

    def update_phases(self) -> tuple[tuple[str, ...], ...] | None:
        """Hook: the parameter names each local step updates in turn, the gradient taken
        afresh before each phase (e.g. PFedRec: the score function, then the item
        embedding). None (default): one phase, every trained parameter at once."""
        return None

    def _local_train(self, global_params: Params, state: LocalState, pos: torch.Tensor, ex: dict[str, Any],
                     share: torch.Tensor, vgrad) -> tuple[Params, dict[str, Any], dict[str, torch.Tensor], Params,
                                                          torch.Tensor, Any]:
        """``local_steps`` steps of a chunk of users (``ex``: one example each, see
        :meth:`_per_user_batch`) from the global parameters and their private ones.

        Returns the trained per-user parameters, the batch as trained (local item indices
        with compact tables), the compact tables' rows, what each user's copy of the global
        parameters started from, the first step's per-user loss and the routing choice."""
        rows: dict[str, torch.Tensor] = {}
        if self.compact and self._item_tables:
            ex, rows = self._compact_batch(ex)
        params, _ = self._user_params(global_params, state, pos, copy_global=True, rows=rows)
        # what each user's copy started from: the global value, or its rows of it
        start_values = {n: (params[n].clone() if n in rows else global_params[n])
                        for n in self.layout.global_names}
        moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
        phases = self.update_phases()
        choice = first = None
        for step in range(1, self.config.local_steps + 1):
            for names in phases or (None,):
                grads, (loss, choice) = vgrad(params, {}, ex, share)
                if first is None:
                    first = loss
                with torch.no_grad():
                    if names is None:
                        params = self._step(params, grads, moments, step)
                    else:
                        params = {**params, **self._step({n: params[n] for n in names},
                                                         {n: grads[n] for n in names}, moments, step)}
        return params, ex, rows, start_values, first, choice

    def client_update(self, global_params: Params, state: LocalState, shard: Shard, *, round: int,
                      group_counts: torch.Tensor | None = None) -> tuple[Upload, LocalState, dict[str, float]]:
        """Train the shard's participating users for one round (see the module docstring)."""
        cfg = self.config
        share = self.group_share(group_counts if group_counts is not None else self.initial_group_counts()).to(self.device)
        on_device = self._on_device(global_params)
        mask = participants(self.split.user_raw[shard.users], seed=cfg.seed, round=round, fraction=cfg.fraction)
        examples = shard.train if mask.all() else shard.train.subset(shard.users[mask])
        users = examples.users
        if len(np.unique(users)) != len(users):
            raise ConfigError("federated training expects one training example per user")
        touched = ({n: torch.zeros(global_params[n].shape[0], dtype=torch.float64) for n in self._item_tables}
                   if self.item_aggregation == "touched" else None)
        # the tables averaged row by row over their readers are summed in float64: the server
        # divides (sum - W x global) by a row's reader weight, often 1, not by W, so float32
        # rounding of W x global (W: every user of the shard) would reach the rows' changes
        sums = {n: torch.zeros_like(global_params[n], dtype=torch.float64 if touched and n in touched else None)
                for n in self.layout.global_names}
        counts = torch.zeros(self.layout.layers, self.layout.n_groups, dtype=torch.float64)
        weight_total, loss_sum, n_examples = 0.0, 0.0, 0
        changed = torch.zeros(self.layout.layers, dtype=torch.float64)
        routed_before = 0
        if len(examples):
            sampler = (UniformNegativeSampler.for_training(self.split, seed=_negative_seed(cfg.seed, round, shard))
                       if self.task == "next_item" else None)
            batches = self._train_batches(examples, sampler)
            if self.batch_transform is not None:  # a simulated malicious client (elementwise, per chunk)
                batches = (self.batch_transform(b) for b in batches)
            vgrad = vmap(grad_and_value(self._loss_fn(), has_aux=True), in_dims=(0, None, 0, None),
                         randomness="different")
            rng_state = torch.random.get_rng_state()
            device_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
            # dropout draws depend on (seed, round, shard) only, not on what ran before in
            # this process (so a Ray actor serving several nodes gives the same result)
            torch.manual_seed(int(np.random.default_rng([cfg.seed, round, shard.key]).integers(2**62)))
            self.template.train()
            for start, chunk in zip(range(0, len(users), cfg.chunk_size), batches, strict=True):
                sl = slice(start, start + cfg.chunk_size)
                cu = users[sl]
                pos = self._positions(state, cu)
                ex = self._per_user_batch(chunk, cu)
                if touched is not None:  # before compaction renumbers the items
                    self._count_readers(ex, touched)
                params, ex, rows, start_values, loss, choice = to_cpu(self._local_train(on_device, state, pos, ex,
                                                                                        share, vgrad))
                loss_sum += float(loss.sum())
                # write private rows back; accumulate the upload
                with torch.no_grad():
                    for n in self.layout.per_user:
                        state.tensors[n][pos] = params[n][:, 1]
                    for n in self.layout.private:
                        state.tensors[n][pos] = params[n]
                    # (C, layers, G): whether each user chose group g at layer l (any of its top-k)
                    member = (F.one_hot(choice, self.layout.n_groups).amax(dim=2).to(torch.float64)
                              if self.layout.groups else None)
                    if self.privacy is not None:
                        uploaded = {n: params[n] for n in self.layout.global_names}
                        self.privacy.clip_(uploaded, start_values, {
                            n: (member[:, self.layout.groups[n][0], self.layout.groups[n][1]]
                                if n in self.layout.groups else None) for n in uploaded})
                    n_pos = ex["target_mask"].sum(1).to(torch.float64)
                    w = torch.ones_like(n_pos) if cfg.weighting == "users" else n_pos
                    weight_total += float(w.sum())
                    n_examples += int(n_pos.sum())
                    for n in self.layout.shared:
                        acc = sums[n].dtype
                        wn = w.to(acc)
                        if n in rows:
                            # sum of the users' copies = W * global + their changes, row by row
                            sums[n] += wn.sum() * global_params[n].to(acc)
                            change = (params[n] - start_values[n]).to(acc) * wn.view(-1, 1, 1)
                            sums[n].index_add_(0, rows[n].reshape(-1), change.flatten(0, 1))
                        else:
                            sums[n] += torch.tensordot(wn, params[n].to(acc), dims=1)
                    if member is not None:
                        counts += member.sum(0)
                        first = choice[:, :, 0].numpy()  # (C, layers)
                        if state.routes is None or state.routes.shape != (len(state.users), first.shape[1]):
                            state.routes = np.full((len(state.users), first.shape[1]), -1, dtype=np.int64)
                        before = state.routes[pos.numpy()]
                        known = before[:, 0] >= 0
                        changed += torch.from_numpy((before[known] != first[known]).sum(0).astype(np.float64))
                        routed_before += int(known.sum())
                        state.routes[pos.numpy()] = first
                        for n, (layer, g) in self.layout.groups.items():
                            sums[n] += torch.tensordot(member[:, layer, g].to(params[n].dtype), params[n], dims=1)
            torch.random.set_rng_state(rng_state)
            if device_rng is not None:  # manual_seed reseeded the GPU's generator too
                torch.cuda.set_rng_state(device_rng, self.device)
        metrics = {"users": float(len(users)), "loss": loss_sum / len(users) if len(users) else float("nan")}
        if self.privacy is not None:
            # every round is a release for every user of the shard (sampling rate 1)
            self.privacy.add_noise(sums, self.layout.global_names,
                                   self.privacy.generator(seed=cfg.seed, round=round, shard_key=shard.key))
            state.privacy = self.privacy.step(state.privacy)
            loss_sum = float("nan")  # the training loss is data-dependent: not reported under DP
            metrics = {"users": float(len(users)), "epsilon": self.privacy.epsilon(state.privacy),
                       "noise-multiplier": self.privacy.noise_multiplier, "delta": self.privacy.delta}
        upload = Upload(sums, weight_total, counts, len(users), n_examples, loss_sum,
                        {k: metrics[k] for k in ("epsilon", "noise-multiplier", "delta")} if self.privacy else None,
                        changed if self.layout.groups else None, routed_before, touched=touched)
        return upload, state, metrics

    def _count_readers(self, ex: dict[str, torch.Tensor], touched: dict[str, torch.Tensor]) -> None:
        """``item-aggregation = touched``: add each user's weight once to every row of each
        compact item table that its real items (history, targets, negatives; not the padding
        item 0) read. ``ex``: the chunk's batch with global item indices (one example per user)."""
        fields = [k for k in ("items", "target_items", "negatives") if k in ex]
        C = ex["items"].shape[0]
        flat = torch.cat([ex[k].reshape(C, -1) for k in fields], dim=1).cpu()
        if self.config.weighting == "users":
            w = torch.ones(C, dtype=torch.float64)
        else:
            w = ex["target_mask"].sum(1).cpu().to(torch.float64)
        user = torch.arange(C).unsqueeze(1).expand_as(flat)
        real = flat > 0
        for n, (_, row_of_item) in self._item_tables.items():
            rows = flat if row_of_item is None else row_of_item.cpu()[flat]
            size = touched[n].numel()
            pairs = torch.unique(user[real] * size + rows[real])  # distinct (user, row)
            touched[n].index_add_(0, pairs % size, w[pairs // size])

    def _train_batches(self, examples: ExampleSet, sampler) -> Any:
        """The training batches of ``examples``, one per chunk of ``chunk_size`` users, in
        order. Without random draws (CTR) each chunk's batch is built on its own, so the
        batch tensors are bounded by the chunk size, not the shard; next-item negatives are
        drawn for the whole shard at once (the draws depend on it) and then sliced."""
        chunk = self.config.chunk_size
        if sampler is None:
            return iterate_batches(examples, batch_size=chunk)
        full = next(iterate_batches(examples, batch_size=len(examples), num_negatives=self.config.negatives,
                                    sampler=sampler))
        return ({k: v[start:start + chunk] for k, v in full.items()} for start in range(0, len(examples), chunk))

    def _step(self, params: Params, grads: Params, moments: dict[str, tuple[torch.Tensor, torch.Tensor]], t: int) -> Params:
        """One optimiser step on stacked per-user tensors (elementwise, so per user)."""
        base = self.config.lr
        scales = self._lr_scales
        out = {}
        if self.config.optimizer == "sgd":
            return {n: p - base * scales.get(n, 1.0) * grads[n] for n, p in params.items()}
        b1, b2, eps = _ADAM
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        for n, p in params.items():
            lr = base * scales.get(n, 1.0)
            m, v = moments[n]
            g = grads[n]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
            out[n] = p.addcdiv(m, denom, value=-lr / bc1)
        return out

    # -- aggregation ---------------------------------------------------------------------
    def aggregate(self, global_params: Params, uploads: list[Upload]) -> tuple[Params, torch.Tensor, dict[str, float]]:
        """New global parameters from the clients' uploads (see :func:`aggregate_uploads`)."""
        return aggregate_uploads(self.layout, global_params, uploads)

    # -- evaluation ----------------------------------------------------------------------
    def group_alive(self, group_counts: torch.Tensor | None) -> torch.Tensor | None:
        """``(layers, G)`` booleans: the groups with members in the round the counts come
        from (None without groups or counts): evaluation routes only to these, so no user
        is scored with a group FFN that was not trained in the last round."""
        if not self.layout.groups or group_counts is None or group_counts.numel() == 0:
            return None
        counts = group_counts.reshape(self.layout.layers, self.layout.n_groups)
        return counts > 0

    def personalise(self, global_params: Params, state: LocalState, users: np.ndarray, params: Params, shared: Params,
                    example: dict[str, Any]) -> tuple[Params, Params, dict[str, Any]]:
        """Hook: the model each of ``users`` (a chunk) scores with, just before scoring
        (:meth:`predict`, :meth:`score_items`): ``params`` per user (stacked), ``shared``
        (passed once) and its ``example`` (one per user, with ``candidates`` when scoring
        those). Default: unchanged, i.e. the global parameters plus the user's private ones."""
        return params, shared, example

    @torch.no_grad()
    def predict(self, global_params: Params, state: LocalState, examples: ExampleSet,
                candidates: np.ndarray | None = None, *, group_counts: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Each user's own model on ``examples`` (one per user): CTR ``probs``/``logits``/
        ``labels``, or next-item ``ranks`` (full ranking, or sampled with ``candidates``; full
        ranking adds ``top``, each example's ``max(topk)`` best items, its history excluded).
        ``group_counts``: the last round's users per group (see :meth:`group_alive`)."""
        if len(examples) == 0:
            return ({"probs": np.zeros(0), "logits": np.zeros(0), "labels": np.zeros(0)} if self.task == "ctr"
                    else {"ranks": np.zeros(0)})
        template = self.template
        template.eval()
        task, cfg = self.task, self.config
        users = examples.users
        # CTR: the plain forward's logits (predict_ctr's sigmoid of them saturates in float32)
        mode = "train" if task == "ctr" else ("candidates" if candidates is not None else "all")
        alive = self.group_alive(group_counts)
        alive = None if alive is None else alive.to(self.device)
        global_params = self._on_device(global_params)

        def fn(params, shared, example):
            b = {k: (v.unsqueeze(0) if torch.is_tensor(v) else v) for k, v in example.items()}
            if alive is not None:
                b["group_alive"] = alive
            out = functional_call(template, {**shared, **params}, (b,), {"mode": mode})
            return out["logits"][0, -1] if task == "ctr" else out[0]

        vfn = vmap(fn, in_dims=(0, None, 0))
        out, last = [], []
        # one chunk's batch at a time (no random draws: the same rows as one batch of all)
        for start, batch in zip(range(0, len(users), cfg.chunk_size),
                                iterate_batches(examples, batch_size=cfg.chunk_size), strict=True):
            sl = slice(start, start + cfg.chunk_size)
            cu = users[sl]
            if candidates is not None:
                batch["candidates"] = torch.from_numpy(candidates[sl])
            last.append((batch["target_labels"] if task == "ctr" else batch["target_items"])[:, -1])
            params, shared = self._user_params(global_params, state, self._positions(state, cu), copy_global=False)
            ex = self._per_user_batch(batch, cu)
            params, shared, ex = self.personalise(global_params, state, cu, params, shared, ex)
            out.append(vfn(params, shared, to_device(ex, self.device)).cpu())
        if task == "ctr":
            logits = torch.cat(out)
            return {"probs": torch.sigmoid(logits).double().numpy(), "logits": logits.double().numpy(),
                    "labels": torch.cat(last).numpy()}
        scores = torch.cat(out).double().numpy()
        if candidates is not None:
            return {"ranks": sampled_ranking_ranks(scores[:, 0], scores[:, 1:])}
        indptr, indices = examples.exclusions()
        targets = torch.cat(last).numpy()
        scores = scores.reshape(len(users), -1)
        return {"ranks": full_ranking_ranks(scores, targets, exclude=(indptr, indices)),
                "top": top_k_items(scores, max(cfg.topk), exclude=(indptr, indices))}

    @torch.no_grad()
    def route_users(self, global_params: Params, state: LocalState, examples: ExampleSet, *,
                    group_counts: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(users, routes)``: where each user's own model routes it at evaluation (the
        first example of each user of ``examples``), ``(n, layers)`` groups; as
        :meth:`predict`, only to groups trained in the round of ``group_counts``."""
        if not self.layout.groups:
            raise ConfigError(f"algorithm '{self.name}' has no groups to route")
        _, first = np.unique(examples.users, return_index=True)
        examples = examples.subset(examples.users[np.sort(first)])
        template = self.template
        template.eval()
        alive = self.group_alive(group_counts)
        alive = None if alive is None else alive.to(self.device)
        global_params = self._on_device(global_params)

        def fn(params, shared, example):
            b = {k: v.unsqueeze(0) for k, v in example.items()}
            if alive is not None:
                b["group_alive"] = alive
            return functional_call(template, {**shared, **params}, (b,), {"mode": "route"})[0]

        vfn = vmap(fn, in_dims=(0, None, 0))
        users = examples.users
        out = []
        chunk = self.config.chunk_size
        for start, batch in zip(range(0, len(users), chunk), iterate_batches(examples, batch_size=chunk), strict=True):
            cu = users[start:start + chunk]
            params, shared = self._user_params(global_params, state, self._positions(state, cu), copy_global=False)
            out.append(vfn(params, shared, self._per_user_batch(batch, cu)).cpu())
        return users, torch.cat(out).numpy()

    @torch.no_grad()
    def score_items(self, global_params: Params, state: LocalState, users: np.ndarray, *,
                    group_counts: torch.Tensor | None = None) -> torch.Tensor:
        """``(len(users), n_items + 1)`` scores of every item (column 0 = padding) as what
        follows each user's whole history (:func:`fedrec.recommend.serving_batch`), each user
        with its own model (global + its private parameters): next item, the model's item
        scores; CTR, the click probability of each item as the next impression."""
        from fedrec.recommend import serving_batch

        users = np.asarray(users, dtype=np.int64)
        template = self.template
        template.eval()
        n_items = self.split.n_items
        if len(users) == 0:
            return torch.zeros(0, n_items + 1)
        batch = serving_batch(self.split, users, self.max_len, task=self.task)
        # CTR: the head scores (users x items) pairs; when the head and the item tables are
        # global, each user is encoded once (with its own model) and the shared head runs on
        # item chunks outside the vmap, so memory is bounded by `budget` values
        budget = 1 << 24
        head_global = self.task == "ctr" and all(
            n in self.layout.global_names for n, _ in template.named_parameters()
            if n.startswith(("ctr_head.", "items.")))
        mode = "encode-last" if head_global else ("ctr-all" if self.task == "ctr" else "all")
        chunk = self.config.chunk_size
        if self.task == "ctr" and not head_global:  # every user's own head over every item
            chunk = max(1, min(chunk, budget // ((n_items + 1) * 4 * template.cfg.dim)))

        alive = self.group_alive(group_counts)
        alive = None if alive is None else alive.to(self.device)
        global_params = self._on_device(global_params)

        def fn(params, shared, example):
            b = {k: (v.unsqueeze(0) if torch.is_tensor(v) else v) for k, v in example.items()}
            if alive is not None:
                b["group_alive"] = alive
            out = functional_call(template, {**shared, **params}, (b,), {"mode": mode})
            return (out[0][0], out[1][0]) if mode == "encode-last" else out[0]

        vfn = vmap(fn, in_dims=(0, None, 0))
        out = []
        items = torch.arange(n_items + 1, device=self.device)
        for start in range(0, len(users), chunk):
            sl = slice(start, start + chunk)
            cu = users[sl]
            params, shared = self._user_params(global_params, state, self._positions(state, cu), copy_global=False)
            ex = self._per_user_batch({k: v[sl] for k, v in batch.items()}, cu)
            params, shared, ex = self.personalise(global_params, state, cu, params, shared, ex)
            res = vfn(params, shared, to_device(ex, self.device))
            if mode != "encode-last":
                out.append(res.cpu())
                continue
            h, user = res  # (C, dim), (C, w)
            head = {"h": h, "user_repr": user, "candidates": items}
            out.append(functional_call(template, global_params, (head,), {"mode": "ctr-head"}).cpu())
        return torch.cat(out)

    def client_evaluate(self, global_params: Params, state: LocalState, shard: Shard, *, stage: str,
                        group_counts: torch.Tensor | None = None) -> dict[str, Any]:
        """The shard's summary for ``stage`` (``valid`` or ``test``): see
        :mod:`fedrec.federated.evaluation`. ``group_counts``: the last round's users per
        group, so that users are routed only to groups trained in it."""
        if stage not in ("valid", "test"):
            raise ConfigError(f"stage must be valid or test (got {stage!r})")
        examples = getattr(shard, stage)
        pred = self.predict(global_params, state, examples, shard.candidates.get(stage), group_counts=group_counts)
        if self.task == "ctr":
            return ctr_summary(pred["labels"], pred["probs"], logits=pred["logits"], bins=self.config.auc_bins)
        groups = target_groups(examples) if "top" in pred else None  # a ratio split, full ranking
        ranks = pred["ranks"] if groups is None else pred["ranks"][groups[1]]
        return topk_summary(ranks, self.config.topk, groups=None if groups is None else groups[0],
                            top_items=pred.get("top"), n_items=self.split.n_items)

    def combine(self, summaries: list[dict[str, Any]]) -> dict[str, float | None]:
        """Pooled metrics from the clients' evaluation summaries."""
        return combine_ctr(summaries) if self.task == "ctr" else combine_ranking(summaries)



def _negative_seed(seed: int, round: int, shard: Shard) -> int:
    """Seed of a shard's training negatives in ``round`` (differs between shards)."""
    return int(np.random.default_rng([seed, round, 11, shard.key]).integers(2**31))


def aggregate_uploads(layout: Layout, global_params: Params, uploads: list[Upload]) -> tuple[Params, torch.Tensor, dict[str, float]]:
    """The server's step, which needs only the layout: public = sum / weight (an item table
    uploaded with per-row weights, ``item-aggregation = touched``: global + each row's summed
    change / the weight of the users that read it, unchanged when nobody did); each group =
    sum / members (unchanged when it has none); each row of an aligned table = its weighted
    sum / its total weight over the clients that sent it (unchanged when none did). Sums run
    in float64 in upload order.

    Returns the new parameters, the ``(layers, G)`` group counts and round metrics.
    """
    new = {n: p.clone() for n, p in global_params.items()}
    counts = torch.zeros(layout.layers, layout.n_groups, dtype=torch.float64)
    weight = sum(u.weight for u in uploads)
    rows_read = -1  # item rows averaged over their readers this round (-1: none was)
    for u in uploads:
        counts += u.group_counts.to(torch.float64).reshape(counts.shape)
    if weight > 0:
        for n in layout.shared:
            total = sum(u.sums[n].to(torch.float64) for u in uploads)
            readers = [u.touched[n] for u in uploads if u.touched is not None and n in u.touched]
            if readers:  # item-aggregation = touched: each row's change over the weight of its readers
                rows_read = max(rows_read, 0)
                if len(readers) != len(uploads):
                    raise ValueError(f"parameter {n}: some uploads carry per-row weights and some do not")
                read = sum(t.to(torch.float64) for t in readers)
                if not bool(torch.isfinite(read).all()) or bool((read < 0).any()):
                    raise ValueError(f"parameter {n}: per-row reader weights must be finite and >= 0")
                g = global_params[n].to(torch.float64)
                shape = (-1,) + (1,) * (g.dim() - 1)
                change = (total - weight * g) / read.clamp(min=1e-300).view(shape)
                new[n] = torch.where((read > 0).view(shape), g + change, g).to(global_params[n].dtype)
                rows_read += int((read > 0).sum())
            else:
                new[n] = total.div(weight).to(global_params[n].dtype)
    for n, (layer, g) in layout.groups.items():
        c = float(counts[layer, g])
        if c > 0:
            new[n] = sum(u.sums[n].to(torch.float64) for u in uploads).div(c).to(global_params[n].dtype)
    for n in layout.aligned:  # row by row, over the clients that sent the row
        acc = torch.zeros(global_params[n].shape, dtype=torch.float64)
        total = torch.zeros(global_params[n].shape[0], dtype=torch.float64)
        for u in uploads:
            if u.rows is None or n not in u.rows:
                continue
            rows, w = u.rows[n]
            acc.index_add_(0, rows.long(), u.sums[n].to(torch.float64))
            total.index_add_(0, rows.long(), w.to(torch.float64))
        sent = total > 0
        if sent.any():
            shape = (-1,) + (1,) * (acc.dim() - 1)
            new[n] = torch.where(sent.view(shape), acc / total.clamp(min=1e-300).view(shape),
                                 global_params[n].to(torch.float64)).to(global_params[n].dtype)
    users = sum(u.users for u in uploads)
    metrics = {"users": float(users), "loss": sum(u.loss_sum for u in uploads) / users if users else float("nan")}
    if rows_read >= 0:
        metrics["item-rows-read"] = float(rows_read)
    before = sum(u.routed_before for u in uploads if u.group_changed is not None)
    if before:  # share of the users routed before whose group changed, per layer
        metrics["group-changed"] = (sum(u.group_changed for u in uploads if u.group_changed is not None)
                                    / before).round(decimals=4).tolist()
    private = [u.privacy for u in uploads if u.privacy is not None]
    if private:
        metrics["epsilon"] = max(p["epsilon"] for p in private)  # the guarantee of the worst-off client
        metrics["noise-multiplier"] = private[0]["noise-multiplier"]
        metrics["delta"] = private[0]["delta"]
    return new, counts, metrics


def _row_unique(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise ``torch.unique(return_inverse=True)`` of a ``(C, L)`` index tensor, batched:
    ``(uniq, inverse)`` with ``uniq`` ``(C, K)`` each row's sorted distinct values, padded
    with the row's smallest value, and ``uniq.gather(1, inverse) == x``."""
    vals, order = x.sort(dim=1)
    first = torch.ones_like(vals, dtype=torch.bool)
    first[:, 1:] = vals[:, 1:] != vals[:, :-1]
    rank = first.long().cumsum(1) - 1  # local index of each sorted entry
    inverse = torch.empty_like(rank).scatter_(1, order, rank)
    uniq = vals[:, :1].repeat(1, int(rank[:, -1].max()) + 1)
    uniq.scatter_(1, rank, vals)  # equal values share a rank: every write to a slot is the same
    return uniq, inverse


def _swap_dropout(module: nn.Module) -> None:
    """Replace every ``nn.Dropout`` by :class:`MaskDropout` (batched well by vmap)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Dropout):
            setattr(module, name, MaskDropout(child.p))
        else:
            _swap_dropout(child)
