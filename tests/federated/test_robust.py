"""Clients that lie (attack simulation) and robust, role-aware aggregation
(:mod:`fedrec.federated.robust`)."""

from __future__ import annotations

import pytest
import torch

from fedrec.errors import ConfigError
from fedrec.federated.algorithm import Upload, aggregate_uploads
from fedrec.federated.layout import Layout
from fedrec.federated.robust import (boost_upload, combine_exposure, malicious_clients, poison_batch,
                                     robust_aggregate)
from fedrec.federated.runner import run_in_process
from fedrec.federated.spec import parse_run_config

TINY = {"data": "synthetic:users=120", "shards": 5, "rounds": 3, "eval-every": 1, "model.groups": 2,
        "model.dim": 16, "model.max-len": 10}


def test_the_malicious_clients_are_an_exact_count_drawn_from_the_seed():
    a = malicious_clients(seed=0, fraction=0.2, clients=10)
    assert len(a) == 2 and list(a) == sorted(a) and set(a) <= set(range(10))
    assert list(malicious_clients(seed=0, fraction=0.2, clients=10)) == list(a)  # every node computes the same
    assert {tuple(malicious_clients(seed=s, fraction=0.2, clients=10)) for s in range(6)} != {tuple(a)}
    assert len(malicious_clients(seed=3, fraction=0.3, clients=10)) == 3
    assert len(malicious_clients(seed=3, fraction=0.01, clients=10)) == 1  # a fraction > 0 marks at least one
    assert malicious_clients(seed=3, fraction=0.0, clients=10).size == 0
    with pytest.raises(ConfigError, match="every client malicious"):
        malicious_clients(seed=0, fraction=0.9, clients=2)
    with pytest.raises(ConfigError, match="'shards'"):
        malicious_clients(seed=0, fraction=0.2, clients=0)


def _batch():
    mask = torch.tensor([[False, True, True], [False, False, True]])
    return {"target_mask": mask, "target_labels": torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
            "target_items": torch.tensor([[0, 4, 5], [0, 0, 6]]), "items": torch.tensor([[0, 3, 4], [0, 0, 5]]),
            "labels": torch.tensor([[0, 1, 0], [0, 0, 1]])}


def test_label_flip_flips_every_real_label_and_item_promotion_makes_every_target_the_clicked_target():
    b = _batch()
    flipped = poison_batch("label-flip", 9)(b)
    assert flipped["target_labels"].tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]  # padding kept
    assert flipped["labels"].tolist() == [[0, 0, 1], [0, 0, 0]]
    promoted = poison_batch("item-promotion", 9)(b)
    assert promoted["target_items"].tolist() == [[0, 9, 9], [0, 0, 9]]
    assert promoted["target_labels"].tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    assert torch.equal(promoted["items"], b["items"])  # the fake users copy real histories
    assert poison_batch("scale", 9) is None and poison_batch("none", 9) is None


def _layout() -> Layout:
    return Layout(shared=("w",), groups={"g0": (0, 0), "g1": (0, 1)}, layers=1, n_groups=2)


def _upload(w: float, g0: float | None, weight: float = 2.0) -> Upload:
    counts = torch.tensor([[1.0 if g0 is not None else 0.0, 0.0]], dtype=torch.float64)
    sums = {"w": torch.full((3,), w * weight, dtype=torch.float64),
            "g0": torch.full((2,), g0 if g0 is not None else 0.0, dtype=torch.float64),
            "g1": torch.zeros(2, dtype=torch.float64)}
    return Upload(sums, weight, counts, int(weight), int(weight), 0.0)


GLOBAL = {"w": torch.zeros(3, dtype=torch.float64), "g0": torch.zeros(2, dtype=torch.float64),
          "g1": torch.full((2,), 7.0, dtype=torch.float64)}


def test_boosting_scales_each_mean_away_from_the_global_parameters():
    u = boost_upload(_layout(), GLOBAL, _upload(1.0, 2.0), 10.0)
    assert torch.allclose(u.sums["w"] / u.weight, torch.full((3,), 10.0, dtype=torch.float64))
    assert torch.allclose(u.sums["g0"], torch.full((2,), 20.0, dtype=torch.float64))  # one member
    assert boost_upload(_layout(), GLOBAL, _upload(1.0, 2.0), 1.0).sums["w"][0] == 2.0


@pytest.mark.parametrize("method", ["median", "trimmed-mean", "krum", "multi-krum", "norm-bound"])
def test_every_defence_keeps_one_outlier_from_moving_the_public_and_group_parameters(method):
    honest = [_upload(1.0 + 0.01 * i, 1.0 + 0.01 * i) for i in range(8)]
    uploads = honest + [_upload(1000.0, 1000.0), _upload(-500.0, None)]
    plain, counts_plain, _ = aggregate_uploads(_layout(), GLOBAL, uploads)
    new, counts, metrics = robust_aggregate(_layout(), GLOBAL, uploads, method=method, fraction=0.2)
    assert abs(float(plain["w"][0])) > 50  # the weighted mean is dragged away
    # the norm bound (the median norm) also shortens the honest updates above it
    low = 0.7 if method == "norm-bound" else 0.9
    assert low < float(new["w"][0]) < 1.1, float(new["w"][0])
    assert 0.5 < float(new["g0"][0]) < 1.1, float(new["g0"][0])  # the group over its 9 members only
    assert torch.equal(new["g1"], GLOBAL["g1"])  # nobody chose it: unchanged
    assert torch.equal(counts, counts_plain) and float(counts[0, 0]) == 9  # the balance loss's counts
    if method == "norm-bound":
        assert metrics["robust-clipped"] >= 2


