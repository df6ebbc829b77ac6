"""PFedRec: dual personalisation — a private score function per user and item embeddings
fine-tuned on each user's own data.

Chunxu Zhang, Guodong Long, Tianyi Zhou, Peng Yan, Zijian Zhang, Chengqi Zhang, Bo Yang.
"Dual Personalization on Federated Recommendation", IJCAI 2023 (arXiv 2301.08143).

The paper's model has no user embedding: each user (one client) scores an item with its own
score function — a linear layer on the item embedding and a sigmoid, dimension 32 — that is
never uploaded, and personalises the global item embedding by fine-tuning it on its own
data. Here:

* **Model.** ``mf`` (:mod:`fedrec.models.mf`) with ``user-bias = true`` by default: the
  linear layer ``w_u . q_i + c_u`` *is* the per-user vector ``p_u = w_u`` and bias ``c_u``,
  stored as per-user private tables (one row per user, kept on the client, never in an
  upload or the global parameters); the item embedding ``q`` is public, averaged by the
  server row by row over the users that read each row (``item-aggregation = touched``, ``auto``
  in the next-item formats' default) or over all of the round's users (``all``: untouched rows
  count with their global value; the paper's code, whose item learning rate
  ``lr x n_items x lr_eta`` offsets that dilution).
* **Local update, in the paper's order.** Each local step first updates the score function
  (gradient of the BCE over the user's positives and sampled negatives), then the item
  embedding (gradient taken again, with the new score function) —
  :meth:`~fedrec.federated.algorithm.Algorithm.update_phases`. Each step is one full-batch
  step over all the user's training targets (the paper's code: minibatches of 256 examples,
  one local epoch; on ML-100K a user has about two such minibatches).
* **Personalised inference.** A user scores with the item embedding fine-tuned on its own
  training data from the current global one: at evaluation (and in ``fedrec recommend``)
  every user runs the same local update as in training — same steps, order, optimiser and
  learning rate, from the current global parameters and its own score function — and scores
  with the result, i.e. the model it would hold after its next local update
  (:meth:`personalise`). Nothing is stored: a full personalised table per user would cost
  users x items x dim. The training negatives of that update are a fixed draw (the one a
  round numbered 0 would make; training rounds are numbered from 1), so evaluation is
  deterministic. The paper's code instead evaluates the model each user kept after the
  round's update, which started from the previous round's global item embedding.

Hyper-parameters: the ``mf`` defaults (dimension 32, as the paper; ``user-bias`` on) and the
engine's local update (one step of a fresh Adam at lr 0.1 per user and round). The paper's
code uses SGD at lr 0.1 for the score function and ``0.1 * n_items * 80`` for the item
embedding, on minibatches of 256; with this engine's full-batch step that item learning rate
diverged on ML-100K (NaN scores by round 10), while Adam, which scales every
coordinate's step to about ``lr``, needs no such ratio. On ML-100K (validation, sampled-99) it
reached NDCG@10 0.350 after 30 rounds (popularity: 0.241). Cost: evaluating a stage runs one
local update per user (about a training round), so evaluate every few rounds.

Run: ``fedrec simulate --algorithm pfedrec --data SPEC --task next_item --protocol sampled-99``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.samplers import UniformNegativeSampler
from fedrec.errors import ConfigError
from fedrec.federated.algorithm import Algorithm, LocalState, Params, _negative_seed

__all__ = ["PERSONALISE_ROUND", "PFedRec"]

#: the round number whose negative draw the personalising update uses (never a training round)
PERSONALISE_ROUND = 0

_TRAIN_KEYS = ("items", "labels", "target_items", "target_labels", "target_mask", "negatives")


class PFedRec(Algorithm):
    """PFedRec on the ``mf`` model (see the module docstring)."""

    name = "pfedrec"
    default_model = "mf"

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Only the ``mf`` model; its ``user-bias`` (the score function's bias) defaults to
        true here (an explicit value is kept)."""
        if self.model_name != "mf":
            raise ConfigError(f"algorithm '{self.name}' trains the 'mf' model (got model '{self.model_name}')")
        if self.task != "next_item":
            raise ConfigError(f"algorithm '{self.name}' is for the next_item task (got {self.task!r})")
        if not any(k.replace("-", "_") == "user_bias" for k in options):
            options = {**options, "user_bias": True}
        return options

    def update_phases(self) -> tuple[tuple[str, ...], ...]:
        """The score function (per-user and private parameters) first, then the item side
        (the public parameters)."""
        return (self.layout.per_user + self.layout.private, self.layout.shared)

    def personalise(self, global_params: Params, state: LocalState, users: np.ndarray, params: Params, shared: Params,
                    example: dict[str, Any]) -> tuple[Params, Params, dict[str, Any]]:
        """Each user's model after one local update from the current global parameters (see
        the module docstring): its score function and its fine-tuned copy of the item
        tables. With ``candidates`` only their rows are copied (with compact tables);
        scoring every item gives each user a full copy of the item tables."""
        cfg = self.config
        users = np.asarray(users, dtype=np.int64)
        C, T = len(users), self.max_len
        train = self.split.cached(("examples", self.task, "train", T), lambda: build_examples(
            self.split, task=self.task, stage="train", max_len=T))
        sub = train.subset(users)
        key = int(self.split.user_raw[users[0]]) % 2**62 if C else 0
        sampler = UniformNegativeSampler.for_training(self.split, seed=_negative_seed(cfg.seed, PERSONALISE_ROUND,
                                                                          SimpleNamespace(key=key)))
        # one (possibly empty) training example per user of the chunk, in the chunk's order:
        # a user without training targets keeps the global parameters and its own
        full = {"items": torch.zeros(C, T, dtype=torch.long), "labels": torch.zeros(C, T, dtype=torch.long),
                "target_items": torch.zeros(C, T, dtype=torch.long), "target_labels": torch.zeros(C, T),
                "target_mask": torch.zeros(C, T, dtype=torch.bool),
                "negatives": torch.zeros(C, T, cfg.negatives, dtype=torch.long)}
        if len(sub):
            batch = next(iterate_batches(sub, batch_size=len(sub), num_negatives=cfg.negatives, sampler=sampler))
            order = np.argsort(users, kind="stable")
            where = torch.from_numpy(order[np.searchsorted(users[order], sub.users)])
            for k in _TRAIN_KEYS:
                full[k][where] = batch[k].to(full[k].dtype)
        ex = self._per_user_batch(full, users)
        scoring_candidates = "candidates" in example
        if scoring_candidates:
            ex["candidates"] = example["candidates"]
        vgrad = vmap(grad_and_value(self._loss_fn(), has_aux=True), in_dims=(0, None, 0, None), randomness="different")
        share = self.group_share(self.initial_group_counts()).to(self.device)
        trained, ex, rows, start, _, _ = self._local_train(global_params, state, self._positions(state, users), ex,
                                                            share, vgrad)
        if scoring_candidates:
            keep = ("user", "user_codes", "candidates", "item_maps")
            return trained, {}, {k: v for k, v in ex.items() if k in keep}
        # every item: expand the compact copies to full ones (global + the user's changes;
        # a padding repeat of a row has change 0, so adding is exact)
        with torch.no_grad():
            for n, r in rows.items():
                change = trained[n] - start[n]  # (C, K, D)
                g = global_params[n].to(change.device)
                table = g.unsqueeze(0).repeat(C, *([1] * g.dim()))
                trained[n] = table.scatter_add_(1, r.unsqueeze(-1).expand_as(change), change)
        return trained, {}, {k: v for k, v in example.items() if k != "candidates"}
