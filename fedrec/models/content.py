"""Item content for QARM: a pretrained text encoder, its alignment to behaviour, and the
quantitative codes (semantic IDs) of the aligned embeddings.

**Encoder.** :func:`text_encoder` loads WordLlama (``wordllama`` on PyPI, MIT licence): static
token embeddings distilled from a large language model's embedding table (Llama 2's
tokenizer, 256 dimensions), shipped *inside* the package, so nothing is fetched at run time;
an item's vector is the mean of its tokens' embeddings. This is the pretrained encoder the
paper's multi-modal LLM stands in for here (no MLLM runs on two CPU cores). Items without
text (KuaiSAR-R) are encoded from their attribute codes instead (:func:`attribute_vectors`:
the one-hot codes of every attribute field, reduced by PCA): a documented
stand-in computed from the data's item table, not a pretrained model.

**Alignment** (:func:`align`): a trainable two-layer projection of the frozen content
vectors, trained by in-batch InfoNCE on item pairs that behaviour says are alike
(:func:`behaviour_pairs`): *item-to-item* pairs, items that follow one another in some
user's training positives (a co-occurrence signal, Swing-like), and *user-to-item* pairs,
each training positive with the most content-similar of the user's previous 50 positives
(the paper's trigger; it uses its retrieval model's embeddings, we use the content
vectors). Only the training split is read.

**Codes** of the aligned embeddings (:func:`vq_codes`, :func:`rq_codes`): VQ, the indices of
an item's ``top`` nearest anchors among ``anchors`` items drawn at random; RQ-KMeans, ``levels``
rounds of k-means with ``size`` centroids, each on the residual of the previous (no
training step, unlike RQ-VAE). Code 0 is padding: codes run 1..N.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.errors import ConfigError

__all__ = ["text_encoder", "text_vectors", "attribute_vectors", "content_vectors", "behaviour_pairs", "align",
           "vq_codes", "rq_codes"]

_ENCODER = None


def text_encoder():
    """The WordLlama model shipped in the ``wordllama`` package (loaded once, offline).

    The package looks for its tokenizer under ``<cache>/tokenizers/`` and would otherwise
    download it although the wheel ships it; a private cache folder holding a link to the
    shipped file keeps the load offline (``disable_download``)."""
    global _ENCODER
    if _ENCODER is not None:
        return _ENCODER
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ConfigError(f"QARM's text encoder needs the 'wordllama' package ({exc}); pip install wordllama") from None
    import hashlib

    shipped = Path(wordllama.__file__).parent / "tokenizers" / "l2_supercat_tokenizer_config.json"
    # one folder per installed package (another environment's link could dangle)
    key = hashlib.sha1(str(shipped.resolve()).encode()).hexdigest()[:12]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    cache = Path(tempfile.gettempdir()) / f"fedrec-wordllama-{uid}-{key}"
    target = cache / "tokenizers" / shipped.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():  # dangling
            target.unlink()
        try:
            target.symlink_to(shipped)
        except FileExistsError:  # another process made it meanwhile
            pass
        except OSError:  # no symlinks here: a copy
            shutil.copy(shipped, target)
    _ENCODER = WordLlama.load(cache_dir=cache, disable_download=True)
    return _ENCODER


def text_vectors(texts: list[str] | np.ndarray) -> np.ndarray:
    """``(n, 256)`` unit-norm WordLlama vectors of ``texts`` (zeros for empty ones)."""
    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), 256), dtype=np.float32)
    real = [i for i, t in enumerate(texts) if t.strip()]
    if real:
        vec = np.asarray(text_encoder().embed([texts[i] for i in real], norm=True), dtype=np.float32)
        out[real] = vec
    return out


def attribute_vectors(codes: np.ndarray, dim: int, *, seed: int = 0) -> np.ndarray:
    """``(n, dim)`` unit-norm vectors of items from their attribute codes ``(n, F)`` (the
    one-hot codes of every field, PCA to ``dim``; the stand-in for data without text).
    Row 0 (padding) is zeros."""
    from sklearn.decomposition import PCA

    codes = np.asarray(codes, dtype=np.int64)
    n, fields = codes.shape
    offsets = np.concatenate([[0], np.cumsum(codes.max(axis=0) + 1)[:-1]])
    cols = (codes + offsets).reshape(-1)
    onehot = np.zeros((n, int(cols.max()) + 1), dtype=np.float32)
    onehot[np.repeat(np.arange(n), fields), cols] = 1.0
    # centred (PCA), so that the vectors do not all share the one-hot's mean direction
    k = max(1, min(dim, onehot.shape[1] - 1, n - 2))
    vec = PCA(k, random_state=seed).fit_transform(onehot[1:]).astype(np.float32)
    vec = np.vstack([np.zeros((1, k), dtype=np.float32), vec])
    if k < dim:
        vec = np.pad(vec, ((0, 0), (0, dim - k)))
    vec[0] = 0.0
    norm = np.linalg.norm(vec, axis=1, keepdims=True)
    return np.where(norm > 0, vec / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def content_vectors(split, *, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, str]:
    """``((n_items + 1, c) content vectors, source)``: WordLlama over the items' text when the
    data has it (``source = "wordllama"``), else their attribute codes (``"attributes"``)."""
    if split.item_text is not None and any(str(t).strip() for t in split.item_text[1:]):
        vec = text_vectors(split.item_text)
        vec[0] = 0.0
        return vec, "wordllama"
    if split.item_features is not None:
        return attribute_vectors(split.item_features, dim, seed=seed), "attributes"
    raise ConfigError("QARM needs item content: the data has neither item text nor item attribute codes")


def behaviour_pairs(split, content: np.ndarray, *, kind: str = "both", window: int = 50,
                    min_count: int = 1) -> np.ndarray:
    """``(P, 2)`` item pairs (trigger, target) from the training split's positives (module
    docstring): ``item2item``, ``user2item`` or ``both``."""
    from fedrec.data.split import TRAIN

    pos = (split.part == TRAIN) & (split.label == 1)
    pairs = []
    for s in range(split.n_sequences):
        lo, hi = split.indptr[s], split.indptr[s + 1]
        rows = np.arange(lo, hi)
        items = split.item[rows[pos[lo:hi]]]
        if len(items) < 2:
            continue
        if kind in ("both", "item2item"):
            pairs.append(np.stack([items[:-1], items[1:]], axis=1))
        if kind in ("both", "user2item"):
            vec = content[items]  # (n, c), unit norm
            n = len(items)
            w = min(window, n - 1)
            # similarity of position i to i - k, k = 1..w (a band: O(n w), not O(n^2))
            sims = np.full((n, w), -np.inf, dtype=np.float32)
            for k in range(1, w + 1):
                sims[k:, k - 1] = np.sum(vec[k:] * vec[:-k], axis=1)
            lag = sims[1:].argmax(axis=1) + 1  # position i >= 1 has at least one earlier item
            target = np.arange(1, n)
            pairs.append(np.stack([items[target - lag], items[target]], axis=1))
    if not pairs:
        raise ConfigError("QARM: the training split has no user with two positives to mine item pairs from")
    out = np.concatenate(pairs)
    out = out[out[:, 0] != out[:, 1]]
    if min_count > 1:
        uniq, counts = np.unique(out, axis=0, return_counts=True)
        out = uniq[counts >= min_count]
    return out.astype(np.int64)


class _Head(nn.Module):
    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def align(content: np.ndarray, pairs: np.ndarray, *, dim: int = 64, epochs: int = 5, batch_size: int = 512,
          lr: float = 1e-3, temperature: float = 0.1, seed: int = 0) -> np.ndarray:
    """``(n_items + 1, dim)`` aligned unit-norm embeddings: the projection of the frozen
    ``content`` trained by in-batch InfoNCE (both directions) on ``pairs``. Row 0 stays 0."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(content, dtype=np.float32))
    head = _Head(x.shape[1], dim)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    p = torch.from_numpy(pairs)
    for _ in range(epochs):
        order = torch.randperm(len(p), generator=gen)
        for start in range(0, len(p), batch_size):
            batch = p[order[start:start + batch_size]]
            a, b = head(x[batch[:, 0]]), head(x[batch[:, 1]])
            logits = a @ b.T / temperature
            # the same target item twice in a batch is not a negative of itself
            same = batch[:, 1].unsqueeze(0) == batch[:, 1].unsqueeze(1)
            eye = torch.eye(len(batch), dtype=torch.bool)
            logits = logits.masked_fill(same & ~eye, float("-inf"))
            target = torch.arange(len(batch))
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        out = head(x).numpy()
    out[0] = 0.0
    return out


