"""Reducing the Transformer Architecture to a Minimum (arXiv 2410.13732) — parameter-reduced attention.

Section 3 of the paper: the query-key product ``W_Q W_K^T`` can be one matrix ``W_QK`` (``collapsed``,
with ``W_K = I``), shared ``W_Q = W_K`` (``shared``: a symmetric similarity) or ``W_QK = L L^T`` with a
lower-triangular ``L`` (``cholesky``); the value-output product ``W_V W_O`` can be one matrix per head
(``collapsed``) or dropped (``identity``: every output is a convex mixture of the inputs).

Backends: ``attention`` (``ak.attention`` on the projected heads, automatic) and ``reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.masks import causal
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_sequence import minimal_qkv, naive_minimal_attention

QK_FORMS = ("separate", "collapsed", "shared", "cholesky")
VO_FORMS = ("separate", "collapsed", "identity")


@dataclass(frozen=True, eq=False)
class MinimalCall:
    x: torch.Tensor
    qk_weight: torch.Tensor
    vo_weight: torch.Tensor | None
    num_heads: int
    qk: str
    vo: str
    causal: bool

    def describe(self) -> str:
        return (f"x {tuple(self.x.shape)} {self.x.dtype}, {self.num_heads} head(s), qk={self.qk}, vo={self.vo}, "
                f"{'causal' if self.causal else 'non-causal'}")


def _expect(name: str, t, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise ValueError(f"minimal_attention: {name} must be {shape}, got {tuple(getattr(t, 'shape', ())) or t}")


def make_call(x, qk_weight, vo_weight=None, *, num_heads=1, qk="shared", vo="identity", causal=False) -> MinimalCall:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.numel() == 0:
        shape = tuple(getattr(x, "shape", ()))
        raise ValueError(f"minimal_attention: x must be a non-empty (B, N, C) tensor, got {shape}")
    if qk not in QK_FORMS or vo not in VO_FORMS:
        raise ValueError(f"minimal_attention: qk must be one of {QK_FORMS} and vo one of {VO_FORMS}, "
                         f"got {qk!r}, {vo!r}")
    C = x.shape[-1]
    if not isinstance(num_heads, int) or num_heads < 1 or (qk in ("separate", "shared", "cholesky") and C % num_heads):
        raise ValueError(f"minimal_attention: num_heads must be a positive divisor of C={C}, got {num_heads}")
    _expect("qk_weight", qk_weight, {"separate": (2, C, C), "collapsed": (num_heads, C, C)}.get(qk, (C, C)))
    if vo == "identity":
        if vo_weight is not None:
            raise ValueError("minimal_attention: vo='identity' takes no vo_weight")
    else:
        _expect("vo_weight", vo_weight, (2, C, C) if vo == "separate" else (num_heads, C, C))
    return MinimalCall(x, qk_weight, vo_weight, num_heads, qk, vo, bool(causal))


def _attention(c: MinimalCall) -> torch.Tensor:
    q, k, v = minimal_qkv(c.x, c.qk_weight, c.vo_weight, c.num_heads, c.qk, c.vo)  # (B, N, H, .)
    o = attention(q, k, v, causal() if c.causal else None)  # (B, N, H, Dv)
    return _combine(c, o)


def _combine(c: MinimalCall, o: torch.Tensor) -> torch.Tensor:
    B, N, H, Dv = o.shape
    if c.vo == "separate":
        return o.reshape(B, N, H * Dv) @ c.vo_weight[1]  # (B, N, C)
    if c.vo == "collapsed":
        return o.sum(2)  # (B, N, C): sum over heads of A_h x W_VO^h
    return o.mean(2)  # identity: a convex mixture of the inputs


def _reference(c: MinimalCall) -> torch.Tensor:
    return naive_minimal_attention(c.x, c.qk_weight, c.vo_weight, num_heads=c.num_heads, qk=c.qk, vo=c.vo,
                                   causal=c.causal)


DISPATCHER = Dispatcher("minimal_attention", [
    Backend("attention", _attention, note="projected heads through ak.attention"),
    Backend("reference", _reference, auto=False, note="naive_minimal_attention: explicit score matrix"),
])
register_op("minimal_attention", make_call, DISPATCHER)


def minimal_attention(x: torch.Tensor, qk_weight: torch.Tensor, vo_weight: torch.Tensor | None = None, *,
                      num_heads: int = 1, qk: str = "shared", vo: str = "identity", causal: bool = False,
                      backend: str | None = None) -> torch.Tensor:
    """Self-attention with reduced projections.

    Args:
        x: ``(B, N, C)``.
        qk_weight: ``separate``: ``(2, C, C)`` = ``[W_Q, W_K]`` (heads of ``C / H``); ``shared``: ``(C, C)``
            ``W`` with ``q = k = x W``; ``cholesky``: ``(C, C)`` whose lower triangle is ``L``
            (``q = k = x L``); ``collapsed``: ``(H, C, C)`` per-head ``W_QK`` with ``q_h = x W_QK^h``, ``k = x``.
        vo_weight: ``separate``: ``(2, C, C)`` = ``[W_V, W_O]``; ``collapsed``: ``(H, C, C)`` per-head ``W_VO``
            (outputs summed over heads); ``identity``: None (``y = mean_h A_h x``).
        num_heads: ``H``; qk, vo: the forms above; causal: causal self-attention.
        backend: None / ``"attention"`` or ``"reference"``.

    Returns:
        ``(B, N, C)``. Scale: ``1 / sqrt(d)`` with ``d`` the query width (``C / H``, or ``C`` when collapsed).

    Example:
        >>> y = minimal_attention(torch.randn(2, 16, 8), torch.randn(8, 8), qk="shared", vo="identity")
    """
    return DISPATCHER.run(make_call(x, qk_weight, vo_weight, num_heads=num_heads, qk=qk, vo=vo, causal=causal),
                          backend)


def minimal_scores(x: torch.Tensor, qk_weight: torch.Tensor, *, num_heads: int = 1, qk: str = "shared"
                   ) -> torch.Tensor:
    """The scaled scores ``(B, H, N, N)`` before masking and softmax (symmetric for ``shared`` / ``cholesky``)."""
    c = make_call(x, qk_weight, None, num_heads=num_heads, qk=qk, vo="identity")
    q, k, _ = minimal_qkv(c.x, c.qk_weight, None, c.num_heads, c.qk, "identity")
    return torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
