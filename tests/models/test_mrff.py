"""MRFF's group-gated layer: independent groups, per-user private FFNs, gate modes, the
balance loss, routing over real positions only, and parameter roles."""

from __future__ import annotations

import pytest
import torch

from fedrec.errors import ConfigError
from fedrec.models.base import ModelData
from fedrec.models.mrff import MRFF, MRFFConfig
from fedrec.train import _optimizers, TrainConfig

N_USERS, N_ITEMS = 5, 12


def _data():
    item_features = torch.randint(1, 4, (N_ITEMS + 1, 2))
    item_features[0] = 0
    user_features = torch.randint(1, 3, (N_USERS + 1, 1))
    user_features[0] = 0
    return ModelData(N_USERS, N_ITEMS, True, user_features, item_features, (3,), (4, 4))


def _model(**kw):
    torch.manual_seed(0)
    opts = dict(dim=8, field_dim=4, layers=2, max_len=6, dropout=0.0, groups=3, task="ctr")
    opts.update(kw)
    return MRFF(_data(), MRFFConfig(**opts))


def _batch(users=(1, 2, 3)):
    B = len(users)
    items = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 7, 8]])[:B]
    return {
        "user": torch.tensor(users),
        "items": items,
        "labels": torch.ones_like(items),
        "target_items": torch.roll(items, -1, 1).clamp(min=1) * (items > 0),
        "target_labels": torch.ones(items.shape),
        "target_mask": items > 0,
    }


def test_group_ffns_are_independent_modules():
    model = _model()
    groups = model.ffns[0].group_ffns
    assert len({id(g) for g in groups}) == 3
    assert len({g.inner.weight.data_ptr() for g in groups}) == 3
    state = model.state_dict()
    for g in range(3):
        state[f"ffns.0.group_ffns.{g}.inner.weight"] = torch.full_like(state[f"ffns.0.group_ffns.{g}.inner.weight"], float(g))
    model.load_state_dict(state)
    assert [float(g.inner.weight.detach()[0, 0]) for g in groups] == [0.0, 1.0, 2.0]


def test_user_ffn_is_private_per_user():
    model = _model()
    batch = _batch()
    before = model.predict_ctr(batch)
    with torch.no_grad():  # change only user 2's private FFN
        model.ffns[0].user_ffn.outer.weight[2] += 1.0
    after = model.predict_ctr(batch)
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]


def test_a_sparse_step_moves_only_the_batch_users_private_rows():
    model = _model()
    opts = _optimizers(model, TrainConfig(lr=0.1))
    rows_before = model.ffns[0].user_ffn.inner.weight.detach().clone()
    batch = _batch(users=(1, 3))
    model.loss(batch, model(batch)).backward()
    for opt in opts:
        opt.step()
    moved = (model.ffns[0].user_ffn.inner.weight.detach() != rows_before).any(dim=1)
    assert moved.tolist() == [False, True, False, True, False, False]


def test_hard_gate_learns_only_from_the_balance_loss_and_scaled_from_the_task():
    for gate, alpha, expect_grad in [("hard", 0.0, False), ("hard", 0.1, True), ("scaled", 0.0, True)]:
        model = _model(gate=gate, alpha=alpha)
        batch = _batch()
        model.loss(batch, model(batch)).backward()
        grad = model.ffns[0].gate.weight.grad
        has = grad is not None and bool(grad.abs().sum() > 0)
        assert has == expect_grad, (gate, alpha)


def test_balance_loss_by_hand():
    model = _model(alpha=0.5, layers=1)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]])
    choice = probs.argmax(1, keepdim=True)  # groups 0, 0, 2, 0 -> f = (3/4, 0, 1/4)
    # P = column means = (0.475, 0.2125, 0.3125); loss = 0.5 * 3 * (0.75 * 0.475 + 0.25 * 0.3125) = 0.6515625
    loss = model.balance_loss([{"probs": probs, "choice": choice}])
    assert float(loss) == pytest.approx(0.6515625)
    # federated: f from the previous round's counts
    share = torch.tensor([[0.0, 1.0, 0.0]])
    assert float(model.balance_loss([{"probs": probs, "choice": choice}], share)) == pytest.approx(0.5 * 3 * 0.2125)


