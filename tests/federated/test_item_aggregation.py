"""``item-aggregation``: public item tables averaged row by row over the users that read them
(``touched``) or over all of a round's users (``all``).

Hand-computed server step; the vectorised engine equals the one-user-at-a-time loop and the
full per-user copies under ``touched``; the per-row weights survive the Flower records (a run
through the apps differs from ``all`` exactly as the engine does); on real data (LastFM) the
row-wise average lifts FedMF far above the diluted one; the options it cannot be combined
with are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError
from fedrec.federated import FederatedConfig, create_algorithm
from fedrec.federated.algorithm import Upload, aggregate_uploads
from fedrec.federated.layout import Layout

from conftest import run_rounds

SMALL = {"dim": 8, "max-len": 30}


@pytest.fixture(scope="module")
def split():
    return split_dataset(load_dataset("synthetic:users=14,items=200,seed=5"))


def _run(alg, shards, rounds, *, reference=False):
    return run_rounds(alg, shards, rounds, reference=reference)[0]


def _max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _upload(sums, weight, touched=None):
    return Upload({"t": torch.tensor(sums, dtype=torch.float64)}, weight, torch.zeros(0, 0), 1, 1, 0.0,
                  touched=None if touched is None else {"t": torch.tensor(touched, dtype=torch.float64)})


def test_server_step_by_hand():
    """Global rows [1, 2, 3]; client A (weight 2: users a1, a2) read rows 0 and 1, client B
    (weight 1) read row 0. A's sums: 2 x global + changes (a1: +0.4 on row 0, a2: +0.2 on row
    0 and -0.6 on row 1); B's: global + (-0.3 on row 0)."""
    layout = Layout(shared=("t",))
    g = {"t": torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)}
    a = [[2 * 1 + 0.4 + 0.2], [2 * 2 - 0.6], [2 * 3]]
    b = [[1 - 0.3], [2], [3]]
    new, _, _ = aggregate_uploads(layout, g, [_upload(a, 2.0, [2, 1, 0]), _upload(b, 1.0, [1, 0, 0])])
    # row 0: read by 3 users, mean change (0.4 + 0.2 - 0.3) / 3 = 0.1; row 1: one reader, -0.6;
    # row 2: nobody read it, unchanged
    torch.testing.assert_close(new["t"], torch.tensor([[1.1], [1.4], [3.0]], dtype=torch.float64))
    # item-aggregation = all: every row over the weight 3 (row 1 moves by -0.6 / 3)
    new_all, _, _ = aggregate_uploads(layout, g, [_upload(a, 2.0), _upload(b, 1.0)])
    torch.testing.assert_close(new_all["t"], torch.tensor([[1.1], [1.8], [3.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="some uploads carry per-row weights"):
        aggregate_uploads(layout, g, [_upload(a, 2.0, [2, 1, 0]), _upload(b, 1.0)])


@pytest.mark.parametrize("algorithm,model,options", [
    ("fedmf", None, SMALL), ("pfedrec", None, SMALL),
    ("fedavg", "sasrec", {**SMALL, "dropout": 0.0}), ("mrff", None, {**SMALL, "dropout": 0.0})])
def test_vectorised_engine_equals_the_one_user_loop(split, float64, algorithm, model, options):
    """One-user clients, 2 rounds of 2 Adam steps: the vmapped engine with compact tables, the
    engine with full per-user copies and the deep-copy loop (which counts the rows each user's
    batch reads on its own) give the same global parameters; ``all`` gives others."""
    def make(agg):
        return create_algorithm(algorithm, split, task="next_item", model=model, model_options=options,
                                config=FederatedConfig(lr=0.01, local_steps=2, negatives=3, item_aggregation=agg))

    shards = [np.array([u]) for u in range(1, 7)]
    alg = make("touched")
    g_vec = _run(alg, shards, 2)
    g_ref = _run(alg, shards, 2, reference=True)
    alg.compact = False
    g_full = _run(alg, shards, 2)
    assert _max_diff(g_vec, g_ref) <= 1e-9 and _max_diff(g_vec, g_full) <= 1e-9
    assert _max_diff(g_vec, _run(make("all"), shards, 2)) > 1e-3


def test_rows_with_one_reader_keep_float32_precision_in_a_large_shard():
    """The server divides (sum - W x global) by a row's reader weight, often 1, not by W: in
    float32 the rounding of W x global (W = 1,500 users here) would reach the rows' changes
    (7.7e-5 apart between two chunkings before the sums of these tables were kept in float64).
    Without dropout the result must not depend on the chunking."""
    sp = split_dataset(load_dataset("synthetic:users=1500,items=3000,seed=2"))
    users = np.arange(1, sp.n_users + 1)
    out = []
    for chunk in (7, 2048):
        alg = create_algorithm("fedmf", sp, task="next_item",
                               config=FederatedConfig(negatives=4, item_aggregation="touched", chunk_size=chunk))
        g = alg.initial_global()
        assert g["items.weight"].dtype == torch.float32
        up, _, _ = alg.client_update(g, alg.initial_local(users), alg.make_shard(users), round=1)
        out.append(alg.aggregate(g, [up])[0]["items.weight"])
    assert float((out[0] - out[1]).abs().max()) <= 1e-6


def test_per_row_weights_travel_through_the_flower_apps(split):
    """In-process Flower run (2 clients): with ``touched`` the saved global item table is the
    one the engine computes directly with ``touched``, not the one of ``all``."""
    from fedrec.federated.runner import run_in_process
    from fedrec.federated.spec import parse_run_config

    data = "synthetic:users=14,items=200,seed=5"
    out = {}
    for agg in ("touched", "all"):
        run = run_in_process(parse_run_config({"data": data, "task": "next_item", "algorithm": "fedmf", "shards": 2,
                                               "rounds": 2, "negatives": 3, "protocol": "sampled-99",
                                               "model.dim": 8, "item-aggregation": agg, "eval-every": 2}))
        out[agg] = run
    assert out["touched"]["valid"] != out["all"]["valid"]
    assert out["touched"]["config"]["item-aggregation"] == "touched"
    trained = [h["train"] for h in out["touched"]["history"] if "train" in h]
    assert trained and all(t["item-rows-read"] > 0 for t in trained)
    assert not any("item-rows-read" in h.get("train", {}) for h in out["all"]["history"])


def test_on_real_data_fedmf_learns_only_with_row_wise_averages(shared_data):
    """LastFM (1,090 users, 3,646 items; a user reads about 6% of the item rows per round):
    after 3 rounds of FedMF the item table averaged over all users has moved so little that
    validation HR@10 is near chance (0.10), while the row-wise average is far above it."""
    sp = split_dataset(load_dataset(f"seq:{shared_data}/s3rec/LastFM.txt"))
    users = np.arange(1, sp.n_users + 1)
    hr = {}
    for agg in ("touched", "all"):
        alg = create_algorithm("fedmf", sp, task="next_item",
                               config=FederatedConfig(negatives=4, protocol="sampled-99", item_aggregation=agg))
        st, sh, g = alg.initial_local(users), alg.make_shard(users), alg.initial_global()
        for r in range(1, 4):
            up, st, _ = alg.client_update(g, st, sh, round=r)
            g, _, _ = alg.aggregate(g, [up])
        hr[agg] = alg.combine([alg.client_evaluate(g, st, sh, stage="valid")])["hr@10"]
    assert hr["all"] < 0.2 and hr["touched"] > hr["all"] + 0.1, hr


def test_refused_where_it_cannot_hold(split):
    from fedrec.federated.spec import parse_run_config

    with pytest.raises(ConfigError, match="'item-aggregation' must be one of all, touched, auto"):
        FederatedConfig(item_aggregation="rows")
    with pytest.raises(ConfigError, match="not with differential privacy"):
        FederatedConfig(item_aggregation="touched", noise_multiplier=1.0)
    base = {"data": "synthetic:users=14,items=200,seed=5", "task": "next_item", "algorithm": "fedmf",
            "item-aggregation": "touched"}
    for key, extra in (("secure-aggregation", {"secure-aggregation": True}),
                       ("central-dp", {"central-dp": True, "central-noise-multiplier": 1.0}),
                       ("robust", {"robust": "median"})):
        with pytest.raises(ConfigError, match=f"cannot be combined with '{key}'"):
            parse_run_config({**base, **extra})
    with pytest.raises(ConfigError, match="algorithm 'unicdr'.*item-aggregation 'touched' does not apply"):
        create_algorithm("unicdr", split_dataset(load_dataset("synthetic:users=40,domains=2,seed=1")), task="cdr",
                         config=FederatedConfig(item_aggregation="touched"))
    # a full cross-entropy reads every item row: no compact tables to weigh row by row
    with pytest.raises(ConfigError, match="needs public item tables read through item indices"):
        create_algorithm("fedavg", split, task="next_item", model="sasrec",
                         model_options={**SMALL, "next-loss": "ce"},
                         config=FederatedConfig(item_aggregation="touched"))


def test_auto_is_touched_where_it_is_allowed_and_all_elsewhere(split):
    """``auto`` (the next-item formats' default): touched for a model with compact public item
    tables; all with DP, with secure aggregation / central DP / robust aggregation in the run
    spec, for a model that reads every item row, and for local-only training."""
    from fedrec.defaults import resolve
    from fedrec.federated.spec import parse_run_config

    def effective(algorithm, model=None, options=SMALL, **cfg):
        return create_algorithm(algorithm, split, task="next_item", model=model, model_options=options,
                                config=FederatedConfig(item_aggregation="auto", **cfg)).item_aggregation

    assert effective("fedmf") == "touched" and effective("mrff") == "touched"
    assert effective("fedmf", noise_multiplier=1.0, population=14) == "all"
    assert effective("fedavg", "sasrec", {**SMALL, "next-loss": "ce"}) == "all"
    assert effective("local", "sasrec") == "all"
    base = {"data": "synthetic:users=14,items=200,seed=5", "task": "next_item", "algorithm": "fedmf",
            "item-aggregation": "auto"}
    assert parse_run_config(base).federated.item_aggregation == "auto"
    for extra in ({"secure-aggregation": True}, {"central-dp": True, "central-noise-multiplier": 1.0},
                  {"robust": "median"}, {"target-epsilon": 8.0}):
        assert parse_run_config({**base, **extra}).federated.item_aggregation == "all"
    assert resolve("seq:FILE", runtime="federated", user={}).options["item-aggregation"] == "auto"
    assert resolve("kuaisar:DIR", runtime="federated", user={}).options["item-aggregation"] == "auto"
    assert resolve("synthetic:", runtime="federated", user={}).options.get("item-aggregation") is None
