"""The seed retrieval models (issue 16): the softmax loss by hand, causality, KuaiFormer's
one-pass query groups, DimeRec on the sphere, ELASTIC's product keys, BERT4Rec's cloze."""

from __future__ import annotations

import math

import pytest
import torch

from fedrec.data import load_dataset
from fedrec.data.batching import build_examples, iterate_batches
from fedrec.data.samplers import UniformNegativeSampler
from fedrec.data.split import split_dataset
from fedrec.errors import ConfigError
from fedrec.models.base import ModelData
from fedrec.models.dimerec import slerp_towards, sphere_step
from fedrec.models.elastic import ProductKeyMemory
from fedrec.models.registry import create_model
from fedrec.models.retrieval import softmax_loss

SMALL = {"dim": 16, "heads": 2, "layers": 2, "max-len": 12, "dropout": 0.0}


@pytest.fixture(scope="module")
def split():
    return split_dataset(load_dataset("synthetic:users=30,items=50,groups=2,min_len=8,max_len=16,seed=2"))


def _batch(split, stage="train", negatives=2):
    ex = build_examples(split, task="next_item", stage=stage, max_len=12)
    return next(iterate_batches(ex, batch_size=8, num_negatives=negatives if stage == "train" else 0,
                                sampler=UniformNegativeSampler(split, seed=0)))


def _table(n=6, d=3, seed=0):
    table = torch.randn(n + 1, d, generator=torch.Generator().manual_seed(seed))
    table[0] = 0
    return lambda items, maps=None: table[items]


def test_in_batch_softmax_with_logq_and_smoothing_by_hand():
    vec = _table()
    q = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[2, 2, 5]])
    weight = torch.tensor([[1.0, 1.0, 1.0]])
    got = softmax_loss(q, targets, weight, vec, softmax="in-batch", n_items=6, logq=True, label_smoothing=0.2,
                       temperature=0.5)
    # by hand: pool = [2, 2, 5], q(2) = 2/3, q(5) = 1/3; hits of the positive are masked
    pool = [2, 2, 5]
    logq = {2: math.log(2 / 3), 5: math.log(1 / 3)}
    total = 0.0
    for t, y in enumerate([2, 2, 5]):
        s = lambda i: float(q[0, t] @ vec(torch.tensor(i))) / 0.5  # noqa: E731
        logits = [s(y) - logq[y]] + [s(j) - logq[j] for j in pool if j != y]
        lse = math.log(sum(math.exp(v) for v in logits))
        logp = [v - lse for v in logits]
        total += 0.8 * -logp[0] + 0.2 * -(sum(logp[1:]) / len(logp[1:]))
    assert float(got) == pytest.approx(total / 3, rel=1e-5)


def test_in_batch_loss_is_the_same_on_the_vmap_path_and_full_softmax_is_cross_entropy():
    vec = _table(n=10, d=4)
    q = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([[0, 3, 7, 3, 9]])
    weight = (targets > 0).float()
    negatives = torch.tensor([[[0, 0], [1, 4], [2, 3], [8, 1], [5, 6]]])
    kw = dict(softmax="in-batch", n_items=10, logq=True, label_smoothing=0.1, negatives=negatives)
    a = softmax_loss(q, targets, weight, vec, vmap_safe=False, **kw)
    b = softmax_loss(q, targets, weight, vec, vmap_safe=True, **kw)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    full = softmax_loss(q, targets, weight, vec, softmax="full", n_items=10)
    logits = q @ vec(torch.arange(11)).T
    logits[..., 0] = float("-inf")
    want = torch.nn.functional.cross_entropy(logits[weight > 0], targets[weight > 0])
    assert float(full) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("name,options", [("kuaiformer", {}), ("kuaiformer", {"windows": "4,2"}),
                                          ("elastic", {}), ("dimerec", {})])
