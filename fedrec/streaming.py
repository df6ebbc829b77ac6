"""Streaming CTR training with delayed labels: Moment&Cross's *Moment* trainer.

Moment&Cross (arXiv 2408.05709) trains its live-stream CTR model in real time: a click is
reported some time after the exposure, a non-click only when the user leaves, and the model
must learn from feedback within seconds. This module replays a time-ordered impression log as
such a stream (``../shared/reference/seed_baselines.md`` section 8):

* every click arrives ``Exp(delay)`` seconds after its exposure (seeded); a sample's label is
  *final* ``horizon`` seconds after the exposure (the user has left: a click arriving later
  is lost, as under any attribution window);
* time is cut into windows of ``window`` seconds; at each window the model is first
  **evaluated** on the impressions exposed in it (their final labels; the history's labels as
  known at the window's start: no future click leaks in), then **trained** on the samples
  whose label event falls in it (one pass, minibatches). The stream's metric is the AUC
  pooled over every evaluated window after ``warmup`` windows (prequential, test-then-train).

Strategies (``strategy``), all at the same ``horizon``:

``final-label``
    wait for the final label: every sample is trained once, ``horizon`` after its exposure.
``first-label``
    Moment's first-only label mask: a clicked sample is trained once, as a positive, when
    its first click arrives; a sample without a click when its label is final (the user
    left). No sample is learned twice.
``fast-slow``
    the earlier fast/slow window join: every sample is trained ``window`` after its exposure
    with the label known then (fast); a click that arrives later is trained again at its
    arrival (slow) with the positive loss *plus* minus the negative loss it was trained with.

Any CTR model trains this way (``fedrec.models``): each sample is a one-target batch whose
history is the user's earlier impressions (at most ``max_len``) with their labels as known at
the training (or evaluation) time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedrec.errors import ConfigError

__all__ = ["StreamConfig", "STRATEGIES", "label_events", "history_labels", "stream_train"]

STRATEGIES = ("first-label", "final-label", "fast-slow")


@dataclass
class StreamConfig:
    """Options of :func:`stream_train` (module docstring); times in the data's unit."""

    strategy: str = "first-label"
    window: float = 1800.0
    delay: float = 600.0
    horizon: float = 3600.0
    warmup: int = 2
    batch_size: int = 256
    lr: float = 1e-3
    max_len: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"streaming strategy must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})")
        for name in ("window", "horizon"):
            value = getattr(self, name)
            if not (value > 0 and np.isfinite(value)):
                raise ConfigError(f"streaming option '{name}' must be a positive finite number (got {value})")
        if not (self.delay >= 0 and np.isfinite(self.delay)):
            raise ConfigError(f"streaming option 'delay' must be a finite number >= 0 (got {self.delay})")
        for name in ("batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"streaming option '{name}' must be >= 1 (got {getattr(self, name)})")
        if self.warmup < 0:
            raise ConfigError(f"streaming option 'warmup' must be >= 0 (got {self.warmup})")


def label_events(time: np.ndarray, label: np.ndarray, arrival: np.ndarray, cfg: StreamConfig) -> dict[str, np.ndarray]:
    """The training events of every sample under ``cfg.strategy``: arrays ``row`` (the
    sample), ``at`` (when it is trained), ``target`` (the label trained) and ``weight``
    (+1, or -1 for the fast/slow correction's negative term). ``arrival`` is each click's
    arrival time (inf for non-clicks)."""
    n = len(time)
    rows = np.arange(n)
    final = (label == 1) & (arrival <= time + cfg.horizon)
    events: list[tuple[np.ndarray, ...]] = []
    if cfg.strategy == "final-label":
        events.append((rows, time + cfg.horizon, final.astype(np.float32), np.ones(n, np.float32)))
    elif cfg.strategy == "first-label":
        pos = rows[final]
        neg = rows[~final]
        events.append((pos, arrival[pos], np.ones(len(pos), np.float32), np.ones(len(pos), np.float32)))
        events.append((neg, time[neg] + cfg.horizon, np.zeros(len(neg), np.float32), np.ones(len(neg), np.float32)))
    else:  # fast-slow
        fast_at = time + cfg.window
        known = final & (arrival <= fast_at)
        events.append((rows, fast_at, known.astype(np.float32), np.ones(n, np.float32)))
        late = rows[final & ~known]
        # the slow window: + BCE(positive) - BCE(negative), the negative it was first trained as
        events.append((late, arrival[late], np.ones(len(late), np.float32), np.ones(len(late), np.float32)))
        events.append((late, arrival[late], np.zeros(len(late), np.float32), -np.ones(len(late), np.float32)))
    row, at, target, weight = (np.concatenate(parts) for parts in zip(*events))
    order = np.argsort(at, kind="stable")
    return {"row": row[order], "at": at[order], "target": target[order], "weight": weight[order]}


def _history(user: np.ndarray, time: np.ndarray, max_len: int) -> np.ndarray:
    """``(n, max_len)`` indices of each row's earlier rows of the same user (left-padded, -1);
    rows must be sorted by (user, time)."""
    n = len(user)
    start = np.zeros(n, dtype=np.int64)
    new = np.ones(n, dtype=bool)
    new[1:] = user[1:] != user[:-1]
    first = np.flatnonzero(new)
    start = first[np.cumsum(new) - 1]
    offsets = np.arange(-max_len, 0)
    idx = np.arange(n)[:, None] + offsets[None, :]
    return np.where(idx >= start[:, None], idx, -1)


def history_labels(history: np.ndarray, label: np.ndarray, arrival: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``(B, L)`` 0/1 labels of the history rows ``history`` (-1 = padding) as known at the
    times ``at`` ``(B,)``: a click counts once it has arrived."""
    safe = np.maximum(history, 0)
    return (history >= 0) & (label[safe] == 1) & (arrival[safe] <= at[:, None])


def stream_train(model_name: str, split, *, model_options: dict[str, Any] | None = None,
                 config: StreamConfig | None = None, progress: bool = False) -> dict[str, Any]:
    """Replay ``split``'s impressions (every part, in time order) as a stream and train a
    fresh ``model_name`` on it (module docstring). Returns a JSON-ready dict: ``auc``
    (pooled over the evaluated windows after warmup), ``windows`` (per window: start,
    evaluated impressions, their AUC or None, samples trained), ``trained`` (events),
    ``mean_training_delay`` (time from exposure to training, averaged over events),
    ``seconds``."""
    import time as clock

    from fedrec.metrics import auc as auc_of
    from fedrec.models.base import ModelData
    from fedrec.models.registry import create_model

    cfg = config or StreamConfig()
    if not split.has_labels:
        raise ConfigError("streaming CTR training needs click labels (0/1) in the data")
    started = clock.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    # each sequence (a user, or a (user, domain) pair on multi-domain data) in time order
    order = np.lexsort((np.asarray(split.time, dtype=np.float64), split.row_seq))
    user = split.row_user[order]
    seq = split.row_seq[order]
    time = np.asarray(split.time, dtype=np.float64)[order]
    item = split.item[order]
    label = split.label[order].astype(np.int64)
    domain = np.repeat(split.seq_domain, np.diff(split.indptr))[order]
    arrival = np.where(label == 1, time + rng.exponential(cfg.delay, size=len(time)) if cfg.delay > 0 else time, np.inf)
    final = ((label == 1) & (arrival <= time + cfg.horizon)).astype(np.float32)
    hist = _history(seq, time, cfg.max_len)
    events = label_events(time, label, arrival, cfg)

    model = create_model(model_name, ModelData.from_split(split), model_options, task="ctr")
    # what prepare() fits reads the whole log, labels included: the stream's future (a model
    # says whether its prepare() does, ``fits_on_log``; one without the flag is assumed to)
    if getattr(model, "fits_on_log", hasattr(model, "prepare")):
        raise ConfigError(f"model '{model_name}' fits state on the whole log before training (prepare), which a "
                          "stream may not read; stream it without that state (moment_cross: cross=false; "
                          "qarm: content=none)")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)

    def batch(rows: np.ndarray, at: np.ndarray) -> dict[str, torch.Tensor]:
        h = hist[rows]
        safe = np.maximum(h, 0)
        known = history_labels(h, label, arrival, at)
        B, L = h.shape
        # the next impression after each history position, as in training windows (only the
        # last position counts: target_mask); models such as MARM read the others
        hist_items = np.where(h >= 0, item[safe], 0)
        targets = np.zeros((B, L), dtype=np.int64)
        targets[:, :-1] = hist_items[:, 1:]
        targets[:, -1] = item[rows]
        mask = np.zeros((B, L), dtype=bool)
        mask[:, -1] = True
        times = np.full((B, L), np.nan)
        times[:, -1] = time[rows]
        return {"user": torch.from_numpy(user[rows]), "domain": torch.from_numpy(domain[rows]),
                "items": torch.from_numpy(hist_items),
                "labels": torch.from_numpy(known.astype(np.int64)),
                "target_items": torch.from_numpy(targets), "target_mask": torch.from_numpy(mask),
                "target_labels": torch.zeros(B, L), "target_times": torch.from_numpy(times)}

    t0 = float(time.min())
    n_windows = int(np.floor((float(max(time.max(), events["at"][np.isfinite(events["at"])].max())) - t0) / cfg.window)) + 1
    window_of_exposure = np.floor((time - t0) / cfg.window).astype(np.int64)
    window_of_event = np.floor((events["at"] - t0) / cfg.window).astype(np.int64)
    windows, probs_all, labels_all = [], [], []
    trained = 0
    delays = []
    from tqdm.auto import tqdm

    # only windows with an exposure or an event (millisecond data has millions of empty ones)
    busy = np.unique(np.concatenate([window_of_exposure, window_of_event]))
    by_exposure = np.argsort(window_of_exposure, kind="stable")
    by_event = np.argsort(window_of_event, kind="stable")
    exp_sorted, ev_sorted = window_of_exposure[by_exposure], window_of_event[by_event]
    for w in tqdm(busy.tolist(), desc=f"stream {cfg.strategy}", disable=not progress, leave=False):
        start = t0 + w * cfg.window
        entry: dict[str, Any] = {"window": w, "start": start}
        shown = by_exposure[np.searchsorted(exp_sorted, w, "left"):np.searchsorted(exp_sorted, w, "right")]
        if len(shown):
            model.eval()
            with torch.no_grad():
                p = np.concatenate([model.predict_ctr(batch(shown[s:s + 1024], np.full(len(shown[s:s + 1024]), start)))
                                    .double().numpy() for s in range(0, len(shown), 1024)])
            y = final[shown]
            entry["evaluated"] = int(len(shown))
            entry["auc"] = float(auc_of(y, p)) if 0 < y.sum() < len(y) else None
            if w >= busy[0] + cfg.warmup:
                probs_all.append(p)
                labels_all.append(y)
        todo = np.sort(by_event[np.searchsorted(ev_sorted, w, "left"):np.searchsorted(ev_sorted, w, "right")])
        if len(todo):
            model.train()
            perm = todo[rng.permutation(len(todo))]
            for s in range(0, len(perm), cfg.batch_size):
                ev = perm[s:s + cfg.batch_size]
                rows, at = events["row"][ev], events["at"][ev]
                out = model(batch(rows, at))
                logit = out["logits"][:, -1]
                target = torch.from_numpy(events["target"][ev])
                weight = torch.from_numpy(events["weight"][ev])
                loss = (weight * F.binary_cross_entropy_with_logits(logit, target, reduction="none")).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            trained += int(len(todo))
            delays.append(events["at"][todo] - time[events["row"][todo]])
        entry["trained"] = int(len(todo))
        windows.append(entry)
    if not probs_all:
        raise ConfigError(f"the stream spans {n_windows} windows: none is evaluated after warmup={cfg.warmup}")
    y_all, p_all = np.concatenate(labels_all), np.concatenate(probs_all)
    return {"model": model_name, "strategy": cfg.strategy, "config": dict(vars(cfg)),
            "auc": float(auc_of(y_all, p_all)), "evaluated": int(len(y_all)), "positive_rate": float(y_all.mean()),
            "windows": windows, "trained": trained,
            "mean_training_delay": float(np.concatenate(delays).mean()) if delays else None,
            "seconds": round(clock.perf_counter() - started, 2)}
