"""Deformable attention: each query reads a few bilinearly sampled points per head and level.

"Deformable DETR: Deformable Transformers for End-to-End Object Detection", arXiv 2010.04159 (ICLR 2021), Eq. 3
(multi-scale deformable attention), and "DFA3D: 3D Deformable Attention For 2D-to-3D Feature Lifting",
arXiv 2307.12972 (ICCV 2023), Sec. 3: the points carry a depth coordinate and read the volume
``depth (x) features`` trilinearly, which factorises into bilinear reads weighted by a depth score per corner.

Both ops take sampling locations normalised to ``[0, 1]`` (``(x, y)`` or ``(x, y, d)``), the pixel-centre
convention (``align_corners=False``) and zeros outside the map. Backends: ``sparse`` (one CSR product over the
corner weights, nothing of size points x channels: the 3-D fast path, and the 2-D one up to ``SPARSE_MAX_POINTS``),
``fused`` (2-D beyond that: ``grid_sample`` per level inside one autograd Function, no stacked copies),
``grid_sample`` (the formulation of the Deformable DETR and DFA3D PyTorch code: one ``F.grid_sample`` per level,
the 3-D one on the materialised volume) and ``reference``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.sampling._fused import fused_deformable
from attnkit.ops.sampling._sparse import row_sparse_mm
from attnkit.reference.naive_sampling import naive_deformable_attention, naive_deformable_attention_3d


@dataclass(frozen=True, eq=False)
class DeformableCall:
    """A validated ``deformable_attention`` (``depth is None``) or ``deformable_attention_3d`` call."""

    value: torch.Tensor
    shapes: tuple[tuple[int, int], ...]
    locations: torch.Tensor
    weights: torch.Tensor
    depth: torch.Tensor | None = None

    def describe(self) -> str:
        _B, Nq, H, _L, P, _ = self.locations.shape
        kind = "2-D" if self.depth is None else f"3-D, {self.depth.shape[-1]} depth bins"
        return (f"{kind}: value {tuple(self.value.shape)} {self.value.dtype}, Nq={Nq}, H={H}, levels {self.shapes}, "
                f"P={P}")


def _shapes(op: str, spatial_shapes: object) -> tuple[tuple[int, int], ...]:
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    try:
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"{op}: spatial_shapes must be a sequence of (H_l, W_l) pairs, "
                        f"got {spatial_shapes!r}") from None
    if not shapes or any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"{op}: spatial_shapes must hold at least one level of positive (H_l, W_l), got {shapes}")
    return shapes


def _tensor(op: str, name: str, t: object, rank: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor {layout}, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} has an empty dimension in shape {tuple(t.shape)}")
    return t


def make_call(value, spatial_shapes, sampling_locations, attention_weights, depth=None) -> DeformableCall:
    op = "deformable_attention" if depth is None else "deformable_attention_3d"
    nc = 2 if depth is None else 3
    _tensor(op, "value", value, 4, "(B, S, H, D)")
    shapes = _shapes(op, spatial_shapes)
    B, S, H, _ = value.shape
    if sum(h * w for h, w in shapes) != S:
        raise ValueError(f"{op}: value has S={S} positions but spatial_shapes {shapes} hold "
                         f"{sum(h * w for h, w in shapes)}")
    loc = _tensor(op, "sampling_locations", sampling_locations, 6, f"(B, Nq, H, L, P, {nc})")
    L = len(shapes)
    if loc.shape[0] != B or loc.shape[2] != H or loc.shape[3] != L or loc.shape[5] != nc:
        raise ValueError(f"{op}: sampling_locations must be (B={B}, Nq, H={H}, L={L}, P, {nc}), got shape "
                         f"{tuple(loc.shape)}")
    a = _tensor(op, "attention_weights", attention_weights, 5, "(B, Nq, H, L, P)")
    if tuple(a.shape) != tuple(loc.shape[:5]):
        raise ValueError(f"{op}: attention_weights must be {tuple(loc.shape[:5])} (B, Nq, H, L, P), got shape "
                         f"{tuple(a.shape)}")
    if depth is not None:
        _tensor(op, "depth", depth, 4, "(B, S, H, Db)")
        if tuple(depth.shape[:3]) != (B, S, H):
            raise ValueError(f"{op}: depth must be (B={B}, S={S}, H={H}, Db), got shape {tuple(depth.shape)}")
    return DeformableCall(value, shapes, loc, a, depth)


def _work(c: DeformableCall) -> torch.dtype:
    return torch.float64 if c.value.dtype == torch.float64 else torch.float32  # CSR products: float32 / float64


def _sparse(c: DeformableCall) -> torch.Tensor:
    wt = _work(c)
    B, S, H, D = c.value.shape
    _, Nq, _, L, P, _ = c.locations.shape
    dev = c.value.device
    loc, attn = c.locations.to(wt), c.weights.to(wt)
    Hl = torch.tensor([h for h, _ in c.shapes], device=dev, dtype=wt).view(1, 1, 1, L, 1)
    Wl = torch.tensor([w for _, w in c.shapes], device=dev, dtype=wt).view(1, 1, 1, L, 1)
    starts = [0]
    for h, w in c.shapes[:-1]:
        starts.append(starts[-1] + h * w)
    start = torch.tensor(starts, device=dev, dtype=torch.long).view(1, 1, 1, L, 1)
    row_base = (torch.arange(B, device=dev).view(B, 1, 1, 1, 1) * S * H
                + torch.arange(H, device=dev).view(1, 1, H, 1, 1))  # value row of pixel 0 for (b, h)
    u = loc[..., 0] * Wl - 0.5  # (B, Nq, H, L, P): pixel-centre convention
    w = loc[..., 1] * Hl - 0.5
    x0, y0 = torch.floor(u), torch.floor(w)
    fx, fy = u - x0, w - y0
    if c.depth is not None:
        Db = c.depth.shape[-1]
        z = loc[..., 2] * Db - 0.5
        z0 = torch.floor(z)
        fz = z - z0
        dflat = c.depth.to(wt).reshape(-1)  # (B * S * H * Db,): row r of the value matrix owns [r Db, (r+1) Db)
    weights, cols = [], []
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < Wl) & (yi >= 0) & (yi < Hl)
            pix = start + yi.clamp(min=0).minimum(Hl - 1).long() * Wl.long() + xi.clamp(min=0).minimum(Wl - 1).long()
            col = row_base + pix * H  # (B, Nq, H, L, P) row of value.view(B * S * H, D)
            wgt = attn * (fx if dx else 1 - fx) * (fy if dy else 1 - fy) * inside
            if c.depth is not None:  # DFA3D: the corner's depth score, linearly interpolated between two bins
                delta = 0
                for dz in (0, 1):
                    zi = z0 + dz
                    ok = (zi >= 0) & (zi < Db)
                    idx = col * Db + zi.clamp(0, Db - 1).long()
                    delta = delta + (fz if dz else 1 - fz) * dflat[idx] * ok
                wgt = wgt * delta
            weights.append(wgt)
            cols.append(col)
    weights_t = torch.stack(weights, -1).reshape(B * Nq * H, L * P * 4)  # (rows (b, q, h), corners)
    cols_t = torch.stack(cols, -1).reshape(B * Nq * H, L * P * 4)
    out = row_sparse_mm(weights_t, cols_t, c.value.to(wt).reshape(B * S * H, D))  # (B * Nq * H, D)
    return out.view(B, Nq, H, D).to(c.value.dtype)


def _grid_sample(c: DeformableCall) -> torch.Tensor:
    """Deformable DETR's / DFA3D's PyTorch formulation: one ``grid_sample`` per level, then the weighted sum."""
    B, _S, H, D = c.value.shape
    _, Nq, _, L, P, nc = c.locations.shape
    grids = 2 * c.locations.to(c.value.dtype) - 1  # grid_sample's [-1, 1] coordinates, (x, y[, d])
    samples, start = [], 0
    for lvl, (Hl, Wl) in enumerate(c.shapes):
        v = c.value[:, start:start + Hl * Wl].permute(0, 2, 3, 1).reshape(B * H, D, Hl, Wl)  # (B H, D, H_l, W_l)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * H, Nq, P, nc)  # (B H, Nq, P, nc)
        if c.depth is None:
            s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B H, D, Nq, P)
        else:
            Db = c.depth.shape[-1]
            dp = c.depth[:, start:start + Hl * Wl].to(v.dtype).permute(0, 2, 3, 1).reshape(B * H, 1, Db, Hl, Wl)
            vol = v.unsqueeze(2) * dp  # (B H, D, Db, H_l, W_l): the materialised volume
            s = F.grid_sample(vol, g.unsqueeze(3), mode="bilinear", padding_mode="zeros",
                              align_corners=False).squeeze(-1)  # (B H, D, Nq, P)
        samples.append(s)
        start += Hl * Wl
    a = c.weights.to(c.value.dtype).transpose(1, 2).reshape(B * H, 1, Nq, L * P)  # (B H, 1, Nq, L P)
    out = (torch.stack(samples, -2).flatten(-2) * a).sum(-1)  # (B H, D, Nq)
    return out.view(B, H, D, Nq).permute(0, 3, 1, 2)  # (B, Nq, H, D)


def _fused(c: DeformableCall) -> torch.Tensor:
    wt = _work(c)
    out = fused_deformable(c.value.to(wt), c.locations.to(wt), c.weights.to(wt), c.shapes)
    return out.to(c.value.dtype)


def _reference(c: DeformableCall) -> torch.Tensor:
    if c.depth is None:
        return naive_deformable_attention(c.value, c.shapes, c.locations, c.weights)
    return naive_deformable_attention_3d(c.value, c.depth, c.shapes, c.locations, c.weights)


def _csr_device(c: DeformableCall) -> tuple[bool, str]:
    return (c.value.device.type == "cpu" or c.value.device.type == "cuda",
            f"sparse CSR products are not available on {c.value.device.type}")


# Measured on CPU (fp32, 8 heads, 4 points): the CSR product beats grid_sample fwd+bwd up to ~50K sampling points
# (B=8 at 14x14) and falls behind near 800K (B=8 at 56x56), where its transpose for the values' gradient dominates.
SPARSE_MAX_POINTS = 1 << 17


def _points(c: DeformableCall) -> int:
    return c.locations[..., 0].numel()  # B Nq H L P


def _sparse_suits(c: DeformableCall) -> tuple[bool, str]:
    if c.depth is not None:
        return True, "the fast path (the alternative materialises the volume)"
    n = _points(c)
    if n <= SPARSE_MAX_POINTS:
        return True, f"{n} sampling points <= {SPARSE_MAX_POINTS}: the CSR product is fastest"
    return False, f"{n} sampling points > {SPARSE_MAX_POINTS}: the CSR transpose in backward outweighs it"


def _backends(op: str) -> list[Backend]:
    fused = [Backend("fused", _fused, suits=lambda c: (True, "the fast path for many points"),
                     note="grid_sample per level without stacking; grid_sample's own backward with grad x weights",
                     detail=lambda c: f"in {_work(c)}; one (B H, D, Nq, P) sample kept per level")]
    return [
        Backend("sparse", _sparse, supports=_csr_device, suits=_sparse_suits,
                note="corner weights (x attention[x depth score]) as one CSR matrix times the values",
                detail=lambda c: f"CSR product in {_work(c)}; backward A^T @ grad and sampled_addmm"),
        *(fused if op == "deformable_attention" else []),
        Backend("grid_sample", _grid_sample, auto=False,
                note="one F.grid_sample per level (3-D: on the materialised volume), weighted sum: the papers' "
                     "PyTorch formulation"),
        Backend("reference", _reference, auto=False,
                note=f"naive_{op}: corners read one at a time" + ("" if op.endswith("attention") else
                                                                  " on the materialised volume")),
    ]


DISPATCHER_2D = Dispatcher("deformable_attention", _backends("deformable_attention"))
DISPATCHER_3D = Dispatcher("deformable_attention_3d", _backends("deformable_attention_3d"))
register_op("deformable_attention", make_call, DISPATCHER_2D)
register_op("deformable_attention_3d", lambda value, depth, spatial_shapes, sampling_locations, attention_weights:
            make_call(value, spatial_shapes, sampling_locations, attention_weights, depth=depth), DISPATCHER_3D)


def deformable_attention(value: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]] | torch.Tensor,
                         sampling_locations: torch.Tensor, attention_weights: torch.Tensor, *,
                         backend: str | None = None) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable DETR), heads-last.

    Args:
        value: ``(B, S, H, D)``: the levels' pixels in raster order, level after level, ``S = sum_l H_l W_l``.
        spatial_shapes: ``L`` pairs ``(H_l, W_l)`` (a list or an ``(L, 2)`` int tensor).
        sampling_locations: ``(B, Nq, H, L, P, 2)``, ``(x, y)`` normalised to ``[0, 1]`` (pixel centres at
            ``(i + 0.5) / W_l``); points outside read zeros.
        attention_weights: ``(B, Nq, H, L, P)`` (Deformable DETR: a softmax over ``L P``).
        backend: None / ``"fused"``, ``"sparse"``, ``"grid_sample"`` or ``"reference"``; see ``ak.explain``.

    Returns:
        ``(B, Nq, H, D)``: ``sum_{l, p} A[..., l, p] * bilinear(value_l, location[..., l, p])``.

    Example:
        >>> v = torch.randn(1, 64, 2, 8)
        >>> loc, a = torch.rand(1, 5, 2, 1, 4, 2), torch.rand(1, 5, 2, 1, 4)
        >>> out = deformable_attention(v, [(8, 8)], loc, a)   # (1, 5, 2, 8)
    """
    return DISPATCHER_2D.run(make_call(value, spatial_shapes, sampling_locations, attention_weights), backend)


