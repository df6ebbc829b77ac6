"""FedMF and PFedRec on the vectorised engine: equal to the one-user-at-a-time loop, the
private score function never leaves the client, PFedRec scores with each user's fine-tuned
item embedding, a short run learns, and bad options are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError
from fedrec.federated import FederatedConfig, create_algorithm
from fedrec.federated.pfedrec import PERSONALISE_ROUND
from fedrec.metrics import sampled_ranking_ranks

from conftest import run_rounds

SMALL = {"dim": 8, "max-len": 30}


@pytest.fixture(scope="module")
def split():
    return split_dataset(load_dataset("synthetic:users=14,items=200,seed=5"))


_run = run_rounds


def _max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _private(states, name):
    return torch.cat([s.tensors[name] for s in states])


@pytest.mark.parametrize("algorithm", ["fedmf", "pfedrec"])
@pytest.mark.parametrize("optimizer,steps,lr", [("adam", 2, 0.01), ("sgd", 2, 0.5)])
def test_vectorised_engine_equals_the_one_user_loop(split, float64, algorithm, optimizer, steps, lr):
    """One-user clients (so both draw the same training negatives): the vmapped engine with
    compact item tables and the plain deep-copy loop (one torch optimiser per update phase)
    give the same global item table and the same private user rows after 2 rounds."""
    cfg = FederatedConfig(optimizer=optimizer, local_steps=steps, lr=lr, negatives=3)
    alg = create_algorithm(algorithm, split, task="next_item", model_options=SMALL, config=cfg)
    shards = [np.array([u]) for u in range(1, 7)]
    g_vec, s_vec = _run(alg, shards, 2)
    g_ref, s_ref = _run(alg, shards, 2, reference=True)
    assert _max_diff(g_vec, g_ref) <= 1e-8
    for n in alg.layout.per_user:
        assert float((_private(s_vec, n) - _private(s_ref, n)).abs().max()) <= 1e-8
    moved = g_vec["items.weight"] - alg.initial_global()["items.weight"]
    assert float(moved.abs().max()) > 1e-3  # the item table did train


@pytest.mark.parametrize("algorithm", ["fedmf", "pfedrec"])
def test_chunking_and_compact_tables_do_not_change_the_result(split, float64, algorithm):
    users = np.arange(1, split.n_users + 1)
    out = []
    for chunk, compact in ((3, True), (64, True), (5, False)):
        alg = create_algorithm(algorithm, split, task="next_item", model_options=SMALL,
                               config=FederatedConfig(chunk_size=chunk, lr=0.05, local_steps=2, negatives=2))
        alg.compact = compact
        out.append(_run(alg, [users], 2)[0])
    assert _max_diff(out[0], out[1]) <= 1e-10 and _max_diff(out[0], out[2]) <= 1e-10


def test_pfedrec_updates_the_score_function_first_then_the_item_embedding(split, float64):
    pf = create_algorithm("pfedrec", split, task="next_item", model_options=SMALL,
                          config=FederatedConfig(optimizer="sgd", lr=0.5, negatives=2))
    assert pf.update_phases() == (("users.weight", "user_bias.weight"), ("items.weight",))
    # the same model trained in one joint step (FedMF's update) ends elsewhere: the order matters
    mf = create_algorithm("fedmf", split, task="next_item", model_options={**SMALL, "user-bias": True},
                          config=FederatedConfig(optimizer="sgd", lr=0.5, negatives=2))
    users = np.arange(1, split.n_users + 1)
    assert _max_diff(pf.initial_global(), mf.initial_global()) == 0
    assert _max_diff(_run(pf, [users], 1)[0], _run(mf, [users], 1)[0]) > 1e-6


def test_pfedrec_score_function_never_leaves_the_client(split):
    alg = create_algorithm("pfedrec", split, task="next_item", config=FederatedConfig(negatives=2))
    assert alg.model.cfg.user_bias and alg.model.cfg.dim == 32
    score_function = {"users.weight", "user_bias.weight"}
    assert set(alg.layout.per_user) == score_function
    assert set(alg.initial_global()) == {"items.weight"}
    users = np.arange(1, split.n_users + 1)
    state = alg.initial_local(users)
    before = {n: t.clone() for n, t in state.tensors.items()}
    up, state, _ = alg.client_update(alg.initial_global(), state, alg.make_shard(users), round=1)
    assert set(up.sums) == {"items.weight"}
    assert all(not torch.equal(before[n], state.tensors[n]) for n in score_function)  # trained, kept at home
    new, _, _ = alg.aggregate(alg.initial_global(), [up])
    assert set(new) == {"items.weight"}


def test_pfedrec_scores_with_the_item_embedding_fine_tuned_on_the_users_own_data(split, float64):
    """A user's scores are those of the model it holds after one more local update from the
    current global parameters (the round-0 negative draw): computed here by running that
    update as a one-user client. Evaluation leaves the client state untouched."""
    alg = create_algorithm("pfedrec", split, task="next_item", model_options=SMALL,
                           config=FederatedConfig(lr=0.05, negatives=2, protocol="sampled-99"))
    users = np.arange(1, split.n_users + 1)
    g, (state,) = _run(alg, [users], 2)
    kept = {n: t.clone() for n, t in state.tensors.items()}
    u = 3
    one = alg.initial_local(np.array([u]))
    for n in one.tensors:
        one.tensors[n] = state.tensors[n][[u - 1]].clone()
    up, one, _ = alg.client_update(g, one, alg.make_shard(np.array([u])), round=PERSONALISE_ROUND)
    table = up.sums["items.weight"] / up.weight  # the user's own fine-tuned item embedding
    want = table @ one.tensors["users.weight"][0] + one.tensors["user_bias.weight"][0]
    got = alg.score_items(g, state, np.array([u]))[0]
    torch.testing.assert_close(got, want.to(got.dtype))
    plain = g["items.weight"] @ state.tensors["users.weight"][u - 1] + state.tensors["user_bias.weight"][u - 1]
    assert float((got - plain).abs().max()) > 1e-4  # personalised, not the global embedding
    # sampled-ranking evaluation (compact copies holding the candidates) ranks as the full scores do
    shard = alg.make_shard(users)
    ex, cands = shard.test, shard.candidates["test"]
    ranks = alg.predict(g, state, ex, cands)["ranks"]
    scores = alg.score_items(g, state, ex.users).numpy()
    picked = np.take_along_axis(scores, cands, axis=1)
    np.testing.assert_allclose(ranks, sampled_ranking_ranks(picked[:, 0], picked[:, 1:]))
    assert all(torch.equal(kept[n], state.tensors[n]) for n in kept)


def test_bad_options_are_one_line_errors(split):
    for algorithm in ("fedmf", "pfedrec"):
        with pytest.raises(ConfigError, match=f"algorithm '{algorithm}' trains the 'mf' model"):
            create_algorithm(algorithm, split, task="next_item", model="sasrec")
    with pytest.raises(ConfigError, match="does not support task 'ctr'"):
        create_algorithm("fedmf", split, task="ctr")
    with pytest.raises(ConfigError, match="'dim' must be a positive integer"):
        create_algorithm("pfedrec", split, task="next_item", model_options={"dim": 0})
    with pytest.raises(ConfigError, match="unknown option 'layers'"):
        create_algorithm("fedmf", split, task="next_item", model_options={"layers": 2})
    # an explicit user-bias is kept, not overridden
    alg = create_algorithm("pfedrec", split, task="next_item", model_options={"user-bias": False})
    assert not alg.model.cfg.user_bias and set(alg.layout.per_user) == {"users.weight"}


def test_a_short_run_learns_and_pfedrec_beats_popularity():
    """Synthetic users with a latent taste: after 8 rounds PFedRec's validation NDCG@10 is
    clearly above popularity's (same split and candidates), and FedMF's loss falls and its
    NDCG@10 rises."""
    from fedrec.train import TrainConfig, train

    sp = split_dataset(load_dataset("synthetic:users=200,items=300,seed=3,explore=0.05,sharpness=5"))
    pop = train("popularity", sp, task="next_item", config=TrainConfig(protocol="sampled-99", progress=False))
    users = np.arange(1, sp.n_users + 1)
    curves = {}
    for name in ("fedmf", "pfedrec"):
        alg = create_algorithm(name, sp, task="next_item", model_options={"dim": 16, "max-len": 40},
                               config=FederatedConfig(negatives=4, protocol="sampled-99"))
        st, sh, g = alg.initial_local(users), alg.make_shard(users), alg.initial_global()
        curves[name] = []
        for r in range(1, 9):
            up, st, m = alg.client_update(g, st, sh, round=r)
            g, _, _ = alg.aggregate(g, [up])
            if r in (1, 8):
                ndcg = alg.combine([alg.client_evaluate(g, st, sh, stage="valid")])["ndcg@10"]
                curves[name].append((m["loss"], ndcg))
    assert curves["pfedrec"][-1][1] > pop["valid"]["ndcg@10"] + 0.03
    (loss1, ndcg1), (loss8, ndcg8) = curves["fedmf"]
    assert loss8 < loss1 - 0.1 and ndcg8 > ndcg1 + 0.05


def test_pfedrec_through_the_flower_apps_saves_a_model_that_repeats_its_numbers(tmp_path):
    """In-process Flower run (ServerApp + ClientApp, 2 clients) with model-dir: `fedrec
    evaluate` on the folder gives the run's own numbers (personalised evaluation included),
    and `fedrec recommend` serves the clients' users."""
    from fedrec.federated.model import evaluate_federated, load_federated_model
    from fedrec.federated.runner import run_in_process
    from fedrec.federated.spec import parse_run_config
    from fedrec.recommend import recommend

    run = run_in_process(parse_run_config({"data": "synthetic:users=30,items=200,seed=2", "task": "next_item",
                                           "algorithm": "pfedrec", "shards": 2, "rounds": 3, "negatives": 2,
                                           "protocol": "sampled-99", "model.dim": 8, "model.max-len": 20,
                                           "model-dir": str(tmp_path / "model")}))
    assert run["algorithm"] == "pfedrec" and run["rounds"] == 3
    again = evaluate_federated(tmp_path / "model")
    assert again["test"] == run["test"] and again["valid"] == run["valid"]
    _, models = load_federated_model(tmp_path / "model")
    m = models[0]
    assert set(m.global_params) == {"items.weight"}  # the score functions stayed with the clients
    table = recommend(m.split, m.scorer(), k=4)
    assert (table.groupby("user").size() == 4).all() and table["user"].nunique() == m.split.n_users
