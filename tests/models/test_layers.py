"""Attention and FFN blocks: equal to PyTorch's reference attention, masks that hold, and
exact per-sample gradients under Opacus."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedrec.models.layers import PositionwiseFFN, SelfAttention, attention_mask


def _inputs(B=3, T=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, dim, generator=g)
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, :2] = True  # left padding, as the batches are built
    padding[2, :5] = True
    return x, padding


@pytest.mark.parametrize("causal", [True, False])
def test_matches_torch_multihead_attention_on_real_positions(causal):
    torch.manual_seed(0)
    dim, heads = 8, 2
    att = SelfAttention(dim, heads, causal=causal).eval()
    ref = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([att.query.weight, att.key.weight, att.value.weight]))
        ref.in_proj_bias.copy_(torch.cat([att.query.bias, att.key.bias, att.value.bias]))
        ref.out_proj.weight.copy_(att.out.weight)
        ref.out_proj.bias.copy_(att.out.bias)
    x, padding = _inputs(dim=dim)
    T = x.shape[1]
    future = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None
    expected, _ = ref(x, x, x, key_padding_mask=padding, attn_mask=future)
    got = att(x, padding)
    real = ~padding
    torch.testing.assert_close(got[real], expected[real], atol=1e-6, rtol=1e-5)


def test_causal_outputs_ignore_the_future_and_bidirectional_do_not():
    torch.manual_seed(0)
    x, padding = _inputs()
    changed = x.clone()
    changed[:, -1] += 1.0
    causal, bidir = SelfAttention(8, causal=True).eval(), SelfAttention(8, causal=False).eval()
    torch.testing.assert_close(causal(x, padding)[:, :-1], causal(changed, padding)[:, :-1])
    assert not torch.allclose(bidir(x, padding)[0, :-1], bidir(changed, padding)[0, :-1])


def test_padded_keys_do_not_change_real_outputs_and_all_padding_gives_no_nan():
    torch.manual_seed(0)
    att = SelfAttention(8, heads=2, causal=False).eval()
    x, padding = _inputs()
    noisy = x.clone()
    noisy[padding] = 100.0
    torch.testing.assert_close(att(x, padding)[~padding], att(noisy, padding)[~padding])
    full = torch.ones(2, 6, dtype=torch.bool)
    assert torch.isfinite(att(x[:2], full)).all()
    assert attention_mask(full, causal=True).diagonal(dim1=-2, dim2=-1).all()


def test_ffn_shapes_and_bad_arguments():
    ffn = PositionwiseFFN(8, 16, activation="gelu")
    assert ffn(torch.randn(2, 5, 8)).shape == (2, 5, 8)
    with pytest.raises(ValueError, match="divisible"):
        SelfAttention(10, heads=3)
    with pytest.raises(ValueError, match="relu or gelu"):
        PositionwiseFFN(8, 16, activation="tanh")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.att = SelfAttention(8, heads=2, causal=True)
        self.ffn = PositionwiseFFN(8, 16)
        self.head = nn.Linear(8, 1)

    def forward(self, items):
        padding = items == 0
        h = self.embed(items)
        h = h + self.att(self.norm(h), padding)
        h = h + self.ffn(h)
        return self.head(h[:, -1]).squeeze(-1)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_opacus_per_sample_gradients_equal_one_example_at_a_time():
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = _Tiny()
    reference = copy.deepcopy(model)  # Opacus hooks the wrapped modules: compare on a copy
    items = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 7, 9]])
    target = torch.tensor([1.0, 0.0, 1.0])
    wrapped = GradSampleModule(model, loss_reduction="sum")
    loss = nn.functional.binary_cross_entropy_with_logits(wrapped(items), target, reduction="sum")
    loss.backward()
    for i in range(len(items)):
        single = nn.functional.binary_cross_entropy_with_logits(
            reference(items[i : i + 1]), target[i : i + 1], reduction="sum"
        )
        grads = torch.autograd.grad(single, list(reference.parameters()))
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(p.grad_sample[i], g, atol=1e-6, rtol=1e-5)
