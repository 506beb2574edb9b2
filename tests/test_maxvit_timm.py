"""MaxViT multi-axis attention (arXiv 2204.01697) is weight-compatible with timm's ``maxxvit`` blocks.

``MultiAxisAttention.from_timm`` copies the attention path of timm's block- and grid-partition
``PartitionAttentionCl`` (qkv, relative position bias table, proj); the module must reproduce timm's
partition -> attention -> reverse, block then grid, output and input gradient, to fp32 tolerance.
Skipped (by ``peers.import_timm``) when timm is not installed.
"""

from __future__ import annotations

import pytest
import torch

from attnkit.mechanisms.maxvit import MultiAxisAttention
from peers import import_timm
from tolerances import assert_close

DIM, SIDE, P = 64, 14, 7  # dim_head 32 -> 2 heads


def _maxxvit():
    return import_timm().models.maxxvit


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random and O(1)-ish, so a wrong row order, index or bias cannot hide in small inits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 2 and p.shape[0] > 200 else 0.2))


def _pair(seed: int = 0, **cfg_kw):
    mx = _maxxvit()
    cfg = mx.MaxxVitTransformerCfg(dim_head=32, window_size=(P, P), **cfg_kw)
    tb = mx.PartitionAttentionCl(DIM, "block", cfg=cfg).eval()
    tg = mx.PartitionAttentionCl(DIM, "grid", cfg=cfg).eval()
    _randomize(tb, seed)
    _randomize(tg, seed + 1)
    return tb, tg


def _x(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, SIDE, SIDE, DIM, generator=torch.Generator().manual_seed(seed))


def _check(mine, theirs, x, name):
    """Output and input gradient (under one random cotangent) of ``mine`` equal ``theirs``'s in fp32."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = mine(xa), theirs(xb)
    assert_close(ya, yb, torch.float32, f"{name} out")
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(7))
    ya.backward(g)
    yb.backward(g)
    assert_close(xa.grad, xb.grad, torch.float32, f"{name} dx", grad=True)


@pytest.mark.parametrize("head_first", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_block_then_grid_and_each_half_match_timm(head_first, fused):
    tb, tg = _pair(head_first=head_first)
    for t in (tb, tg):
        t.attn.fused_attn = fused  # timm's SDPA path and its explicit softmax path
    m = MultiAxisAttention.from_timm(tb, tg)
    assert (m.dim, m.block.num_heads, m.block_size, m.grid_size) == (DIM, 2, P, P)
    x = _x()
    _check(m, lambda t: tg._partition_attn(tb._partition_attn(t)), x, "block+grid")
    _check(m.block, tb._partition_attn, x, "block")
    _check(m.grid, tg._partition_attn, x, "grid")
    # the halves differ (a grid group is not a window at 14x14): the test tells block from grid
    assert (m.block(x) - m.grid(x)).abs().max() > 1e-2


def test_maxxvit_block_and_the_full_timm_block_around_it():
    """From a ``MaxxVitBlock``; and timm's pre-norm residual blocks rebuilt around our attention halves equal timm's."""
    mx = _maxxvit()
    cfg = mx.MaxxVitTransformerCfg(dim_head=32, window_size=(P, P))
    blk = mx.MaxxVitBlock(DIM, DIM, transformer_cfg=cfg).eval()
    _randomize(blk, 11)
    m = MultiAxisAttention.from_timm(blk)
    tb, tg = blk.attn_block, blk.attn_grid
    x = _x(5)
    _check(m, lambda t: tg._partition_attn(tb._partition_attn(t)), x, "MaxxVitBlock attention")

    def ours(t):  # x + Attn(LN1(x)), then x + MLP(LN2(x)), per partition: timm's PartitionAttentionCl.forward
        for half, part in ((m.block, tb), (m.grid, tg)):
            t = t + half(part.norm1(t))
            t = t + part.mlp(part.norm2(t))
        return t

    _check(ours, lambda t: tg(tb(t)), x, "full timm blocks")


def test_attn_bias_false_and_other_sizes():
    tb, tg = _pair(seed=4, attn_bias=False, grid_size=(2, 2))
    m = MultiAxisAttention.from_timm(tb, tg)
    assert m.block.qkv.bias is None and m.grid.proj.bias is None and m.grid_size == 2
    _check(m, lambda t: tg._partition_attn(tb._partition_attn(t)), _x(), "no bias, G=2")


@pytest.mark.parametrize("kw, match", [
    ({"rel_pos_type": "mlp"}, "rel_pos_type"),
    ({"rel_pos_type": "bias_tf"}, "rel_pos_type"),
    ({"window_size": (7, 14)}, "non-square partition window_size"),
    ({"grid_size": (2, 7)}, "non-square partition grid_size"),
    ({"attn_drop": 0.1}, "attn_drop"),
])
def test_unsupported_timm_variants_are_refused(kw, match):
    mx = _maxxvit()
    kw = {"window_size": (P, P), **kw}
    cfg = mx.MaxxVitTransformerCfg(dim_head=32, **kw)
    tb, tg = mx.PartitionAttentionCl(DIM, "block", cfg=cfg), mx.PartitionAttentionCl(DIM, "grid", cfg=cfg)
    with pytest.raises(ValueError, match=match):
        MultiAxisAttention.from_timm(tb, tg)


def test_wrong_modules_are_refused():
    mx = _maxxvit()
    cfg = mx.MaxxVitTransformerCfg(dim_head=32, window_size=(P, P))
    tb, tg = mx.PartitionAttentionCl(DIM, "block", cfg=cfg), mx.PartitionAttentionCl(DIM, "grid", cfg=cfg)
    with pytest.raises(ValueError, match="grid_module must have partition_type='grid'"):
        MultiAxisAttention.from_timm(tb, tb)
    with pytest.raises(ValueError, match="timm_module must have partition_type='block'"):
        MultiAxisAttention.from_timm(tg, tg)
    with pytest.raises(TypeError, match="MaxxVitBlock"):
        MultiAxisAttention.from_timm(tb)
    with pytest.raises(TypeError, match="PartitionAttentionCl"):
        MultiAxisAttention.from_timm(torch.nn.Linear(2, 2), tg)
    no_block = mx.MaxxVitBlock(DIM, DIM, transformer_cfg=mx.MaxxVitTransformerCfg(dim_head=32, window_size=(P, P),
                                                                                  no_block_attn=True))
    with pytest.raises(ValueError, match="no_block_attn"):
        MultiAxisAttention.from_timm(no_block)
    nchw = mx.MaxxVitBlock(DIM, DIM, transformer_cfg=mx.MaxxVitTransformerCfg(dim_head=32, window_size=(P, P),
                                                                              use_nchw_attn=True))
    with pytest.raises(ValueError, match="use_nchw_attn"):
        MultiAxisAttention.from_timm(nchw)
