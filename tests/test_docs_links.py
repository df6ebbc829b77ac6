"""Every relative link in README.md and the documentation pages resolves: the file exists and,
for ``file#anchor``, the file has a heading with that anchor (as GitHub renders it)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "simulations"))
from render_results import github_anchor  # noqa: E402

PAGES = ["README.md", "fedrec/README.md", "fedrec/data/README.md", "fedrec/models/README.md", "fedrec/federated/README.md",
         "server/README.md", "simulations/README.md", "simulations/results/README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (``-1``, ``-2`` for repeated ones), outside code blocks."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        slug = github_anchor(line.lstrip("#"))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks hold no links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_github_anchor_is_githubs():
    assert github_anchor("Splits, tasks and protocols (`fedrec.data`, `fedrec.metrics`)") == \
        "splits-tasks-and-protocols-fedrecdata-fedrecmetrics"
    assert github_anchor("Moment&Cross: searching the other domain") == "momentcross-searching-the-other-domain"
    assert github_anchor("MovieLens-100K, CTR (rating >= 4)") == "movielens-100k-ctr-rating--4"


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    source = ROOT / page
    assert source.is_file(), page
    broken = []
    for target in links(source):
        file, _, anchor = target.partition("#")
        dest = (source.parent / file).resolve() if file else source
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page}: broken links: {', '.join(broken)}"


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Top\n\n## A section\n\n[ok](#a-section) [gone](#nowhere) [file](q.md) `[x](#code)`\n")
    assert links(page) == ["#a-section", "#nowhere", "q.md", "#code"]
    assert anchors(page) == {"top", "a-section"}
