"""The one-user-at-a-time client loop: the plain semantics the vectorised engine must match.

For every participating user: copy the model, load the global parameters and the user's
private ones, build a fresh ``torch.optim`` optimiser (one per update phase, see
:meth:`~fedrec.federated.algorithm.Algorithm.update_phases`), take ``local_steps`` steps on the
user's sequence through the ordinary ``nn.Module`` path (fused attention, ``nn.Dropout``,
the user's own index and profile lookup), then add its parameters to the upload. This is how
the MRFF reference code runs a round (one deep copy per user); it is kept as the test
oracle for :meth:`fedrec.federated.algorithm.Algorithm.client_update` and as the baseline
of ``simulations/bench_federated.py``. Not for production use: it is slow by design.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fedrec.data.batching import iterate_batches
from fedrec.data.samplers import UniformNegativeSampler
from fedrec.federated.algorithm import Algorithm, LocalState, Params, Shard, Upload, _negative_seed, participants

__all__ = ["reference_client_update"]


def reference_client_update(alg: Algorithm, global_params: Params, state: LocalState, shard: Shard, *, round: int,
                            group_counts: torch.Tensor | None = None) -> tuple[Upload, LocalState, dict[str, float]]:
    """Same contract as :meth:`Algorithm.client_update`, computed one user at a time."""
    cfg, layout = alg.config, alg.layout
    share = alg.group_share(group_counts if group_counts is not None else alg.initial_group_counts())
    mask = participants(alg.split.user_raw[shard.users], seed=cfg.seed, round=round, fraction=cfg.fraction)
    examples = shard.train.subset(shard.users[mask])
    touched = ({n: torch.zeros(global_params[n].shape[0], dtype=torch.float64) for n in alg._item_tables}
               if alg.item_aggregation == "touched" else None)
    sums = {n: torch.zeros_like(global_params[n], dtype=torch.float64 if touched and n in touched else None)
            for n in layout.global_names}
    counts = torch.zeros(layout.layers, layout.n_groups, dtype=torch.float64)
    weight_total, loss_sum, n_examples = 0.0, 0.0, 0
    users = examples.users
    sampler = (UniformNegativeSampler.for_training(alg.split, seed=_negative_seed(cfg.seed, round, shard))
               if alg.task == "next_item" else None)
    for u in users:
        pos = int(np.searchsorted(state.users, u))
        model = copy.deepcopy(alg.model)
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.sparse = False
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n in layout.global_names:
                named[n].copy_(global_params[n])
            for n in layout.per_user:
                named[n][u] = state.tensors[n][pos]
            for n in layout.private:
                named[n].copy_(state.tensors[n][pos])
        # one optimiser per update phase (one phase of every parameter unless the algorithm says
        # so), with the model's learning-rate multipliers as parameter groups
        phases = alg.update_phases() or (tuple(named),)
        make = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
        scales = model.lr_scales()
        opts = []
        for names in phases:
            by_scale: dict[float, list] = {}
            for n in names:
                by_scale.setdefault(float(scales.get(n, 1.0)), []).append(named[n])
            opts.append(make([{"params": ps, "lr": cfg.lr * k} for k, ps in sorted(by_scale.items())], lr=cfg.lr))
        batch = next(iterate_batches(examples.subset(np.array([u])), batch_size=1,
                                     num_negatives=cfg.negatives if sampler is not None else 0, sampler=sampler))
        if share.numel():
            batch["group_share"] = share
        model.train()
        out = None
        for step in range(cfg.local_steps):
            for phase, opt in enumerate(opts):
                opt.zero_grad()
                out = model(batch)
                loss = model.loss(batch, out)
                loss.backward()
                opt.step()
                if step == 0 and phase == 0:
                    loss_sum += float(loss.detach())
        with torch.no_grad():
            for n in layout.per_user:
                state.tensors[n][pos] = named[n][u]
            for n in layout.private:
                state.tensors[n][pos] = named[n]
            n_pos = float(batch["target_mask"].sum())
            w = 1.0 if cfg.weighting == "users" else n_pos
            weight_total += w
            n_examples += int(n_pos)
            for n in layout.shared:
                sums[n] += w * named[n].to(sums[n].dtype)
            if touched is not None:  # the rows of each item table this user's real items read
                items = torch.cat([batch[k].reshape(-1) for k in ("items", "target_items", "negatives") if k in batch])
                items = items[items > 0]
                for n, (_, row_of_item) in alg._item_tables.items():
                    read = items.unique() if row_of_item is None else row_of_item.cpu()[items].unique()
                    touched[n][read] += w
            routing = out["context"]["routing"]
            for n, (layer, g) in layout.groups.items():
                if bool((routing[layer]["choice"][0] == g).any()):
                    sums[n] += named[n]
            for layer, r in enumerate(routing):
                for g in r["choice"][0].tolist():
                    counts[layer, g] += 1
    upload = Upload(sums, weight_total, counts, len(users), n_examples, loss_sum, touched=touched)
    return upload, state, {"users": float(len(users)), "loss": loss_sum / len(users) if len(users) else float("nan")}
