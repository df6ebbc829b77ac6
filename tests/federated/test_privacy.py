"""User-level differential privacy on the clients: clipping bounds every user's contribution,
the noise has the configured standard deviation, epsilon matches Opacus's own analysis, and
DP switched off changes nothing."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedrec.data import load_dataset
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError, FedrecWarning
from fedrec.federated import FederatedConfig, create_algorithm
from fedrec.federated.algorithm import LocalState
from fedrec.federated.privacy import (UserLevelDP, calibrate_noise, central_delta, check_delta, default_delta,
                                      privacy_from_config)
from fedrec.federated.runner import run_in_process
from fedrec.federated.spec import parse_run_config

SMALL = {"dim": 16, "max-len": 20, "dropout": 0.0}
TINY = {"data": "synthetic:users=24,items=40,seed=2", "rounds": 2, "shards": 2, "model.dim": 16,
        "model.max-len": 20}


@pytest.fixture(scope="module")
def split():
    return split_dataset(load_dataset("synthetic:users=16,items=40,seed=1"))


def _independent_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Opacus's RDP analysis called directly (sampling rate 1)."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=1.0, noise_multiplier=sigma, steps=steps, orders=orders)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def _one_round(alg, users, *, no_noise=False, monkeypatch=None):
    g = alg.initial_global()
    if no_noise:
        monkeypatch.setattr(alg.privacy, "add_noise", lambda *a, **k: None)
    shard = alg.make_shard(users)
    up, state, metrics = alg.client_update(g, alg.initial_local(users), shard, round=1)
    return g, up, state, metrics


def test_every_users_clipped_contribution_is_within_max_grad_norm(split, monkeypatch):
    """One-user shards, noise removed: upload - global is exactly the user's clipped change;
    its pseudo-gradient norm (over public params and the chosen groups) is <= C, and users
    whose raw norm was larger are clipped to C (so the check can fail)."""
    C, lr = 0.5, 0.1
    cfg = FederatedConfig(noise_multiplier=1.0, max_grad_norm=C, lr=lr, population=split.n_users)
    alg = create_algorithm("mrff", split, task="ctr", model_options=SMALL, config=cfg)
    raw = []
    original = alg.privacy.clip_

    def spy(params, global_params, members):
        norms = original(params, global_params, members)
        raw.append(norms.clone())
        return norms

    monkeypatch.setattr(alg.privacy, "clip_", spy)
    monkeypatch.setattr(alg.privacy, "add_noise", lambda *a, **k: None)
    g = alg.initial_global()
    norms = []
    for u in range(1, split.n_users + 1):
        users = np.array([u])
        up, _, _ = alg.client_update(g, alg.initial_local(users), alg.make_shard(users), round=1)
        sq = sum(float((up.sums[n] - g[n]).pow(2).sum()) for n in alg.layout.shared)
        for n, (layer, grp) in alg.layout.groups.items():
            if up.group_counts[layer, grp] > 0:
                sq += float((up.sums[n] - g[n]).pow(2).sum())
            else:
                assert torch.count_nonzero(up.sums[n]) == 0  # unchosen groups: nothing uploaded
        norms.append(math.sqrt(sq) / lr)
    raw = torch.cat(raw).numpy()
    norms = np.array(norms)
    assert (norms <= C * (1 + 1e-5)).all()
    assert (raw > C).any()  # clipping did bind for some users ...
    assert np.allclose(norms[raw > C], C, rtol=1e-4)  # ... and they sit exactly at C
    assert np.allclose(norms[raw <= C], raw[raw <= C], rtol=1e-4)


def test_noise_has_the_configured_standard_deviation(split, monkeypatch):
    """The upload with noise minus the same upload without: N(0, (lr * sigma * C)^2)."""
    cfg = FederatedConfig(noise_multiplier=1.7, max_grad_norm=0.3, lr=0.05, dp_noise_seed=5, population=split.n_users)
    alg = create_algorithm("mrff", split, task="ctr", model_options=SMALL, config=cfg)
    users = np.arange(1, split.n_users + 1)
    _, noisy, _, _ = _one_round(alg, users)
    _, clean, _, _ = _one_round(alg, users, no_noise=True, monkeypatch=monkeypatch)
    diff = torch.cat([(noisy.sums[n] - clean.sums[n]).flatten().double() for n in alg.layout.global_names]).numpy()
    expected = 0.05 * 1.7 * 0.3
    assert diff.size > 10_000
    se = expected / math.sqrt(2 * diff.size)  # standard error of a sample std
    assert abs(diff.std() - expected) < 4 * se
    assert abs(diff.mean()) < 4 * expected / math.sqrt(diff.size)
    # Gaussian shape: share within one standard deviation ~ 0.6827
    assert abs(np.mean(np.abs(diff) < expected) - 0.6827) < 0.02  # 4.4 standard errors


def test_noise_is_secret_unless_seeded():
    kw = {"max_grad_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3, "lr": 0.1}
    draw = lambda dp: torch.randn(4, generator=dp.generator(seed=0, round=1, shard_key=1))
    assert not torch.equal(draw(UserLevelDP(**kw)), draw(UserLevelDP(**kw)))
    assert torch.equal(draw(UserLevelDP(**kw, noise_seed=3)), draw(UserLevelDP(**kw, noise_seed=3)))


def test_epsilon_after_r_rounds_matches_opacus_and_persists_in_client_state(split):
    sigma, rounds = 1.3, 4
    cfg = FederatedConfig(noise_multiplier=sigma, max_grad_norm=1.0, population=split.n_users)
    alg = create_algorithm("mrff", split, task="ctr", model_options=SMALL, config=cfg)
    users = np.arange(1, split.n_users + 1)
    shard = alg.make_shard(users)
    g = alg.initial_global()
    state = alg.initial_local(users)
    eps = []
    for r in range(1, rounds + 1):
        up, state, metrics = alg.client_update(g, state, shard, round=r)
        state = LocalState.from_state_dict(state.state_dict())  # as the Flower client persists it
        g, _, agg = alg.aggregate(g, [up])
        eps.append(agg["epsilon"])
        assert agg["epsilon"] == metrics["epsilon"] and math.isnan(agg["loss"])
    delta = 0.01 / split.n_users  # the default: well below 1 / population
    for r, e in enumerate(eps, start=1):
        assert e == pytest.approx(_independent_epsilon(sigma, r, delta), rel=0.01)
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert state.privacy.tolist() == [[sigma, 1.0, float(rounds)]]


def test_target_epsilon_is_met_by_the_calibrated_noise():
    sigma = calibrate_noise(target_epsilon=4.0, delta=1e-3, rounds=10)
    eps = _independent_epsilon(sigma, 10, 1e-3)
    assert 0.95 * 4.0 <= eps <= 4.0 * 1.001


def test_simulate_reports_epsilon_and_stays_within_the_target():
    result = run_in_process(parse_run_config({**TINY, "rounds": 3, "target-epsilon": 5.0, "delta": 1e-3}))
    eps = result["test"]["epsilon"]
    assert 0.95 * 5.0 <= eps <= 5.0 * 1.001
    assert eps == result["privacy"]["epsilon"] == result["history"][-1]["train"]["epsilon"]
    spent = [h["train"]["epsilon"] for h in result["history"]]
    assert spent == sorted(spent) and len(set(spent)) == 3
    assert result["privacy"]["noise-multiplier"] == pytest.approx(
        calibrate_noise(target_epsilon=5.0, delta=1e-3, rounds=3), rel=1e-4)
    assert all(h["train"]["loss"] is None for h in result["history"])  # no training loss under DP
    assert result["privacy"]["train-loss"] == "not reported under DP"
    assert result["privacy"]["neighbouring"].startswith("zero-out one user's contribution")
    # replace-one doubles the sensitivity: the accountant at half the noise multiplier
    sigma = result["privacy"]["noise-multiplier"]
    assert result["privacy"]["epsilon-replace-one"] == pytest.approx(_independent_epsilon(sigma / 2, 3, 1e-3), rel=0.01)
    assert result["privacy"]["epsilon-replace-one"] > 2 * eps


def test_dp_switched_off_gives_exactly_the_non_dp_result():
    plain = run_in_process(parse_run_config(TINY))
    off = run_in_process(parse_run_config({**TINY, "noise-multiplier": 0.0, "target-epsilon": 0.0,
                                           "max-grad-norm": 3.0}))
    assert off["history"] == plain["history"] and "privacy" not in off and "epsilon" not in off["test"]


def test_dp_delta_default_needs_the_population(split):
    """A node cannot count the federation's users: without 'population' or 'delta', DP stops;
    with it, delta is 0.01 / population, and no warning is given."""
    with pytest.raises(ConfigError, match="'delta' defaults to 0.01 / 'population'"):
        create_algorithm("mrff", split, task="ctr", model_options=SMALL, config=FederatedConfig(noise_multiplier=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FedrecWarning)
        alg = create_algorithm("mrff", split, task="ctr", model_options=SMALL,
                               config=FederatedConfig(noise_multiplier=1.0, population=1000))
        assert alg.privacy.delta == pytest.approx(1e-5)
        privacy_from_config(FederatedConfig(noise_multiplier=1.0, population=1000, delta=1e-3))  # = 1 / N: no warning


def test_a_delta_above_one_over_the_population_warns():
    with pytest.warns(FedrecWarning, match=r"'delta' 0.01 is above 1 / 1,000 users .* use at most 1e-05"):
        dp = privacy_from_config(FederatedConfig(noise_multiplier=1.0, population=1000, delta=0.01))
    assert dp.delta == 0.01  # accepted as given
    with pytest.warns(FedrecWarning, match=r"'central-delta' 0.2 is above 1 / 10 clients"):
        check_delta(0.2, 10, key="central-delta", unit="clients")
    assert central_delta(10) == 1e-5 and central_delta(10**6) == pytest.approx(1e-8) and default_delta(200) == 5e-5


def _train_replies(monkeypatch, flat):
    """A run's train-reply metrics (every client, every round) and its result."""
    from fedrec.federated import node

    seen = []
    original = node.client_train

    def spy(msg, context):
        reply = original(msg, context)
        seen.append(dict(reply["metrics"]))
        return reply

    monkeypatch.setattr(node, "client_train", spy)
    return seen, run_in_process(parse_run_config(flat))


