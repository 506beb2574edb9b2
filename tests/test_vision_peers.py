"""Vision token mixers against timm (``from_timm``): same options and weights, same output and input gradient to
fp32 tolerance, with timm called in its own layout. Skipped by ``import_timm()`` when timm is absent."""

from __future__ import annotations

import pytest
import torch

from attnkit.mechanisms.vision_davit import DaViTChannelAttention, DaViTWindowAttention
from attnkit.mechanisms.vision_focalnet import FocalModulation
from attnkit.mechanisms.vision_gcvit import GCViTGlobalAttention
from attnkit.mechanisms.vision_poolformer import PoolMixer
from peers import import_timm
from tolerances import assert_close


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def _same_output_and_grad(mine, theirs_fn, x_cl: torch.Tensor, what: str) -> None:
    """``mine(x)`` vs ``theirs_fn(x)`` (both channels-last in and out): output and input gradient in fp32."""
    a = x_cl.clone().requires_grad_()
    b = x_cl.clone().requires_grad_()
    ya, yb = mine(a), theirs_fn(b)
    assert_close(ya, yb, torch.float32, f"{what} out")
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(5))
    (ga,), (gb,) = torch.autograd.grad(ya, a, g), torch.autograd.grad(yb, b, g)
    assert_close(ga, gb, torch.float32, f"{what} dx", grad=True)


def _nchw(module):
    return lambda x: module(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


@pytest.mark.parametrize("pool_size", [3, 5])
def test_pool_mixer_from_timm(pool_size):
    timm = import_timm()
    theirs = timm.models.metaformer.Pooling(pool_size)
    mine = PoolMixer.from_timm(theirs, 8)
    assert mine.pool_size == pool_size
    _same_output_and_grad(mine, _nchw(theirs), torch.randn(2, 7, 9, 8), "pooling")
    with pytest.raises(TypeError, match=r"PoolMixer.from_timm: expected timm\.models\.metaformer\.Pooling"):
        PoolMixer.from_timm(torch.nn.Identity(), 8)


@pytest.mark.parametrize(("level", "normalize", "post_norm"), [(2, False, False), (3, True, True)])
def test_focal_modulation_from_timm(level, normalize, post_norm):
    timm = import_timm()
    theirs = _randomize(timm.models.focalnet.FocalModulation(16, focal_window=3, focal_level=level,
                                                             normalize_modulator=normalize, use_post_norm=post_norm))
    mine = FocalModulation.from_timm(theirs)
    assert mine.kernel_sizes == theirs.kernel_sizes
    _same_output_and_grad(mine, _nchw(theirs), torch.randn(2, 9, 11, 16), "focal modulation")


def test_davit_channel_from_timm():
    timm = import_timm()
    theirs = _randomize(timm.models.davit.ChannelAttention(24, num_heads=3, qkv_bias=True))
    mine = DaViTChannelAttention.from_timm(theirs)
    assert mine.wiring == "official"
    x = torch.randn(2, 5, 7, 24)
    _same_output_and_grad(mine, lambda t: theirs(t.flatten(1, 2)).view(t.shape), x, "davit channel")


def _timm_spatial_attention(timm, attn, x):
    """What timm's ``SpatialBlock`` does around ``attn`` (pad, partition, attention, reverse, crop)."""
    import torch.nn.functional as F

    davit = timm.models.davit
    _, H, W, C = x.shape
    ws = attn.window_size
    pr, pb = (ws[1] - W % ws[1]) % ws[1], (ws[0] - H % ws[0]) % ws[0]
    xp = F.pad(x, (0, 0, 0, pr, 0, pb))
    win = davit.window_partition(xp, ws).view(-1, ws[0] * ws[1], C)
    out = attn(win).view(-1, ws[0], ws[1], C)
    return davit.window_reverse(out, ws, xp.shape[1], xp.shape[2])[:, :H, :W]


@pytest.mark.parametrize("size", [(6, 9), (7, 5)], ids=["multiple", "padded"])
def test_davit_window_from_timm(size):
    timm = import_timm()
    theirs = _randomize(timm.models.davit.WindowAttention(16, (3, 3), num_heads=2))
    mine = DaViTWindowAttention.from_timm(theirs)
    _same_output_and_grad(mine, lambda t: _timm_spatial_attention(timm, theirs, t), torch.randn(2, *size, 16),
                          "davit window")


def _timm_global_attention(timm, attn, block, x):
    """timm's GC ViT stage: ``FeatureBlock`` on NCHW for the global query, then the block's window attention."""
    gcvit = timm.models.gcvit
    qg = block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    _B, H, W, C = x.shape
    ws = attn.window_size
    win = gcvit.window_partition(x, ws).view(-1, ws[0] * ws[1], C)
    return gcvit.window_reverse(attn(win, qg), ws, (H, W))


@pytest.mark.parametrize(("size", "levels"), [(8, 2), (4, 1), (2, 0)])
def test_gcvit_global_from_timm(size, levels):
    timm = import_timm()
    gcvit = timm.models.gcvit
    attn = _randomize(gcvit.WindowAttentionGlobal(16, 2, (2, 2), use_global=True))
    block = _randomize(gcvit.FeatureBlock(16, levels), seed=1)
    mine = GCViTGlobalAttention.from_timm(attn, block)
    assert mine.feat_levels == max(1, levels) or levels == 0
    x = torch.randn(2, size, size, 16)
    _same_output_and_grad(mine, lambda t: _timm_global_attention(timm, attn, block, t), x, "gcvit global")
    # with an external q_global (the stage's shared queries), without a generator
    qg = torch.randn(2, 2, 2, 16)
    bare = GCViTGlobalAttention.from_timm(attn)
    win = gcvit.window_partition(x, (2, 2)).view(-1, 4, 16)
    theirs = gcvit.window_reverse(attn(win, qg), (2, 2), (size, size))
    assert_close(bare(x, qg), theirs, torch.float32, "external q_global")
