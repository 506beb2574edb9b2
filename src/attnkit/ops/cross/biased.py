"""Cross-attention with additive per-pair logits: RelationNet++'s appearance + geometry attention.

"RelationNet++: Bridging Visual Representations for Object Detection via Transformer Decoder",
arXiv 2010.15831, §3.2: the logit of query ``i`` and key ``j`` is the scaled appearance product plus a
geometry term ``G(p_j - p_i)`` per head, ``softmax_j(q_i . k_j / sqrt(d) + G_ij) v_j``. ``ak.attention``
takes boolean masks only, so this op carries the float bias.

Also the pointer distribution of Pointer Networks and OAT ("OAT: Object-Level Attention Transformer for
Gaze Scanpath Prediction", arXiv 2407.13335): the attention weights themselves are the output, a
distribution over the keys (objects), with no values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_cross import naive_biased_attention


@dataclass(frozen=True, eq=False)
class BiasedCall:
    """A validated ``biased_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor
    scale: float

    def describe(self) -> str:
        return f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} {self.q.dtype}, bias {tuple(self.bias.shape)}"


def make_call(q, k, v, bias, *, scale=None) -> BiasedCall:
    hq, hkv = check_qkv(q, k, v)
    if hq != hkv:
        raise ValueError(f"biased_attention: needs as many K/V heads as query heads, got {hq} and {hkv}")
    want = (q.shape[0], hq, q.shape[1], k.shape[1])
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.dim() != 4 or any(
            s not in (1, w) for s, w in zip(bias.shape, want)):
        raise ValueError(f"biased_attention: bias must be a float tensor broadcastable to (B, H, Nq, Nk) = {want}, "
                         f"got {getattr(bias, 'shape', type(bias).__name__)}")
    return BiasedCall(q, k, v, bias, resolve_scale(scale, q.shape[-1]))


def _einsum(c: BiasedCall) -> torch.Tensor:
    work = torch.float32 if c.q.dtype in (torch.float16, torch.bfloat16) else c.q.dtype
    s = torch.einsum("bqhd,bkhd->bhqk", c.q.to(work), c.k.to(work)) * c.scale + c.bias.to(work)   # (B, H, Nq, Nk)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), c.v.to(work)).to(c.q.dtype)


def _reference(c: BiasedCall) -> torch.Tensor:
    return naive_biased_attention(c.q, c.k, c.v, c.bias, c.scale)


DISPATCHER = Dispatcher("biased_attention", [
    Backend("einsum", _einsum, suits=lambda c: (True, "scores materialised with the bias"),
            note="scores + bias, softmax, product (fp32 for half inputs)"),
    Backend("reference", _reference, auto=False, note="naive_biased_attention"),
])
register_op("biased_attention", make_call, DISPATCHER)


def biased_attention(q, k, v, bias, *, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v``: attention with additive float logits per (head, query, key).

    Args:
        q: ``(B, Nq, H, D)``; k, v: ``(B, Nk, H, D)`` / ``(B, Nk, H, Dv)``.
        bias: float, broadcastable to ``(B, H, Nq, Nk)`` (RelationNet++: the geometry term).
        scale: default ``D ** -0.5``. backend: None, ``"einsum"`` or ``"reference"``.

    Returns:
        ``(B, Nq, H, Dv)``.

    Example:
        >>> out = biased_attention(q, k, v, geometry.permute(0, 3, 1, 2))
    """
    return DISPATCHER.run(make_call(q, k, v, bias, scale=scale), backend)


def pointer_probs(q, k, mask=None, *, scale: float | None = None) -> torch.Tensor:
    """The pointer distribution over keys: ``softmax_j(q . k_j * scale)`` with masked keys at 0.

    Args:
        q: ``(B, Nq, H, D)`` decoder states; k: ``(B, Nk, H, D)`` encoder outputs (objects).
        mask: bool broadcastable to ``(B, H, Nq, Nk)`` (True = may point), or None.

    Returns:
        ``(B, H, Nq, Nk)``; each row sums to 1 over its allowed keys.
    """
    check_qkv(q, k, k)
    scale = resolve_scale(scale, q.shape[-1])
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1).to(q.dtype)


__all__ = ["biased_attention", "pointer_probs"]