@pytest.mark.parametrize("flat,central", [({"noise-multiplier": 1.0, "dp-noise-seed": 0}, False),
                                          ({"central-dp": True, "central-noise-multiplier": 1.0}, True)])
def test_under_dp_no_unnoised_per_user_value_leaves_a_client(monkeypatch, flat, central):
    """Under local and central DP the train replies carry no examples / loss-sum (the
    per-user history length and training loss, unnoised) and num-examples does not depend on
    data; the node info has no interaction counts; the history says the loss is not reported."""
    seen, result = _train_replies(monkeypatch, {**TINY, **flat})
    assert len(seen) == 4  # 2 clients x 2 rounds
    for m in seen:
        assert not {"examples", "loss-sum"} & set(m), sorted(m)
        assert m["num-examples"] == (1 if central else m["users"])
        assert {"weight", "users", "group-counts", "shard"} <= set(m)  # the listed, unnoised counts
    assert all(h["train"]["loss"] is None for h in result["history"])
    assert result["privacy"]["train-loss"] == "not reported under DP"
    assert result["node_data"] and all("rows" not in n and "out-of-catalogue" not in n and "data-fingerprint" not in n
                                       for n in result["node_data"])


def test_without_dp_the_replies_keep_examples_and_loss(monkeypatch):
    seen, result = _train_replies(monkeypatch, TINY)
    assert all({"examples", "loss-sum"} <= set(m) and m["num-examples"] == m["examples"] for m in seen)
    assert all(isinstance(h["train"]["loss"], float) for h in result["history"])
    assert all("rows" in n for n in result["node_data"]) and "privacy" not in result