def test_routing_is_per_user_and_layer_and_ignores_padding():
    model = _model()
    batch = _batch()
    routes = model.route(batch)
    assert routes.shape == (3, 2) and routes.max() < 3
    noisy = dict(batch)
    noisy["items"] = batch["items"].clone()
    noisy["items"][0, :2] = 0  # already padding: unchanged
    torch.testing.assert_close(model.route(noisy), routes)


def test_top_k_and_residual_options():
    model = _model(top_k=2, residual=True)
    batch = _batch()
    out = model(batch)
    assert all(r["choice"].shape == (3, 2) for r in out["context"]["routing"])
    with pytest.raises(ConfigError, match="top_k"):
        _model(top_k=4)
    with pytest.raises(ConfigError, match="gate"):
        _model(gate="soft")


def test_parameter_roles():
    model = _model(user_id=True)
    roles = {k: str(v) for k, v in model.parameter_roles().items()}
    assert roles["ffns.1.group_ffns.2.inner.weight"] == "group(1, 2)"
    assert roles["ffns.0.user_ffn.inner.weight"] == "private[per-user]"
    assert roles["users.id_embedding.weight"] == "private[per-user]"
    assert roles["users.fields.0.weight"] == "private"
    assert roles["ffns.0.gate.weight"] == "public"
    assert roles["items.fields.0.weight"] == "public"
    assert roles["attns.0.query.weight"] == "public"


def test_bidirectional_trains_only_on_the_last_position():
    model = _model(bidirectional=True)
    batch = _batch()
    out = model(batch)
    base = model.loss(batch, out)
    changed = dict(batch)
    changed["target_labels"] = batch["target_labels"].clone()
    changed["target_labels"][:, :-1] = 0.0  # earlier targets are visible to the encoder: ignored
    assert float(model.loss(changed, out).detach()) == pytest.approx(float(base.detach()))


@pytest.mark.parametrize("gate,top_k", [("hard", 1), ("scaled", 1), ("scaled", 2), ("hard", 3)])
def test_dispatch_computes_the_same_function_and_gradients(gate, top_k):
    """``dispatch`` runs each group FFN only on its users: the same outputs, losses and
    gradients as running every group on every user (dropout off, so no random draws)."""
    batch = _batch()
    results = []
    for dispatch in (False, True):
        model = _model(gate=gate, top_k=top_k, dispatch=dispatch)
        out = model(batch)
        loss = model.loss(batch, out)
        loss.backward()
        grads = {n: p.grad.to_dense() if p.grad.is_sparse else p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((model.predict_ctr(batch), loss.detach(), grads,
                        [r["choice"] for r in out["context"]["routing"]]))
    (p0, l0, g0, c0), (p1, l1, g1, c1) = results
    assert all(torch.equal(a, b) for a, b in zip(c0, c1))
    # some group gets no users here: its gradient is zero, not None, either way
    if top_k < 3:
        assert any(not g0[n].any() for n in g0 if "group_ffns" in n)
    assert torch.allclose(p0, p1, atol=1e-6) and torch.allclose(l0, l1, atol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6), name


def test_dispatch_falls_back_to_dense_under_vmap():
    """The federated engine marks its working copy vmap-safe; dispatch then stays dense, so
    the per-user vmap (no data-dependent shapes) still runs."""
    from torch.func import vmap

    model = _model(dispatch=True)
    model.vmap_safe = True
    batch = _batch()
    # (the dispatching form's nonzero() has a data-dependent shape: vmap would refuse it)
    per_user = vmap(lambda b: model.predict_ctr({k: v.unsqueeze(0) for k, v in b.items()}))(batch)
    model.vmap_safe = False
    assert torch.allclose(per_user.squeeze(1), model.predict_ctr(batch), atol=1e-6)
