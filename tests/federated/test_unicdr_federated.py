"""Federated cross-domain UniCDR: the private set intersection, row-wise aggregation of the
aligned table, what a domain uploads, a run through the Flower apps with one client per
domain, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.catalogue import Catalogue
from fedrec.data.federation import cut_domains, domain_clients
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError
from fedrec.federated import FederatedConfig, create_algorithm, psi
from fedrec.federated.algorithm import Upload, aggregate_uploads
from fedrec.federated.layout import Layout

DATA = "synthetic:users=120,items=200,domains=2,overlap=0.5,groups=2,seed=4"
SMALL = {"dim": 8, "max-len": 5, "eval-len": 10}


# -- private set intersection ------------------------------------------------------------
def test_psi_finds_exactly_the_common_users_and_numbers_them_alike():
    a = np.array([10, 3, 7, 99, 42, 5])
    b = np.array([42, 8, 3, 77, 10, 1000, 6])
    rows_a, rows_b = psi.run_two_party(a, b)
    common = sorted(set(a) & set(b))  # 3, 10, 42
    assert sorted(a[rows_a > 0]) == common and sorted(b[rows_b > 0]) == common
    # the same row on both sides, rows 1..m
    assert {int(rows_a[list(a).index(raw)]) for raw in common} == {1, 2, 3}
    for raw in common:
        assert rows_a[list(a).index(raw)] == rows_b[list(b).index(raw)]
    assert rows_a[list(a).index(99)] == 0 and rows_b[list(b).index(1000)] == 0
    # the numbering follows the (fresh) keys, not the raw ids the server might guess
    orders = {tuple(int(rows_a[list(a).index(raw)]) for raw in common) for _ in range(6)
              for rows_a in [psi.run_two_party(a, b)[0]]}
    assert len(orders) > 1


def test_psi_blinding_commutes_and_hides_ids():
    ka, kb = psi.new_key(), psi.new_key()
    h = psi.hash_users(np.array([1, 2, 3]))
    assert psi.blind(psi.blind(h, ka), kb) == psi.blind(psi.blind(h, kb), ka)
    assert not set(psi.blind(h, ka)) & set(h)  # what travels is not the hash of the id
    assert psi.blind(h, ka) != psi.blind(h, kb)  # nor the same under two keys
    again = psi.key_from_int(psi.key_to_int(ka))
    assert psi.blind(h, again) == psi.blind(h, ka)
    assert psi.from_array(psi.to_array(h)) == h
    with pytest.raises(ConfigError, match=r"\(n, 32\)"):
        psi.from_array(np.zeros((2, 5), dtype=np.uint8))
    not_on_curve = next(x for x in (bytes([i]) * 32 for i in range(256)) if _not_a_point(x))
    with pytest.raises(ConfigError, match="not a point"):
        psi.blind([not_on_curve], ka)


def _not_a_point(x: bytes) -> bool:
    try:
        psi._to_point(x)
        return False
    except ValueError:
        return True


# -- aggregation -------------------------------------------------------------------------
def test_aligned_rows_are_averaged_over_the_clients_that_sent_them():
    layout = Layout(("w",), {}, (), (), 0, 0, ("s",))
    glob = {"w": torch.zeros(2), "s": torch.full((4, 2), 9.0)}
    # client 1 sends rows 1, 2 (weights 1, 3); client 2 sends rows 2, 3 (weights 1, 1)
    u1 = Upload({"w": torch.ones(2) * 2.0, "s": torch.tensor([[1.0, 1.0], [3 * 2.0, 3 * 2.0]])}, 2.0,
                torch.zeros(0, 0), 1, 2, 0.0, rows={"s": (torch.tensor([1, 2]), torch.tensor([1.0, 3.0]))})
    u2 = Upload({"w": torch.ones(2) * 6.0, "s": torch.tensor([[6.0, 6.0], [5.0, 5.0]])}, 2.0,
                torch.zeros(0, 0), 1, 2, 0.0, rows={"s": (torch.tensor([2, 3]), torch.tensor([1.0, 1.0]))})
    new, _, _ = aggregate_uploads(layout, glob, [u1, u2])
    torch.testing.assert_close(new["w"], torch.full((2,), 2.0))  # (2 + 6) / 4
    torch.testing.assert_close(new["s"][0], torch.full((2,), 9.0))  # nobody sent row 0: kept
    torch.testing.assert_close(new["s"][1], torch.full((2,), 1.0))
    torch.testing.assert_close(new["s"][2], torch.full((2,), (6.0 + 6.0) / 4))  # (3 * 2 + 1 * 6) / (3 + 1)
    torch.testing.assert_close(new["s"][3], torch.full((2,), 5.0))


# -- the algorithm on two domain nodes ---------------------------------------------------
@pytest.fixture(scope="module")
def nodes():
    """Two domain nodes, each with only its domain's rows, aligned by the PSI."""
    ds = load_dataset(DATA)
    full = split_dataset(ds)
    cat = Catalogue.from_split(full)
    cfg = FederatedConfig(lr=0.01, negatives=4, protocol="sampled-99", batch_size=64)
    out = []
    for k, doms in enumerate(domain_clients(full)):
        sp = split_dataset(cut_domains(ds, doms, name=f"c{k}"), catalogue=cat)
        out.append(create_algorithm("unicdr", sp, task="cdr", model_options=SMALL, config=cfg))
    rows = psi.run_two_party(out[0].raw_users(), out[1].raw_users())
    for alg, r in zip(out, rows, strict=True):
        alg.set_alignment(r)
    return full, out


