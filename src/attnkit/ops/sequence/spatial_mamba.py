"""Spatial-Mamba: Effective Visual State Space Models via Structure-aware State Fusion (arXiv 2410.15091).

Structure-aware state fusion (SASF), written in its linear-recurrence form on a channels-last image
``x (B, Y, X, C)`` flattened in raster order (``L = Y X`` tokens):

    h_t     = exp(dt_t A) h_{t-1} + dt_t B_t x_t              selective scan (Mamba, Euler B_bar), h_t (C, n)
    hf      = sum_r DWConv3x3_{dilation r}(h as a (C n, Y, X) map)   fusion over the 2-D neighbourhood
    y_t     = C_t . hf_t + D x_t

The depthwise 3x3 kernels ``weights (R, C, 3, 3)`` (one per dilation; a kernel is shared by the ``n`` state
entries of its channel) pad the state map by replication, as the authors' released code does. With one
dilation and a kernel that is 1 at the centre and 0 elsewhere, ``hf = h`` and the op is the plain 1-D
selective scan.

Backends: ``chunked`` (the scan in chunks of ``T`` tokens: inside a chunk every pair's decay is
``exp(cum_t - cum_s)`` with ``cum`` the running sum of ``dt A``, so only exponentials of non-positive numbers
are taken; the fusion as grouped ``conv2d``) and ``reference`` (token-by-token recurrence, explicit neighbour
sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_sequence5 import naive_spatial_mamba_fusion


@dataclass(frozen=True, eq=False)
class SpatialMambaCall:
    """A validated ``spatial_mamba_fusion`` call."""

    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    Bm: torch.Tensor
    Cm: torch.Tensor
    D: torch.Tensor | None
    weights: torch.Tensor
    dilations: tuple[int, ...]
    chunk_size: int

    def describe(self) -> str:
        B, Y, X, C = self.x.shape
        return (f"x {(B, Y, X, C)} {self.x.dtype}, state {self.A.shape[1]}, dilations {self.dilations}, "
                f"chunk {self.chunk_size}")


def make_call(x, dt, A, Bm, Cm, D=None, weights=None, *, dilations=(1, 3, 5), chunk_size=16) -> SpatialMambaCall:
    who = "spatial_mamba_fusion"
    for name, t in (("x", x), ("dt", dt), ("A", A), ("Bm", Bm), ("Cm", Cm), ("weights", weights)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{who}: {name} must be a floating-point tensor, got {type(t).__name__}")
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"{who}: x must be a non-empty (B, Y, X, C), got shape {tuple(x.shape)}")
    B, Y, X, C = x.shape
    if A.dim() != 2 or A.shape[0] != C:
        raise ValueError(f"{who}: A must be (C={C}, n), got {tuple(A.shape)}")
    n = A.shape[1]
    if dt.shape != x.shape:
        raise ValueError(f"{who}: dt must have x's shape {tuple(x.shape)}, got {tuple(dt.shape)}")
    for name, t in (("Bm", Bm), ("Cm", Cm)):
        if t.shape != (B, Y, X, n):
            raise ValueError(f"{who}: {name} must be (B, Y, X, n) = {(B, Y, X, n)}, got {tuple(t.shape)}")
    if D is not None and D.shape != (C,):
        raise ValueError(f"{who}: D must be (C,) = ({C},), got {tuple(D.shape)}")
    dil = tuple(int(d) for d in dilations)
    if not dil or any(d < 1 for d in dil):
        raise ValueError(f"{who}: dilations must be positive integers, got {dilations}")
    if weights.shape != (len(dil), C, 3, 3):
        raise ValueError(f"{who}: weights must be (R, C, 3, 3) = {(len(dil), C, 3, 3)}, got {tuple(weights.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{who}: chunk_size must be an int >= 1, got {chunk_size!r}")
    return SpatialMambaCall(x, dt, A, Bm, Cm, D, weights, dil, chunk_size)


def _states(c: SpatialMambaCall) -> torch.Tensor:
    """All states ``h (B, L, C, n)`` of the selective scan, chunk by chunk."""
    B, Y, X, C = c.x.shape
    L = Y * X
    x, dt = c.x.reshape(B, L, C), c.dt.reshape(B, L, C)  # (B, L, C) raster order
    Bm = c.Bm.reshape(B, L, -1)  # (B, L, n)
    la = dt.unsqueeze(-1) * c.A  # (B, L, C, n) log-decay per step, <= 0 for A <= 0
    u = (dt * x).unsqueeze(-1) * Bm.unsqueeze(2)  # (B, L, C, n) input of each step
    h0 = x.new_zeros(B, C, c.A.shape[1])
    out = []
    T = c.chunk_size
    for s in range(0, L, T):
        cum = la[:, s:s + T].cumsum(1)  # (B, t, C, n)
        t = cum.shape[1]
        diff = cum.unsqueeze(2) - cum.unsqueeze(1)  # (B, t, t', C, n): cum_t - cum_t'
        keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, :, :, None, None]
        w = torch.exp(torch.where(keep, diff, float("-inf")))  # decay from step t' to t (0 above the diagonal)
        h = torch.einsum("bstcn,btcn->bscn", w, u[:, s:s + T]) + torch.exp(cum) * h0.unsqueeze(1)  # (B, t, C, n)
        out.append(h)
        h0 = h[:, -1]
    return torch.cat(out, 1)


def _fuse(h: torch.Tensor, c: SpatialMambaCall) -> torch.Tensor:
    """SASF: dilated depthwise 3x3 sums over the state map, replicate padding. ``h (B, L, C, n)``."""
    B, Y, X, C = c.x.shape
    n = h.shape[-1]
    m = h.reshape(B, Y, X, C, n).permute(0, 4, 3, 1, 2).reshape(B * n, C, Y, X)  # (B n, C, Y, X)
    fused = 0
    for r, d in enumerate(c.dilations):
        k = c.weights[r].to(h.dtype).unsqueeze(1)  # (C, 1, 3, 3)
        fused = fused + F.conv2d(F.pad(m, (d, d, d, d), mode="replicate"), k, dilation=d, groups=C)
    return fused.reshape(B, n, C, Y, X).permute(0, 3, 4, 2, 1).reshape(B, Y * X, C, n)  # (B, L, C, n)


def _chunked(c: SpatialMambaCall) -> torch.Tensor:
    work = torch.promote_types(c.x.dtype, torch.float32)  # states and decays in fp32 for half inputs
    cw = SpatialMambaCall(c.x.to(work), c.dt.to(work), c.A.to(work), c.Bm.to(work), c.Cm.to(work),
                          None if c.D is None else c.D.to(work), c.weights.to(work), c.dilations, c.chunk_size)
    B, Y, X, C = c.x.shape
    hf = _fuse(_states(cw), cw)  # (B, L, C, n)
    y = torch.einsum("blcn,bln->blc", hf, cw.Cm.reshape(B, Y * X, -1))  # (B, L, C)
    if cw.D is not None:
        y = y + cw.D * cw.x.reshape(B, Y * X, C)
    return y.reshape(B, Y, X, C).to(c.x.dtype)


def _reference(c: SpatialMambaCall) -> torch.Tensor:
    return naive_spatial_mamba_fusion(c.x, c.dt, c.A, c.Bm, c.Cm, c.D, c.weights, c.dilations)


DISPATCHER = Dispatcher("spatial_mamba_fusion", [
    Backend("chunked", _chunked, suits=lambda c: (True, "the fast path"),
            note="scan in chunks (pairwise decays inside a chunk), fusion as grouped dilated conv2d"),
    Backend("reference", _reference, auto=False, note="token-by-token scan, explicit neighbour sums"),
])
# explain("spatial_mamba_fusion", x, dt, A, ...): the three leading tensors take the q, k, v places
register_op("spatial_mamba_fusion", make_call, DISPATCHER)


def spatial_mamba_fusion(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
                         D: torch.Tensor | None = None, weights: torch.Tensor | None = None, *,
                         dilations: tuple[int, ...] = (1, 3, 5), chunk_size: int = 16,
                         backend: str | None = None) -> torch.Tensor:
    """Selective scan over the raster order of an image with structure-aware state fusion.

    Args:
        x: ``(B, Y, X, C)`` channels-last input; dt: ``(B, Y, X, C)`` step sizes (positive);
        A: ``(C, n)`` state matrix (diagonal per channel, negative); Bm, Cm: ``(B, Y, X, n)`` input and output
        projections of the state; D: ``(C,)`` skip or None.
        weights: ``(R, C, 3, 3)`` depthwise kernels, one per dilation (replicate padding).
        dilations: ``R`` dilations (the paper's 1, 3, 5); chunk_size: tokens per scan chunk.
        backend: None / ``"chunked"`` or ``"reference"``.

    Returns:
        ``(B, Y, X, C)`` in x's dtype (half inputs computed in float32).

    Example:
        >>> y = spatial_mamba_fusion(x, dt, A, Bm, Cm, D, torch.ones(3, C, 3, 3) / 27)
    """
    call = make_call(x, dt, A, Bm, Cm, D, weights, dilations=dilations, chunk_size=chunk_size)
    return DISPATCHER.run(call, backend)