def vq_codes(emb: np.ndarray, *, anchors: int, top: int, seed: int = 0) -> np.ndarray:
    """``(n_items + 1, top)`` VQ codes: the 1-based indices of each item's ``top`` nearest
    anchors (cosine) among ``anchors`` items drawn at random (row 0: zeros)."""
    n = emb.shape[0] - 1
    anchors = min(anchors, n)
    top = min(top, anchors)
    rng = np.random.default_rng(seed)
    pool = 1 + rng.choice(n, size=anchors, replace=False)
    sims = emb[1:] @ emb[pool].T  # (n, anchors)
    best = np.argsort(-sims, axis=1, kind="stable")[:, :top] + 1
    return np.vstack([np.zeros((1, top), dtype=np.int64), best.astype(np.int64)])


def rq_codes(emb: np.ndarray, *, levels: int, size: int, seed: int = 0) -> np.ndarray:
    """``(n_items + 1, levels)`` RQ-KMeans codes, 1-based (row 0: zeros)."""
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    residual = emb[1:].astype(np.float64).copy()
    k = max(1, min(size, len(residual)))
    codes = np.zeros((emb.shape[0], levels), dtype=np.int64)
    for level in range(levels):
        with warnings.catch_warnings():  # fewer distinct points than centroids: some stay empty
            warnings.simplefilter("ignore", ConvergenceWarning)
            km = KMeans(n_clusters=k, n_init=1, random_state=seed + level).fit(residual)
        codes[1:, level] = km.labels_ + 1
        residual = residual - km.cluster_centers_[km.labels_]
    return codes
