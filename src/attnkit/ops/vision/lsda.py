"""CrossFormer long-short distance attention (LSDA): attention inside adjacent or strided token groups.

"CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention", arXiv 2108.00154
(ICLR 2022), §3.2.

* Short distance (SDA), group size ``G``: token ``(y, x)`` joins group ``(y div G, x div G)`` at slot
  ``(y mod G, x mod G)``: the ``G x G`` adjacent tokens of each window (MaxViT's block partition).
* Long distance (LDA), interval ``I``: token ``(y, x)`` joins group ``(y mod I, x mod I)`` at slot
  ``(y div I, x div I)``: the ``(Y/I) x (X/I)`` tokens spaced ``I`` apart (MaxViT's grid partition with
  ``G = Y/I``).

Each group runs ``softmax(q k^T * scale + bias) v`` per head, ``bias (H, n, n)`` indexed by (query slot, key
slot). With ``pad=True`` the map is zero-padded at the bottom / right to a multiple of the size, padded keys
are masked out, and the output is cropped back (the authors' dense-prediction backbones do this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_vision_b import naive_lsda

MODES = ("short", "long")
# the authors' additive mask value for padded keys: finite, so a group made only of padding stays finite
# (its outputs are cropped) and cannot turn the shared bias's gradient into NaN
PAD_MASK = -1.0e6


def _pair(fn: str, name: str, value: object) -> tuple[int, int]:
    vals = value if isinstance(value, (tuple, list)) else (value, value)
    if len(vals) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
        raise ValueError(f"{fn}: {name} must be a positive int or a pair of them, got {value!r}")
    return int(vals[0]), int(vals[1])


def lsda_group_shape(Y: int, X: int, size, mode: str, pad: bool = False) -> tuple[int, int]:
    """``(gh, gw)``, the slots per group along each axis for a ``(Y, X)`` map (after padding when ``pad``).

    ``mode="short"``: ``size`` is the group side ``G`` -> ``(G, G)``. ``mode="long"``: ``size`` is the interval
    ``I`` (or ``(Iy, Ix)``) -> ``(ceil(Y/Iy), ceil(X/Ix))``. Raises ``ValueError`` naming ``size`` when the map
    is not a multiple of it and ``pad`` is False.
    """
    fn = "long_short_distance_attention"
    if mode not in MODES:
        raise ValueError(f"{fn}: mode must be one of {MODES}, got {mode!r}")
    sy, sx = _pair(fn, "size", size)
    what = "group size G" if mode == "short" else "interval I"
    if not pad and (Y % sy or X % sx):
        raise ValueError(f"{fn}: the map (Y, X) = {(Y, X)} must be a multiple of size ({what}) {(sy, sx)} on both "
                         "sides; pass pad=True to pad and crop as CrossFormer's dense-prediction backbones do")
    if mode == "short":
        return sy, sx
    return -(-Y // sy), -(-X // sx)


@dataclass(frozen=True, eq=False)
class LSDACall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    size: tuple[int, int]
    mode: str
    group: tuple[int, int]
    bias: torch.Tensor | None
    pad: bool
    scale: float

    def describe(self) -> str:
        what = "G" if self.mode == "short" else "I"
        return (f"q {tuple(self.q.shape)} {self.q.dtype}, {self.mode} distance {what}={self.size}, groups "
                f"{self.group[0]}x{self.group[1]}, {'relative bias' if self.bias is not None else 'no bias'}"
                f"{', padded' if self.padding != (0, 0) else ''}")

    @property
    def padding(self) -> tuple[int, int]:
        Y, X = self.q.shape[1:3]
        return (-Y) % self.size[0], (-X) % self.size[1]


def make_lsda_call(q, k, v, size, *, mode: str = "short", bias=None, pad: bool = False, scale=None) -> LSDACall:
    fn = "long_short_distance_attention"
    try:
        hq, hkv = check_qkv(q, k, v, spatial_rank=2, same_extent=True)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None
    if hq != hkv:
        raise ValueError(f"{fn}: needs as many key/value heads as query heads, got {hq} and {hkv}")
    if not isinstance(pad, bool):
        raise TypeError(f"{fn}: pad must be a bool, got {type(pad).__name__}")
    Y, X = q.shape[1:3]
    group = lsda_group_shape(Y, X, size, mode, pad)
    n = group[0] * group[1]
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (hq, n, n)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{fn}: bias must be (H, n, n) = {(hq, n, n)} for groups of {group[0]}x{group[1]}, got {got}")
    return LSDACall(q, k, v, _pair(fn, "size", size), mode, group, bias, pad, resolve_scale(scale, q.shape[-1]))


def _partition(t: torch.Tensor, c: LSDACall) -> torch.Tensor:
    """``(B, Yp, Xp, H, D)`` -> ``(B, nG, H, n, D)``, groups image-major, slots row-major."""
    B, Yp, Xp, H, D = t.shape
    gh, gw = c.group
    if c.mode == "short":
        t = t.view(B, Yp // gh, gh, Xp // gw, gw, H, D).permute(0, 1, 3, 5, 2, 4, 6)  # (B, Y/G, X/G, H, G, G, D)
    else:
        iy, ix = c.size
        t = t.view(B, gh, iy, gw, ix, H, D).permute(0, 2, 4, 5, 1, 3, 6)            # (B, Iy, Ix, H, gh, gw, D)
    return t.reshape(B, -1, H, gh * gw, D)


def _unpartition(o: torch.Tensor, c: LSDACall, Yp: int, Xp: int) -> torch.Tensor:
    """Inverse of :func:`_partition`: ``(B, nG, H, n, D)`` -> ``(B, Yp, Xp, H, D)``."""
    B, _, H, _, D = o.shape
    gh, gw = c.group
    if c.mode == "short":
        o = o.view(B, Yp // gh, Xp // gw, H, gh, gw, D).permute(0, 1, 4, 2, 5, 3, 6)  # (B, Y/G, G, X/G, G, H, D)
    else:
        iy, ix = c.size
        o = o.view(B, iy, ix, H, gh, gw, D).permute(0, 4, 1, 5, 2, 3, 6)             # (B, gh, Iy, gw, Ix, H, D)
    return o.reshape(B, Yp, Xp, H, D)


def _sdpa(c: LSDACall) -> torch.Tensor:
    Y, X = c.q.shape[1:3]
    pb, pr = c.padding
    q, k, v = ((F.pad(t, (0, 0, 0, 0, 0, pr, 0, pb)) if pb or pr else t) for t in (c.q, c.k, c.v))
    Yp, Xp = Y + pb, X + pr
    qg, kg, vg = (_partition(t, c) for t in (q, k, v))                                # (B, nG, H, n, D)
    mask = None if c.bias is None else c.bias.to(c.q.dtype)                           # (H, n, n)
    if pb or pr:
        valid = torch.zeros(1, Yp, Xp, 1, 1, dtype=torch.bool, device=c.q.device)
        valid[:, :Y, :X] = True
        keys = _partition(valid, c)[0, :, :, None, :, 0]                              # (nG, 1, 1, n)
        pad_mask = torch.zeros(keys.shape, dtype=c.q.dtype, device=c.q.device).masked_fill(~keys, PAD_MASK)
        mask = pad_mask if mask is None else mask + pad_mask                          # (nG, H, n, n)
    # 4-D inputs and mask: CPU SDPA takes its flash kernel only for 4-D calls (a 5-D call or a 3-D mask runs the
    # math path, ~4x slower on window-sized groups)
    B, nG, H, n, _ = qg.shape
    if mask is not None and mask.dim() == 4:  # per-group padding: groups join the heads, the mask is shared by B
        mask = mask.expand(nG, H, n, n).reshape(1, nG * H, n, n)                     # (1, nG*H, n, n)
        o = F.scaled_dot_product_attention(qg.flatten(1, 2), kg.flatten(1, 2), vg.flatten(1, 2), attn_mask=mask,
                                           scale=c.scale).unflatten(1, (nG, H))       # (B, nG, H, n, Dv)
    else:
        mask = None if mask is None else mask.unsqueeze(0)                           # (1, H, n, n)
        o = F.scaled_dot_product_attention(qg.flatten(0, 1), kg.flatten(0, 1), vg.flatten(0, 1), attn_mask=mask,
                                           scale=c.scale).unflatten(0, (B, nG))       # (B, nG, H, n, Dv)
    out = _unpartition(o, c, Yp, Xp)                                                  # (B, Yp, Xp, H, Dv)
    return out[:, :Y, :X] if pb or pr else out


def _reference(c: LSDACall) -> torch.Tensor:
    return naive_lsda(c.q, c.k, c.v, c.size, c.mode, c.bias, c.pad, c.scale)


LSDA_DISPATCHER = Dispatcher("long_short_distance_attention", [
    Backend("sdpa", _sdpa, note="pad (if asked), adjacent / strided group partition, one batched SDPA over the groups",
            detail=lambda c: ("additive bias" if c.bias is not None else "no bias")
            + (" + padded-key mask" if c.padding != (0, 0) else "")),
    Backend("reference", _reference, auto=False, note="naive_lsda: pixel by pixel over its group"),
])
register_op("long_short_distance_attention", make_lsda_call, LSDA_DISPATCHER)


def long_short_distance_attention(q, k, v, size, *, mode: str = "short", bias=None, pad: bool = False,
                                  scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """CrossFormer's short (adjacent groups) or long (strided groups) distance attention.

    Args:
        q: ``(B, Y, X, H, D)``; k: ``(B, Y, X, H, D)``; v: ``(B, Y, X, H, Dv)``.
        size: ``mode="short"``: the group side ``G`` (groups of ``G x G`` adjacent tokens);
            ``mode="long"``: the interval ``I`` or ``(Iy, Ix)`` (groups of ``(Y/Iy) x (X/Ix)`` tokens spaced
            ``I`` apart). ``Y, X`` must be multiples of it unless ``pad``.
        mode: ``"short"`` (SDA) or ``"long"`` (LDA).
        bias: ``(H, n, n)`` additive bias by (query slot, key slot), ``n`` the slots per group (see
            :func:`lsda_group_shape`), or None.
        pad: zero-pad the bottom / right to a multiple of ``size``, mask padded keys, crop the output.
        scale: default ``D ** -0.5``.
        backend: None / ``"sdpa"`` or ``"reference"``.

    Returns:
        ``(B, Y, X, H, Dv)``.

    Example:
        >>> out = long_short_distance_attention(q, k, v, 7, mode="short")   # q, k, v (2, 56, 56, 3, 32)
    """
    return LSDA_DISPATCHER.run(make_lsda_call(q, k, v, size, mode=mode, bias=bias, pad=pad, scale=scale), backend)
