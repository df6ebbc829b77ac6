"""The ``fedrec`` command line.

Every command has ``--help``. Errors in the user's input (a bad spec, a bad file) are
printed as one line on stderr with a non-zero exit (2), never as a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from fedrec import __version__
from fedrec.errors import FedrecError

app = typer.Typer(
    help="fedrec: federated, privacy-preserving multifaceted user modelling for recommendation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect data sources.", no_args_is_help=True)
app.add_typer(data_app, name="data")

EXIT_USER_ERROR = 2


def _fail(exc: Exception) -> None:
    typer.echo(f"fedrec: error: {exc}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedrec {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """fedrec: federated, privacy-preserving multifaceted user modelling for recommendation."""


@data_app.command("describe")
def data_describe(
    spec: str = typer.Argument(
        ...,
        metavar="SPEC",
        help="Data source FORMAT:PATH[?key=value&...], e.g. kuaisar:DIR, movielens:u.data, "
        "seq:Beauty.txt, pairs:Video.txt, cdr:DIR, csv:FILE?user=..&item=.., synthetic:users=2000.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Print users, items, interactions, density, label rate, sequence lengths and domains."""
    from fedrec.data import load_dataset
    from fedrec.data.describe import describe

    try:
        stats = describe(load_dataset(spec))
    except FedrecError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(stats))
        return
    _print_stats(stats)


@data_app.command("formats")
def data_formats() -> None:
    """List the data formats a SPEC can name, with the first line of their documentation."""
    from fedrec.data.sources import SOURCES

    for name in SOURCES.names():
        doc = (sys.modules[SOURCES.get(name).__module__].__doc__ or "").strip().splitlines()
        typer.echo(f"{name:10s} {doc[0] if doc else ''}")


def _print_stats(stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=stats["data"], show_header=False)
    table.add_column("statistic", style="bold")
    table.add_column("value")
    label = "n/a (implicit feedback)" if stats["label_rate"] is None else f"{stats['label_rate']:.4f}"
    rows = [
        ("users", f"{stats['users']:,}"),
        ("items", f"{stats['items']:,}"),
        ("interactions", f"{stats['interactions']:,}"),
        ("density", f"{stats['density']:.6f}"),
        ("label rate", label),
    ]
    if stats["rating"]:
        r = stats["rating"]
        rows.append(("rating", f"{r['min']:g}..{r['max']:g}, mean {r['mean']:.3f}"))
    sl = stats["sequence_length"]
    rows.append(
        ("interactions per user",
         f"min {sl['p0']:g} / p25 {sl['p25']:g} / median {sl['p50']:g} / p75 {sl['p75']:g} / "
         f"p90 {sl['p90']:g} / max {sl['p100']:g} / mean {sl['mean']:.2f}")
    )
    rows.append(("repeated (user, item) rows", f"{stats['repeated_pairs']:,}"))
    if stats["domains"]:
        for name, d in stats["domains"].items():
            text = f"{d['users']:,} users, {d['items']:,} items, {d['interactions']:,} interactions"
            if d.get("splits"):
                text += " (" + ", ".join(f"{s} {c['interactions']:,}" for s, c in d["splits"].items()) + ")"
            rows.append((f"domain {name}", text))
        rows.append(("users in all domains", f"{stats['users_in_all_domains']:,}"))
    elif stats["splits"]:
        rows.append(("splits", ", ".join(f"{s} {c['interactions']:,}" for s, c in stats["splits"].items())))
    if stats["user_features"]:
        rows.append(("user features", ", ".join(stats["user_features"])))
    if stats["item_features"]:
        rows.append(("item features", ", ".join(stats["item_features"])))
    if stats.get("true_groups"):
        rows.append(("true groups (users)", ", ".join(f"{k}: {v}" for k, v in stats["true_groups"].items())))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    app()
