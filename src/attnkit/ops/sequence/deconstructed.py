"""Deconstructing Attention: Investigating Design Principles for Effective Language Modeling (arXiv 2510.11602).

The paper relaxes the design principles of dot-product attention one at a time: token mixing, sequence-dependent
weights, the mathematical form (dot product + softmax) and the coupling of queries/keys to the current hidden states.
This op holds the first three as options of one mixing ``y = A v`` (the fourth, where ``q, k`` come from, is the
module's ``qk_source``):

* ``mixing="attention"``: ``A`` from the scores ``s = q k^T * scale`` through ``form``:
  ``softmax`` (standard attention), ``relu`` (``relu(s) / n_i``), ``sigmoid`` (``sigmoid(s - log n_i)``),
  ``linear`` (``s / n_i``, no normaliser and no non-linearity) or ``taylor`` (``t / sum_j t``,
  ``t = 1 + s + s^2 / 2``: a positive second-order approximation of ``exp``); ``n_i`` = keys visible to query ``i``.
* ``mixing="uniform"``: ``A_ij = 1 / n_i``: fixed mixing, the same for every input (no query-key similarity);
* ``mixing="none"``: ``A = I``: no token mixing (each output is its own value).

Backends: ``attention`` (``ak.attention``, softmax only), ``fixed`` (uniform / none in ``O(N)``: a running mean),
``scores`` (the ``(B, H, N, N)`` matrix for the other forms) and ``reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.masks import causal as causal_mask
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_sequence4 import naive_deconstructed

FORMS = ("softmax", "relu", "sigmoid", "linear", "taylor")
MIXINGS = ("attention", "uniform", "none")


@dataclass(frozen=True, eq=False)
class DeconstructedCall:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    form: str
    mixing: str
    causal: bool
    scale: float | None

    def describe(self) -> str:
        what = f"form={self.form}" if self.mixing == "attention" else f"mixing={self.mixing}"
        return (f"q {tuple(self.q.shape)} {self.q.dtype}, {what}, {'causal' if self.causal else 'non-causal'}")


def make_call(q, k, v, *, form="softmax", mixing="attention", causal=False, scale=None) -> DeconstructedCall:
    if form not in FORMS or mixing not in MIXINGS:
        raise ValueError(f"deconstructed_attention: form must be one of {FORMS} and mixing one of {MIXINGS}, got "
                         f"{form!r}, {mixing!r}")
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or v.numel() == 0:
        raise ValueError(f"deconstructed_attention: v must be a non-empty (B, N, H, Dv) tensor, got "
                         f"{tuple(getattr(v, 'shape', ())) or type(v).__name__}")
    if mixing == "attention":
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[:3] != v.shape[:3]:
                raise ValueError(f"deconstructed_attention: {name} must be (B, N, H, D) matching v's "
                                 f"{tuple(v.shape[:3])}, got {tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"deconstructed_attention: q and k widths differ ({q.shape[-1]} vs {k.shape[-1]})")
    return DeconstructedCall(q, k, v, form, mixing, bool(causal), scale)


def _counts(c: DeconstructedCall) -> torch.Tensor:
    """``n_i`` (keys visible to query ``i``) as ``(N, 1)`` in v's dtype."""
    n = c.v.shape[1]
    i = torch.arange(1, n + 1, dtype=c.v.dtype, device=c.v.device)
    return (i if c.causal else torch.full_like(i, n)).unsqueeze(-1)


def _attention(c: DeconstructedCall) -> torch.Tensor:
    return attention(c.q, c.k, c.v, causal_mask() if c.causal else None, scale=c.scale)


def _fixed(c: DeconstructedCall) -> torch.Tensor:
    if c.mixing == "none":
        return c.v.clone()
    if c.causal:  # running mean over the prefix
        return c.v.cumsum(1) / _counts(c).view(1, -1, 1, 1)
    return c.v.mean(1, keepdim=True).expand_as(c.v).contiguous()


def _scores(c: DeconstructedCall) -> torch.Tensor:
    N = c.v.shape[1]
    scale = c.q.shape[-1] ** -0.5 if c.scale is None else c.scale
    s = torch.einsum("bihd,bjhd->bhij", c.q, c.k) * scale  # (B, H, N, N)
    n = _counts(c)  # (N, 1)
    if c.form == "relu":
        a = torch.relu(s) / n
    elif c.form == "sigmoid":
        a = torch.sigmoid(s - torch.log(n))
    elif c.form == "linear":
        a = s / n
    elif c.form == "taylor":
        a = 1 + s + s * s / 2  # > 0 for every s: 1 + s + s^2/2 = ((1 + s)^2 + 1) / 2
    else:
        a = s
    if c.causal:
        keep = torch.ones(N, N, dtype=torch.bool, device=s.device).tril()
        a = a.masked_fill(~keep, float("-inf") if c.form == "softmax" else 0.0)
    if c.form == "softmax":
        a = torch.softmax(a, -1)
    elif c.form == "taylor":
        a = a / a.sum(-1, keepdim=True)
    return torch.einsum("bhij,bjhd->bihd", a, c.v)  # (B, N, H, Dv)


def _reference(c: DeconstructedCall) -> torch.Tensor:
    return naive_deconstructed(c.q, c.k, c.v, form=c.form, mixing=c.mixing, causal=c.causal, scale=c.scale)


def _softmax_only(c: DeconstructedCall) -> tuple[bool, str]:
    ok = c.mixing == "attention" and c.form == "softmax"
    return ok, "" if ok else "ak.attention computes softmax attention only"


def _fixed_only(c: DeconstructedCall) -> tuple[bool, str]:
    ok = c.mixing != "attention"
    return ok, "" if ok else "fixed mixing only (mixing='uniform' or 'none')"


def _scored(c: DeconstructedCall) -> tuple[bool, str]:
    ok = c.mixing == "attention"
    return ok, "" if ok else "no scores to compute: mixing is fixed"


DISPATCHER = Dispatcher("deconstructed_attention", [
    Backend("attention", _attention, supports=_softmax_only, note="ak.attention (standard softmax attention)"),
    Backend("fixed", _fixed, supports=_fixed_only, note="running / global mean or identity, O(N)"),
    Backend("scores", _scores, supports=_scored, note="materialised (B, H, N, N) weights for any form"),
    Backend("reference", _reference, auto=False, note="naive_deconstructed: weights entry by entry"),
])
register_op("deconstructed_attention", make_call, DISPATCHER)


def deconstructed_attention(q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor, *,
                            form: str = "softmax", mixing: str = "attention", causal: bool = False,
                            scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention with its design principles as options; the defaults are standard softmax attention.

    Args:
        q, k: ``(B, N, H, D)`` (ignored, and may be None, for ``mixing`` other than ``"attention"``).
        v: ``(B, N, H, Dv)``.
        form: ``"softmax"``, ``"relu"``, ``"sigmoid"``, ``"linear"`` or ``"taylor"`` (see the module docstring).
        mixing: ``"attention"``, ``"uniform"`` (``1 / n_i`` over the visible keys) or ``"none"`` (identity).
        causal: query ``i`` mixes keys ``j <= i`` only. scale: default ``D ** -0.5``.
        backend: None (automatic), ``"attention"``, ``"fixed"``, ``"scores"`` or ``"reference"``.

    Returns:
        ``(B, N, H, Dv)``.

    Example:
        >>> q, k, v = (torch.randn(2, 16, 4, 32) for _ in range(3))
        >>> y = deconstructed_attention(q, k, v, form="relu", causal=True)
    """
    return DISPATCHER.run(make_call(q, k, v, form=form, mixing=mixing, causal=causal, scale=scale), backend)