def deformable_attention_3d(value: torch.Tensor, depth: torch.Tensor,
                            spatial_shapes: Sequence[tuple[int, int]] | torch.Tensor,
                            sampling_locations: torch.Tensor, attention_weights: torch.Tensor, *,
                            backend: str | None = None) -> torch.Tensor:
    """DFA3D deformable attention on the implicit volume ``depth (x) value``, heads-last.

    Args:
        value: ``(B, S, H, D)`` as for :func:`deformable_attention`.
        depth: ``(B, S, H, Db)``: each pixel's depth scores over ``Db`` bins (DFA3D: a softmax per pixel and head).
        spatial_shapes: ``L`` pairs ``(H_l, W_l)``.
        sampling_locations: ``(B, Nq, H, L, P, 3)``, ``(x, y, d)`` normalised to ``[0, 1]`` (bin centres at
            ``(z + 0.5) / Db``); outside the volume reads zeros.
        attention_weights: ``(B, Nq, H, L, P)``.
        backend: None / ``"sparse"``, ``"grid_sample"`` (materialises the volume) or ``"reference"``.

    Returns:
        ``(B, Nq, H, D)``: ``sum_{l, p} A * trilinear(depth_l (x) value_l, location)`` without building the volume.
    """
    return DISPATCHER_3D.run(make_call(value, spatial_shapes, sampling_locations, attention_weights, depth=depth),
                             backend)
