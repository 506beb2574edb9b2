"""GreenPLM's zero-parameter cross-attention pooling (0M-Pooling).

"More Text, Less Point: Towards 3D Data-Efficient Point-Language Understanding", arXiv 2408.15966, §3:
summary vectors of the point tokens (their max and their mean over tokens) are the queries of a
cross-attention whose keys and values are the tokens themselves, without any projection: a few
pooled tokens out of many, with no parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import check_tensor, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_zero_param_pool

QUERIES = ("max", "mean")


@dataclass(frozen=True, eq=False)
class PoolCall:
    """A validated ``zero_param_pool`` call."""

    tokens: torch.Tensor
    queries: tuple[str, ...]
    cls: bool
    scale: float

    def describe(self) -> str:
        return f"tokens {tuple(self.tokens.shape)} {self.tokens.dtype}, queries {self.queries}, cls={self.cls}"


def make_call(tokens, queries=QUERIES, *, cls=True, scale=None) -> PoolCall:
    t = check_tensor("tokens", tokens)
    if t.dim() != 3 or 0 in t.shape:
        raise ValueError(f"zero_param_pool: tokens must be a non-empty (B, N, C), got {tuple(t.shape)}")
    if cls and t.shape[1] < 2:
        raise ValueError(f"zero_param_pool: with cls=True token 0 is the class token and at least one more is "
                         f"needed, got N={t.shape[1]}")
    queries = tuple(queries)
    if not queries or any(q not in QUERIES for q in queries):
        raise ValueError(f"zero_param_pool: queries must be a non-empty tuple of {QUERIES}, got {queries}")
    return PoolCall(t, queries, bool(cls), resolve_scale(scale, t.shape[-1]))


def _attention(c: PoolCall) -> torch.Tensor:
    body = c.tokens[:, 1:] if c.cls else c.tokens                               # (B, N', C)
    summary = [body.amax(1, keepdim=True) if q == "max" else body.mean(1, keepdim=True) for q in c.queries]
    q = torch.cat(summary, 1)[:, :, None]                                        # (B, nq, 1, C): one head
    kv = body[:, :, None]                                                        # (B, N', 1, C)
    out = attention(q, kv, kv, scale=c.scale)[:, :, 0]                           # (B, nq, C)
    return torch.cat([c.tokens[:, :1], out], 1) if c.cls else out


def _reference(c: PoolCall) -> torch.Tensor:
    return naive_zero_param_pool(c.tokens, c.queries, c.scale, c.cls)


DISPATCHER = Dispatcher("zero_param_pool", [
    Backend("attention", _attention, suits=lambda c: (True, "one single-head ak.attention call"),
            note="summary queries, K = V = tokens, one head of width C"),
    Backend("reference", _reference, auto=False, note="naive_zero_param_pool: softmax rows materialised"),
])
register_op("zero_param_pool", make_call, DISPATCHER)


def zero_param_pool(tokens, queries=QUERIES, *, cls: bool = True, scale: float | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Zero-parameter cross-attention pooling of ``tokens (B, N, C)`` into ``(B, cls + len(queries), C)``.

    Args:
        tokens: ``(B, N, C)``; with ``cls`` token 0 is a class token, kept as the first output and
            left out of the pooling.
        queries: which summaries query the tokens: ``"max"`` (channel-wise max over tokens) and/or
            ``"mean"``; the keys and values are the tokens, unprojected.
        scale: default ``C ** -0.5``. backend: None, ``"attention"`` or ``"reference"``.

    Returns:
        ``(B, cls + len(queries), C)``: ``[cls token, pooled by max query, pooled by mean query]``.

    Example:
        >>> pooled = zero_param_pool(point_tokens)     # (B, 513, C) -> (B, 3, C)
    """
    return DISPATCHER.run(make_call(tokens, queries, cls=cls, scale=scale), backend)
