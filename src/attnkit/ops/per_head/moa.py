"""MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression (arXiv 2406.14909).

Every head has its own causal sliding window whose span grows with the input length,
``S_h(N) = clamp(alpha_h + beta_h N, 1, N)``, plus ``g`` always-visible initial (sink)
tokens. Heads with equal spans share one mask ``causal & (sliding_window(S - 1, 0) |
global_tokens(g))``: each distinct span is one head group of
:func:`attnkit.ops.per_head.call.per_head_attention`, whose default ``masked`` path makes it one
``ak.attention`` call (the blocked backend walks its diagonal band and sink tiles, K/V read
through views); the outputs are put back in head order. ``backend="gather"`` runs the per-head
block layout on the block-gather engine; ``backend="reference"`` is naive attention under
``naive_moa_mask``. The (alpha, beta) plan comes from MoA's offline profiling; it is an input here.
"""


from __future__ import annotations

from dataclasses import dataclass

import torch

import attnkit.masks as M
from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.ops.base import Dispatcher, register_op
from attnkit.ops.per_head.call import BACKENDS, GatherPlan, HeadGroup, PerHeadCall, resolve_backend
from attnkit.reference.naive_per_head import naive_moa_mask


def moa_spans(alphas: torch.Tensor, betas: torch.Tensor, n: int) -> torch.Tensor:
    """Per-head spans ``clamp(round(alpha + beta N), 1, N)`` as int64 ``(H,)``."""
    return torch.round(alphas.double() + betas.double() * n).clamp(1, n).long()



@dataclass(frozen=True)
class _MoAMask:
    """``u <= t and (t - u < S_h or u < g)`` with per-head spans; the ``mask_mod`` protocol."""

    spans: torch.Tensor  # (H,) int64
    sink: int

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx - kv_idx < self.spans[h]) | (kv_idx < self.sink))



def moa_layout(spans: torch.Tensor, sink: int, n: int, block: int) -> torch.Tensor:
    """Block layout ``(H, nb, nb)``: a tile is kept iff some pair in it satisfies the MoA mask."""
    nb = -(-n // block)
    i = torch.arange(nb, device=spans.device).view(1, -1, 1)
    j = torch.arange(nb, device=spans.device).view(1, 1, -1)
    min_dist = (i * block - (j * block + block - 1)).clamp_min(0)  # closest (t, u) pair of the tile
    return (j <= i) & ((min_dist < spans.view(-1, 1, 1)) | (j * block < sink))



def moa_mask(span: int, sink: int) -> M.Mask:
    """One head's MoA mask ``u <= t and (t - u < span or u < sink)`` as an ``ak.masks`` pattern.

    ``global_tokens(g)`` also opens whole rows for the first ``g`` queries, but under ``causal`` those
    rows only reach keys ``u <= t < g``, which the sink already allows.
    """
    m = M.sliding_window(int(span) - 1, 0)
    return M.causal() & (m | M.global_tokens(sink) if sink > 0 else m)


def make_call(q, k, v, alphas, betas, *, sink=64, block_size=64, scale=None) -> PerHeadCall:
    hq, _ = check_qkv(q, k, v, same_extent=True)
    if not isinstance(alphas, torch.Tensor) or not isinstance(betas, torch.Tensor):
        raise TypeError("alphas and betas must be tensors of shape (Hq,)")
    if alphas.shape != (hq,) or betas.shape != (hq,):
        raise ValueError(f"alphas and betas must have shape (Hq,) = ({hq},), got {tuple(alphas.shape)}, "
                         f"{tuple(betas.shape)}")
    sink = int_arg("sink", sink, 0)
    block_size = int_arg("block_size", block_size, 1)
    n = q.shape[1]
    spans = moa_spans(alphas, betas, n)  # (Hq,) int64
    by_span: dict[int, list[int]] = {}
    for h, s in enumerate(spans.tolist()):
        by_span.setdefault(s, []).append(h)
    groups = tuple(HeadGroup(tuple(heads), moa_mask(s, sink)) for s, heads in by_span.items())

    def gather() -> GatherPlan:
        sp = spans.to(q.device)
        return GatherPlan(moa_layout(sp, sink, n, block_size).unsqueeze(0), block_size,  # (1, Hq, nb, nb)
                          _MoAMask(sp, sink))

    label = f"moa(spans={spans.tolist()}, sink={sink})"
    return PerHeadCall(q, k, v, groups, resolve_scale(scale, q.shape[-1]), lambda: naive_moa_mask(spans, sink, n),
                       gather, label)


DISPATCHER = Dispatcher("moa_attention", BACKENDS)
register_op("moa_attention", make_call, DISPATCHER)


def moa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor, *,
                  sink: int = 64, block_size: int = 64, scale: float | None = None,
                  impl: str | None = None, backend: str | None = None) -> torch.Tensor:
    """Causal attention with heterogeneous elastic per-head windows and attention sinks.

    Args:
        q: ``(B, N, Hq, D)``; k: ``(B, N, Hkv, D)``; v: ``(B, N, Hkv, Dv)``.
        alphas, betas: ``(Hq,)`` span rule per query head, ``S_h = alpha_h + beta_h N`` (N = this
            call's length; alpha may be negative), clamped to ``[1, N]``.
        sink: initial tokens every query sees.
        block_size: tile of the ``"gather"`` path (a speed knob only; unused by the others).
        scale: score scale, default ``D ** -0.5``.
        impl: older spelling of the path: ``"masked"`` or ``"gather"``
            (see ``attnkit.ops.per_head.call.resolve_backend``).
        backend: None (automatic: ``"masked"``, one ``ak.attention`` call per distinct span, heads
            grouped; without gradients each group is written in place), ``"masked"``, ``"sdpa"`` /
            ``"blocked"`` / ``"flex"`` (those calls forced onto that backend), ``"gather"`` (per-head
            block layout on the block-gather engine) or ``"reference"``. Same result;
            ``ak.explain("moa_attention", q, k, v, alphas=..., betas=...)`` says which and why.

    Returns:
        ``(B, N, Hq, Dv)``.

    Example:
        >>> q = k = v = torch.randn(1, 512, 4, 32)
        >>> out = moa_attention(q, k, v, torch.tensor([32., 64, 0, 16]), torch.tensor([0., 0, .5, .1]))
    """
    path = resolve_backend(impl, backend)
    call = make_call(q, k, v, alphas, betas, sink=sink, block_size=block_size, scale=scale)
    return DISPATCHER.run(call, path)
