"""ADEM-VL's parameter-free cross-attention fusion of vision features into the language model.

"ADEM-VL: Adaptive and Embedded Fusion for Efficient Vision-Language Tuning", arXiv 2410.17779, §3.2-3.4:
the text hidden states read the (embedded, multiscale) vision features through a cross-attention with no
projection matrices, scores ``phi(x) phi(x_v)^T`` with a non-parametric feature map, and an adaptive
step that drops, per text token, the visual features with the lowest scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_tensor
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_cross import naive_adem_fusion

FEATURE_MAPS = ("silu", "relu", "identity")
NORMALIZE = ("count", "softmax", "none")


@dataclass(frozen=True, eq=False)
class ADEMCall:
    """A validated ``adem_fusion`` call."""

    x: torch.Tensor
    xv: torch.Tensor
    feature_map: str
    drop_ratio: float
    normalize: str
    weight: float

    def describe(self) -> str:
        return (f"x {tuple(self.x.shape)} vision {tuple(self.xv.shape)} {self.x.dtype}, phi={self.feature_map}, "
                f"drop {self.drop_ratio:g}, normalize={self.normalize}")


def make_call(x, xv, *, feature_map="silu", drop_ratio=0.1, normalize="count", weight=1.0) -> ADEMCall:
    x, xv = check_tensor("x", x), check_tensor("xv", xv)
    if x.dim() != 3 or xv.dim() != 3 or x.shape[0] != xv.shape[0] or x.shape[-1] != xv.shape[-1]:
        raise ValueError(f"adem_fusion: x must be (B, Nt, C) and xv (B, Nv, C), got {tuple(x.shape)} and "
                         f"{tuple(xv.shape)}")
    if 0 in x.shape or 0 in xv.shape:
        raise ValueError(f"adem_fusion: empty input, x {tuple(x.shape)} xv {tuple(xv.shape)}")
    if feature_map not in FEATURE_MAPS or normalize not in NORMALIZE:
        raise ValueError(f"adem_fusion: feature_map must be one of {FEATURE_MAPS} and normalize one of {NORMALIZE}, "
                         f"got {feature_map!r}, {normalize!r}")
    if isinstance(drop_ratio, bool) or not isinstance(drop_ratio, (int, float)) or not 0 <= drop_ratio < 1:
        raise ValueError(f"adem_fusion: drop_ratio must be in [0, 1), got {drop_ratio!r}")
    return ADEMCall(x, xv, feature_map, float(drop_ratio), normalize, float(weight))


def _phi(name: str, t: torch.Tensor) -> torch.Tensor:
    return F.silu(t) if name == "silu" else F.relu(t) if name == "relu" else t


def _dense(c: ADEMCall) -> torch.Tensor:
    work = torch.float32 if c.x.dtype in (torch.float16, torch.bfloat16) else c.x.dtype
    x, xv = c.x.to(work), c.xv.to(work)
    s = torch.bmm(_phi(c.feature_map, x), _phi(c.feature_map, xv).transpose(1, 2))     # (B, Nt, Nv)
    nv = s.shape[-1]
    drop = int(c.drop_ratio * nv)
    keep = None
    if drop:  # the drop is a selection (no gradient through which entries are kept)
        low = s.detach().topk(drop, dim=-1, largest=False).indices
        keep = torch.ones_like(s, dtype=torch.bool).scatter_(-1, low, False)
    if c.normalize == "softmax":
        logits = s * x.shape[-1] ** -0.5
        w = torch.softmax(logits if keep is None else logits.masked_fill(~keep, float("-inf")), -1)
    else:
        w = s if keep is None else s.masked_fill(~keep, 0.0)
        if c.normalize == "count":
            w = w / (nv - drop)
    return (x + c.weight * torch.bmm(w, xv)).to(c.x.dtype)


def _reference(c: ADEMCall) -> torch.Tensor:
    return naive_adem_fusion(c.x, c.xv, c.feature_map, c.drop_ratio, c.normalize, c.weight)


DISPATCHER = Dispatcher("adem_fusion", [
    Backend("dense", _dense, suits=lambda c: (True, "two batched matmuls"),
            note="phi(x) phi(xv)^T, drop the lowest per row, normalise, times xv"),
    Backend("reference", _reference, auto=False, note="naive_adem_fusion"),
])
register_op("adem_fusion", make_call, DISPATCHER)


def adem_fusion(x, xv, *, feature_map: str = "silu", drop_ratio: float = 0.1, normalize: str = "count",
                weight: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """``x + weight * S xv``, ``S = norm(drop(phi(x) phi(xv)^T))``: parameter-free cross-attention fusion.

    Args:
        x: ``(B, Nt, C)`` text hidden states; xv: ``(B, Nv, C)`` vision features embedded in the same width.
        feature_map: ``phi``: ``"silu"`` (default), ``"relu"`` or ``"identity"``.
        drop_ratio: ``gamma``: the ``floor(gamma * Nv)`` lowest scores of each row are dropped.
        normalize: ``"count"`` (divide by the kept count), ``"softmax"`` (softmax over kept scores
            scaled by ``C ** -0.5``) or ``"none"``.
        weight: ``lambda``, the fused term's weight. backend: None, ``"dense"`` or ``"reference"``.

    Returns:
        ``(B, Nt, C)``.

    Example:
        >>> x = adem_fusion(x, vision_tokens, drop_ratio=0.1)
    """
    call = make_call(x, xv, feature_map=feature_map, drop_ratio=drop_ratio, normalize=normalize, weight=weight)
    return DISPATCHER.run(call, backend)
