"""DCAL's global-local cross-attention (GLCA) and the attention rollout that selects its queries.

"Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification",
arXiv 2205.02151, §3.2: only the ``R`` queries with the highest accumulated attention from the CLS token
(attention rollout, "Quantifying Attention Flow in Transformers", arXiv 2005.00928) attend to every
key and value; the output has ``R`` rows. The selection is not differentiable (a top-k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.reference.naive_cross import naive_glca_attention


def attention_rollout(maps: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout: ``maps (L, B, N, N)`` head-averaged, row-stochastic attention of ``L`` layers ->
    ``(B, N, N)``, the product ``S_L' ... S_1'`` of ``S_l' = residual * I + (1 - residual) * S_l``.

    Rows of the result sum to 1 when every ``S_l`` is row-stochastic. Row 0 is the CLS token's rollout
    that GLCA ranks the patches by (arXiv 2205.02151, eq. 2).
    """
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"attention_rollout: maps must be (L, B, N, N), got {getattr(maps, 'shape', maps)}")
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype, device=maps.device)
    out = None
    for s in maps:
        s = (1 - residual) * s + residual * eye
        out = s if out is None else s @ out
    return out


@dataclass(frozen=True, eq=False)
class GLCACall:
    """A validated ``glca_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scores: torch.Tensor
    topk: int
    scale: float

    def describe(self) -> str:
        rows = f"top {self.topk} of {self.q.shape[1]} rows"
        return f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} {self.q.dtype}, {rows}"


def make_call(q, k, v, scores, topk, *, scale=None) -> GLCACall:
    check_qkv(q, k, v)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(q.shape[:2]):
        raise ValueError(f"glca_attention: scores must be (B, Nq) = {tuple(q.shape[:2])}, got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    topk = int_arg("glca_attention: topk", topk, 1)
    if topk > q.shape[1]:
        raise ValueError(f"glca_attention: topk ({topk}) must be <= Nq ({q.shape[1]})")
    return GLCACall(q, k, v, scores, topk, resolve_scale(scale, q.shape[-1]))


def _select(c: GLCACall) -> torch.Tensor:
    return c.scores.detach().topk(c.topk, dim=-1).indices                       # (B, R)


def _gather(c: GLCACall):
    idx = _select(c)
    rows = idx[:, :, None, None].expand(-1, -1, *c.q.shape[2:])                 # (B, R, H, D)
    return attention(c.q.gather(1, rows), c.k, c.v, scale=c.scale), idx


def _reference(c: GLCACall):
    out, idx = naive_glca_attention(c.q, c.k, c.v, c.scores, c.topk, scale=c.scale)
    return out.to(c.q.dtype), idx


DISPATCHER = Dispatcher("glca_attention", [
    Backend("gather", _gather, suits=lambda c: (True, "R selected rows, one ak.attention call"),
            note="gather the top-R query rows, ak.attention over every key",
            detail=lambda c: f"{c.topk} of {c.q.shape[1]} query rows"),
    Backend("reference", _reference, auto=False, note="naive_glca_attention: every row computed, then selected"),
])
register_op("glca_attention", make_call, DISPATCHER)


def glca_attention(q, k, v, scores, topk: int, *, scale: float | None = None, backend: str | None = None):
    """Global-local cross-attention: the ``topk`` query rows with the highest ``scores`` attend to all keys.

    Args:
        q: ``(B, N, H, D)``; k, v: ``(B, M, Hkv, D)`` / ``(B, M, Hkv, Dv)``.
        scores: ``(B, N)`` selection scores (DCAL: the CLS row of the attention rollout; give the CLS
            token ``+inf`` to keep it). Not differentiated.
        topk: ``R``, rows kept (ties go to the lower index, as ``torch.topk``).
        scale: default ``D ** -0.5``. backend: None, ``"gather"`` or ``"reference"``.

    Returns:
        ``(out (B, R, H, Dv), index (B, R))``: the selected rows' outputs, by decreasing score, and
        their row indices.

    Example:
        >>> out, idx = glca_attention(q, k, v, rollout[:, 0], topk=20)
    """
    return DISPATCHER.run(make_call(q, k, v, scores, topk, scale=scale), backend)
