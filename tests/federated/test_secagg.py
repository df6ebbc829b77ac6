"""Secure aggregation (SecAgg+, Flower's legacy workflow): the securely aggregated round
equals the plain one within SecAgg+'s quantisation error, and the server never receives a
client's own sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.errors import ConfigError
from fedrec.federated.checkpoint import load_server
from fedrec.federated.runner import run_in_process
from fedrec.federated.spec import parse_run_config

BASE = {"data": "synthetic:users=24,items=40,seed=2", "rounds": 1, "shards": 3, "model.dim": 16, "model.max-len": 20,
        "checkpoint-every": 1}


def _round_one(tmp_path, **extra):
    result = run_in_process(parse_run_config({**BASE, "checkpoint-dir": str(tmp_path), **extra}))
    return result, load_server(tmp_path)


def test_secure_aggregate_equals_the_plain_one_within_quantisation_error(tmp_path):
    plain, p = _round_one(tmp_path / "plain")
    secure, s = _round_one(tmp_path / "secure", **{"secure-aggregation": True})
    assert torch.equal(p["group_counts"], s["group_counts"])  # total members per group, exactly
    n, scale, R = 3, 24 / 3, 8.0
    step = 2 * R / 2**22  # SecAgg+'s quantisation step per value and client
    worst = 0.0
    for name, a in p["global"].items():
        b = s["global"][name]
        diff = float((a - b).abs().max())
        worst = max(worst, diff)
        # each client's value is off by <= step/2; the server divides sums of n of them by the
        # aggregated weight (public, ~n) or the group's members / scale (groups, >= 1/scale)
        bound = n * step * (1 + float(a.abs().max())) * scale
        assert diff <= bound, (name, diff, bound)
    assert worst > 0  # the values did go through quantisation
    assert plain["history"][0]["train"]["group-counts"] == secure["history"][0]["train"]["group-counts"]
    assert secure["test"]["auc"] == pytest.approx(plain["test"]["auc"], abs=0.02)


def test_values_beyond_the_clipping_range_are_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="beyond 'secagg-clipping-range'"):
        run_in_process(parse_run_config({**BASE, "checkpoint-dir": str(tmp_path), "secure-aggregation": True,
                                         "secagg-clipping-range": 1e-3}))


def test_secure_aggregation_and_central_dp_do_not_mix():
    with pytest.raises(ConfigError, match="cannot be combined with 'central-dp'"):
        parse_run_config({"secure-aggregation": True, "central-dp": True, "central-noise-multiplier": 1.0})


def test_secagg_vector_round_trip():
    """Without quantisation, vector -> average -> result is the plain role-aware aggregate."""
    from fedrec.data import load_dataset
    from fedrec.data.split import split_dataset
    from fedrec.federated import create_algorithm
    from fedrec.federated.algorithm import aggregate_uploads
    from fedrec.federated.node import secagg_result, secagg_vector

    split = split_dataset(load_dataset(BASE["data"]))
    alg = create_algorithm("mrff", split, task="ctr", model_options={"dim": 16, "max-len": 20})
    g = alg.initial_global()
    ups = []
    for users in np.array_split(np.arange(1, 25), 3):
        up, _, _ = alg.client_update(g, alg.initial_local(users), alg.make_shard(users), round=1)
        ups.append(up)
    vectors = [secagg_vector(alg.layout, u, scale=8.0) for u in ups]
    mean = [np.mean([v[i] for v in vectors], axis=0) for i in range(len(vectors[0]))]
    new, counts = secagg_result(alg.layout, g, mean, total_weight=sum(u.weight for u in ups))
    ref, ref_counts, _ = aggregate_uploads(alg.layout, g, ups)
    assert torch.equal(counts, ref_counts)
    for name in ref:
        assert torch.allclose(new[name], ref[name], atol=1e-6), name


def test_local_dp_under_secure_aggregation_reports_its_epsilon():
    flat = {k: v for k, v in BASE.items() if k != "checkpoint-every"}
    flat.update({"rounds": 2, "noise-multiplier": 1.0, "max-grad-norm": 0.1})
    plain = run_in_process(parse_run_config(flat))
    secure = run_in_process(parse_run_config({**flat, "secure-aggregation": True}))
    assert [h["train"]["epsilon"] for h in secure["history"]] == [h["train"]["epsilon"] for h in plain["history"]]
    assert secure["privacy"]["epsilon"] == plain["privacy"]["epsilon"] > 0
