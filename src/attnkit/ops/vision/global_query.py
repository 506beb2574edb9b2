"""GC ViT global query attention: image-level query tokens attend inside every local window.

"Global Context Vision Transformers", arXiv 2206.09959 (ICML 2023), §3.2.

The ``h x w`` global queries ``qg`` of an image (generated once per stage from the whole feature map)
are the queries of every ``h x w`` window of that image; keys and values come from the window. Query
slot ``t`` writes window position ``t``. Windows are image-major, so each image's queries are repeated
over its own windows only (never across the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.local.multi_axis import block_partition, block_unpartition
from attnkit.reference.naive_vision import naive_global_query_window_attention


@dataclass(frozen=True, eq=False)
class GlobalQueryCall:
    qg: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    window_size: int
    bias: torch.Tensor | None
    scale: float

    def describe(self) -> str:
        return (f"qg {tuple(self.qg.shape)} k {tuple(self.k.shape)} {self.k.dtype}, window {self.window_size}, "
                f"{'relative bias' if self.bias is not None else 'no bias'}")


def make_global_query_call(qg, k, v, window_size, *, bias=None, scale=None) -> GlobalQueryCall:
    fn = "global_query_window_attention"
    try:
        check_qkv(k, k, v, spatial_rank=2)
        check_qkv(qg, k, v, spatial_rank=2)
        M = int_arg("window_size", window_size, 1)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None
    B, Y, X, H, D = k.shape
    if tuple(qg.shape) != (B, M, M, H, D):
        raise ValueError(f"{fn}: qg must be (B, h, w, H, D) = {(B, M, M, H, D)} for window_size {M}, "
                         f"got {tuple(qg.shape)}")
    if Y % M or X % M:
        raise ValueError(f"{fn}: the map (Y, X) = {(Y, X)} must be a multiple of window_size {M} on both sides")
    if bias is not None and tuple(bias.shape) != (H, M * M, M * M):
        raise ValueError(f"{fn}: bias must be (H, M*M, M*M) = {(H, M * M, M * M)}, got {tuple(bias.shape)}")
    return GlobalQueryCall(qg, k, v, M, bias, resolve_scale(scale, D))


def _gemm(c: GlobalQueryCall) -> torch.Tensor:
    B, Y, X, H, D = c.k.shape
    Dv = c.v.shape[-1]
    M = c.window_size
    wy, wx, mm = Y // M, X // M, M * M
    nw = wy * wx

    def heads_first(t):  # (B, Y, X, H, d) -> (B, H, nW * M*M, d): one copy, windows then window slots
        d = t.shape[-1]
        t = t.view(B, wy, M, wx, M, H, d).permute(0, 5, 1, 3, 2, 4, 6)  # (B, H, Y/M, X/M, M, M, d)
        return t.reshape(B, H, nw * mm, d)

    kw, vw = heads_first(c.k), heads_first(c.v)
    # the image's M*M queries are shared by all its windows: ONE (M*M x D) @ (D x nW M*M) GEMM per
    # (image, head) instead of repeating the queries per window (no expanded copy of qg, no broadcast mask)
    q = c.qg.reshape(B, mm, H, D).permute(0, 2, 1, 3)  # (B, H, M*M, D)
    s = torch.matmul(q * c.scale, kw.transpose(-1, -2)).view(B, H, mm, nw, mm)  # (B, H, t, window, s)
    if c.bias is not None:
        s = s + c.bias.to(s.dtype).view(H, mm, 1, mm)  # bias (H, t, s), the same in every window
    p = torch.softmax(s, -1).transpose(2, 3)  # (B, H, window, t, s), a strided view
    o = torch.matmul(p, vw.view(B, H, nw, mm, Dv))  # (B, H, window, t, Dv)
    o = o.view(B, H, wy, wx, M, M, Dv).permute(0, 2, 4, 3, 5, 1, 6)  # (B, Y/M, M, X/M, M, H, Dv)
    return o.reshape(B, Y, X, H, Dv)  # (B, Y, X, H, Dv)


def _sdpa(c: GlobalQueryCall) -> torch.Tensor:
    B, Y, X, H, D = c.k.shape
    M = c.window_size
    nw = (Y // M) * (X // M)
    kw, vw = (block_partition(t, M).transpose(1, 2) for t in (c.k, c.v))            # (B*nW, H, M*M, D)
    qw = c.qg.reshape(B, 1, M * M, H, D).expand(B, nw, M * M, H, D)                   # each image's own windows
    qw = qw.reshape(B * nw, M * M, H, D).transpose(1, 2)                              # (B*nW, H, M*M, D)
    bias = None if c.bias is None else c.bias.to(c.k.dtype)
    o = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=bias, scale=c.scale)
    return block_unpartition(o.transpose(1, 2), M, Y, X)                              # (B, Y, X, H, Dv)


def _reference(c: GlobalQueryCall) -> torch.Tensor:
    return naive_global_query_window_attention(c.qg, c.k, c.v, c.window_size, c.bias, c.scale)


GLOBAL_QUERY_DISPATCHER = Dispatcher("global_query_window_attention", [
    Backend("gemm", _gemm, note="heads-first window layout; one (M*M x nW M*M) score GEMM per (image, head) shared "
            "by the windows, bias broadcast over windows, softmax, batched value GEMM"),
    Backend("sdpa", _sdpa, note="window partition of k, v; the image's queries repeated per window; one SDPA",
            detail=lambda c: "additive float bias as the SDPA mask" if c.bias is not None else "no mask"),
    Backend("reference", _reference, auto=False, note="naive_global_query_window_attention: loop over windows"),
])
register_op("global_query_window_attention", make_global_query_call, GLOBAL_QUERY_DISPATCHER)


def global_query_window_attention(qg, k, v, window_size: int, *, bias=None, scale: float | None = None,
                                  backend: str | None = None) -> torch.Tensor:
    """GC ViT's global window attention.

    Args:
        qg: ``(B, M, M, H, D)`` the image's global queries (``M = window_size``).
        k: ``(B, Y, X, H, D)``; v: ``(B, Y, X, H, Dv)``; ``Y, X`` multiples of ``M``.
        window_size: ``M``.
        bias: ``(H, M*M, M*M)`` additive relative bias indexed by (query slot, key slot), or None.
        scale: default ``D ** -0.5``.
        backend: None / ``"gemm"`` (the image's queries against all its windows in one GEMM), ``"sdpa"`` (queries
            repeated per window, one SDPA call) or ``"reference"``.

    Returns:
        ``(B, Y, X, H, Dv)``.
    """
    return GLOBAL_QUERY_DISPATCHER.run(make_global_query_call(qg, k, v, window_size, bias=bias, scale=scale), backend)
