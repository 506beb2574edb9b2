"""ContMix: OverLoCK's context-mixing dynamic kernels (per-pixel kernels from pixel-to-region affinities).

"OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels", arXiv 2502.20087
(CVPR 2025), Sec. 3.3: the affinity of every pixel's query to ``R`` region-centre keys (pooled from the top-down
context) is mapped by one linear layer to the weights of a ``k x k`` kernel per channel group, normalised by a
softmax, and the kernel aggregates the pixel's neighbourhood. Two kernel sizes share the logits and split the
channels in halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.vision.common import check_image
from attnkit.ops.vision.dynamic_conv import dynamic_depthwise_conv
from attnkit.reference.naive_vision_a import naive_contmix

BORDERS = ("clamp", "zero")


@dataclass(frozen=True, eq=False)
class ContMixCall:
    """A validated ``contmix`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor | None
    kernel_sizes: tuple[int, ...]
    rpb: tuple | None
    border: str

    def describe(self) -> str:
        return (f"v {tuple(self.v.shape)} {self.v.dtype}, {self.q.shape[3]} groups, {self.k.shape[1]} regions, kernels "
                f"{self.kernel_sizes}, border={self.border}, rpb={self.rpb is not None}")


def make_call(q, k, v, proj_weight, proj_bias, kernel_sizes, rpb=None, border="clamp") -> ContMixCall:
    fn = "contmix"
    q = check_image(fn, "q", q, rank=5, layout="(B, Y, X, G, D)")
    k = check_image(fn, "k", k, rank=4, layout="(B, R, G, D)")
    v = check_image(fn, "v", v)
    B, Y, X, G, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (G, D):
        raise ValueError(f"{fn}: k must be (B, R, G, D) = ({B}, R, {G}, {D}), got {tuple(k.shape)}")
    if v.shape[:3] != (B, Y, X):
        raise ValueError(f"{fn}: v must be (B, Y, X, C) with (B, Y, X) = {(B, Y, X)} as q, got {tuple(v.shape)}")
    if not isinstance(kernel_sizes, (tuple, list)) or not kernel_sizes or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 or s % 2 == 0 for s in kernel_sizes):
        raise ValueError(f"{fn}: kernel_sizes must be a non-empty tuple of odd ints, got {kernel_sizes!r}")
    kernel_sizes = tuple(kernel_sizes)
    C, n = v.shape[-1], len(kernel_sizes)
    if C % (n * G):
        raise ValueError(f"{fn}: v's channel count C={C} must split into {n} branches of G={G} groups each")
    total = sum(s * s for s in kernel_sizes)
    R = k.shape[1]
    if not isinstance(proj_weight, torch.Tensor) or tuple(proj_weight.shape) != (total, R):
        raise ValueError(f"{fn}: proj_weight must be (sum k^2, R) = {(total, R)}, got "
                         f"{tuple(getattr(proj_weight, 'shape', ())) or type(proj_weight).__name__}")
    if proj_bias is not None and (not isinstance(proj_bias, torch.Tensor) or tuple(proj_bias.shape) != (total,)):
        raise ValueError(f"{fn}: proj_bias must be None or ({total},), got {getattr(proj_bias, 'shape', proj_bias)}")
    if rpb is not None:
        if not isinstance(rpb, (tuple, list)) or len(rpb) != n:
            raise ValueError(f"{fn}: rpb must be None or one table per kernel size ({n}), got {type(rpb).__name__}")
        for s, t in zip(kernel_sizes, rpb, strict=True):
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (G, 2 * s - 1, 2 * s - 1)):
                raise ValueError(f"{fn}: the relative position bias of kernel {s} must be (G, 2k-1, 2k-1) = "
                                 f"{(G, 2 * s - 1, 2 * s - 1)}, got {getattr(t, 'shape', t)}")
        rpb = tuple(rpb)
    if border not in BORDERS:
        raise ValueError(f"{fn}: border must be one of {BORDERS}, got {border!r}")
    if border == "clamp" and min(Y, X) < max(kernel_sizes):
        raise ValueError(f"{fn}: border='clamp' (windows shifted inside the image) needs Y, X >= kernel size "
                         f"{max(kernel_sizes)}, got spatial size {(Y, X)}; use border='zero' or a larger map")
    for name, t in (("q", q), ("k", k), ("proj_weight", proj_weight)):
        if t.dtype != v.dtype:
            raise TypeError(f"{fn}: {name} must have v's dtype {v.dtype}, got {t.dtype}")
    return ContMixCall(q, k, v, proj_weight, proj_bias, kernel_sizes, rpb, border)


def _starts(n: int, k: int, border: str, device) -> torch.Tensor:
    """Every pixel's window start on an axis of ``n`` (see the reference's ``_window_start``)."""
    p = torch.arange(n, device=device)
    return (p - k // 2).clamp(0, n - k) if border == "clamp" else p - k // 2


def _rpb_bias(table: torch.Tensor, Y: int, X: int, k: int, border: str) -> torch.Tensor:
    """``(Y, X, G, k*k)`` bias: the table entry of each pixel's true offset ``start + i - p`` to its neighbour."""
    dev = table.device
    iy = _starts(Y, k, border, dev)[:, None] + torch.arange(k, device=dev) - torch.arange(Y, device=dev)[:, None]
    ix = _starts(X, k, border, dev)[:, None] + torch.arange(k, device=dev) - torch.arange(X, device=dev)[:, None]
    b = table[:, (iy + k - 1)[:, None, :, None], (ix + k - 1)[None, :, None, :]]  # (G, Y, X, k, k)
    return b.permute(1, 2, 0, 3, 4).reshape(Y, X, table.shape[0], k * k)  # (Y, X, G, k*k)


def _clamp_aggregate(v: torch.Tensor, ker: torch.Tensor, k: int) -> torch.Tensor:
    # the window of pixel p starts at clamp(p - r, 0, n - k): k row gathers, then k column gathers of each
    B, Y, X, C = v.shape
    G = ker.shape[3]
    sy, sx = _starts(Y, k, "clamp", v.device), _starts(X, k, "clamp", v.device)
    # one contiguous (B, Y, X, G, 1) weight per offset; unbind's backward is a single stack, whereas k^2 separate
    # ker[..., o] selections would each allocate a zero tensor of ker's full size in the backward
    weights = ker.movedim(-1, 0).unsqueeze(-1).contiguous().unbind(0)
    out = None
    for i in range(k):
        rows = v.index_select(1, sy + i)  # (B, Y, X, C): row i of every pixel's window
        for j in range(k):
            nb = rows.index_select(2, sx + j).view(B, Y, X, G, C // G)  # (B, Y, X, G, C/G)
            out = nb * weights[i * k + j] if out is None else torch.addcmul(out, nb, weights[i * k + j])
    return out.reshape(B, Y, X, C)


def _fast(c: ContMixCall) -> torch.Tensor:
    q, v = c.q, c.v
    Y, X = q.shape[1:3]
    wt = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
    aff = torch.einsum("byxgd,brgd->byxgr", q, c.k)  # (B, Y, X, G, R)
    logits = torch.nn.functional.linear(aff, c.proj_weight, c.proj_bias)  # (B, Y, X, G, sum k^2)
    per = v.shape[-1] // len(c.kernel_sizes)
    outs, at = [], 0
    for n, ks in enumerate(c.kernel_sizes):
        lg = logits[..., at:at + ks * ks]  # (B, Y, X, G, k^2)
        at += ks * ks
        if c.rpb is not None and c.rpb[n] is not None:
            lg = lg + _rpb_bias(c.rpb[n], Y, X, ks, c.border)
        ker = torch.softmax(lg, -1, dtype=wt).to(v.dtype)  # (B, Y, X, G, k^2): each kernel sums to 1
        vb = v[..., n * per:(n + 1) * per]  # (B, Y, X, C_b): this branch's channels
        outs.append(dynamic_depthwise_conv(vb, ker, ks) if c.border == "zero" else _clamp_aggregate(vb, ker, ks))
    return torch.cat(outs, -1)


DISPATCHER = Dispatcher("contmix", [
    Backend("shifts", _fast, note="affinity einsum, one linear to every kernel's logits, softmax, k^2 shifted "
                                  "(zero) or gathered (clamp) multiply-adds per branch",
            detail=lambda c: f"border={c.border}, kernels {c.kernel_sizes}"),
    Backend("reference", lambda c: naive_contmix(c.q, c.k, c.v, c.proj_weight, c.proj_bias, c.kernel_sizes, c.rpb,
                                                 c.border),
            auto=False, note="naive_contmix: one pixel at a time"),
])
register_op("contmix", make_call, DISPATCHER)


def contmix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
            proj_bias: torch.Tensor | None, kernel_sizes: tuple[int, ...] = (5, 7), rpb: tuple | None = None,
            border: str = "clamp", *, backend: str | None = None) -> torch.Tensor:
    """Context-mixing dynamic convolution on a channels-last map.

    Args:
        q: ``(B, Y, X, G, D)``: per-pixel queries (already scaled), ``G`` kernel groups.
        k: ``(B, R, G, D)``: keys of ``R`` region centres (e.g. the ``7 x 7`` average-pooled context).
        v: ``(B, Y, X, C)``: the values; branch ``n`` of ``kernel_sizes`` mixes the ``n``-th equal channel chunk,
            in ``G`` groups of contiguous channels.
        proj_weight: ``(sum k^2, R)``, proj_bias ``(sum k^2,)`` or None: affinity to kernel logits, shared by the
            groups (branch ``n``'s logits are the ``n``-th slice).
        kernel_sizes: odd kernel sizes, one per branch (OverLoCK: ``(5, 7)``).
        rpb: None or one ``(G, 2k-1, 2k-1)`` relative position bias table (or None) per branch, indexed by the
            true offset of each neighbour.
        border: ``"clamp"``: every window lies inside the image (shifted at the borders, as neighbourhood
            attention; needs ``Y, X >= max(kernel_sizes)``); ``"zero"``: centred windows, zero outside.
        backend: None / ``"shifts"`` or ``"reference"``.

    Returns:
        ``(B, Y, X, C)``.
    """
    return DISPATCHER.run(make_call(q, k, v, proj_weight, proj_bias, kernel_sizes, rpb, border), backend)
