"""BiFormer: Vision Transformer with Bi-Level Routing Attention (arXiv 2303.08810).

The map is split into ``S x S`` regions; region-mean queries and keys give a region affinity,
each region routes to its top-k regions, and its tokens attend to the tokens of those regions
(the block-gather engine, with regions made contiguous). A depthwise conv on V (local
context enhancement, LCE) is added before the output projection (the module's part).

Backends (``ak.explain("bi_level_routing_attention", q, k, v, n_win=.., topk=..)``):

* ``gather`` -- the block-gather engine (``attnkit.kernels.gather``) on the region routes;
* ``reference`` -- the naive raster-grid twin of ``attnkit.reference.naive_routed`` (never automatic).
"""


from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.kernels.gather import block_gather_attention, needs_grad
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.routed._common import cpu_only, gather_detail, grad_words, reference_dtype
from attnkit.reference.naive_routed import naive_biformer


def _to_regions(x: torch.Tensor, s: int) -> torch.Tensor:
    """``(B, Y, X, H, D)`` -> region-major tokens ``(B, S*S*m, H, D)``, ``m = (Y/S)(X/S)``."""
    b, yy, xx, h, d = x.shape
    x = x.view(b, s, yy // s, s, xx // s, h, d).permute(0, 1, 3, 2, 4, 5, 6)  # (B, S, S, Y/S, X/S, H, D)
    return x.reshape(b, yy * xx, h, d)



def _from_regions(x: torch.Tensor, s: int, yy: int, xx: int) -> torch.Tensor:
    """Inverse of :func:`_to_regions`: ``(B, Y*X, H, D)`` -> ``(B, Y, X, H, D)``."""
    b, _, h, d = x.shape
    x = x.view(b, s, s, yy // s, xx // s, h, d).permute(0, 1, 3, 2, 4, 5, 6)  # (B, S, Y/S, S, X/S, H, D)
    return x.reshape(b, yy, xx, h, d)



def region_routes(q: torch.Tensor, k: torch.Tensor, n_win: int, topk: int, scale: float) -> torch.Tensor:
    """Bool routing layout ``(B, 1, R, R)``: region ``r`` attends region ``j`` iff ``j`` is among
    the top-k of ``(mean q_r · scale) · mean k_j``; one decision for all heads (full q/k width),
    no gradient, ties to the lower region index."""
    b = q.shape[0]
    r = n_win * n_win
    qbar = _to_regions(q.detach(), n_win).reshape(b, r, -1, q.shape[-2] * q.shape[-1]).mean(2)  # (B, R, H*D)
    kbar = _to_regions(k.detach(), n_win).reshape(b, r, -1, k.shape[-2] * k.shape[-1]).mean(2)  # (B, R, H*D)
    aff = (qbar * scale) @ kbar.transpose(-1, -2)  # (B, R, R)
    idx = torch.sort(aff, dim=-1, descending=True, stable=True).indices[..., :topk]
    return torch.zeros_like(aff, dtype=torch.bool).scatter_(-1, idx, True).unsqueeze(1)  # (B, 1, R, R)



@dataclass(frozen=True)
class BRACall:
    """A validated ``bi_level_routing_attention`` call (what backends and ``explain`` see)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    n_win: int
    topk: int
    scale: float
    return_layout: bool
    needs_grad: bool  # autograd will record the attention (read once, when the call is built)

    def describe(self) -> str:
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, "
                f"n_win={self.n_win} ({self.n_win ** 2} regions), topk={self.topk}, scale={self.scale:.4g}, "
                f"{grad_words(self.needs_grad)}")


def make_call(q, k, v, n_win, topk, *, scale=None, return_layout=False) -> BRACall:
    """Validate a ``bi_level_routing_attention`` call; errors name the argument."""
    check_qkv(q, k, v, spatial_rank=2, same_extent=True)
    _, yy, xx, h, d = q.shape
    int_arg("n_win", n_win, 1)
    if yy % n_win or xx % n_win:
        raise ValueError(f"n_win must be a positive int dividing the grid ({yy}, {xx}), got {n_win!r}")
    r = n_win * n_win
    if int_arg("topk", topk, 1) > r:
        raise ValueError(f"topk must be in [1, number of regions = n_win^2 = {r}], got {topk!r}")
    if k.shape[-2] != h:
        raise ValueError("bi_level_routing_attention needs as many key as query heads (routing concatenates heads)")
    # the reference's full q/k width, not the head dim
    return BRACall(q, k, v, n_win, topk, resolve_scale(scale, h * d), bool(return_layout), needs_grad(q, k, v))


def _run_gather(call: BRACall):
    q, k, v, n_win = call.q, call.k, call.v, call.n_win
    yy, xx = q.shape[1:3]
    layout = region_routes(q, k, n_win, call.topk, call.scale)  # (B, 1, R, R)
    m = (yy // n_win) * (xx // n_win)
    qr, kr, vr = (_to_regions(t, n_win) for t in (q, k, v))  # (B, R*m, H, D)
    out = block_gather_attention(qr, kr, vr, layout, m, scale=call.scale,
                                 reuse_buffers=not call.needs_grad)  # (B, R*m, H, Dv)
    out = _from_regions(out, n_win, yy, xx)  # (B, Y, X, H, Dv)
    return (out, layout) if call.return_layout else out


def _reference_supports(call: BRACall) -> tuple[bool, str]:
    if call.return_layout:
        return False, "the naive twin returns no layout (return_layout=True)"
    return cpu_only(call)


def _run_reference(call: BRACall):
    """The naive raster-grid twin (float32 for half inputs)."""
    dt = reference_dtype(call.q.dtype)
    q, k, v = (t.to(dt) for t in (call.q, call.k, call.v))
    return naive_biformer(q, k, v, call.n_win, call.topk, call.scale).to(call.q.dtype)


DISPATCHER = Dispatcher("bi_level_routing_attention", [
    Backend("gather", _run_gather, suits=lambda call: (True, "regions made contiguous, routed blocks gathered"),
            detail=lambda c: gather_detail(c, (c.q.shape[1] // c.n_win) * (c.q.shape[2] // c.n_win)),
            note="block-gather engine"),
    Backend("reference", _run_reference, _reference_supports, auto=False, note="naive raster twin (the oracle)"),
])

register_op("bi_level_routing_attention", make_call, DISPATCHER)


def bi_level_routing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_win: int, topk: int, *,
                               scale: float | None = None, return_layout: bool = False,
                               backend: str | None = None):
    """Bi-level routing attention on a 2-D grid.

    Args:
        q, k: ``(B, Y, X, H, D)``; v: ``(B, Y, X, H, Dv)`` (same heads; routing uses all heads).
        n_win: regions per side ``S`` (``Y % S == X % S == 0``); topk: routed regions per region.
        scale: token and routing logit scale; default ``(H*D) ** -0.5`` (the reference's full
            q/k width, not the head dim).
        return_layout: also return the routing layout.
        backend: ``"gather"``, ``"reference"`` or None (gather). A forced backend that cannot run
            raises ValueError with the reason.

    Returns:
        ``(B, Y, X, H, Dv)``; with ``return_layout`` also the ``(B, 1, R, R)`` routing layout.

    Example:
        >>> q = k = v = torch.randn(1, 16, 16, 4, 16)
        >>> out = bi_level_routing_attention(q, k, v, n_win=4, topk=4)
    """
    call = make_call(q, k, v, n_win, topk, scale=scale, return_layout=return_layout)
    return DISPATCHER.run(call, backend)
