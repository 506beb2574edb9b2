"""FILIP's token-wise late interaction: the similarity of every image with every text.

"FILIP: Fine-grained Interactive Language-Image Pre-Training", arXiv 2111.07783, §3.1.1: tokens are
L2-normalised; an image's similarity to a text is the mean over its patches of each patch's best
word (``s_I2T``), and the text's similarity to the image the mean over its real words of each word's
best patch (``s_T2I``): max then mean, not a softmax. Padding tokens take part in neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_tensor, int_arg
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_cross import naive_filip_similarity


@dataclass(frozen=True, eq=False)
class FILIPCall:
    """A validated ``filip_similarity`` call."""

    x: torch.Tensor
    y: torch.Tensor
    x_mask: torch.Tensor | None
    y_mask: torch.Tensor | None
    chunk: int

    def describe(self) -> str:
        return (f"images {tuple(self.x.shape)} texts {tuple(self.y.shape)} {self.x.dtype}, "
                f"chunks of {self.chunk} texts")


def _valid(name: str, m, t: torch.Tensor):
    if m is None:
        return None
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != tuple(t.shape[:2]):
        raise ValueError(f"filip_similarity: {name} must be a bool (B, n) = {tuple(t.shape[:2])} tensor (True = real "
                         f"token), got {getattr(m, 'dtype', type(m).__name__)} {tuple(getattr(m, 'shape', ()))}")
    return m


def make_call(x, y, x_mask=None, *, y_mask=None, chunk=64) -> FILIPCall:
    x, y = check_tensor("x", x), check_tensor("y", y)
    if x.dim() != 3 or y.dim() != 3 or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"filip_similarity: x must be (BI, n1, d) and y (BT, n2, d) with one d, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"filip_similarity: x and y must share a dtype, got {x.dtype} and {y.dtype}")
    if 0 in x.shape or 0 in y.shape:
        raise ValueError(f"filip_similarity: empty input, x {tuple(x.shape)} y {tuple(y.shape)}")
    return FILIPCall(x, y, _valid("x_mask", x_mask, x), _valid("y_mask", y_mask, y), int_arg("chunk", chunk, 1))


def _masked_mean_max(sim: torch.Tensor, keep_other: torch.Tensor | None, keep_own: torch.Tensor | None,
                     dim_other: int, dim_own: int) -> torch.Tensor:
    """Max over ``dim_other`` (excluding invalid tokens there), then mean over ``dim_own`` (valid tokens only)."""
    if keep_other is not None:
        sim = sim.masked_fill(~keep_other, float("-inf"))
    best = sim.amax(dim_other)
    if keep_own is None:
        return best.mean(dim_own if dim_own < dim_other else dim_own - 1)
    own = keep_own.squeeze(dim_other)
    best = best.masked_fill(~own, 0.0)
    d = dim_own if dim_own < dim_other else dim_own - 1
    return best.sum(d) / own.sum(d).clamp_min(1)


def _batched(c: FILIPCall):
    work = torch.float64 if c.x.dtype == torch.float64 else torch.float32
    x, y = F.normalize(c.x.to(work), dim=-1), F.normalize(c.y.to(work), dim=-1)
    i2t, t2i = [], []
    for t0 in range(0, y.shape[0], c.chunk):  # the (BI, BT, n1, n2) similarity is built one text chunk at a time
        yc = y[t0:t0 + c.chunk]
        sim = torch.einsum("ikd,jrd->ijkr", x, yc)                                   # (BI, BTc, n1, n2)
        xm = None if c.x_mask is None else c.x_mask[:, None, :, None]                # (BI, 1, n1, 1)
        ym = None if c.y_mask is None else c.y_mask[t0:t0 + c.chunk][None, :, None, :]   # (1, BTc, 1, n2)
        i2t.append(_masked_mean_max(sim, ym, xm, 3, 2))
        t2i.append(_masked_mean_max(sim, xm, ym, 2, 3))
    return torch.cat(i2t, 1).to(c.x.dtype), torch.cat(t2i, 1).to(c.x.dtype)


def _reference(c: FILIPCall):
    a, b = naive_filip_similarity(c.x, c.y, c.x_mask, c.y_mask)
    return a.to(c.x.dtype), b.to(c.x.dtype)


DISPATCHER = Dispatcher("filip_similarity", [
    Backend("batched", _batched, suits=lambda c: (True, "einsum per text chunk"),
            note="normalise, einsum over a chunk of texts, masked max then mean",
            detail=lambda c: f"{-(-c.y.shape[0] // c.chunk)} chunk(s) of {c.chunk} texts"),
    Backend("reference", _reference, auto=False, note="naive_filip_similarity: a loop over (image, text) pairs"),
])
register_op("filip_similarity", make_call, DISPATCHER)


def filip_similarity(x, y, x_mask=None, *, y_mask=None, chunk: int = 64, backend: str | None = None):
    """FILIP's late-interaction similarities of every image with every text.

    Args:
        x: ``(BI, n1, d)`` image tokens; y: ``(BT, n2, d)`` text tokens (projected, not yet normalised).
        x_mask, y_mask: optional bool ``(BI, n1)`` / ``(BT, n2)``, True for real tokens (text padding
            is excluded from the max and from the mean count).
        chunk: texts per einsum (bounds the ``(BI, chunk, n1, n2)`` buffer).
        backend: None, ``"batched"`` or ``"reference"``.

    Returns:
        ``(s_i2t, s_t2i)``, each ``(BI, BT)``: image-to-text and text-to-image similarities.

    Example:
        >>> s_i2t, s_t2i = filip_similarity(img_tokens, txt_tokens, y_mask=attention_mask.bool())
    """
    return DISPATCHER.run(make_call(x, y, x_mask, y_mask=y_mask, chunk=chunk), backend)
