"""Deformable attention (Deformable DETR 2-D, DFA3D 3-D): every backend vs the naive reference (output and every
gradient), the papers' identities, the sparse path's memory bound, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit as ak
from attnkit.ops.sampling import deformable_attention, deformable_attention_3d
from attnkit.reference.naive_sampling import naive_deformable_attention, naive_deformable_attention_3d
from tolerances import compare_fn

SHAPES = [(4, 5), (2, 3)]
S = sum(h * w for h, w in SHAPES)


def _inputs(B=2, Nq=6, H=2, D=3, P=3, coords=2, Db=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = len(SHAPES)
    d = {"value": torch.randn(B, S, H, D, generator=g, dtype=torch.float64),
         # some points fall outside the maps: zeros there
         "sampling_locations": torch.rand(B, Nq, H, L, P, coords, generator=g, dtype=torch.float64) * 1.4 - 0.2,
         "attention_weights": torch.rand(B, Nq, H, L, P, generator=g, dtype=torch.float64)}
    if Db:
        d["depth"] = torch.rand(B, S, H, Db, generator=g, dtype=torch.float64)
    return d


@pytest.mark.parametrize("backend", ["fused", "sparse", "grid_sample"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_deformable_2d_backends_match_reference(backend, dtype):
    compare_fn(lambda **a: deformable_attention(a["value"], SHAPES, a["sampling_locations"], a["attention_weights"],
                                                backend=backend),
               lambda **a: naive_deformable_attention(a["value"], SHAPES, a["sampling_locations"],
                                                      a["attention_weights"]), _inputs(), dtype,
               factor=4.0 if dtype == torch.bfloat16 else 1.0)


@pytest.mark.parametrize("backend", ["sparse", "grid_sample"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_deformable_3d_backends_match_reference(backend, dtype):
    compare_fn(lambda **a: deformable_attention_3d(a["value"], a["depth"], SHAPES, a["sampling_locations"],
                                                   a["attention_weights"], backend=backend),
               lambda **a: naive_deformable_attention_3d(a["value"], a["depth"], SHAPES, a["sampling_locations"],
                                                         a["attention_weights"]), _inputs(coords=3, Db=5), dtype)


def test_gradcheck_of_the_fast_paths():
    a = {k: v.requires_grad_() for k, v in _inputs(B=1, Nq=3, coords=3, Db=4).items()}
    assert torch.autograd.gradcheck(lambda v, d, loc, w: deformable_attention_3d(v, d, SHAPES, loc, w),
                                    (a["value"], a["depth"], a["sampling_locations"], a["attention_weights"]))
    a = {k: v.requires_grad_() for k, v in _inputs(B=1, Nq=3).items()}
    for backend in ("fused", "sparse"):
        assert torch.autograd.gradcheck(
            lambda v, loc, w, b=backend: deformable_attention(v, SHAPES, loc, w, backend=b),
            (a["value"], a["sampling_locations"], a["attention_weights"]))


def test_zero_offsets_one_point_is_bilinear_sampling_at_the_reference_points():
    torch.manual_seed(0)
    B, H, D, Y, X = 2, 2, 4, 5, 6
    v = torch.randn(B, Y * X, H, D, dtype=torch.float64)
    ref = torch.rand(B, 7, H, 1, 1, 2, dtype=torch.float64)
    out = deformable_attention(v, [(Y, X)], ref, torch.ones(B, 7, H, 1, 1, dtype=torch.float64))
    vmap = v.permute(0, 2, 3, 1).reshape(B * H, D, Y, X)  # (B H, D, Y, X)
    grid = (2 * ref - 1).transpose(1, 2).reshape(B * H, 7, 1, 2)
    want = F.grid_sample(vmap, grid, align_corners=False).view(B, H, D, 7).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, want)
    # at the pixel centres it reads the pixel itself
    m = ak.get("deformable_2d", dim=8, num_heads=2, num_points=1).double()
    with torch.no_grad():
        m.sampling_offsets.bias.zero_()
        x = torch.randn(1, 3, 4, 8, dtype=torch.float64)
        torch.testing.assert_close(m(x), m.output_proj(m.value_proj(x)))


def test_dfa3d_factorised_equals_materialised_volume_and_reduces_to_2d():
    a = _inputs(coords=3, Db=6)
    v, dp, loc, w = a["value"], a["depth"], a["sampling_locations"], a["attention_weights"]
    B, Nq, H, _, P, _ = loc.shape
    out = deformable_attention_3d(v, dp, SHAPES, loc, w)
    # materialised volume + 5-D grid_sample, level by level
    want, start = 0, 0
    for lvl, (Hl, Wl) in enumerate(SHAPES):
        f = v[:, start:start + Hl * Wl].permute(0, 2, 3, 1).reshape(B * H, -1, 1, Hl, Wl)
        d = dp[:, start:start + Hl * Wl].permute(0, 2, 3, 1).reshape(B * H, 1, 6, Hl, Wl)
        g = (2 * loc[:, :, :, lvl] - 1).transpose(1, 2).reshape(B * H, Nq, P, 1, 3)
        s = F.grid_sample(f * d, g, align_corners=False).squeeze(-1)  # (B H, D, Nq, P)
        want = want + (s * w[:, :, :, lvl].transpose(1, 2).reshape(B * H, 1, Nq, P)).sum(-1)
        start += Hl * Wl
    torch.testing.assert_close(out, want.view(B, H, -1, Nq).permute(0, 3, 1, 2))
    # one-hot depth sampled at the bin centre: plain 2-D deformable attention
    onehot = F.one_hot(torch.full(dp.shape[:3], 2), 6).double()
    at_centre = loc.clone()
    at_centre[..., 2] = 2.5 / 6
    torch.testing.assert_close(deformable_attention_3d(v, onehot, SHAPES, at_centre, w),
                               deformable_attention(v, SHAPES, loc[..., :2], w))
    # uniform depth away from the depth borders: the 2-D result divided by Db
    inner = loc.clone()
    inner[..., 2] = inner[..., 2].clamp(0.1, 0.9)
    torch.testing.assert_close(deformable_attention_3d(v, torch.full_like(dp, 1 / 6), SHAPES, inner, w),
                               deformable_attention(v, SHAPES, loc[..., :2], w) / 6)


class _Sizes(TorchDispatchMode):
    """Records the largest dense float tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def test_fast_paths_build_no_points_by_channels_tensor_beyond_grid_sample():
    """Largest float tensor, forward and backward: the grid_sample formulation stacks Nq x H x L x P x D; the fused
    path keeps at most one level's grid_sample output (Nq x H x P x D); the sparse path nothing of that size."""
    B, Nq, H, D, P = 1, 64, 2, 32, 4
    a = {k: t.float().requires_grad_() for k, t in _inputs(B=B, Nq=Nq, H=H, D=D, P=P).items()}
    points_by_channels = B * Nq * H * len(SHAPES) * P * D
    sizes = {}
    for backend in ("fused", "sparse", "grid_sample"):
        with _Sizes() as rec:
            out = deformable_attention(a["value"], SHAPES, a["sampling_locations"], a["attention_weights"],
                                       backend=backend)
            torch.autograd.grad(out.sum(), list(a.values()))
        sizes[backend] = rec.largest
    assert sizes["grid_sample"] >= points_by_channels
    assert sizes["fused"] <= points_by_channels // len(SHAPES), sizes
    assert sizes["sparse"] < points_by_channels / 4, sizes


