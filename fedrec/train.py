"""The centralised trainer: batched, seeded, early stopping on the validation metric, test
reported at the best validation epoch, checkpoints, a progress bar.

Protocols (name them next to every number):

* ``ctr`` — AUC / LogLoss (and GAUC when users have several test impressions) over the
  pooled held-out impressions; model selection on validation AUC.
* ``next_item`` with ``protocol="full"`` — the held-out item ranked against every item, the
  user's history items excluded; ``"sampled-99"`` / ``"sampled-999"`` — against 99 / 999
  uniform items the user never interacted with (fixed by ``eval_seed``). HR@K, NDCG@K
  (K = 5, 10, 20), MRR; model selection on validation NDCG@10.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fedrec.data.batching import ExampleSet, build_examples, iterate_batches
from fedrec.data.samplers import UniformNegativeSampler
from fedrec.data.split import SplitData
from fedrec.errors import ConfigError
from fedrec.metrics import ctr_metrics, full_ranking_ranks, ranking_metrics, sampled_ranking_ranks
from fedrec.models.base import ModelData, RecModel
from fedrec.models.registry import create_model

__all__ = ["TrainConfig", "train", "evaluate", "selection_metric", "PROTOCOLS"]

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
    progress: bool = True
    #: extra ranking protocols (comma-separated, e.g. ``"full"``) also evaluated on the test
    #: set at the best validation epoch; reported under ``test_by_protocol``.
    also_test: str = ""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "negatives"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train option '{name}' must be >= 1 (got {getattr(self, name)})")
        if self.patience < 0:
            raise ConfigError(f"train option 'patience' must be >= 0 (got {self.patience})")
        if self.lr <= 0:
            raise ConfigError(f"train option 'lr' must be > 0 (got {self.lr})")
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


def selection_metric(task: str) -> str:
    """The validation metric that selects the best epoch."""
    return "auc" if task == "ctr" else "ndcg@10"


def _clean(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if v is None or (isinstance(v, float) and np.isnan(v)) else round(float(v), 6)) for k, v in metrics.items()}


@torch.no_grad()
def evaluate(model: RecModel, examples: ExampleSet, *, task: str, protocol: str = "full",
             batch_size: int = 512, eval_seed: int = 2024) -> dict[str, float | None]:
    """Metrics of ``model`` on ``examples`` (a valid or test :class:`ExampleSet`)."""
    model.eval()
    if len(examples) == 0:
        raise ConfigError(f"no {examples.stage} examples to evaluate")
    if task == "ctr":
        probs, labels, users = [], [], []
        for batch in iterate_batches(examples, batch_size=batch_size):
            probs.append(model.predict_ctr(batch).double().numpy())
            labels.append(batch["target_labels"][:, -1].numpy())
            users.append(batch["user"].numpy())
        labels_all, users_all = np.concatenate(labels), np.concatenate(users)
        several = np.bincount(users_all).max() > 1
        return _clean(ctr_metrics(labels_all, np.concatenate(probs), users_all if several else None))
    ranks = []
    if protocol == "full":
        indptr, indices = examples.exclusions()
        for start, batch in zip(range(0, len(examples), batch_size), iterate_batches(examples, batch_size=batch_size)):
            scores = model.score_all(batch).double().numpy()
            stop = start + scores.shape[0]
            sub_ptr = indptr[start : stop + 1] - indptr[start]
            ranks.append(full_ranking_ranks(scores, batch["target_items"][:, -1].numpy(),
                                            exclude=(sub_ptr, indices[indptr[start] : indptr[stop]])))
    else:
        n = int(protocol.split("-")[1])
        sampler = UniformNegativeSampler(examples.split, seed=eval_seed)
        for batch in iterate_batches(examples, batch_size=batch_size, num_negatives=n, sampler=sampler):
            scores = model.score_candidates(batch, batch["candidates"]).double().numpy()
            ranks.append(sampled_ranking_ranks(scores[:, 0], scores[:, 1:]))
    return _clean(ranking_metrics(np.concatenate(ranks)))


def _optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Adam for dense parameters; SparseAdam for sparse embedding tables (per-user private
    parameters), so a step moves only the rows of the batch's users."""
    sparse = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in sparse]
    sparse_params = [p for p in model.parameters() if p.requires_grad and id(p) in sparse]
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)]
    if sparse_params:
        opts.append(torch.optim.SparseAdam(sparse_params, lr=cfg.lr))
    return opts


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    ``protocol``, ``valid``, ``test``, ``best_epoch``, ``history``, ``seconds``,
    ``parameters`` and the configs; ``model_state`` holds the best weights (not JSON).
    """
    cfg = config or TrainConfig()
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    data = ModelData.from_split(split)
    model = create_model(model_name, data, model_options, task=task)
    max_len = getattr(getattr(model, "cfg", None), "max_len", 1)
    valid = build_examples(split, task=task, stage="valid", max_len=max_len)
    test = build_examples(split, task=task, stage="test", max_len=max_len)
    metric = selection_metric(task)
    protocol = "pooled" if task == "ctr" else cfg.protocol
    eval_args = dict(task=task, protocol=cfg.protocol, batch_size=cfg.eval_batch_size, eval_seed=cfg.eval_seed)
    history: list[dict[str, Any]] = []

    if not getattr(model, "trainable", True):
        model.fit(split)
        best_state, best_epoch = copy.deepcopy(model.state_dict()), 0
        best_valid = evaluate(model, valid, **eval_args)
    else:
        train_ex = build_examples(split, task=task, stage="train", max_len=max_len)
        if len(train_ex) == 0:
            raise ConfigError("no training examples (every user has fewer than two training interactions)")
        opts = _optimizers(model, cfg)
        sampler = UniformNegativeSampler(split, seed=cfg.seed) if task == "next_item" else None
        best_state, best_epoch, best_valid, best_score, stale = None, 0, {}, -np.inf, 0
        bar = _progress(cfg.epochs, f"{model_name} {task}", cfg.progress)
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            losses = []
            for batch in iterate_batches(train_ex, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch,
                                         num_negatives=cfg.negatives if task == "next_item" else 0, sampler=sampler):
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss = model.loss(batch, model(batch))
                loss.backward()
                for opt in opts:
                    opt.step()
                losses.append(float(loss.detach()))
            scores = evaluate(model, valid, **eval_args)
            record = {"epoch": epoch, "loss": round(float(np.mean(losses)), 6), "valid": scores}
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            score = scores[metric] if scores[metric] is not None else -np.inf
            bar.update(1)
            bar.set_postfix(loss=record["loss"], **{f"valid_{metric}": scores[metric]})
            if score > best_score:
                best_score, best_epoch, best_valid, stale = score, epoch, scores, 0
                best_state = copy.deepcopy(model.state_dict())
                if cfg.checkpoint:
                    _save_atomic({"model": model_name, "task": task, "epoch": epoch, "state": best_state,
                                  "model_options": model_options or {}, "train": asdict(cfg)}, Path(cfg.checkpoint))
            else:
                stale += 1
                if stale > cfg.patience:
                    break
        bar.close()
        model.load_state_dict(best_state)
    test_scores = evaluate(model, test, **eval_args)
    by_protocol = {}
    if task != "ctr":
        by_protocol[cfg.protocol] = test_scores
        for extra in cfg.extra_protocols():
            by_protocol[extra] = evaluate(model, test, **{**eval_args, "protocol": extra})
    return {
        "model": model_name,
        "data": data_name,
        "task": task,
        "protocol": protocol,
        "selection": f"valid {metric}",
        "valid": best_valid,
        "test": test_scores,
        "test_by_protocol": by_protocol,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "history": history,
        "seconds": round(time.perf_counter() - start, 2),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "seed": cfg.seed,
        "model_options": dict(model_options or {}),
        "train": {k: v for k, v in asdict(cfg).items() if k != "progress"},
        "model_state": best_state,
    }


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", disable=not enabled, leave=False)
