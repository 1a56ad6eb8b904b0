"""The xformers branch of the attention and the crop-list block, on the CPU, against a stand-in
for xformers that checks its input contract (``(B, M, H, K)`` layout, unit last stride, batch 1
under a block-diagonal mask) and computes what the real kernel computes. xformers itself needs
CUDA; this proves our side of the call: layouts, the selected queries, the crop packing."""

import sys
import types

import pytest
import torch

from dinov2.layers import attention, block
from dinov2.models import build_backbone


class BlockDiagonalMask:
    """xformers.ops.fmha.BlockDiagonalMask, the part we use: crops packed into one sequence."""

    def __init__(self, shapes):
        self.shapes = shapes  # (B_i, N_i) per crop tensor

    @classmethod
    def from_tensor_list(cls, tensors):
        packed = torch.cat([t.reshape(1, -1, t.shape[-1]) for t in tensors], dim=1)
        return cls([tuple(t.shape[:2]) for t in tensors]), packed

    def split(self, x):
        sizes = [b * n for b, n in self.shapes]
        return [part.reshape(b, n, -1) for part, (b, n) in zip(x.split(sizes, dim=1), self.shapes)]

    def segment_ids(self):
        lengths = [n for b, n in self.shapes for _ in range(b)]
        return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def memory_efficient_attention(q, k, v, attn_bias=None):
    assert q.dim() == k.dim() == v.dim() == 4, "xformers takes (B, M, H, K)"
    assert k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if attn_bias is not None:
        assert isinstance(attn_bias, BlockDiagonalMask) and q.shape[0] == 1
        segment = attn_bias.segment_ids()
        scores = scores.masked_fill(segment[:, None] != segment[None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.fixture
def fake_xformers(monkeypatch):
    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.BlockDiagonalMask = BlockDiagonalMask
    ops = types.ModuleType("xformers.ops")
    ops.fmha, ops.memory_efficient_attention = fmha, memory_efficient_attention
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("attn_bias"))
        return memory_efficient_attention(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setitem(sys.modules, "xformers.ops.fmha", fmha)
    monkeypatch.setattr(attention, "memory_efficient_attention", counted, raising=False)
    for module in (attention, block):
        monkeypatch.setattr(module, "use_xformers", lambda x, setting="auto": True)
    return calls


def _model(**kwargs):
    torch.manual_seed(0)
    model = build_backbone("vit_test", num_register_tokens=2, **kwargs).double()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def test_crop_list_in_one_block_diagonal_call_equals_sdpa(fake_xformers):
    model = _model().eval()
    crops = [torch.randn(2, 3, 28, 28, dtype=torch.float64), torch.randn(3, 3, 14, 14, dtype=torch.float64)]
    with torch.no_grad():
        packed = model.forward_features(crops)
    assert len(fake_xformers) == 2 and all(isinstance(bias, BlockDiagonalMask) for bias in fake_xformers)
    for module in (attention, block):
        module.use_xformers = lambda x, setting="auto": False  # the fixture restores them
    with torch.no_grad():
        reference = model.forward_features(crops)
    for got, want in zip(packed, reference):
        torch.testing.assert_close(got["x_prenorm"], want["x_prenorm"])


def test_selected_queries_through_xformers_equal_sdpa_values_and_gradients(fake_xformers):
    model = _model(drop_path_rate=0.2).train()
    crops = [torch.randn(2, 3, 28, 28, dtype=torch.float64), torch.randn(2, 3, 14, 14, dtype=torch.float64)]
    wanted = [torch.tensor([[True, False, False, True], [False, False, True, False]]), None]

    def run():
        torch.manual_seed(1)  # the same stochastic-depth draws in both runs
        model.zero_grad(set_to_none=True)
        outs = model(crops, masks=[wanted[0], None], is_training=True, patches=wanted)
        loss = sum((o["x_norm_clstoken"] ** 2).sum() + o["x_norm_patchtokens"].sum() for o in outs)
        loss.backward()
        return [o[key].detach() for o in outs for key in o], [p.grad.clone() for p in model.parameters()]

    values, grads = run()
    # block 0 (drop rate 0 under the linear decay) packs the crops; the last block selects per crop
    assert isinstance(fake_xformers[0], BlockDiagonalMask) and fake_xformers[1:] == [None, None]
    for module in (attention, block):
        module.use_xformers = lambda x, setting="auto": False
    ref_values, ref_grads = run()
    for got, want in zip(values + grads, ref_values + ref_grads):
        torch.testing.assert_close(got, want)