def test_domain_nodes_hold_only_their_domain_and_share_rows_of_common_users(nodes):
    full, (a, b) = nodes
    for alg, k in ((a, 0), (b, 1)):
        assert set(np.unique(alg.split.seq_domain)) == {k}
    both = {int(u) for u in a.raw_users()} & {int(u) for u in b.raw_users()}
    assert a.n_shared == b.n_shared == len(both) > 0
    assert a.layout.aligned == ("user_shared.weight",) and a.layout.shared == ("agg_shared.proj.weight",)
    g = a.initial_global()
    assert g["user_shared.weight"].shape[0] == len(both) + 1
    assert set(g) == set(a.layout.global_names)


def test_an_upload_holds_only_the_rows_of_common_users_it_trained(nodes):
    _, (a, b) = nodes
    g = a.initial_global()
    users = np.arange(1, a.split.n_users + 1)
    state, shard = a.initial_local(users), a.make_shard(users)
    up, new_state, metrics = a.client_update(g, state, shard, round=1)
    rows, weights = up.rows["user_shared.weight"]
    trained = np.bincount(shard.train.users, minlength=a.split.n_users + 1)
    common_trained = np.flatnonzero((a._rows > 0) & (trained > 0))
    assert sorted(rows.tolist()) == sorted(a._rows[common_trained].tolist())
    assert weights.tolist() == trained[common_trained].astype(float).tolist()
    assert up.sums["user_shared.weight"].shape == (len(rows), SMALL["dim"])
    # private tables never travel; they changed locally
    assert not any(n.startswith(("items", "user_spec", "disc", "agg.")) for n in up.sums)
    assert not torch.equal(new_state.tensors["items.weight"], state.tensors["items.weight"])
    # the row a domain sends is its trained row, weighted
    first = int(common_trained[0])  # rows are sent in local-user order
    torch.testing.assert_close(up.sums["user_shared.weight"][0].float(),
                               (new_state.tensors["user_shared.weight"][first] * weights[0]).float())


def test_rounds_learn_and_report_each_domain(nodes):
    _, algs = nodes
    g = algs[0].initial_global()
    users = [np.arange(1, a.split.n_users + 1) for a in algs]
    states = [a.initial_local(u) for a, u in zip(algs, users, strict=True)]
    shards = [a.make_shard(u) for a, u in zip(algs, users, strict=True)]

    def valid():
        return algs[0].combine([a.client_evaluate(g, s, sh, stage="valid") for a, s, sh in zip(algs, states, shards,
                                                                                                 strict=True)])

    before = valid()
    for r in range(1, 6):
        ups = []
        for i, a in enumerate(algs):
            up, states[i], _ = a.client_update(g, states[i], shards[i], round=r)
            ups.append(up)
        g, _, metrics = algs[0].aggregate(g, ups)
    after = valid()
    assert {"d0/hr@10", "d1/hr@10", "hr@10", "ndcg@10"} <= set(after)
    assert after["ndcg@10"] > before["ndcg@10"]
    assert after["ndcg@10"] == pytest.approx((after["d0/ndcg@10"] + after["d1/ndcg@10"]) / 2)