def test_dp_without_binding_clip_or_noise_is_the_non_dp_update(split):
    """With a clipping norm no user reaches and negligible noise, the DP path is the plain one."""
    base = {"lr": 0.1}
    plain = create_algorithm("mrff", split, task="ctr", model_options=SMALL, config=FederatedConfig(**base))
    dp = create_algorithm("mrff", split, task="ctr", model_options=SMALL,
                          config=FederatedConfig(**base, noise_multiplier=1e-15, max_grad_norm=1e6, dp_noise_seed=0, delta=1e-3))
    users = np.arange(1, split.n_users + 1)
    _, a, sa, _ = _one_round(plain, users)
    _, b, sb, _ = _one_round(dp, users)
    for n in plain.layout.global_names:
        assert torch.allclose(a.sums[n], b.sums[n], atol=1e-6)
    for n in sa.tensors:
        assert torch.equal(sa.tensors[n], sb.tensors[n])  # private params: trained without noise


@pytest.mark.parametrize("options,needle", [
    ({"delta": 1e-5}, "'delta' is given but differential privacy is off"),
    ({"noise_multiplier": 1.0, "target_epsilon": 2.0}, "either federated option 'noise_multiplier' or 'target_epsilon'"),
    ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "'max_grad_norm' must be > 0"),
    ({"noise_multiplier": 1.0, "weighting": "examples"}, "needs weighting 'users'"),
    ({"noise_multiplier": -1.0}, "'noise_multiplier' must be >= 0"),
    ({"target_epsilon": 1.0, "accountant": "gdp"}, "'accountant' must be rdp or prv"),
])
def test_bad_privacy_options_are_named(options, needle):
    with pytest.raises(ConfigError, match=needle):
        FederatedConfig(**options)