def test_a_later_item_does_not_change_earlier_user_vectors(split, name, options):
    torch.manual_seed(0)
    model = create_model(name, ModelData.from_split(split), {**SMALL, **options}, task="next_item").eval()
    batch = _batch(split)
    changed = {**batch, "items": batch["items"].clone()}
    changed["items"][:, -1] = torch.where(changed["items"][:, -1] > 0, changed["items"][:, -1] % 50 + 1, 0)
    with torch.no_grad():
        a, _, _ = model.user_vectors(batch)
        b, _, _ = model.user_vectors(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_kuaiformer_query_groups_equal_appending_the_queries_to_each_prefix(split):
    """The one-pass block mask (queries after every prefix) gives, at position t, what the
    queries appended after the prefix ending at t give: served with every later item
    hidden as padding (which keeps the prefix's positions)."""
    torch.manual_seed(0)
    model = create_model("kuaiformer", ModelData.from_split(split), SMALL, task="next_item").eval()
    batch = _batch(split)
    with torch.no_grad():
        reps, trainable, _ = model.user_vectors(batch)
        assert trainable.all()
        for t in (5, 8, 11):
            prefix = {**batch, "items": batch["items"].clone()}
            prefix["items"][:, t + 1:] = 0
            served = model.serving_vectors(prefix)  # (B, k, d)
            torch.testing.assert_close(reps[:, t], served, rtol=1e-5, atol=1e-5)


def test_kuaiformer_windows_compress_early_history_and_leave_it_untrained(split):
    torch.manual_seed(0)
    model = create_model("kuaiformer", ModelData.from_split(split), {**SMALL, "windows": "4,2", "train-cuts": 3},
                         task="next_item")
    batch = _batch(split)
    _, trainable, _ = model.user_vectors(batch)
    assert trainable[0].tolist() == [False] * 9 + [True] * 3  # the newest 3 of the 6 raw positions
    # an item inside the first window changes the last position's interests (it is seen,
    # compressed), and the per-window mean pooling ignores padding
    with torch.no_grad():
        model.eval()
        items = torch.randint(1, 50, (4, 12), generator=torch.Generator().manual_seed(0))
        items[1, :3] = 0  # a first window of one real item
        a = model.serving_vectors({"items": items})
        changed = items.clone()
        changed[:, 3] = changed[:, 3] % 49 + 1
        b = model.serving_vectors({"items": changed})
        assert not torch.allclose(a, b)
        # the single real item of row 1's first window is that window's token, padding ignored
        tokens = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(1))
        win, pad = model._compress(tokens, items[:, :6])
        one = model.compressor(tokens[1:2, 3:4], torch.zeros(1, 1, dtype=torch.bool), torch.ones(1, 1, 1, 1, dtype=torch.bool))
        torch.testing.assert_close(win[1, 0], one[0, 0])
        assert not pad.any()
    with pytest.raises(ConfigError, match="windows"):
        create_model("kuaiformer", ModelData.from_split(split), {**SMALL, "windows": "8,4"}, task="next_item")
    with pytest.raises(ConfigError, match="windows"):
        create_model("kuaiformer", ModelData.from_split(split), {**SMALL, "windows": "8,x"}, task="next_item")


def test_sphere_steps_keep_unit_norm_at_the_requested_angle():
    x = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    noise = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    angle = torch.linspace(0.01, 1.5, 50)
    y = sphere_step(x, noise, angle)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(50))
    torch.testing.assert_close(torch.acos((x * y).sum(-1).clamp(-1, 1)), angle, rtol=1e-4, atol=1e-4)
    half = slerp_towards(x, y, 0.5)
    torch.testing.assert_close(torch.acos((x * half).sum(-1).clamp(-1, 1)), angle / 2, rtol=1e-4, atol=1e-4)


