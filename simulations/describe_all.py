"""Describe every dataset folder under ../shared/data and write the statistics as JSON.

Usage::

    python simulations/describe_all.py [--data-root ../shared/data] [--out simulations/results/datasets.json]

Prints one line per dataset and writes one JSON object ``{spec: statistics}`` (the output
of ``fedrec data describe --json`` for each spec). Folders that are absent are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedrec.data import load_dataset
from fedrec.data.describe import describe
from fedrec.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]

#: spec per dataset folder, relative to the data root
SPECS = {
    "KuaiSAR-R": "kuaisar:{root}/KuaiSAR-R",
    "ml-100k": "movielens:{root}/ml-100k/u.data",
    "Beauty": "seq:{root}/s3rec/Beauty.txt",
    "LastFM": "seq:{root}/s3rec/LastFM.txt",
    "amazon-games-sasrec": "pairs:{root}/amazon-games-sasrec/Video.txt",
    "amazon-video-pfedrec": "csv:{root}/amazon-video-pfedrec/ratings.dat?header=false&user=0&item=1&rating=2&time=3&ids=factorize",
    "DisenCDR-sport_cloth": "cdr:{root}/DisenCDR-sport_cloth",
    "CDRIB-game_video": "cdr:{root}/CDRIB-game_video?shared_users=2179",
}


def main(argv: list[str] | None = None) -> int:
    """Describe every dataset and write ``--out``; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "datasets.json")
    args = parser.parse_args(argv)
    results = {}
    for name, template in SPECS.items():
        first = template.split(":", 1)[1].split("?")[0].format(root=args.data_root)
        if not Path(first).exists():
            print(f"{name:22s} skipped (not found)")
            continue
        stats = describe(load_dataset(template.format(root=args.data_root)))
        # record the spec relative to the data root: no machine paths in results
        stats["data"] = template.format(root="DATA")
        results[name] = stats
        label = "-" if stats["label_rate"] is None else f"{stats['label_rate']:.3f}"
        print(f"{name:22s} users {stats['users']:>7,}  items {stats['items']:>7,}  "
              f"interactions {stats['interactions']:>8,}  label rate {label}")
    write_json_atomic(results, args.out)  # a crash never leaves a truncated results file
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
