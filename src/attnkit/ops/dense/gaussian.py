"""Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple
Modalities (arXiv 2401.11143) — GAAM, learnable Gaussian feature re-weighting.

Not a query-key mechanism: along an axis the data's own mean and variance are taken, the mean
is shifted by a learned offset, the spread scaled by a learned width, and every element is
multiplied by its Gaussian density. Heads with their own parameters split the features
(``head_split="features"``) or, as the authors' released code does, the statistics axis itself
(``head_split="axis"``: consecutive chunks of ``n // h`` positions, the last one taking the remainder, each
with its own statistics).
"""


from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_dense import naive_gaam
from attnkit.reference.naive_sequence5 import naive_gaam_axis_split


@dataclass(frozen=True, eq=False)
class GaussianCall:
    """A validated ``gaussian_adaptive`` call."""

    x: torch.Tensor
    offsets: torch.Tensor
    widths: torch.Tensor
    mix_logits: torch.Tensor | None
    axis: int
    normalize: bool
    eps: float
    unbiased: bool = False
    combine: str = "mixture"
    head_split: str = "features"

    def describe(self) -> str:
        h, g = self.offsets.shape
        return (f"x {tuple(self.x.shape)} {self.x.dtype}, {h} head(s) x {g} Gaussian(s), "
                f"statistics over {'tokens' if self.axis == 1 else 'features'}, normalize={self.normalize}, "
                f"heads split {'the statistics axis' if self.head_split == 'axis' else 'the features'}")


def make_call(x, offsets, widths, mix_logits=None, *, axis=1, normalize=False, eps=1e-8, unbiased=False,
              combine="mixture", head_split="features") -> GaussianCall:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be (B, N, C), got shape {tuple(getattr(x, 'shape', ()))}")
    if offsets.dim() != 2:
        raise ValueError(f"offsets must have shape (h, G), got {tuple(offsets.shape)}")
    h, g = offsets.shape
    C = x.shape[-1]
    if head_split not in ("features", "axis"):
        raise ValueError(f"head_split must be 'features' or 'axis', got {head_split!r}")
    if axis not in (1, -1, 2):
        raise ValueError(f"axis must be 1 (tokens) or -1 / 2 (features), got {axis}")
    if head_split == "features" and C % h:
        raise ValueError(f"feature dim C={C} must be divisible by the number of heads h={h}")
    if head_split == "axis" and x.shape[1 if axis == 1 else 2] < h:
        raise ValueError(f"head_split='axis': the statistics axis ({x.shape[1 if axis == 1 else 2]} positions) "
                         f"must have at least h={h} positions (one chunk per head)")
    if widths.shape != (h, g) or (mix_logits is not None and mix_logits.shape != (h, g)):
        raise ValueError(f"offsets, widths and mix_logits must share shape (h, G) = {(h, g)}")
    if combine not in ("mixture", "product"):
        raise ValueError(f"combine must be 'mixture' or 'product', got {combine!r}")
    return GaussianCall(x, offsets, widths, mix_logits, axis, bool(normalize), eps, bool(unbiased), combine,
                        head_split)


def _gate(dens: torch.Tensor, c: GaussianCall, mix: torch.Tensor | None) -> torch.Tensor:
    """Combine the Gaussians ``dens (..., G)``; ``mix`` broadcasts against it (softmax weights)."""
    if c.combine == "product":  # the released code multiplies the Gaussians
        return dens.prod(-1)
    return (dens * mix).sum(-1) if mix is not None else dens.mean(-1)