def test_dimerec_serves_deterministically_and_its_guidance_alone_without_diffusion(split):
    torch.manual_seed(0)
    data = ModelData.from_split(split)
    model = create_model("dimerec", data, SMALL, task="next_item").eval()
    batch = _batch(split, "test")
    with torch.no_grad():
        a, b = model.score_all(batch), model.score_all(batch)
        u = model.serving_vectors(batch)
    torch.testing.assert_close(a, b)
    assert u.shape[1] == 1
    torch.testing.assert_close(u.norm(dim=-1), torch.ones_like(u.norm(dim=-1)))
    assert float(a[:, 1:].abs().max()) <= 1 / 0.1 + 1e-4  # cosines over the temperature
    gem = create_model("dimerec", data, {**SMALL, "diffusion": False}, task="next_item").eval()
    with torch.no_grad():
        assert gem.serving_vectors(batch).shape[1] == 4  # the K interests, max over them
    # training: the diffusion terms add to the guidance loss
    model.train()
    out = model(_batch(split))
    assert float(model.auxiliary_loss(_batch(split), out).detach()) > 0


def test_product_keys_retrieve_the_best_pairs_of_all_slots():
    torch.manual_seed(0)
    mem = ProductKeyMemory(8, n_sub=6, top=3)
    x = torch.randn(5, 8)
    q1, q2 = mem.query(x).split(4, dim=-1)
    full = (mem.keys1(q1).unsqueeze(-1) + mem.keys2(q2).unsqueeze(-2)).flatten(-2)  # all 36 slots
    score, slots = full.topk(3, dim=-1)
    want = mem.values(slots) * torch.softmax(score, -1).unsqueeze(-1) * 3
    torch.testing.assert_close(mem(x), want)


def test_elastic_step_cost_is_linear_in_the_number_of_experts_not_in_the_length(split):
    """ELASTIC never forms a (T, T) matrix: the only T x T-shaped work would show as a
    tensor whose last two sizes are both T; none is created in a forward pass."""
    torch.manual_seed(0)
    model = create_model("elastic", ModelData.from_split(split), {**SMALL, "max-len": 40}, task="next_item")
    items = torch.randint(1, 50, (2, 40))
    shapes = []
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch.is_tensor(out):
                shapes.append(tuple(out.shape))
            return out

    with Record():
        model.user_vectors({"items": items})
    assert shapes and not any(len(s) >= 2 and s[-1] == 40 and s[-2] == 40 for s in shapes)


def test_bert4rec_masks_real_items_and_trains_only_there(split):
    torch.manual_seed(0)
    model = create_model("bert4rec", ModelData.from_split(split), {**SMALL, "mask-ratio": 0.5, "next-loss": "ce"},
                         task="next_item")
    batch = _batch(split)
    out = model(batch)
    cloze, seq = out["loss_mask"], out["loss_targets"]
    real = seq != 0
    assert torch.equal(seq[:, :-1], batch["items"][:, 1:]) and torch.equal(seq[:, -1], batch["target_items"][:, -1])
    assert not (cloze & ~real).any()
    assert 0.3 < float(cloze.sum() / real.sum()) < 0.7
    loss = model.loss(batch, out)
    loss.backward()
    assert model.mask_embedding.weight.grad.abs().sum() > 0
    # serving: the [mask] appended after the whole history
    model.eval()
    ev = _batch(split, "test")
    with torch.no_grad():
        h = model._serving(ev)
        shifted = torch.cat([ev["items"][:, 1:], ev["items"].new_zeros(ev["items"].shape[0], 1)], 1)
        cloze = torch.zeros_like(shifted, dtype=torch.bool)
        cloze[:, -1] = True
        want = model.encode({**ev, "items": shifted, "cloze_mask": cloze})["h"][:, -1]
    torch.testing.assert_close(h, want)
    with pytest.raises(ConfigError, match="mask-ratio"):
        create_model("bert4rec", ModelData.from_split(split), {"mask-ratio": 1.5}, task="next_item")


@pytest.mark.parametrize("options,match", [({"softmax": "sampled"}, "softmax"), ({"label-smoothing": 1.0}, "label"),
                                           ({"temperature": 0.0}, "temperature"), ({"interests": 0}, "interests")])
def test_bad_retrieval_options_are_refused(split, options, match):
    with pytest.raises(ConfigError, match=match):
        create_model("kuaiformer", ModelData.from_split(split), options, task="next_item")