def test_refused_configurations(nodes):
    full, (a, _) = nodes
    sp = a.split
    for kwargs, needle in [
        ({"task": "next_item"}, "cdr task"),
        ({"task": "cdr", "model": "mf"}, "trains the 'unicdr' model"),
        ({"task": "cdr", "model_options": {"shared-context": "other"}}, "must be 'own'"),
        ({"task": "cdr", "config": FederatedConfig(noise_multiplier=1.0)}, "population"),
        ({"task": "cdr", "config": FederatedConfig(fraction=0.5)}, "fraction must be 1"),
        ({"task": "cdr", "config": FederatedConfig(optimizer="sgd")}, "optimizer 'sgd' is not supported"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            create_algorithm("unicdr", sp, **kwargs)
    three = split_dataset(load_dataset("synthetic:users=60,items=40,domains=3,seed=1"))
    with pytest.raises(ConfigError, match="two domains"):
        create_algorithm("unicdr", three, task="cdr")
    fresh = create_algorithm("unicdr", sp, task="cdr", model_options=SMALL)
    with pytest.raises(ConfigError, match="not known yet"):
        fresh.initial_global()


# -- through the Flower apps -------------------------------------------------------------
RUN = {"data": DATA, "task": "cdr", "algorithm": "unicdr", "partition": "domain", "shards": 2, "rounds": 2,
       "lr": 0.01, "negatives": 4, "protocol": "sampled-99", "batch-size": 64,
       **{f"model.{k}": v for k, v in SMALL.items()}}


def test_a_run_through_the_flower_apps_aligns_trains_and_saves_a_usable_model(tmp_path):
    from fedrec.data.federation import write_federation
    from fedrec.federated.model import evaluate_federated
    from fedrec.federated.runner import run_in_process
    from fedrec.federated.spec import parse_run_config

    result = run_in_process(parse_run_config({**RUN, "model-dir": str(tmp_path / "model")}))
    frame = load_dataset(DATA).interactions.frame
    per_domain = [set(frame.loc[frame["domain"] == d, "user"]) for d in ("d0", "d1")]
    assert result["alignment"]["common_users"] == len(per_domain[0] & per_domain[1])
    assert [h["round"] for h in result["history"]] == [1, 2]
    assert {"d0/hr@10", "d1/ndcg@10", "ndcg@10"} <= set(result["test"])
    # the saved model scores as the run did, with no intersection run again
    saved = evaluate_federated(tmp_path / "model")
    assert saved["test"] == result["test"] and saved["round"] == result["best_round"]
    # node-local: a federation folder (one file per domain) gives the same run
    write_federation(DATA, tmp_path / "fed", clients=2, partition="domain")
    again = run_in_process(parse_run_config({**{k: v for k, v in RUN.items() if k != "data"},
                                             "federation": str(tmp_path / "fed")}))
    assert again["history"] == result["history"]


def test_secure_aggregation_and_central_dp_are_refused_with_aligned_rows():
    from fedrec.federated.node import build_node
    from fedrec.federated.spec import parse_run_config

    # refused from the run config alone, before any node is contacted
    for extra, needle in [({"secure-aggregation": True, "population": 120}, "does not support 'secure-aggregation'"),
                          ({"central-dp": True, "central-noise-multiplier": 1.0}, "does not support 'central-dp'")]:
        with pytest.raises(ConfigError, match=needle):
            parse_run_config({**RUN, **extra})
    # and by the node, from the layout (any algorithm with aligned tables)
    import dataclasses

    spec = dataclasses.replace(parse_run_config(RUN), algorithm="unicdr")
    object.__setattr__(spec, "secure_aggregation", True)
    with pytest.raises(ConfigError, match="secure aggregation is not supported"):
        build_node(spec, {"shard": 0, "shards": 2})


def test_data_partition_by_domain_writes_one_domain_per_client(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "fed"
    proc = subprocess.run([sys.executable, "-m", "fedrec.cli", "data", "partition", DATA, "--clients", "2",
                           "--partition", "domain", "--out", str(out), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert [c["domains"] for c in manifest["clients"]] == [["d0"], ["d1"]]
    for c in manifest["clients"]:
        frame = load_dataset(f"parquet:{out / c['file']}").interactions.frame
        assert set(frame["domain"]) == set(c["domains"])
    bad = subprocess.run([sys.executable, "-m", "fedrec.cli", "data", "partition", "synthetic:users=20", "--clients",
                          "2", "--partition", "domain", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode != 0 and "multi-domain" in bad.stderr and "Traceback" not in bad.stderr


def test_every_node_gives_the_same_initial_global_parameters(nodes):
    # the server asks whichever node it likes first: the answer must not depend on it
    _, (a, b) = nodes
    ga, gb = a.initial_global(), b.initial_global()
    assert set(ga) == set(gb)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n])


def test_psi_steps_refuse_out_of_order_or_repeated_queries(nodes):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fedrec.federated.node import _Node, psi_query
    from fedrec.federated.runner import _set_identity

    _set_identity(1, 1)  # Flower messages need a run id (set by the runtime otherwise)
    _, (a, _) = nodes
    node = _Node(None, a, None)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def ask(kind, arrays=None):
        content = RecordDict({"config": ConfigRecord({"kind": kind})})
        if arrays is not None:
            content["arrays"] = ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()})
        return psi_query(node, kind, Message(content, dst_node_id=1, message_type="query"), context)

    with pytest.raises(ConfigError, match="before 'psi-blind'"):
        ask("psi-raise", {"set": np.zeros((1, 32), dtype=np.uint8)})
    blinded = ask("psi-blind")["arrays"].to_torch_state_dict()["set"].numpy()
    assert blinded.shape == (a.split.n_users, 32)
    with pytest.raises(ConfigError, match=r"\(n, 32\)"):
        ask("psi-raise", {"set": np.zeros((2, 7), dtype=np.uint8)})
    ask("psi-raise", {"set": blinded[:3]})
    with pytest.raises(ConfigError, match="already raised"):  # no second batch of chosen points
        ask("psi-raise", {"set": blinded[:3]})
    with pytest.raises(ConfigError, match="no arrays"):
        ask("psi-finish")


def test_cross_domain_summaries_pool_per_domain_then_average_the_domains():
    from fedrec.federated.evaluation import combine_ranking

    from fedrec.federated.unicdr import domain_ranking_summary
    from fedrec.metrics import domain_ranking_metrics

    ranks = np.array([0, 20, 3, 50, 1, 7])
    doms = np.array([0, 0, 1, 1, 1, 0])
    cold = np.array([False, True, False, False, True, False])
    # two clients holding parts of the examples, domain 0 split across both
    parts = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    summaries = [domain_ranking_summary(ranks[p], doms[p], ["x", "y"], cold[p]) for p in parts]
    pooled = combine_ranking(summaries)
    central = domain_ranking_metrics(ranks, doms, ["x", "y"], cold)
    for key, value in central.items():
        assert pooled[key] == pytest.approx(value), key
    assert pooled["x/n"] == 3 and pooled["y/n"] == 3 and pooled["n"] == 6


def test_the_multi_behaviour_head_stays_in_its_domain_and_reports_likes(tmp_path):
    from fedrec.federated.model import evaluate_federated
    from fedrec.federated.runner import run_in_process
    from fedrec.federated.spec import parse_run_config

    data = DATA.replace("seed=4", "behaviours=2,seed=4")
    sp = split_dataset(load_dataset(data))
    alg = create_algorithm("unicdr", sp, task="cdr", model_options={**SMALL, "behaviour-head": "mmoe"})
    travels = set(alg.layout.shared) | set(alg.layout.aligned)
    assert any(n.startswith("head.") for n, _ in alg.model.named_parameters())
    assert not any(n.startswith("head.") for n in travels)  # each domain keeps its head
    result = run_in_process(parse_run_config({**RUN, "data": data, "rounds": 1, "model.behaviour-head": "mmoe",
                                              "model-dir": str(tmp_path / "model")}))
    assert {"d0/like/hr@10", "d1/like/ndcg@10", "d0/hr@10"} <= set(result["test"])
    assert evaluate_federated(tmp_path / "model")["test"] == result["test"]


def test_dp_clips_each_shared_row_and_the_aggregator_and_accounts_two_releases_a_round(nodes):
    from fedrec.federated.privacy import epsilon_of

    _, (a, _) = nodes
    C, lr = 0.01, 0.01
    cfg = FederatedConfig(lr=lr, negatives=4, protocol="sampled-99", batch_size=64, noise_multiplier=1e-9,
                          max_grad_norm=C, population=120, dp_noise_seed=0)
    dp = create_algorithm("unicdr", a.split, task="cdr", model_options=SMALL, config=cfg)
    dp.set_alignment(a._rows[1:])
    g = dp.initial_global()
    users = np.arange(1, dp.split.n_users + 1)
    state, shard = dp.initial_local(users), dp.make_shard(users)
    for r in (1, 2):
        up, state, metrics = dp.client_update(g, state, shard, round=r)
        rows, weights = up.rows["user_shared.weight"]
        sent = up.sums["user_shared.weight"] / weights.view(-1, 1)
        change = (sent - g["user_shared.weight"][rows].double()).norm(dim=1) / lr
        assert change.max() <= C * (1 + 1e-6) and change.max() > 0.5 * C  # clipped, per row
        agg = torch.cat([(up.sums[n] / up.weight - g[n].double()).flatten() for n in dp.layout.shared])
        assert agg.norm() / lr <= C * (1 + 1e-6)  # the aggregator, as one vector
        expected = epsilon_of(torch.tensor([[1e-9, 1.0, 2.0 * r]], dtype=torch.float64), delta=0.01 / 120)  # the default delta
        assert metrics["epsilon"] == pytest.approx(expected) and up.privacy["epsilon"] == metrics["epsilon"]
        assert "loss" not in metrics and np.isnan(up.loss_sum)
    # target-epsilon is met after all rounds, two releases each
    cal = create_algorithm("unicdr", a.split, task="cdr", model_options=SMALL,
                           config=FederatedConfig(target_epsilon=8.0, rounds=5, population=120))
    sigma = cal.privacy.noise_multiplier
    spent = epsilon_of(torch.tensor([[sigma, 1.0, 10.0]], dtype=torch.float64), delta=0.01 / 120)  # the default delta
    assert spent <= 8.0 and spent > 7.5
