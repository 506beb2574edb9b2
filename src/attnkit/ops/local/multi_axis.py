"""MaxViT multi-axis attention: block (window) attention followed by grid (dilated global) attention.

"MaxViT: Multi-Axis Vision Transformer", arXiv 2204.01697 (ECCV 2022).

Block attention attends inside non-overlapping ``P x P`` windows; grid attention inside groups
formed by a ``G x G`` lattice spread over the image (spacing ``Y/G``). Each uses a learned
per-head relative bias table ``((2M-1)^2, H)``. Identities: block(P) == NA(k=P, s=P) and
grid(G) == NA(k=G, dilation=Y/G) when the bias is zero.
"""


from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_local import naive_block_attention, naive_grid_attention


def block_partition(x: torch.Tensor, P: int) -> torch.Tensor:
    """``(B, Y, X, H, D)`` -> ``(B * (Y/P)(X/P), P*P, H, D)``: token (y, x) -> window (y div P, x div P)."""
    B, Y, X, H, D = x.shape
    x = x.view(B, Y // P, P, X // P, P, H, D).permute(0, 1, 3, 2, 4, 5, 6)  # (B, Y/P, X/P, P, P, H, D)
    return x.reshape(-1, P * P, H, D)



def block_unpartition(x: torch.Tensor, P: int, Y: int, X: int) -> torch.Tensor:
    H, D = x.shape[-2:]
    x = x.view(-1, Y // P, X // P, P, P, H, D).permute(0, 1, 3, 2, 4, 5, 6)  # (B, Y/P, P, X/P, P, H, D)
    return x.reshape(-1, Y, X, H, D)



def grid_partition(x: torch.Tensor, G: int) -> torch.Tensor:
    """``(B, Y, X, H, D)`` -> ``(B * (Y/G)(X/G), G*G, H, D)``: group (y mod Y/G, x mod X/G), slot (y div Y/G, ...)."""
    B, Y, X, H, D = x.shape
    x = x.view(B, G, Y // G, G, X // G, H, D).permute(0, 2, 4, 1, 3, 5, 6)  # (B, Y/G, X/G, G, G, H, D)
    return x.reshape(-1, G * G, H, D)



def grid_unpartition(x: torch.Tensor, G: int, Y: int, X: int) -> torch.Tensor:
    H, D = x.shape[-2:]
    x = x.view(-1, Y // G, X // G, G, G, H, D).permute(0, 3, 1, 4, 2, 5, 6)  # (B, G, Y/G, G, X/G, H, D)
    return x.reshape(-1, Y, X, H, D)



def partition_map(x: torch.Tensor, axis: str, M: int) -> torch.Tensor:
    """``x (B, Y, X, C)`` -> ``(B * nW, M, M, C)``: the windows (``axis="block"``, ``M = P``) or the grid groups
    (``axis="grid"``, ``M = G``, slot ``(y div Y/G, x div X/G)``) as a batch of ``M x M`` maps.

    Partitioning the input of the qkv projection once costs a third of partitioning q, k and v.
    """
    B, Y, X, C = x.shape
    if axis == "block":
        x = x.view(B, Y // M, M, X // M, M, C).permute(0, 1, 3, 2, 4, 5)  # (B, Y/P, X/P, P, P, C)
    else:
        x = x.view(B, M, Y // M, M, X // M, C).permute(0, 2, 4, 1, 3, 5)  # (B, Y/G, X/G, G, G, C)
    return x.reshape(-1, M, M, C)


def unpartition_map(x: torch.Tensor, axis: str, M: int, Y: int, X: int) -> torch.Tensor:
    """Inverse of :func:`partition_map`: ``(B * nW, M, M, C)`` -> ``(B, Y, X, C)``."""
    C = x.shape[-1]
    if axis == "block":
        x = x.view(-1, Y // M, X // M, M, M, C).permute(0, 1, 3, 2, 4, 5)  # (B, Y/P, P, X/P, P, C)
    else:
        x = x.view(-1, Y // M, X // M, M, M, C).permute(0, 3, 1, 4, 2, 5)  # (B, G, Y/G, G, X/G, C)
    return x.reshape(-1, Y, X, C)


@functools.lru_cache(maxsize=32)
def _relative_index(M: int, device: torch.device) -> torch.Tensor:
    """``(M*M, M*M)`` index into a ``((2M-1)^2, H)`` table, built once per size and device."""
    py, px = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
    py, px = py.reshape(-1), px.reshape(-1)
    idx = (py[:, None] - py[None, :] + M - 1) * (2 * M - 1) + (px[:, None] - px[None, :] + M - 1)
    return idx.to(device)


def relative_bias(table: torch.Tensor, M: int) -> torch.Tensor:
    """``table ((2M-1)^2, H)`` -> ``(H, M*M, M*M)`` bias indexed by in-window offsets."""
    # contiguous: SDPA reads a dense (H, M*M, M*M) mask faster than a permuted view
    return table[_relative_index(M, table.device)].permute(2, 0, 1).contiguous()  # (H, M*M, M*M)



@dataclass(frozen=True, eq=False)
class WindowCall:
    """A validated MaxViT block or grid attention call; ``size`` is ``P`` (block) or ``G`` (grid)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    axis: str  # "block" | "grid"
    size: int
    bias: torch.Tensor | None
    scale: float | None  # None: SDPA's own D ** -0.5

    def describe(self) -> str:
        n = "P" if self.axis == "block" else "G"
        return (f"q {tuple(self.q.shape)} v {tuple(self.v.shape)} {self.q.dtype}, {self.axis} axis {n}={self.size}, "
                f"{'relative bias' if self.bias is not None else 'no bias'}")


def _make_call(axis: str, arg: str, q, k, v, size, bias, scale) -> WindowCall:
    hq, hkv = check_qkv(q, k, v, spatial_rank=2, same_extent=True)
    if hq != hkv:
        raise ValueError(f"{axis}_attention needs as many K/V heads as query heads, got {hq} and {hkv}")
    size = int_arg(arg, size, 1)
    Y, X = q.shape[1:3]
    if Y % size or X % size:
        raise ValueError(f"spatial size ({Y}, {X}) must be a multiple of {arg} {size}")
    m = size * size
    if bias is not None and tuple(bias.shape) != (hq, m, m):
        raise ValueError(f"bias must have shape (H, M*M, M*M) = ({hq}, {m}, {m}), got {tuple(bias.shape)}")
    return WindowCall(q, k, v, axis, size, bias, None if scale is None else resolve_scale(scale, q.shape[-1]))


def make_block_call(q, k, v, block_size, *, bias=None, scale=None) -> WindowCall:
    return _make_call("block", "block_size", q, k, v, block_size, bias, scale)


def make_grid_call(q, k, v, grid_size, *, bias=None, scale=None) -> WindowCall:
    return _make_call("grid", "grid_size", q, k, v, grid_size, bias, scale)


def _windowed(c: WindowCall) -> torch.Tensor:
    part, unpart = (block_partition, block_unpartition) if c.axis == "block" else (grid_partition, grid_unpartition)
    Y, X = c.q.shape[1:3]
    qw, kw, vw = (part(t, c.size).transpose(1, 2) for t in (c.q, c.k, c.v))  # (B*nW, H, M*M, D)
    # (1, H, M*M, M*M): PyTorch's CPU flash kernel takes a 4-D mask only; a 3-D one falls back to the math path
    bias = None if c.bias is None else c.bias.to(c.q.dtype).unsqueeze(0)
    o = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=bias, scale=c.scale)
    return unpart(o.transpose(1, 2), c.size, Y, X)  # (B, Y, X, H, Dv)


def _reference(c: WindowCall) -> torch.Tensor:
    naive = naive_block_attention if c.axis == "block" else naive_grid_attention
    return naive(c.q, c.k, c.v, c.size, c.bias, c.scale)


def _fast(c: WindowCall) -> tuple[bool, str]:
    return True, "the fast path"


def _dispatcher(axis: str) -> Dispatcher:
    return Dispatcher(f"{axis}_attention", [
        Backend("sdpa", _windowed, suits=_fast, note=f"{axis} partition, one batched SDPA over all windows",
                detail=lambda c: "additive float bias as the SDPA mask" if c.bias is not None else "no mask"),
        Backend("reference", _reference, auto=False, note=f"naive_{axis}_attention: pixel by pixel over its group"),
    ])


BLOCK_DISPATCHER, GRID_DISPATCHER = _dispatcher("block"), _dispatcher("grid")
register_op("block_attention", make_block_call, BLOCK_DISPATCHER)
register_op("grid_attention", make_grid_call, GRID_DISPATCHER)


def block_attention(q, k, v, block_size: int, *, bias=None, scale=None, backend: str | None = None) -> torch.Tensor:
    """MaxViT block attention: every ``P x P`` window attends within itself.

    Args:
        q: ``(B, Y, X, H, D)``; k: ``(B, Y, X, H, D)``; v: ``(B, Y, X, H, Dv)``; ``Y, X`` multiples of ``P``.
        block_size: ``P``.
        bias: ``(H, P*P, P*P)`` additive relative bias (see :func:`relative_bias`), or None.
        scale: default ``D ** -0.5``.
        backend: None / ``"sdpa"`` (partition + SDPA) or ``"reference"``; see ``ak.explain("block_attention", ...)``.

    Returns:
        ``(B, Y, X, H, Dv)``.
    """
    return BLOCK_DISPATCHER.run(make_block_call(q, k, v, block_size, bias=bias, scale=scale), backend)


def grid_attention(q, k, v, grid_size: int, *, bias=None, scale=None, backend: str | None = None) -> torch.Tensor:
    """MaxViT grid attention: the ``G x G`` pixels of a lattice with spacing ``(Y/G, X/G)`` attend each other.

    Args:
        q: ``(B, Y, X, H, D)``; k: ``(B, Y, X, H, D)``; v: ``(B, Y, X, H, Dv)``; ``Y, X`` multiples of ``G``.
        grid_size: ``G``.
        bias: ``(H, G*G, G*G)`` additive relative bias (see :func:`relative_bias`), or None.
        scale: default ``D ** -0.5``.
        backend: None / ``"sdpa"`` (partition + SDPA) or ``"reference"``; see ``ak.explain("grid_attention", ...)``.

    Returns:
        ``(B, Y, X, H, Dv)``.
    """
    return GRID_DISPATCHER.run(make_grid_call(q, k, v, grid_size, bias=bias, scale=scale), backend)