def _axis_split(c: GaussianCall) -> torch.Tensor:
    """Heads = consecutive chunks of the statistics axis (the released code's split), all chunks at once."""
    work = torch.promote_types(c.x.dtype, torch.float32)
    h = c.offsets.shape[0]
    x = c.x.to(work)
    xt = x if c.axis == 1 else x.transpose(1, 2)  # (B, L, F): statistics along L, per column F
    L = xt.shape[1]
    size = L // h
    seg = (torch.arange(L, device=x.device) // size).clamp_max(h - 1)  # head of each position, remainder to the last
    one = torch.nn.functional.one_hot(seg, h).to(work)  # (L, h)
    count = one.sum(0)  # (h,)
    mu = torch.einsum("lh,blf->bhf", one, xt) / count[:, None]  # (B, h, F)
    var = torch.einsum("lh,blf->bhf", one, xt * xt) / count[:, None] - mu * mu
    if c.unbiased:  # torch.var's default in the released code: n / (n - 1) per chunk
        var = var * (count / (count - 1).clamp_min(1))[:, None]
    std = torch.sqrt(var.clamp_min(0)[:, seg] + c.eps)  # (B, L, F)
    off, wid = c.offsets.to(work)[seg], c.widths.to(work)[seg]  # (L, G)
    z = (xt.unsqueeze(-1) - mu[:, seg].unsqueeze(-1) - off[:, None]) / std.unsqueeze(-1)  # (B, L, F, G)
    dens = torch.exp(-z * z / (2 * wid[:, None] ** 2))
    mix = None if c.mix_logits is None else torch.softmax(c.mix_logits.to(work), -1)[seg][:, None]  # (L, 1, G)
    gate = _gate(dens, c, mix)  # (B, L, F)
    if c.normalize:
        gate = gate / torch.einsum("lh,blf->bhf", one, gate)[:, seg]
    y = xt * gate
    return (y if c.axis == 1 else y.transpose(1, 2)).to(c.x.dtype)  # (B, N, C)


def _vectorized(c: GaussianCall) -> torch.Tensor:
    if c.head_split == "axis":
        return _axis_split(c)
    # half inputs: E[x^2] overflows fp16 from |x| ~ 256 on, so the statistics and the gate run in fp32
    work = torch.promote_types(c.x.dtype, torch.float32)
    x, offsets, widths = c.x.to(work), c.offsets.to(work), c.widths.to(work)
    h, g = offsets.shape
    B, N, C = x.shape
    xh = x.view(B, N, h, C // h)  # (B, N, h, C/h)
    red = 1 if c.axis == 1 else 3  # tokens, or features within the head chunk  (dims of (B, N, h, C/h))
    mu = xh.mean(dim=red, keepdim=True)
    var = (xh * xh).mean(dim=red, keepdim=True) - mu * mu
    if c.unbiased:  # the released code's torch.var default: n / (n - 1)
        n = xh.shape[red]
        var = var * (n / max(n - 1, 1))
    z = (xh.unsqueeze(-1) - mu.unsqueeze(-1) - offsets.view(1, 1, h, 1, g)) / torch.sqrt(
        var.clamp_min(0).unsqueeze(-1) + c.eps)  # (B, N, h, C/h, G)
    dens = torch.exp(-z * z / (2 * widths.view(1, 1, h, 1, g) ** 2))
    mix = None if c.mix_logits is None else torch.softmax(c.mix_logits.to(work), -1).view(1, 1, h, 1, g)
    gate = _gate(dens, c, mix)  # (B, N, h, C/h)
    if c.normalize:
        gate = gate / gate.sum(dim=red, keepdim=True)
    return (xh * gate).view(B, N, C).to(c.x.dtype)


def _reference(c: GaussianCall) -> torch.Tensor:
    if c.head_split == "axis":
        return naive_gaam_axis_split(c.x, c.offsets, c.widths, c.mix_logits, axis=c.axis, normalize=c.normalize,
                                     eps=c.eps, unbiased=c.unbiased, combine=c.combine)
    return naive_gaam(c.x, c.offsets, c.widths, c.mix_logits, axis=c.axis, normalize=c.normalize, eps=c.eps,
                      unbiased=c.unbiased, combine=c.combine)


DISPATCHER = Dispatcher("gaussian_adaptive", [
    Backend("vectorized", _vectorized, suits=lambda c: (True, "the fast path"),
            note="every head and Gaussian at once, variance as E[x^2] - mean^2"),
    Backend("reference", _reference, auto=False, note="naive_gaam: head by head, Gaussian by Gaussian"),
])
# explain("gaussian_adaptive", x, offsets, widths, ...): the three leading tensors take the q, k, v places
register_op("gaussian_adaptive", make_call, DISPATCHER)


def gaussian_adaptive(x: torch.Tensor, offsets: torch.Tensor, widths: torch.Tensor,
                      mix_logits: torch.Tensor | None = None, *, axis: int = 1, normalize: bool = False,
                      eps: float = 1e-8, unbiased: bool = False, combine: str = "mixture",
                      head_split: str = "features", backend: str | None = None) -> torch.Tensor:
    """GAAM re-weighting ``y = x * G``.

    Args:
        x: ``(B, N, C)``; the last dim is split into ``h`` equal head chunks.
        offsets: ``(h, G)`` mean offsets ``delta``; widths: ``(h, G)`` Gaussian widths ``c``
            (``G = exp(-z^2 / (2 c^2))``; the paper's single form has ``xi = c^2``).
        mix_logits: ``(h, G)`` mixture weights (softmax); None = equal weights.
        axis: statistics axis of ``x`` (1 = tokens, as the paper's time axis; -1 = features).
        normalize: divide ``G`` by its sum along ``axis`` (a choice of the authors' released code; the
            paper's formula, section 3, has no such division).
        eps: inside the square root of the variance.
        unbiased: the unbiased variance (``n / (n - 1)``, the released code's choice); False = the
            population variance of the paper's formula.
        combine: ``"mixture"`` (weights ``softmax(mix_logits)``, equal when None: the paper's formula for
            one Gaussian) or ``"product"`` (the released code multiplies the Gaussians; ``mix_logits`` unused).
        head_split: ``"features"`` (``C`` cut into ``h`` equal chunks, statistics of each chunk along ``axis``)
            or ``"axis"`` (the released code: the statistics axis itself is cut into ``h`` consecutive chunks of
            ``n // h`` positions, the last taking the remainder; each chunk has its own statistics and
            parameters; ``C % h`` need not be 0, the axis needs ``>= h`` positions).
        backend: None / ``"vectorized"`` (the fast path) or ``"reference"``;
            see ``ak.explain("gaussian_adaptive", x, offsets, widths, ...)``.

    Returns:
        ``(B, N, C)`` in x's dtype (half inputs are computed in float32). NaN or infinity in ``x``
        reaches every output sharing its statistics (the mean and variance along ``axis``).

    Example:
        >>> y = gaussian_adaptive(torch.randn(2, 16, 8), torch.zeros(2, 1), torch.full((2, 1), 2.0))
    """
    call = make_call(x, offsets, widths, mix_logits, axis=axis, normalize=normalize, eps=eps, unbiased=unbiased,
                     combine=combine, head_split=head_split)
    return DISPATCHER.run(call, backend)
