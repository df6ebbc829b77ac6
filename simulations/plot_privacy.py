"""Privacy-utility plot: test AUC and LogLoss against epsilon, from the comparison results of
``fed_kuaisar_dp.toml`` (local, user-level DP) and ``fed_kuaisar_central_dp.toml`` (central,
client-level DP), with the no-DP runs drawn at the right edge and the user-click-rate
baseline as a line.

    python simulations/plot_privacy.py [--results simulations/results] [--out simulations/results/privacy_utility.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERIES = {"fed_kuaisar_dp": "local DP (user level, 1 silo)", "fed_kuaisar_central_dp": "central DP (client level, 100 clients)"}


def _points(path: Path) -> tuple[list[tuple[float, float, float]], float | None, dict | None]:
    """(epsilon, auc, logloss) of the DP runs, the no-DP run's epsilon position and values."""
    runs = json.loads(path.read_text())
    dp, nodp, baseline = [], None, None
    for run in runs.values():
        test = run["test"]
        if run.get("model") == "user_ctr" or run["row"].startswith("user click rate"):
            baseline = test
        elif test.get("epsilon") is not None:
            dp.append((float(test["epsilon"]), float(test["auc"]), float(test["logloss"])))
        elif "privacy" not in run:
            nodp = test
    return sorted(dp), nodp, baseline


def main(argv: list[str] | None = None) -> int:
    """Draw the plot (PNG)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "simulations" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "privacy_utility.png")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    found = False
    baseline = None
    for stem, label in SERIES.items():
        path = args.results / f"{stem}.json"
        if not path.exists():
            continue
        dp, nodp, base = _points(path)
        baseline = baseline or base
        if not dp:
            continue
        found = True
        eps = [p[0] for p in dp]
        inf_x = max(eps) * 4
        for ax, i in ((axes[0], 1), (axes[1], 2)):
            line, = ax.plot(eps, [p[i] for p in dp], "o-", label=label)
            if nodp is not None:
                key = "auc" if i == 1 else "logloss"
                ax.plot([inf_x], [nodp[key]], "s", color=line.get_color())
    if not found:
        print(f"plot_privacy: no DP results under {args.results}", file=sys.stderr)
        return 2
    for ax, key, name in ((axes[0], "auc", "test AUC"), (axes[1], "logloss", "test LogLoss")):
        if baseline is not None:
            ax.axhline(baseline[key], color="grey", linestyle="--", label="user click rate")
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (squares: no DP)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("KuaiSAR-R, federated MRFF: privacy vs utility (60 rounds, seed 0)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
