"""MRFF's routing and private-FFN options (issue 14): gates that learn, evaluation that routes
only to trained groups, private FFNs that can be shrunk, and weight decay that reaches the
sparse per-user tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError
from fedrec.federated.config import FederatedConfig
from fedrec.federated.registry import create_algorithm
from fedrec.models.mrff import MRFFConfig
from fedrec.train import TrainConfig, _optimizers, routing_stats

from tests.models.test_mrff import _batch, _model


def test_default_gate_is_scaled_and_hard_stays_available():
    assert MRFFConfig().gate == "scaled"
    assert _model(gate="hard").cfg.gate == "hard"


@pytest.mark.parametrize("bad", [{"gate": "soft"}, {"z_loss": -1.0}, {"entropy": -0.1}, {"gate_noise": -1.0},
                                 {"router_lr": 0.0}, {"balance": "mean"}, {"user_init": "ones"},
                                 {"user_scale": "length"}, {"user_k": 0.0}, {"user_decay": -1.0},
                                 {"user_ffn": False, "user_decay": 0.1}])
def test_bad_options_are_one_line_errors(bad):
    with pytest.raises(ConfigError) as err:
        _model(**bad)
    assert "\n" not in str(err.value)


def test_z_loss_and_entropy_add_their_terms():
    batch = _batch()
    base = _model(alpha=0.0)
    out = base(batch)
    routing = out["context"]["routing"]
    z = sum(torch.logsumexp(r["logits"], -1).pow(2).mean() for r in routing)
    ent = sum(-(r["probs"] * r["probs"].log()).sum(-1).mean() for r in routing)
    assert float(base.auxiliary_loss(out)) == 0.0
    with_terms = _model(alpha=0.0, z_loss=0.01, entropy=0.5)
    assert float(with_terms.auxiliary_loss(with_terms(batch)).detach()) == pytest.approx(float(0.01 * z + 0.5 * ent), rel=1e-5)


def test_soft_balance_is_minimal_for_an_even_spread():
    model = _model(alpha=1.0, layers=1, balance="soft")
    even = torch.eye(3)  # three users, one per group: mean (1/3, 1/3, 1/3)
    herd = torch.tensor([[1.0, 0, 0]] * 3)
    loss = lambda p: float(model.balance_loss([{"probs": p, "choice": p.argmax(1, keepdim=True)}]))
    assert loss(even) == pytest.approx(1.0) and loss(herd) == pytest.approx(3.0)


def test_gate_noise_only_in_training():
    model = _model(gate_noise=5.0, dropout=0.0)
    batch = _batch()
    model.eval()
    assert torch.equal(model.route(batch), model.route(batch))
    model.train()
    torch.manual_seed(0)
    draws = {tuple(model.forward(batch, mode="route").flatten().tolist()) for _ in range(20)}
    assert len(draws) > 1


def test_evaluation_routes_only_to_groups_alive():
    model = _model(groups=3)
    batch = _batch()
    model.eval()
    free = model.route(batch)
    dead = int(free[0, 0])  # kill the group user 1 chooses at layer 0
    alive = torch.ones(2, 3, dtype=torch.bool)
    alive[0, dead] = False
    routed = model.route({**batch, "group_alive": alive})
    assert (routed[:, 0] != dead).all()
    # a layer without any trained group is not masked
    assert torch.equal(model.route({**batch, "group_alive": torch.zeros(2, 3, dtype=torch.bool)}), free)


def test_zero_init_private_ffn_starts_at_the_group_and_history_scale():
    zero = _model(user_init="zero")
    no_private = _model(user_ffn=False)
    no_private.load_state_dict({k: v for k, v in zero.state_dict().items() if "user_ffn" not in k})
    batch = _batch()
    zero.eval(), no_private.eval()
    assert torch.allclose(zero.predict_ctr(batch), no_private.predict_ctr(batch))
    # history scaling n / (n + k): with k huge the private part vanishes
    tiny = _model(user_scale="history", user_k=1e9)
    plain = _model(user_ffn=False)
    plain.load_state_dict({k: v for k, v in tiny.state_dict().items() if "user_ffn" not in k})
    tiny.eval(), plain.eval()
    assert torch.allclose(tiny.predict_ctr(batch), plain.predict_ctr(batch), atol=1e-6)
    assert not torch.allclose(_model().predict_ctr(batch), plain.predict_ctr(batch), atol=1e-6)


def test_user_decay_penalises_the_batch_users_rows():
    model = _model(alpha=0.0, user_decay=0.1)
    batch = _batch(users=(1, 3))
    out = model(batch)
    rows = sum(f.user_ffn.inner.weight[[1, 3]].pow(2).sum() + f.user_ffn.outer.weight[[1, 3]].pow(2).sum()
               for f in model.ffns)
    assert float(model.auxiliary_loss(out)) == pytest.approx(float(0.1 * rows / 2), rel=1e-5)


def test_private_parameters_per_user():
    model = _model(user_hidden=2)  # dim 8: inner 8*2 + 2, outer 2*8 + 8, two layers
    assert model.private_parameters_per_user() == 2 * ((8 * 2 + 2) + (2 * 8 + 8))


def test_weight_decay_reaches_sparse_rows_and_only_the_touched_ones():
    torch.manual_seed(0)
    plain, decayed = _model(), _model()
    batch = _batch(users=(1, 3))
    moved = {}
    for name, model, wd in [("plain", plain, 0.0), ("decayed", decayed, 0.5)]:
        opts = _optimizers(model, TrainConfig(lr=0.1, weight_decay=wd))
        torch.manual_seed(1)
        model.loss(batch, model(batch)).backward()
        for opt in opts:
            opt.step()
        moved[name] = model.ffns[0].user_ffn.inner.weight.detach().clone()
    differs = (moved["plain"] != moved["decayed"]).any(dim=1).tolist()
    assert differs == [False, True, False, True, False, False]


def test_router_lr_makes_its_own_optimiser_group():
    model = _model(router_lr=0.1)
    opt = _optimizers(model, TrainConfig(lr=0.01))[0]
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([0.001, 0.01])
    gate_ids = {id(model.ffns[i].gate.weight) for i in range(2)}
    slow = next(g for g in opt.param_groups if g["lr"] == pytest.approx(0.001))
    assert gate_ids <= {id(p) for p in slow["params"]}


@pytest.fixture(scope="module")
def split():
    return split_dataset(load_dataset("synthetic:users=16,items=40,seed=1"))


def test_federated_routing_changes_are_counted_and_balance_soft_is_refused(split):
    alg = create_algorithm("mrff", split, task="ctr", model_options={"dim": 16, "max-len": 20},
                           config=FederatedConfig(rounds=2, population=16))
    g = alg.initial_global()
    shard = alg.make_shard(np.arange(1, 17))
    state = alg.initial_local(shard.users)
    up1, state, _ = alg.client_update(g, state, shard, round=1)
    assert up1.routed_before == 0 and float(up1.group_changed.sum()) == 0
    g, counts, metrics = alg.aggregate(g, [up1])
    assert "group-changed" not in metrics
    first = state.routes.copy()
    up2, state, _ = alg.client_update(g, state, shard, round=2, group_counts=counts)
    assert up2.routed_before == 16
    expected = (first != state.routes).sum(0)
    assert up2.group_changed.tolist() == expected.astype(float).tolist()
    _, counts2, metrics = alg.aggregate(g, [up2])
    assert metrics["group-changed"] == pytest.approx((expected / 16).round(4).tolist())
    # evaluation routing respects the round's live groups
    users, routes = alg.route_users(g, state, shard.test, group_counts=counts2)
    live = (counts2 > 0).numpy()
    assert all(live[layer, routes[:, layer]].all() for layer in range(routes.shape[1]))
    with pytest.raises(ConfigError, match="balance=soft"):
        create_algorithm("mrff", split, task="ctr", model_options={"balance": "soft"},
                         config=FederatedConfig(rounds=1, population=16))


def test_routing_stats_share_and_changed(split):
    from fedrec.data.batching import build_examples
    from fedrec.models.base import ModelData
    from fedrec.models.registry import create_model

    m = create_model("mrff", ModelData.from_split(split), {"dim": 16, "max-len": 20}, task="ctr")
    ex = build_examples(split, task="ctr", stage="valid", max_len=20)
    record, routes = routing_stats(m, ex)
    assert len(record["share"]) == 2 and all(sum(s) == pytest.approx(1.0, abs=1e-3) for s in record["share"])
    assert "changed" not in record
    record2, _ = routing_stats(m, ex, np.where(routes == 0, 1, 0))
    assert all(0.0 <= c <= 1.0 for c in record2["changed"]) and sum(record2["changed"]) > 0


def test_router_lr_in_the_federated_engine_equals_the_one_user_loop(split):
    from tests.federated.test_algorithm import _max_diff, _run

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        alg = create_algorithm("mrff", split, task="ctr",
                               model_options={"dim": 16, "max-len": 20, "dropout": 0.0, "router_lr": 0.1},
                               config=FederatedConfig(rounds=2, lr=0.05, population=16))
        shards = [np.arange(1, 9), np.arange(9, 17)]
        fast, _, _ = _run(alg, shards, 2)
        slow, _, _ = _run(alg, shards, 2, reference=True)
        assert _max_diff(fast, slow) <= 1e-8
        plain = create_algorithm("mrff", split, task="ctr", model_options={"dim": 16, "max-len": 20, "dropout": 0.0},
                                 config=FederatedConfig(rounds=2, lr=0.05, population=16))
        full, _, _ = _run(plain, shards, 2)
        gate = "ffns.0.gate.weight"
        init = alg.initial_global()[gate]
        # the router moves about a tenth as far
        assert float((fast[gate] - init).abs().mean()) < 0.3 * float((full[gate] - init).abs().mean())
    finally:
        torch.set_default_dtype(old)


def test_router_detach_keeps_auxiliary_gradients_on_the_gate():
    """With router_detach (the default for the scaled gate) the balance loss trains the gate
    but not the inputs it reads (profile embeddings, hidden states); gate=hard keeps the
    reference behaviour, where it reaches them."""
    batch = _batch()
    for gate, detach, reaches_inputs in [("scaled", None, False), ("scaled", False, True), ("hard", None, True)]:
        model = _model(gate=gate, router_detach=detach, alpha=1.0)
        model.train()
        out = model(batch)
        model.auxiliary_loss(out).backward()
        assert model.ffns[0].gate.weight.grad.abs().sum() > 0
        profile = model.users.fields[0].weight.grad
        got = profile is not None and bool(profile.abs().sum() > 0)
        assert got == reaches_inputs, (gate, detach)


def test_history_only_gate():
    model = _model(gate_input="history")
    assert model.ffns[0].gate.in_features == 8
    assert model.route(_batch()).shape == (3, 2)
