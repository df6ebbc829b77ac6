"""Group discovery made visible: how MRFF routes users, per layer, and — on synthetic data
with known groups — how well the discovered groups agree with the true ones (NMI).

Each user is routed with its full history (train + valid, the test-time view). The
agreement is the normalised mutual information between the true group and the chosen group
at each layer, and between the true group and the combination of choices over all layers
(the hierarchical group). Chance level is the mean NMI of the same routes against randomly
permuted true groups.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.split import SplitData
from fedrec.device import to_device
from fedrec.errors import ConfigError

__all__ = ["grouped_models", "require_groups", "route_users", "user_gate_inputs", "kmeans_nmi", "group_report",
           "plot_group_report"]


def grouped_models() -> list[str]:
    """The registered models that route users over groups (those with a ``route`` method)."""
    from fedrec.models.registry import MODELS

    return [name for name in MODELS.names() if hasattr(MODELS.create(name).model, "route")]


def require_groups(model_name: str, where: str = "") -> None:
    """Refuse a model without groups, naming it and the models that have them
    (:class:`~fedrec.errors.ConfigError`; ``where`` prefixes the message, e.g. the file)."""
    if model_name not in grouped_models():
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}holds a {model_name} model, which has no groups to inspect (models with groups: "
                          f"{', '.join(grouped_models())})")


def _per_user_batches(model, split: SplitData, method: str, what: str, batch_size: int):
    """``(user indices, device batch)`` of each user's test-time view (one example per
    sequence: the first target of each user), for a model that has ``method``."""
    from fedrec.train import model_device

    if not hasattr(model, method):
        raise ConfigError(f"{type(model).__name__} has no {what} to inspect (models with groups: "
                          f"{', '.join(grouped_models())})")
    model.eval()
    examples = build_examples(split, task="ctr" if split.has_labels else "next_item", stage="test",
                              max_len=model.cfg.max_len)
    _, first = np.unique(examples.users, return_index=True)
    examples = examples.subset(examples.users[first])
    for batch in iterate_batches(examples, batch_size=batch_size):
        yield batch["user"].numpy(), to_device(batch, model_device(model))


@torch.no_grad()
def route_users(model, split: SplitData, *, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``(users, routes)``: user indices and their ``(n, layers)`` chosen groups."""
    users, routes = [], []
    for u, batch in _per_user_batches(model, split, "route", "group routing", batch_size):
        users.append(u)
        routes.append(model.route(batch).cpu().numpy())
    return np.concatenate(users), np.concatenate(routes)


@torch.no_grad()
def user_gate_inputs(model, split: SplitData, *, batch_size: int = 512) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(users, per layer (n, w) arrays)``: each user's gate-network input at its test-time
    view (the same examples :func:`route_users` routes), for models with ``gate_inputs``."""
    users, layers = [], []
    for u, batch in _per_user_batches(model, split, "gate_inputs", "group gate", batch_size):
        users.append(u)
        layers.append([x.cpu().numpy() for x in model.gate_inputs(batch)])
    return np.concatenate(users), [np.concatenate(per) for per in zip(*layers)]


def kmeans_nmi(features: np.ndarray, truth: np.ndarray, groups: int, *, seed: int = 0) -> float:
    """NMI against ``truth`` of k-means with ``groups`` clusters on ``features`` (``(n, w)``,
    each column standardised; 10 restarts): how well the best clustering of these features
    into ``groups`` parts recovers the true groups (an upper reference for a router that reads them)."""
    from sklearn.cluster import KMeans

    x = np.asarray(features, dtype=np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    labels = KMeans(groups, n_init=10, random_state=seed).fit(x).labels_
    return round(float(normalized_mutual_info_score(truth, labels)), 4)


def group_report(users: np.ndarray, routes: np.ndarray, groups: int, true_group: np.ndarray | None = None,
                 *, permutations: int = 20, seed: int = 0) -> dict[str, Any]:
    """Per-layer spread of users over groups and, with ``true_group`` (indexed by user
    index), NMI against the truth and its chance level."""
    layers = routes.shape[1]
    report: dict[str, Any] = {"users": int(len(users)), "groups": groups, "layers": []}
    combo = np.zeros(len(users), dtype=np.int64)
    for layer in range(layers):
        counts = np.bincount(routes[:, layer], minlength=groups)
        report["layers"].append({"layer": layer, "users_per_group": counts.tolist()})
        combo = combo * groups + routes[:, layer]
    report["combinations_used"] = int(len(np.unique(combo)))
    if true_group is not None:
        truth = true_group[users]
        rng = np.random.default_rng(seed)
        for layer, entry in enumerate(report["layers"]):
            entry["nmi"] = round(float(normalized_mutual_info_score(truth, routes[:, layer])), 4)
            entry["nmi_chance"] = round(float(np.mean([
                normalized_mutual_info_score(rng.permutation(truth), routes[:, layer]) for _ in range(permutations)
            ])), 4)
            entry["true_groups"] = np.unique(truth).tolist()
            entry["contingency"] = [
                np.bincount(routes[truth == t, layer], minlength=groups).tolist() for t in np.unique(truth)
            ]
        report["nmi_combined"] = round(float(normalized_mutual_info_score(truth, combo)), 4)
        report["nmi_combined_chance"] = round(float(np.mean([
            normalized_mutual_info_score(rng.permutation(truth), combo) for _ in range(permutations)
        ])), 4)
    return report


def plot_group_report(report: dict[str, Any], path) -> None:
    """Heatmap PNG: per layer, users per (true group x chosen group), or per chosen group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.4), squeeze=False)
    for ax, entry in zip(axes[0], layers):
        matrix = np.array(entry.get("contingency") or [entry["users_per_group"]])
        im = ax.imshow(matrix, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", color="w" if v < matrix.max() / 2 else "k", fontsize=8)
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(matrix.shape[0]))
        ax.set_yticklabels([str(t) for t in entry.get("true_groups", range(matrix.shape[0]))])
        ax.set_xlabel("chosen group")
        ax.set_ylabel("true group" if "contingency" in entry else "")
        title = f"layer {entry['layer']}"
        if "nmi" in entry:
            title += f": NMI {entry['nmi']:.3f} (chance {entry['nmi_chance']:.3f})"
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