def test_local_only_has_nothing_to_protect(split):
    with pytest.raises(ConfigError, match="uploads no parameters to protect"):
        create_algorithm("local", split, task="ctr", model_options=SMALL, config=FederatedConfig(noise_multiplier=1.0))


def test_cli_target_epsilon(tmp_path):
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "fedrec.cli", "simulate", "--data", TINY["data"], "--rounds", "2",
                           "-n", "2", "--set", "model.dim=16", "--target-epsilon", "6", "--delta", "1e-4",
                           "--json", "--out", str(out)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.95 * 6 <= result["test"]["epsilon"] <= 6.006 and result["privacy"]["delta"] == pytest.approx(1e-4)
    assert "warning" not in done.stderr  # 1e-4 is below 1 / 24 users
    loose = subprocess.run([sys.executable, "-m", "fedrec.cli", "simulate", "--data", TINY["data"], "--rounds", "1",
                            "-n", "2", "--set", "model.dim=16", "--noise-multiplier", "1", "--delta", "0.1", "--json"],
                           capture_output=True, text=True, check=False)
    assert loose.returncode == 0, loose.stderr  # accepted, with one warning line
    warned = [line for line in loose.stderr.splitlines() if "warning" in line]
    assert warned == ["fedrec: warning: 'delta' 0.1 is above 1 / 24 users (0.0417): it allows one of them to be "
                      "exposed in full; use at most 0.000417 (the default)"]
    bad = subprocess.run([sys.executable, "-m", "fedrec.cli", "simulate", "--rounds", "1", "--delta", "1e-5"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "differential privacy is off" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


# -- central DP (Flower's server-side fixed clipping) ---------------------------------------
def _central_round_one(tmp_path, **extra):
    """Initial and round-1 global parameters of a 2-client central-DP run (from the
    server's checkpoint), and the result."""
    flat = {**TINY, "rounds": 1, "central-dp": True, "checkpoint-dir": str(tmp_path), "checkpoint-every": 1, **extra}
    spec = parse_run_config(flat)
    result = run_in_process(spec)
    alg = create_algorithm(spec.algorithm, split_dataset(load_dataset(spec.data)), task=spec.task,
                           model_options=spec.model_options, config=spec.federated)
    from fedrec.federated.checkpoint import load_server

    return alg.initial_global(), load_server(tmp_path)["global"], result


def _delta(a, b):
    return torch.cat([(b[n].double() - a[n].double()).flatten() for n in a])


def test_central_dp_clips_each_clients_update(tmp_path):
    """Negligible noise: the new global moves by the average of the clipped client updates,
    so by at most the clipping norm; a loose norm leaves a larger move (the clip binds)."""
    init, tight, result = _central_round_one(tmp_path / "a", **{"central-noise-multiplier": 1e-9,
                                                           "central-clipping-norm": 0.01})
    _, loose, _ = _central_round_one(tmp_path / "b", **{"central-noise-multiplier": 1e-9,
                                                        "central-clipping-norm": 1e6})
    assert float(_delta(init, tight).norm()) <= 0.01 * (1 + 1e-3)
    assert float(_delta(init, loose).norm()) > 0.5
    # the default central-delta: min(1e-5, 0.01 / clients); the relation is add/remove one client
    assert result["privacy"]["delta"] == 1e-5 and result["privacy"]["neighbouring"].startswith("add/remove one client")


def test_central_dp_noise_has_the_wrapper_standard_deviation(tmp_path):
    """Clipping norm C, 2 clients, sigma 20: std of the global's change ~ sigma * C / 2 (the
    clipped updates' share per coordinate is ~1e-5 of that)."""
    sigma, C = 20.0, 1e-3
    init, new, _ = _central_round_one(tmp_path, **{"central-noise-multiplier": sigma, "central-clipping-norm": C})
    d = _delta(init, new).numpy()
    expected = sigma * C / 2
    assert abs(d.std() - expected) < 4 * expected / math.sqrt(2 * d.size)
    assert abs(np.mean(np.abs(d) < expected) - 0.6827) < 0.02


def test_central_dp_epsilon_matches_opacus_and_the_target():
    result = run_in_process(parse_run_config({**TINY, "rounds": 3, "central-dp": True, "central-target-epsilon": 6.0,
                                              "central-delta": 1e-4}))
    sigma = result["privacy"]["noise-multiplier"]
    spent = [h["train"]["epsilon"] for h in result["history"]]
    assert spent == pytest.approx([_independent_epsilon(sigma, r, 1e-4) for r in (1, 2, 3)], rel=0.01)
    assert 0.95 * 6.0 <= result["test"]["epsilon"] <= 6.006 and result["privacy"]["kind"].startswith("central")


def test_client_means_are_the_clients_models(split):
    alg = create_algorithm("mrff", split, task="ctr", model_options=SMALL)
    from fedrec.federated.privacy import client_means

    users = np.arange(1, split.n_users + 1)
    g = alg.initial_global()
    up, _, _ = alg.client_update(g, alg.initial_local(users), alg.make_shard(users), round=1)
    means = client_means(alg.layout, g, up)
    for n in alg.layout.shared:
        assert torch.allclose(means[n], up.sums[n] / up.weight, atol=1e-6)
    for n, (layer, grp) in alg.layout.groups.items():
        c = float(up.group_counts[layer, grp])
        assert torch.allclose(means[n], up.sums[n] / c if c else g[n], atol=1e-6)


@pytest.mark.parametrize("flat,needle", [
    ({"central-dp": True}, "exactly one of 'central-noise-multiplier' and 'central-target-epsilon'"),
    ({"central-noise-multiplier": 1.0}, "need 'central-dp = true'"),
    ({"central-dp": True, "central-noise-multiplier": 1.0, "noise-multiplier": 1.0}, "not both"),
    ({"central-dp": True, "central-noise-multiplier": 1.0, "central-delta": 2.0}, "'central-delta' must be in (0, 1)"),
])
def test_bad_central_dp_options_are_named(flat, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_run_config(flat)


def test_prv_accountant_is_available_and_tighter_than_rdp():
    from fedrec.federated.privacy import epsilon_of

    history = torch.tensor([[1.1, 1.0, 5.0]], dtype=torch.float64)
    rdp, prv = epsilon_of(history, delta=1e-5), epsilon_of(history, delta=1e-5, accountant="prv")
    assert rdp == pytest.approx(_independent_epsilon(1.1, 5, 1e-5), rel=1e-6)
    assert 0.8 * rdp < prv < rdp
