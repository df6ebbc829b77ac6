"""simulations/results/README.md is what simulations/render_results.py renders from the
recorded JSON (no hand-typed numbers), and the recorded runs match today's configurations."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "simulations"))
import render_results  # noqa: E402

RESULTS = ROOT / "simulations" / "results"


@pytest.fixture(scope="module")
def fresh() -> str:
    return render_results.render()


def test_results_page_is_rendered_from_the_json(fresh):
    """The committed page equals a fresh rendering (no training, no data files: only the JSON)."""
    committed = (RESULTS / "README.md").read_text()
    stale = [] if committed == fresh else render_results.stale_sections(committed)
    assert committed == fresh, (f"simulations/results/README.md is stale in: {', '.join(stale)}; "
                                "run python simulations/render_results.py")


def test_every_recorded_comparison_and_table_is_on_the_page(fresh):
    """Every results JSON of a config is rendered (so a new result cannot be left off), and the
    tables are the ones each script renders itself."""
    import bench_cdr
    import bench_long_sequences
    import bench_marm
    import client_failures
    import crm_control
    import group_discovery
    import streaming_moment

    rendered = {line for line in fresh.splitlines() if line.startswith("| ")}
    for config in sorted((ROOT / "simulations" / "configs").glob("*.toml")):
        if (RESULTS / f"{config.stem}.json").is_file():
            rows = {run["row"] for run in json.loads((RESULTS / f"{config.stem}.json").read_text()).values()}
            missing = [row for row in rows if not any(line.startswith(f"| {row} | ") for line in rendered)]
            assert not missing, f"{config.stem}.json: rows not on the page: {missing}"
    for text in (bench_cdr.markdown_table(json.loads((RESULTS / "bench_cdr.json").read_text())),
                 bench_long_sequences.markdown_table(json.loads((RESULTS / "bench_long_sequences.json").read_text())),
                 bench_marm.markdown_table(json.loads((RESULTS / "bench_marm.json").read_text())),
                 crm_control.markdown(json.loads((RESULTS / "ml100k_crm_control.json").read_text())),
                 crm_control.markdown(json.loads((RESULTS / "ml100k_crm_dt_control.json").read_text())),
                 streaming_moment.markdown(json.loads((RESULTS / "streaming_moment.json").read_text())),
                 streaming_moment.markdown(json.loads((RESULTS / "streaming_moment_nonstationary.json").read_text())),
                 group_discovery.markdown_table(json.loads((RESULTS / "group_discovery.json").read_text())),
                 client_failures.markdown(json.loads((RESULTS / "client_failures.json").read_text()))):
        assert {line for line in text.splitlines() if line.startswith("| ")} <= rendered
    # the recorded benchmarks without a renderer of their own: their numbers are on the page
    privacy = json.loads((RESULTS / "bench_privacy.json").read_text())
    seconds = privacy["seconds"]["70000"]
    assert f"| 70,000 | {seconds['nondp']:.2f} s | {seconds['dp']:.2f} s |" in fresh
    training = json.loads((RESULTS / "bench_training.json").read_text())
    assert f"| SASRec | {training['sasrec']:.1f} | 1 |" in fresh
    assert "| MovieLens-100K, all ratings" not in fresh  # the old hand-typed FedMF table is gone


def test_the_page_quotes_only_what_the_json_holds(monkeypatch):
    """A number in the prose comes from the JSON: change one recorded value and the sentence
    quoting it changes with the table."""
    recorded = render_results.doc
    edited = json.loads(json.dumps(recorded("kuaisar_ctr_ablations")))
    for run in edited.values():
        if run["row"] == "MRFF, no user FFN":
            run["test"]["auc"] = 0.1234
    monkeypatch.setattr(render_results, "doc",
                        lambda name: edited if name == "kuaisar_ctr_ablations" else recorded(name))
    text = render_results.s_kuaisar_ctr()
    assert "without it MRFF falls to 0.1234" in text
    assert "| MRFF, no user FFN | 0.1234 ± 0.0000 |" in text


def test_check_names_the_stale_sections(tmp_path, fresh, capsys):
    page = tmp_path / "README.md"
    page.write_text(fresh)
    assert render_results.main(["--check", "--out", str(page)]) == 0
    assert "up to date" in capsys.readouterr().out
    page.write_text(fresh.replace("| SASRec | 0.6679 ± 0.0034", "| SASRec | 0.9999 ± 0.0034", 1)
                    .replace("## Datasets checked", "## Datasets", 1))
    assert render_results.main(["--check", "--out", str(page)]) == 1
    err = capsys.readouterr().err
    assert "stale in: kuaisar-ctr, datasets;" in err and "run python simulations/render_results.py" in err
    assert render_results.main(["--check", "--out", str(tmp_path / "absent.md")]) == 1
    assert "no such file" in capsys.readouterr().err
    # writing: the page, whole, and nothing else in the folder
    out = tmp_path / "out" / "page.md"
    out.parent.mkdir()
    assert render_results.main(["--out", str(out)]) == 0
    assert out.read_text() == fresh and [p.name for p in out.parent.iterdir()] == ["page.md"]


def test_help_names_the_check():
    with pytest.raises(SystemExit) as stop:
        render_results.main(["--help"])
    assert stop.value.code == 0
    assert render_results.__doc__.startswith("Render every recorded result")


def test_recorded_comparisons_match_todays_configs():
    """Every recorded row of a comparison is the configuration (and defaults) of today, so a
    resumed ``fedrec compare`` keeps it rather than re-running it."""
    from fedrec.compare import _fingerprint, load_comparison

    for stem in ("lastfm_seed_models", "lastfm_mrff_private", "recflow_synthetic_stages", "kuaisar_marm", "ml100k_crm",
                 "ml100k_qarm", "synthetic_moment_cross", "sport_cloth_ctr_moment_cross"):
        cfg = load_comparison(ROOT / "simulations" / "configs" / f"{stem}.toml", data_root="../shared/data")
        recorded = json.loads((RESULTS / f"{stem}.json").read_text())
        for run in cfg["runs"]:
            prints = {r["fingerprint"] for r in recorded.values() if r["row"] == run["name"]}
            assert prints <= {_fingerprint(cfg, run)}, (stem, run["name"])


def test_long_sequence_bench_compresses_exactly_what_is_not_kept_raw():
    import bench_long_sequences

    for length in (50, 200, 800, 2000):
        windows = bench_long_sequences.kuaiformer_windows(length)
        assert sum(int(w) for w in windows.split(",") if w) == max(0, length - 50)


def test_a_missing_results_file_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(render_results, "RESULTS", tmp_path)  # no JSON at all
    out = tmp_path / "page.md"
    assert render_results.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("render_results: error:") and "kuaisar_ctr.json" in err and len(err.splitlines()) == 1
    assert not out.exists()
    render_results.doc.cache_clear()
