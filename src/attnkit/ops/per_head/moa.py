"""MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression (arXiv 2406.14909).

Every head has its own causal sliding window whose span grows with the input length,
``S_h(N) = clamp(alpha_h + beta_h N, 1, N)``, plus ``g`` always-visible initial (sink)
tokens. Heads with equal spans share one mask ``causal & (sliding_window(S - 1, 0) |
global_tokens(g))``, so each distinct span is one ``ak.attention`` call (the blocked backend walks
its diagonal band and sink tiles, K/V read through views); the outputs are put back in head order.
The (alpha, beta) plan comes from MoA's offline profiling; it is an input here.
"""


from __future__ import annotations

from dataclasses import dataclass

import torch

import attnkit.masks as M
from attnkit._validate import check_qkv
from attnkit.kernels.gather import block_gather_attention
from attnkit.ops.dense.call import attention


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



def moa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alphas: torch.Tensor, betas: torch.Tensor, *,
                  sink: int = 64, block_size: int = 64, scale: float | None = None,
                  impl: str = "masked", backend: str | None = None) -> torch.Tensor:
    """Causal attention with heterogeneous elastic per-head windows and attention sinks.

    Args:
        q: ``(B, N, Hq, D)``; k: ``(B, N, Hkv, D)``; v: ``(B, N, Hkv, Dv)``.
        alphas, betas: ``(Hq,)`` span rule per query head, ``S_h = alpha_h + beta_h N`` (N = this
            call's length; alpha may be negative), clamped to ``[1, N]``.
        sink: initial tokens every query sees.
        block_size: tile of the ``"gather"`` engine (a speed knob only; unused by ``"masked"``).
        impl: ``"masked"`` (default: one ``ak.attention`` call per distinct span, heads grouped) or
            ``"gather"`` (per-head block layout on the block-gather engine). Same result.
        backend: forwarded to ``ak.attention`` by ``"masked"`` (None = automatic).

    Returns:
        ``(B, N, Hq, Dv)``.

    Example:
        >>> q = k = v = torch.randn(1, 512, 4, 32)
        >>> out = moa_attention(q, k, v, torch.tensor([32., 64, 0, 16]), torch.tensor([0., 0, .5, .1]))
    """
    hq, hkv = check_qkv(q, k, v, same_extent=True)
    if alphas.shape != (hq,) or betas.shape != (hq,):
        raise ValueError(f"alphas and betas must have shape (Hq,) = ({hq},), got {tuple(alphas.shape)}, "
                         f"{tuple(betas.shape)}")
    if sink < 0:
        raise ValueError(f"sink must be >= 0, got {sink}")
    if impl not in ("masked", "gather"):
        raise ValueError(f"impl must be 'masked' or 'gather', got {impl!r}")
    n = q.shape[1]
    spans = moa_spans(alphas, betas, n)
    if impl == "gather":
        spans = spans.to(q.device)
        lay = moa_layout(spans, sink, n, block_size).unsqueeze(0)  # (1, Hq, nb, nb)
        return block_gather_attention(q, k, v, lay, block_size, extra_mask=_MoAMask(spans, sink), scale=scale)
    return _masked(q, k, v, spans.tolist(), sink, hq // hkv, scale, backend)



def _masked(q, k, v, spans: list[int], sink: int, g: int, scale, backend) -> torch.Tensor:
    """One ``ak.attention`` call per distinct span; GQA kept where a span group is whole KV groups."""
    hq = q.shape[2]
    by_span: dict[int, list[int]] = {}
    for h, s in enumerate(spans):
        by_span.setdefault(s, []).append(h)
    if len(by_span) == 1:
        return attention(q, k, v, moa_mask(spans[0], sink), scale=scale, backend=backend)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out = None if grad else q.new_empty(*q.shape[:3], v.shape[-1])  # (B, N, Hq, Dv), written per group
    outs, order = [], []
    for s, heads in by_span.items():
        kv = sorted({h // g for h in heads})
        whole = len(heads) == len(kv) * g  # every query head of these KV heads has this span
        if whole:
            heads = [kv_h * g + i for kv_h in kv for i in range(g)]
            kv_ix = kv
        else:
            kv_ix = [h // g for h in heads]  # one KV head per query head (a copy of O(N D) per head)
        qs = q[:, :, heads[0]:heads[0] + 1] if len(heads) == 1 else q[:, :, heads]  # (B, N, h', D)
        ks, vs = (t[:, :, kv_ix[0]:kv_ix[0] + 1] if len(kv_ix) == 1 else t[:, :, kv_ix] for t in (k, v))
        o = attention(qs, ks, vs, moa_mask(s, sink), scale=scale, backend=backend)  # (B, N, h', Dv)
        if out is not None:
            out[:, :, heads] = o
            continue
        outs.append(o)
        order += heads
    if out is not None:
        return out
    inv = torch.empty(hq, dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(hq)
    return torch.cat(outs, 2).index_select(2, inv.to(q.device))  # (B, N, Hq, Dv) in head order

