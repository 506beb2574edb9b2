"""Sparse decoding: TidalDecode's position-persistent top-k attention and StreamingLLM sinks.

* TidalDecode (Fast and Accurate LLM Decoding with Position Persistent Sparse Attention, arXiv
  2410.05076 §3): a few token-selection layers run dense attention and record, per query head, the
  top-``budget`` positions by ``q . k``; every later layer attends only to those positions of its
  own cache, until a re-selection layer refreshes them. Layers before the first selection layer are
  dense. The shared state lives in one :class:`TidalDecode` object per model, not on the layers.
* StreamingLLM (Efficient Streaming Language Models with Attention Sinks, arXiv 2309.17453 §3.2):
  keep the first ``sinks`` tokens and the last ``window``; rotary positions are those *inside the
  kept cache*, so keys are cached un-rotated and rotated when attended.
"""

from __future__ import annotations

import torch

from attnkit._validate import int_arg
from attnkit.ops.decode.call import decode_attention


def topk_positions(q: torch.Tensor, k: torch.Tensor, budget: int, *, scale: float | None = None) -> torch.Tensor:
    """Per query head, the ``budget`` cache positions of highest score: ``q (B, 1, Hq, D)``, ``k (B, N, Hkv, D)``
    -> long ``(B, Hq, min(budget, N))``, ascending (ties: the lower position)."""
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qg = q[:, 0].reshape(b, hkv, hq // hkv, d)                                     # (B, Hkv, G, D)
    s = torch.einsum("bhgd,bnhd->bhgn", qg, k).reshape(b, hq, -1) * scale        # (B, Hq, N)
    idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., : min(budget, k.shape[1])]
    return idx.sort(-1).values


def sparse_decode_attention(q, k, v, positions, *, scale: float | None = None) -> torch.Tensor:
    """Attention of ``q (B, 1, Hq, D)`` over only ``positions (B, Hq, P)`` of ``k, v (B, N, Hkv, D|Dv)``."""
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    head = torch.arange(hq, device=q.device) // g                                  # (Hq,)
    bi = torch.arange(b, device=q.device)[:, None, None]
    ks = k[bi, positions, head[None, :, None]]                                     # (B, Hq, P, D)
    vs = v[bi, positions, head[None, :, None]]                                     # (B, Hq, P, Dv)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bhd,bhpd->bhp", q[:, 0].to(work), ks.to(work)) * scale
    out = torch.einsum("bhp,bhpd->bhd", torch.softmax(s, -1), vs.to(work))
    return out.unsqueeze(1).to(q.dtype)                                            # (B, 1, Hq, Dv)


class TidalDecode:
    """The model-level state of TidalDecode: which layers select, and the positions they selected.

    Args:
        sparse_start: layers below it are dense; it is the first selection layer (paper: 2).
        reselect: layers that select again (paper: one mid-network layer, 13 of 32 for Llama-3-8B).
        budget: positions kept per query head (paper: 128-4096).

    Call :meth:`attend` for each layer in order at every decode step.
    """

    def __init__(self, sparse_start: int = 2, reselect: tuple[int, ...] = (), budget: int = 256):
        self.sparse_start = int_arg("sparse_start", sparse_start, 0)
        self.reselect = tuple(int_arg("reselect", r, self.sparse_start + 1) for r in reselect)
        self.budget = int_arg("budget", budget, 1)
        self.positions: torch.Tensor | None = None

    def attend(self, layer_idx: int, q, k, v, *, scale: float | None = None) -> torch.Tensor:
        """``q (B, 1, Hq, D)`` of layer ``layer_idx`` over its own cache ``k, v (B, N, Hkv, D|Dv)``."""
        if q.shape[1] != 1:
            raise ValueError(f"TidalDecode.attend: decode steps only (Nq = 1), got q {tuple(q.shape)}")
        if layer_idx < self.sparse_start:
            return decode_attention(q, k, v, scale=scale)
        if layer_idx == self.sparse_start or layer_idx in self.reselect:
            self.positions = topk_positions(q, k, self.budget, scale=scale)
            return decode_attention(q, k, v, scale=scale)
        if self.positions is None:
            raise ValueError(f"TidalDecode.attend: layer {layer_idx} is sparse but no selection layer ran first")
        return sparse_decode_attention(q, k, v, self.positions, scale=scale)


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding (half-split layout) of ``x (B, N, H, D)`` at integer ``positions (N,)``."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = positions.to(torch.float64)[:, None] * inv[None]                        # (N, D/2)
    cos, sin = (torch.cat([f(ang), f(ang)], -1).to(x.dtype)[None, :, None] for f in (torch.cos, torch.sin))
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def streaming_attention(q, k, v, *, sinks: int, window: int, base: float = 10000.0,
                        scale: float | None = None) -> torch.Tensor:
    """StreamingLLM decode step: ``q (B, 1, Hq, D)`` (un-rotated, the newest token) over un-rotated
    ``k (B, N, Hkv, D)``: the first ``sinks`` and last ``window`` tokens, rotated at their positions inside the
    kept cache (``0 .. kept-1``, the query at the last); returns ``(B, 1, Hq, Dv)``."""
    n = k.shape[1]
    sinks, window = int_arg("sinks", sinks, 0), int_arg("window", window, 1)
    keep = torch.cat([torch.arange(min(sinks, n)), torch.arange(max(sinks, n - window), n)])
    pos = torch.arange(keep.numel())
    kr = rope(k[:, keep], pos, base)
    return decode_attention(rope(q, pos[-1:], base), kr, v[:, keep], scale=scale)
