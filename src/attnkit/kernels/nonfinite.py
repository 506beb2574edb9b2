"""Exact propagation of non-finite values through a masked ``P @ V`` (the NaN policy of ``docs/design.md``).

A masked softmax gives ``P = 0`` where a query may not attend, but ``0 * NaN = NaN`` and
``0 * inf = NaN`` in IEEE arithmetic, so a plain matmul spreads one NaN value to every query of the
tile, allowed or not. These helpers split ``V`` into its finite part (multiplied as usual) and a
correction that carries NaN / ``+inf`` / ``-inf`` to exactly the queries allowed to see them.
"""

from __future__ import annotations

import torch


def any_nonfinite(*tensors: torch.Tensor) -> bool:
    """Whether any tensor may hold a NaN or an infinity: one vectorised sum per tensor (NaN and inf survive a
    sum), a fraction of the cost of ``isfinite(t).all()``. A sum that overflows on huge finite values answers
    True: callers then take their exact non-finite path, so the answer is the same, only the path differs.
    A host sync: callers use it on CPU only, outside ``torch.compile``."""
    return not all(bool(torch.isfinite(t.sum(dtype=torch.promote_types(t.dtype, torch.float32)))) for t in tensors)


def finite_part(v: torch.Tensor) -> torch.Tensor:
    """``v`` with every non-finite entry replaced by 0 (same dtype)."""
    return torch.where(torch.isfinite(v), v, torch.zeros((), dtype=v.dtype, device=v.device))


def _from_counts(nan: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NaN where a NaN (or both infinities) is seen, ``+-inf`` where one infinity is, else 0."""
    zero = torch.zeros((), dtype=dtype, device=nan.device)
    inf = torch.full((), float("inf"), dtype=dtype, device=nan.device)
    # inf + (-inf) = NaN and NaN + anything = NaN: IEEE's sum of the allowed terms
    return (torch.where(pos, inf, zero) + torch.where(neg, -inf, zero)
            + torch.where(nan, torch.full((), float("nan"), dtype=dtype, device=nan.device), zero))


def masked_correction(allowed: torch.Tensor, v: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """What the non-finite entries of ``v`` add to ``P @ v`` for the allowed keys only.

    Args:
        allowed: ``(..., M, K)`` bool (True = the query may attend the key); broadcasts with ``v``'s batch dims.
        v: ``(..., K, Dv)``.
        dtype: of the result (default ``v``'s).

    Returns:
        ``(..., M, Dv)``: 0 where every allowed key's value is finite, otherwise NaN / ``+-inf`` as the
        IEEE sum ``sum_k P[m, k] v[k, d]`` over the allowed keys would give (``P > 0``). Add it to
        ``P @ finite_part(v)`` (before or after normalising: ``inf / den = inf``).
    """
    dtype = dtype or v.dtype
    ind = torch.cat([v.isnan(), v == float("inf"), v == float("-inf")], dim=-1)  # (..., K, 3 Dv)
    # counts of allowed non-finite keys per column: 0/1 matrices, so no 0 * NaN here
    cnt = torch.matmul(allowed.to(torch.float32), ind.to(torch.float32))  # (..., M, 3 Dv)
    nan, pos, neg = (cnt > 0).chunk(3, dim=-1)
    return _from_counts(nan, pos, neg, dtype)


def causal_correction(v: torch.Tensor, dim: int = -2, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`masked_correction` for a causal (top-left aligned, ``Nq == Nk``) mask along ``dim`` of ``v``.

    Query ``i`` sees keys ``0..i``, so the correction is a running OR along the key axis: O(N Dv), no matmul.
    Returns a tensor of ``v``'s shape.
    """
    dtype = dtype or v.dtype
    seen = [torch.cumsum(t.to(torch.int32), dim=dim) > 0
            for t in (v.isnan(), v == float("inf"), v == float("-inf"))]
    return _from_counts(*seen, dtype)
