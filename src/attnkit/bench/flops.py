"""FLOP accounting as LongCA-bench counts it (arXiv 2510.17896).

Useful forward FLOPs of softmax attention are ``2 * area * H * D`` for ``Q K^T`` plus
``2 * area * H * Dv`` for ``P V``, i.e. ``4 * area * H * D`` when ``Dv == D``, where
*area* is the exact number of allowed (query, key) pairs. The backward pass counts
2.5x the forward (two gradient matmuls + recomputation), so fwd+bwd is 3.5x.
Masked-out pairs are never counted, so a sparse kernel that skips them is not
credited for work it did not need to do.
"""

from __future__ import annotations

from typing import Any

import torch

BWD_FACTOR = 2.5


def mask_area(mask: Any, nq: int, nk: int) -> int:
    """Exact number of allowed (query, key) pairs of one (batch, head) slice.

    Args:
        mask: ``None`` (dense), a boolean tensor whose last two dims are ``(Nq, Nk)``
            (its first slice is counted), or an ``ak.masks`` mask (its exact ``count``).
        nq, nk: query and key lengths.

    Returns:
        The number of allowed pairs, an int.

    Example:
        >>> mask_area(None, 4, 4)
        16
    """
    if mask is None:
        return nq * nk
    if isinstance(mask, torch.Tensor):
        m = mask.reshape(-1, mask.shape[-2], mask.shape[-1])[0]  # (Nq, Nk): first (batch, head) slice
        return int(m.expand(nq, nk).sum().item())
    if hasattr(mask, "count"):
        return int(mask.count(nq, nk))
    return round(float(mask.density(nq, nk)) * nq * nk)


def attention_flops(area: int, heads: int, head_dim: int, head_dim_v: int | None = None, batch: int = 1) -> float:
    """Useful forward FLOPs of softmax attention over ``area`` allowed pairs per (batch, head).

    Args:
        area: allowed (query, key) pairs per (batch, head), e.g. from :func:`mask_area`.
        heads: query heads ``Hq`` (GQA shares K/V but every query head does its own matmuls).
        head_dim: ``D`` of queries and keys.
        head_dim_v: ``Dv`` of values (defaults to ``D``).
        batch: ``B``.

    Returns:
        ``2 * B * Hq * area * (D + Dv)`` (= ``4 * area * H * D`` for ``Dv == D``).
    """
    dv = head_dim if head_dim_v is None else head_dim_v
    return 2.0 * batch * heads * area * (head_dim + dv)


def pass_flops(fwd_flops: float, pass_: str) -> float:
    """FLOPs of one timed pass: the forward, or forward + 2.5x for the backward."""
    if pass_ == "fwd":
        return float(fwd_flops)
    if pass_ == "fwd+bwd":
        return float(fwd_flops) * (1.0 + BWD_FACTOR)
    raise ValueError(f"pass_ must be 'fwd' or 'fwd+bwd', got {pass_!r}")


# Closed forms, used to check the accounting by hand (and handy in reports).


def causal_area(n: int) -> int:
    """Allowed pairs of a causal ``n x n`` mask: ``n (n + 1) / 2``."""
    return n * (n + 1) // 2


def sliding_window_area(n: int, left: int, right: int | None = None) -> int:
    """Allowed pairs of ``-right <= i - j <= left`` on ``n x n`` (``right=None``: symmetric)."""
    right = left if right is None else right
    total = 0
    for side in (left, right):  # each diagonal d = 1..w has n - d pairs
        w = min(side, n - 1)
        total += w * n - w * (w + 1) // 2
    return total + n  # the main diagonal


def document_area(lengths: list[int], causal: bool = False) -> int:
    """Allowed pairs of a block-diagonal document mask (causal inside each document if asked)."""
    return sum(causal_area(n) if causal else n * n for n in lengths)