def test_no_defence_is_the_plain_aggregate_and_aligned_tables_are_refused():
    uploads = [_upload(1.0, 1.0), _upload(3.0, None)]
    a, _, _ = robust_aggregate(_layout(), GLOBAL, uploads, method="none")
    b, _, _ = aggregate_uploads(_layout(), GLOBAL, uploads)
    assert all(torch.equal(a[n], b[n]) for n in a)
    aligned = Layout(shared=("w",), aligned=("w",))
    with pytest.raises(ConfigError, match="rows of their own users"):
        robust_aggregate(aligned, GLOBAL, uploads, method="median")


def test_exposure_pools_hits_over_the_users_who_never_saw_the_target():
    out = combine_exposure([{"target-users": 3, "target-hits@10": 1}, {"target-users": 1, "target-hits@10": 1},
                            {"n": 4}])
    assert out == {"er-users": 4.0, "er@10": 0.5}
    assert combine_exposure([{"n": 1}]) == {}


@pytest.mark.slow
def test_item_promotion_raises_the_targets_exposure_and_the_median_brings_it_back():
    """Through the Flower apps in process: the same honest users are evaluated in every run;
    fake users (boosted) push the target into everybody's top 10; the median does not."""
    base = {**TINY, "attack-fraction": 0.2}
    clean = run_in_process(parse_run_config(base))
    attacked = run_in_process(parse_run_config({**base, "attack": "item-promotion"}))
    defended = run_in_process(parse_run_config({**base, "attack": "item-promotion", "robust": "median"}))
    bad = clean["attack"]["malicious-clients"]
    assert len(bad) == 1 and attacked["attack"]["malicious-clients"] == bad
    assert clean["test"]["n"] == attacked["test"]["n"] == defended["test"]["n"] < 120  # honest users only
    assert clean["attack"]["target"] == attacked["attack"]["target"]
    assert attacked["test"]["er@10"] > clean["test"]["er@10"] + 0.3
    assert defended["test"]["er@10"] <= clean["test"]["er@10"] + 0.05
    assert all(h["train"]["clients"] == [0, 1, 2, 3, 4] for h in attacked["history"])


def test_a_defended_run_without_attack_stays_close_to_the_plain_one():
    base = {**TINY, "rounds": 2}
    plain = run_in_process(parse_run_config(base))
    median = run_in_process(parse_run_config({**base, "robust": "median"}))
    assert plain["test"]["n"] == median["test"]["n"] == 120 and "attack" not in plain
    assert abs(plain["test"]["auc"] - median["test"]["auc"]) < 0.05


@pytest.mark.parametrize("sets, message", [
    (["attack=foo"], "'attack' must be one of"),
    (["attack=scale"], "needs 'attack-fraction' > 0"),
    (["attack-fraction=1"], "'attack-fraction' must be in [0, 1)"),
    (["robust=mean"], "'robust' must be one of"),
    (["robust-fraction=0.5"], "'robust-fraction' must be in [0, 0.5)"),
    (["robust-norm=-1"], "'robust-norm' must be >= 0"),
    (["attack=scale", "attack-fraction=0.2", "attack-scale=0"], "'attack-scale' must be a finite non-zero"),
    (["attack=label-flip", "attack-fraction=0.2", "task=next_item"], "label-flip flips click labels"),
    (["robust=median", "secure-aggregation=true"], "cannot be combined with 'secure-aggregation'"),
    (["attack-fraction=0.2", "attack-target=no-such-item"], "item 'no-such-item' is not in the catalogue"),
    (["attack=scale", "attack-fraction=0.9"], "every client malicious"),
    (["attack=label-flip", "attack-fraction=0.2", "attack-scale=5"], "'attack-scale' is used only with"),
    (["robust=median", "robust-norm=2"], "'robust-norm' is used only with robust norm-bound"),
])
def test_bad_attack_and_defence_options_are_one_line_errors(tmp_path, sets, message):
    from typer.testing import CliRunner

    from fedrec.cli import app

    args = ["simulate", "--data", "synthetic:users=40", "--clients", "2", "--rounds", "1", "--set", "model.dim=8",
            "--out", str(tmp_path / "r.json")]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("fedrec: error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_exposure_does_not_depend_on_the_chunk_it_is_scored_in():
    """er@K is scored chunk by chunk (memory bounded by chunk-size): the same numbers for any
    chunk size when nothing random depends on it (no dropout)."""
    base = {**TINY, "rounds": 1, "attack-fraction": 0.2, "attack": "item-promotion", "model.dropout": 0.0}
    a = run_in_process(parse_run_config({**base, "chunk-size": 7}))
    b = run_in_process(parse_run_config(base))
    assert a["test"]["er-users"] == b["test"]["er-users"] > 0
    assert all(a["test"][f"er@{k}"] == b["test"][f"er@{k}"] for k in (5, 10, 20))


def test_halves_round_up_and_central_dp_refuses_example_weights():
    assert len(malicious_clients(seed=0, fraction=0.25, clients=10)) == 3
    assert len(malicious_clients(seed=0, fraction=0.35, clients=10)) == 4
    with pytest.raises(ConfigError, match="'central-dp' needs weighting 'users'"):
        parse_run_config({**TINY, "central-dp": True, "central-noise-multiplier": 1.0, "weighting": "examples"})
