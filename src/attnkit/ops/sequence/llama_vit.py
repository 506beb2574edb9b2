"""Adapting LLaMA Decoder to Vision Transformer (arXiv 2404.06773) — iLLaMA's causal attention with a soft mask.

iLLaMA runs causal self-attention over patch tokens with the class token placed AFTER the patches (the
post-sequence class token sees every patch; patches never see it), and trains with a soft mask that starts
bidirectional and becomes causal: future keys' weights are multiplied by ``alpha`` before renormalising,
``softmax(S + log(alpha + (1 - alpha) [j <= i]))``, with ``alpha`` going from 1 to 0.

Backends: ``attention`` (automatic for ``alpha`` 0 or 1: ``ak.attention``, causal or full), ``soft``
(``0 < alpha < 1``: the scores with the log-weight bias, materialised) and ``reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, resolve_scale
from attnkit.masks import causal
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_sequence2 import naive_soft_causal_attention


@dataclass(frozen=True, eq=False)
class SoftCausalCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    alpha: float
    scale: float

    def describe(self) -> str:
        return f"q {tuple(self.q.shape)} {self.q.dtype}, alpha {self.alpha:g}"


def make_call(q, k, v, *, alpha=0.0, scale=None) -> SoftCausalCall:
    try:
        check_qkv(q, k, v, same_extent=True)
    except (TypeError, ValueError) as e:
        raise type(e)(f"soft_causal_attention: {e}") from None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"soft_causal_attention: alpha must be a float in [0, 1], got {alpha!r}")
    return SoftCausalCall(q, k, v, float(alpha), resolve_scale(scale, q.shape[-1]))


def _hard(c: SoftCausalCall):
    return (True, "") if c.alpha in (0.0, 1.0) else (False, "0 < alpha < 1 needs the log-weight bias")


def _attention(c: SoftCausalCall) -> torch.Tensor:
    return attention(c.q, c.k, c.v, causal() if c.alpha == 0.0 else None, scale=c.scale)


def _soft(c: SoftCausalCall) -> torch.Tensor:
    N = c.q.shape[1]
    s = torch.einsum("bihd,bjhd->bhij", c.q * c.scale, c.k)  # (B, H, N, N)
    future = torch.ones(N, N, dtype=torch.bool, device=s.device).triu(1)
    if c.alpha > 0:  # future weights times alpha: + log(alpha) on their scores
        s = s + future.to(s.dtype) * torch.log(torch.tensor(c.alpha, dtype=s.dtype))
    else:
        s = s.masked_fill(future, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), c.v)  # (B, N, H, Dv)


def _reference(c: SoftCausalCall) -> torch.Tensor:
    return naive_soft_causal_attention(c.q, c.k, c.v, c.alpha, scale=c.scale)


DISPATCHER = Dispatcher("soft_causal_attention", [
    Backend("attention", _attention, supports=_hard, note="alpha 0 (causal) or 1 (full) through ak.attention"),
    Backend("soft", _soft, note="scores + log(alpha) on future keys, materialised"),
    Backend("reference", _reference, auto=False, note="naive_soft_causal_attention"),
])
register_op("soft_causal_attention", make_call, DISPATCHER)


def soft_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, alpha: float = 0.0,
                          scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Causal attention whose future keys keep weight ``alpha`` (iLLaMA's soft mask).

    Args:
        q, k: ``(B, N, H, D)``; v: ``(B, N, H, Dv)``.
        alpha: 0 = causal, 1 = bidirectional, in between = future weights times ``alpha``.
        scale: score scale (default ``1 / sqrt(D)``); backend: None, ``"attention"``, ``"soft"``, ``"reference"``.

    Returns:
        ``(B, N, H, Dv)``.

    Example:
        >>> q = k = v = torch.randn(1, 197, 3, 64)
        >>> o = soft_causal_attention(q, k, v, alpha=0.3)
    """
    return DISPATCHER.run(make_call(q, k, v, alpha=alpha, scale=scale), backend)


def soft_mask_alpha(epoch: float, soft_epochs: float) -> float:
    """The schedule: ``alpha`` from 1 at epoch 0 linearly to 0 at ``soft_epochs`` (then causal)."""
    if soft_epochs <= 0:
        return 0.0
    return max(0.0, 1.0 - float(epoch) / float(soft_epochs))