def test_module_attention_weights_sum_to_one_and_layout_errors():
    m = ak.get("deformable_2d", dim=8, num_heads=2, num_points=3)
    x = torch.randn(2, 3, 4, 8)
    a = m.attention_weights(x.reshape(2, 12, 8)).view(2, 12, 2, 3).softmax(-1)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 12, 2))
    with pytest.raises(ValueError, match=r"DeformableAttention2D: x must be channels-last \(B, Y, X, C=8\), got shape "
                                         r"\(2, 8, 5, 6\), which looks channels-first"):
        m(torch.randn(2, 8, 5, 6))
    with pytest.raises(ValueError, match=r"DeformableAttention3D: dim \(10\) must be divisible by num_heads \(4\)"):
        ak.get("deformable_3d", dim=10, num_heads=4)


def test_op_errors():
    a = _inputs()
    with pytest.raises(ValueError, match=r"deformable_attention: value has S=26 positions but spatial_shapes"):
        deformable_attention(a["value"], [(4, 5)], a["sampling_locations"][:, :, :, :1],
                             a["attention_weights"][..., :1, :])
    with pytest.raises(ValueError, match=r"sampling_locations must be \(B=2, Nq, H=2, L=2, P, 2\)"):
        deformable_attention(a["value"], SHAPES, a["sampling_locations"][..., :1], a["attention_weights"])
    with pytest.raises(ValueError, match=r"deformable_attention: attention_weights must be"):
        deformable_attention(a["value"], SHAPES, a["sampling_locations"], a["attention_weights"][..., :2])
    with pytest.raises(ValueError, match=r"deformable_attention_3d: depth must be \(B=2, S=26, H=2, Db\)"):
        deformable_attention_3d(a["value"], torch.rand(2, 25, 2, 4), SHAPES,
                                torch.rand(*a["sampling_locations"].shape[:5], 3), a["attention_weights"])
    text = ak.explain("deformable_attention", a["value"], SHAPES, a["sampling_locations"],
                      attention_weights=a["attention_weights"])
    assert "-> sparse" in text and "grid_sample" in text
    big = torch.rand(1, 4096, 8, 1, 4, 2)  # 131072 points: still sparse; one more query and fused takes over
    v = torch.randn(1, 64 * 64, 8, 4)
    assert "-> sparse" in ak.explain("deformable_attention", v, [(64, 64)], big, attention_weights=big[..., 0])
    big = torch.rand(1, 4097, 8, 1, 4, 2)
    assert "-> fused" in ak.explain("deformable_attention", v, [(64, 64)], big, attention_weights=big[..., 0])
    text = ak.explain("deformable_attention_3d", a["value"], torch.rand(2, 26, 2, 4), SHAPES,
                      sampling_locations=torch.rand(*a["sampling_locations"].shape[:5], 3),
                      attention_weights=a["attention_weights"])
    assert "-> sparse" in text
