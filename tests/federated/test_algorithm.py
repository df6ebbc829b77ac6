"""The federated algorithm interface: vectorised shards keep one-client-per-user semantics,
aggregation follows parameter roles, private parameters never leave the client."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError
from fedrec.federated import FederatedConfig, Layout, create_algorithm, participants
from fedrec.federated.algorithm import Upload, aggregate_uploads
from fedrec.federated.reference import reference_client_update


SMALL = {"dim": 16, "max-len": 20}


@pytest.fixture(scope="module")
def split():
    return split_dataset(load_dataset("synthetic:users=16,items=40,seed=1"))


def _run(alg, shards, rounds, *, reference=False):
    """Rounds over the given user shards; returns final global params, counts, states."""
    g = alg.initial_global()
    counts = None
    states = [alg.initial_local(s) for s in shards]
    made = [alg.make_shard(s) for s in shards]
    for r in range(1, rounds + 1):
        update = reference_client_update if reference else type(alg).client_update
        ups = []
        for st, sh in zip(states, made, strict=True):
            up, _, _ = update(alg, g, st, sh, round=r, group_counts=counts)
            ups.append(up)
        g, counts, _ = alg.aggregate(g, ups)
    return g, counts, states


def _max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("optimizer,steps,lr", [("adam", 1, 0.05), ("adam", 2, 0.001), ("sgd", 2, 0.05)])
def test_shard_of_n_users_equals_n_one_user_clients_run_one_by_one(split, float64, optimizer, steps, lr):
    """The issue's acceptance test: 3 rounds, shard of N vs N one-user clients (the plain
    deep-copy-per-user loop), max abs difference of the global parameters <= 1e-5.

    float64 because a fresh Adam's first step is lr * g / (|g| + 1e-8): for entries whose
    gradient is ~0 it amplifies rounding differences by up to lr / 1e-8 per step (so
    several Adam steps are compared at a small lr)."""
    cfg = FederatedConfig(optimizer=optimizer, local_steps=steps, lr=lr, chunk_size=7)
    alg = create_algorithm("mrff", split, task="ctr", model_options={"dropout": 0.0, "user-id": True, **SMALL}, config=cfg)
    users = np.arange(1, split.n_users + 1)
    g_vec, c_vec, s_vec = _run(alg, [users], 3)
    g_ref, c_ref, s_ref = _run(alg, [np.array([u]) for u in users], 3, reference=True)
    assert torch.equal(c_vec, c_ref)
    assert _max_diff(g_vec, g_ref) <= 1e-5
    # private state too: each user's own FFN rows
    for n in alg.layout.per_user:
        ref_rows = torch.cat([s.tensors[n] for s in s_ref])
        assert float((s_vec[0].tensors[n] - ref_rows).abs().max()) <= 1e-5
    assert c_vec.sum(1).tolist() == [float(len(users))] * alg.layout.layers


def test_float32_sgd_matches_the_loop(split):
    cfg = FederatedConfig(optimizer="sgd", local_steps=2, lr=0.1, chunk_size=8)
    alg = create_algorithm("mrff", split, task="ctr", model_options={"dropout": 0.0, **SMALL}, config=cfg)
    users = np.arange(1, split.n_users + 1)
    g_vec, _, _ = _run(alg, [users], 3)
    g_ref, _, _ = _run(alg, [np.array([u]) for u in users], 3, reference=True)
    assert _max_diff(g_vec, g_ref) <= 1e-5


def test_result_does_not_depend_on_chunking_or_sharding_without_dropout(split, float64):
    users = np.arange(1, split.n_users + 1)
    results = []
    for chunk, shards in ((4, [users]), (64, [users]), (64, np.array_split(users, 3))):
        cfg = FederatedConfig(chunk_size=chunk, lr=0.05)
        alg = create_algorithm("mrff", split, task="ctr", model_options={"dropout": 0.0, **SMALL}, config=cfg)
        results.append(_run(alg, list(shards), 2)[0])
    assert _max_diff(results[0], results[1]) <= 1e-5
    assert _max_diff(results[0], results[2]) <= 1e-5


def test_upload_holds_only_global_parameters_and_private_state_stays(split):
    alg = create_algorithm("mrff", split, task="ctr", config=FederatedConfig())
    assert alg.layout.per_user and alg.layout.private  # user FFNs; profile tables
    users = np.arange(1, 11)
    state = alg.initial_local(users)
    before = {n: t.clone() for n, t in state.tensors.items()}
    up, state, metrics = alg.client_update(alg.initial_global(), state, alg.make_shard(users), round=1)
    assert set(up.sums) == set(alg.layout.global_names)
    assert not set(up.sums) & (set(alg.layout.per_user) | set(alg.layout.private))
    assert metrics["users"] == 10 and up.users == 10
    assert all(not torch.equal(before[n], state.tensors[n]) for n in alg.layout.per_user)


def test_partial_participation_trains_only_the_drawn_users(split):
    cfg = FederatedConfig(fraction=0.4, seed=5)
    alg = create_algorithm("mrff", split, task="ctr", config=cfg)
    users = np.arange(1, split.n_users + 1)
    raw = split.user_raw[users]
    drawn = participants(raw, seed=5, round=1, fraction=0.4)
    assert np.array_equal(drawn, participants(raw, seed=5, round=1, fraction=0.4))
    assert 0 < drawn.sum() < split.n_users
    # a user's draw depends on its raw id alone: the same whichever users come with it
    assert np.array_equal(participants(raw[::-1], seed=5, round=1, fraction=0.4), drawn[::-1])
    assert not np.array_equal(participants(raw, seed=5, round=2, fraction=0.4), drawn)
    state = alg.initial_local(users)
    before = state.tensors["ffns.0.user_ffn.inner.weight"].clone()
    up, state, _ = alg.client_update(alg.initial_global(), state, alg.make_shard(users), round=1)
    changed = (state.tensors["ffns.0.user_ffn.inner.weight"] != before).any(1).numpy()
    assert np.array_equal(changed, drawn)
    assert up.users == drawn.sum()


def test_participation_rate_is_the_fraction():
    drawn = participants(np.arange(100_000), seed=0, round=3, fraction=0.3)
    assert abs(drawn.mean() - 0.3) < 0.01


def test_aggregation_by_role_hand_computed():
    layout = Layout(shared=("w",), groups={"g0": (0, 0), "g1": (0, 1)}, layers=1, n_groups=2)
    glob = {"w": torch.zeros(2), "g0": torch.full((2,), 5.0), "g1": torch.full((2,), 7.0)}
    # client A: users with weights 1 and 3, w = [1,1] and [2,2]; both routed to group 0
    a = Upload({"w": torch.tensor([7.0, 7.0]), "g0": torch.tensor([3.0, 3.0]), "g1": torch.zeros(2)}, 4.0,
               torch.tensor([[2.0, 0.0]]), 2, 4, 1.0)
    b = Upload({"w": torch.tensor([4.0, 4.0]), "g0": torch.tensor([4.0, 4.0]), "g1": torch.zeros(2)}, 1.0,
               torch.tensor([[1.0, 0.0]]), 1, 1, 1.0)
    new, counts, _ = aggregate_uploads(layout, glob, [a, b])
    assert torch.allclose(new["w"], torch.tensor([11 / 5, 11 / 5]))
    assert torch.allclose(new["g0"], torch.tensor([7 / 3, 7 / 3]))
    assert torch.equal(new["g1"], glob["g1"])  # nobody chose group 1: unchanged
    assert counts.tolist() == [[3.0, 0.0]]


def test_weighting_by_examples_changes_the_average(split):
    users = np.arange(1, split.n_users + 1)
    out = {}
    for weighting in ("users", "examples"):
        alg = create_algorithm("fedavg", split, task="ctr", model_options={"dropout": 0.0, **SMALL},
                               config=FederatedConfig(weighting=weighting))
        out[weighting] = _run(alg, [users], 1)[0]
    assert _max_diff(out["users"], out["examples"]) > 1e-6


def test_local_only_shares_nothing(split):
    alg = create_algorithm("local", split, task="ctr", config=FederatedConfig())
    assert alg.layout.global_names == ()
    users = np.arange(1, 6)
    state = alg.initial_local(users)
    up, state, _ = alg.client_update({}, state, alg.make_shard(users), round=1)
    assert up.sums == {}
    summary = alg.client_evaluate({}, state, alg.make_shard(users), stage="valid")
    assert summary["n"] == 5


def test_fedavg_sasrec_has_no_groups_and_mrff_nogroups_has_one(split):
    fedavg = create_algorithm("fedavg", split, task="ctr")
    assert fedavg.model_name == "sasrec" and not fedavg.layout.groups
    nog = create_algorithm("mrff-nogroups", split, task="ctr")
    assert nog.layout.n_groups == 1 and nog.model.cfg.groups == 1
    with pytest.raises(ConfigError, match="groups = 1"):
        create_algorithm("mrff-nogroups", split, task="ctr", model_options={"groups": 3})
    with pytest.raises(ConfigError, match="trains the 'mrff' model"):
        create_algorithm("mrff", split, task="ctr", model="sasrec")
    with pytest.raises(ConfigError, match="unknown algorithm"):
        create_algorithm("fedprox", split, task="ctr")


def test_group_share_uniform_before_first_round(split):
    alg = create_algorithm("mrff", split, task="ctr")
    share = alg.group_share(alg.initial_group_counts())
    assert torch.allclose(share, torch.full_like(share, 0.25))
    share = alg.group_share(torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert share[0].tolist() == [0.75, 0.25, 0.0, 0.0] and share[1].tolist() == [0.25] * 4


def test_next_item_sampled_and_full_evaluation_per_user(split):
    from fedrec.data.split import split_dataset as sd

    # 200 items: sampled-99 needs 99 distinct unseen items per user
    seq = sd(load_dataset("synthetic:users=16,items=200,seed=1"))
    for protocol in ("full", "sampled-99"):
        alg = create_algorithm("fedavg", seq, task="next_item", config=FederatedConfig(protocol=protocol))
        users = np.arange(1, seq.n_users + 1)
        st = alg.initial_local(users)
        up, st, m = alg.client_update(alg.initial_global(), st, alg.make_shard(users), round=1)
        pooled = alg.combine([alg.client_evaluate(alg.initial_global(), st, alg.make_shard(users), stage="test")])
        assert 0.0 <= pooled["hr@10"] <= 1.0 and pooled["n"] > 0


@pytest.mark.parametrize("engine", ["vectorised", "reference"])
def test_training_negatives_exclude_only_training_items(monkeypatch, engine):
    """User 1 trains on items 1..8 and holds out 9 (valid) and 10 (test); users 2, 3 bring
    items 11, 12. Its training negatives, in the engine and in the one-user loop, come from
    {9, 10, 11, 12}: held-out items too (as in SASRec's code), training items never."""
    import pandas as pd

    import fedrec.federated.algorithm as algorithm_module
    import fedrec.federated.reference as reference_module
    from fedrec.data import Dataset, Interactions
    from fedrec.data.batching import iterate_batches

    rows = [(1, i, i) for i in range(1, 11)] + [(u, i, t) for u in (2, 3) for t, i in enumerate((11, 12, 1, 2, 3))]
    frame = pd.DataFrame(rows, columns=["user", "item", "time"])
    sp = split_dataset(Dataset(name="t", interactions=Interactions.from_frame(frame, source="t")))
    drawn: set = set()
    u1 = int(np.flatnonzero(sp.user_raw == 1)[0])

    def recording(examples, **kw):
        for batch in iterate_batches(examples, **kw):
            if "negatives" in batch:
                mine = (batch["user"] == u1).numpy()
                neg, mask = batch["negatives"][mine], batch["target_mask"][mine]
                drawn.update(sp.item_raw[neg[mask].numpy().ravel()].tolist())
            yield batch

    module = algorithm_module if engine == "vectorised" else reference_module
    monkeypatch.setattr(module, "iterate_batches", recording)
    alg = create_algorithm("fedavg", sp, task="next_item", model_options={"dropout": 0.0, **SMALL},
                           config=FederatedConfig(negatives=8))
    users = np.arange(1, sp.n_users + 1)
    update = type(alg).client_update if engine == "vectorised" else reference_client_update
    for r in (1, 2):
        update(alg, alg.initial_global(), alg.initial_local(users), alg.make_shard(users), round=r)
    assert drawn == {9, 10, 11, 12}


def test_next_item_cross_entropy_trains_the_users_item_table(split, float64):
    """Full cross-entropy reads the item table inside the loss: it must be each user's copy
    (regression: it once read the template's frozen table). Vectorised == loop."""
    cfg = FederatedConfig(optimizer="sgd", lr=0.5, chunk_size=5)
    alg = create_algorithm("fedavg", split, task="next_item", model_options={"dropout": 0.0, "next-loss": "ce", **SMALL},
                           config=cfg)
    users = np.arange(1, split.n_users + 1)
    g_vec, _, _ = _run(alg, [users], 2)
    g_ref, _, _ = _run(alg, [np.array([u]) for u in users], 2, reference=True)
    assert _max_diff(g_vec, g_ref) <= 1e-5
    assert float((g_vec["items.id_embedding.weight"] - alg.initial_global()["items.id_embedding.weight"]).abs().max()) > 1e-3


def test_local_only_mrff_runs(split):
    alg = create_algorithm("local", split, task="ctr", model="mrff", config=FederatedConfig())
    users = np.arange(1, 6)
    up, state, m = alg.client_update({}, alg.initial_local(users), alg.make_shard(users), round=1)
    assert m["users"] == 5 and up.sums == {}


# -- compact per-user item tables -----------------------------------------------------------
def test_compact_tables_read_exactly_the_rows_the_full_tables_would():
    """A chunk of users with a 400-item catalogue (ids and attribute fields), next item with
    negatives: every lookup through a user's compact copy gives the full table's row, and the
    copies hold only the rows the user's history, targets and negatives touch."""
    seq = split_dataset(load_dataset("synthetic:users=12,items=400,seed=3"))
    alg = create_algorithm("fedavg", seq, task="next_item", model_options={"dropout": 0.0, **SMALL},
                           config=FederatedConfig(negatives=3))
    tables = alg._item_tables
    assert {k for k, _ in tables.values()} == {"id", "field0", "field1"}
    users = np.arange(1, seq.n_users + 1)
    from fedrec.data.batching import iterate_batches
    from fedrec.data.samplers import UniformNegativeSampler

    shard = alg.make_shard(users)
    batch = next(iterate_batches(shard.train, batch_size=len(users), num_negatives=3,
                                 sampler=UniformNegativeSampler(seq, seed=0)))
    ex = alg._per_user_batch(batch, shard.train.users)
    compact, rows = alg._compact_batch(ex)
    g = alg.initial_global()
    for name, (key, row_of_item) in tables.items():
        for field in ("items", "target_items", "negatives"):
            for u in range(len(users)):
                local, full = compact[field][u], ex[field][u]
                got = g[name][rows[name][u]][compact["item_maps"][key][u][local]]
                want = g[name][full if row_of_item is None else row_of_item[full]]
                assert torch.equal(got, want), (name, field, u)
        touched = max(len(torch.unique(torch.cat([ex[f][u].flatten() for f in ("items", "target_items", "negatives")])))
                      for u in range(len(users)))
        assert rows[name].shape[1] <= min(touched + 1, g[name].shape[0])
    assert rows["items.id_embedding.weight"].shape[1] < seq.n_items / 2  # compact, not the catalogue


@pytest.mark.parametrize("task,algorithm,model,extra", [
    ("next_item", "fedavg", None, {}),
    ("ctr", "mrff", None, {}),
    ("next_item", "fedavg", "bert4rec-last", {"weighting": "examples"}),  # bidirectional; weights = target positions
    ("next_item", "fedavg", "kuaiformer", {}),  # in-batch softmax over the user's own targets and negatives
    ("ctr", "mrff", None, {"weighting": "examples", "local_steps": 1}),
])
def test_compact_item_tables_equal_full_per_user_copies(task, algorithm, model, extra, float64):
    """The engine with compact tables vs the same engine with full per-user copies: same
    global parameters (1e-10) and counts; for CTR also the one-user-at-a-time loop (1e-5;
    next-item negatives are drawn per shard, so the loop draws others)."""
    seq = split_dataset(load_dataset("synthetic:users=16,items=300,seed=4"))
    cfg = FederatedConfig(**{"optimizer": "adam", "local_steps": 2, "lr": 0.01, "chunk_size": 5, "negatives": 2, **extra})
    users = np.arange(1, seq.n_users + 1)
    out = []
    for compact in (True, False):
        alg = create_algorithm(algorithm, seq, task=task, model=model, model_options={"dropout": 0.0, **SMALL}, config=cfg)
        alg.compact = compact
        out.append(_run(alg, [users], 2))
    assert torch.equal(out[0][1], out[1][1])
    assert _max_diff(out[0][0], out[1][0]) <= 1e-10
    if task == "ctr":
        ref = _run(alg, [np.array([u]) for u in users], 2, reference=True)
        assert torch.equal(out[0][1], ref[1]) and _max_diff(out[0][0], ref[0]) <= 1e-5
    moved = out[0][0]["items.id_embedding.weight"] - alg.initial_global()["items.id_embedding.weight"]
    assert float(moved.abs().max()) > 1e-3  # the item table did train


def test_compact_item_tables_under_dp_clip_the_same_norms(split):
    """User-level DP on compact copies: the same per-user norms and the same noisy upload
    (seeded noise) as with full copies."""
    cfg = FederatedConfig(noise_multiplier=1.0, max_grad_norm=0.5, lr=0.1, dp_noise_seed=3, chunk_size=6,
                              population=split.n_users)
    users = np.arange(1, split.n_users + 1)
    norms, uploads = [], []
    for compact in (True, False):
        alg = create_algorithm("mrff", split, task="ctr", model_options=SMALL, config=cfg)
        alg.compact = compact
        seen = []
        original = alg.privacy.clip_
        alg.privacy.clip_ = lambda p, g, m, original=original, seen=seen: seen.append(original(p, g, m)) or seen[-1]
        up, _, _ = alg.client_update(alg.initial_global(), alg.initial_local(users), alg.make_shard(users), round=1)
        norms.append(torch.cat(seen))
        uploads.append(up)
    assert torch.allclose(norms[0], norms[1], rtol=1e-5)
    assert (norms[0] > 0.5).any()
    assert _max_diff(uploads[0].sums, uploads[1].sums) <= 1e-5


def test_row_unique_is_torch_unique_per_row():
    from fedrec.federated.algorithm import _row_unique

    x = torch.randint(0, 30, (7, 40), generator=torch.Generator().manual_seed(0))
    x[3] = 5  # a row with a single value
    uniq, inverse = _row_unique(x)
    assert torch.equal(uniq.gather(1, inverse), x)
    for u in range(len(x)):
        want = torch.unique(x[u])
        assert torch.equal(uniq[u, :len(want)], want)
        assert (uniq[u, len(want):] == want[0]).all()  # padding repeats the smallest value


def test_ctr_evaluation_bins_the_models_own_logits(split):
    """The CTR summary's histogram is of the model's logits (which do not saturate), its
    log loss of their sigmoid (the probabilities predict_ctr gives)."""
    from fedrec.federated.evaluation import LOGIT_RANGE, ctr_summary

    alg = create_algorithm("mrff", split, task="ctr", model_options={"dropout": 0.0, **SMALL})
    users = np.arange(1, split.n_users + 1)
    g, st, shard = alg.initial_global(), alg.initial_local(users), alg.make_shard(users)
    pred = alg.predict(g, st, shard.test)
    assert pred["logits"].shape == pred["probs"].shape == (len(shard.test),)
    assert np.allclose(pred["probs"], 1 / (1 + np.exp(-pred["logits"])), atol=1e-6)
    summary = alg.client_evaluate(g, st, shard, stage="test")
    assert summary["logit-range"] == LOGIT_RANGE
    assert summary == ctr_summary(pred["labels"], pred["probs"], logits=pred["logits"], bins=alg.config.auc_bins)
    # the same model through the centralised path gives the same probabilities
    model = alg.model
    model.eval()
    with torch.no_grad():
        from fedrec.data.batching import iterate_batches

        central = model.predict_ctr(next(iterate_batches(shard.test, batch_size=len(shard.test)))).double().numpy()
    assert np.allclose(central, pred["probs"], atol=1e-6)
