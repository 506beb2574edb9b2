"""Query-key top-k block sparsity: each query block keeps the k key blocks its pooled query scores highest.

LongCA-bench ("Long-Context Attention Benchmark", arXiv 2510.17896, §3) names this data-dependent
pattern; the selection is MoBA's (arXiv 2502.13189, §2.2): mean-pool each block of queries and of keys,
score the pooled pairs, keep the top ``topk`` key blocks per (batch, head, query block). The mask is
built from the tensors once and is then an ordinary, head-dependent mask: ``mask_mod``, ``to_dense``,
exact ``blocks``, and :meth:`QKSparse.head_blocks`, the per-(batch, head) tile classes that let the
blocked backend's kernel walk only each head's own tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import EMPTY, FULL, PARTIAL, Mask, _ceil_div, offset_arg


@dataclass(frozen=True, eq=False)
class LayoutMask(Mask):
    """``layout[b, h, (q + offset) // block, kv // block]`` (``& kv <= q + offset`` when causal), per (batch, head).

    ``layout`` is bool ``(B, H, nqb, nkb)`` with ``nqb = ceil((offset + Nq) / block)``.
    """

    layout: torch.Tensor
    block: int
    causal: bool = False
    offset: int = 0

    head_dependent = True

    @property
    def lead_shape(self) -> tuple[int, int]:  # type: ignore[override]
        return tuple(self.layout.shape[:2])

    def validate(self, nq: int, nk: int) -> None:
        super().validate(nq, nk)
        nqb, nkb = self.layout.shape[-2:]
        if nqb != _ceil_div(self.offset + nq, self.block) or nkb != _ceil_div(nk, self.block):
            raise ValueError(f"{self.name}: layout {tuple(self.layout.shape)} with block {self.block} does not cover "
                             f"Nq={nq} (offset {self.offset}), Nk={nk}")

    def mask_mod(self, b, h, q_idx, kv_idx):
        p = q_idx + self.offset
        ok = self.layout[b, h, p // self.block, kv_idx // self.block]
        return ok & (kv_idx <= p) if self.causal else ok

    def _evaluate(self, q_idx, kv_idx, nq, nk):
        p = q_idx + self.offset
        ok = self.layout[:, :, p // self.block, kv_idx // self.block]             # (B, H, ...)
        return ok & (kv_idx <= p) if self.causal else ok

    def head_blocks(self, nq: int, nk: int, bq: int, bk: int) -> torch.Tensor:
        """Exact tile classes per (batch, head): int8 ``(B, H, ceil(Nq / bq), ceil(Nk / bk))``.

        ``O(tiles)`` when tiles nest in the layout's blocks (``block % bq == block % bk == offset % bq == 0``),
        else from the dense per-head mask."""
        self.validate(nq, nk)
        nqt, nkt = _ceil_div(nq, bq), _ceil_div(nk, bk)
        if self.block % bq or self.block % bk or self.offset % bq:
            return self._dense_head_blocks(nq, nk, bq, bk)
        q0 = torch.arange(nqt) * bq + self.offset                                   # first position per tile
        k0 = torch.arange(nkt) * bk
        sel = self.layout[:, :, q0 // self.block][..., k0 // self.block]            # (B, H, nqt, nkt)
        inside = torch.full((nqt, nkt), FULL, dtype=torch.int8)
        if self.causal:
            q1 = torch.clamp(q0 - self.offset + bq, max=nq) - 1 + self.offset
            k1 = torch.clamp(k0 + bk, max=nk) - 1
            lo, hi = q0[:, None] - k1[None, :], q1[:, None] - k0[None, :]           # position - key per tile
            inside = torch.where(lo >= 0, FULL, torch.where(hi < 0, EMPTY, PARTIAL)).to(torch.int8)
        return torch.where(sel, inside, torch.zeros((), dtype=torch.int8))

    def _dense_head_blocks(self, nq, nk, bq, bk):
        sel = self._evaluate(torch.arange(nq)[:, None], torch.arange(nk)[None, :], nq, nk)   # (B, H, Nq, Nk)
        b, h = sel.shape[:2]
        nqt, nkt = _ceil_div(nq, bq), _ceil_div(nk, bk)
        pad = torch.zeros(b, h, nqt * bq, nkt * bk, dtype=torch.bool)
        valid = torch.zeros(nqt * bq, nkt * bk, dtype=torch.bool)
        pad[..., :nq, :nk], valid[:nq, :nk] = sel, True
        tiles = pad.view(b, h, nqt, bq, nkt, bk).transpose(3, 4)                  # (B, H, nqt, nkt, bq, bk)
        vt = valid.view(nqt, bq, nkt, bk).transpose(1, 2)                          # (nqt, nkt, bq, bk)
        anyv = tiles.flatten(-2).any(-1)
        allv = (tiles | ~vt).flatten(-2).all(-1)
        return torch.where(allv, FULL, torch.where(anyv, PARTIAL, EMPTY)).to(torch.int8)

    def _coarse_blocks(self, nq, nk, bq, bk):
        cls = self.head_blocks(nq, nk, bq, bk)                                     # (B, H, nqt, nkt)
        full = (cls == FULL).flatten(0, 1).all(0)
        empty = (cls == EMPTY).flatten(0, 1).all(0)
        return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)

    _coarse_is_exact = True

    def count(self, nq: int, nk: int) -> int:
        """Allowed pairs, per (batch, head) mean (rounded); ``O(B H Nq nkb)``, never ``Nq x Nk``."""
        self.validate(nq, nk)
        p = torch.arange(nq) + self.offset                                          # positions (Nq,)
        nkb = self.layout.shape[-1]
        k0 = torch.arange(nkb) * self.block
        k1 = torch.clamp(k0 + self.block, max=nk)
        width = (k1 - k0)[None, :].expand(nq, -1)                                   # (Nq, nkb)
        if self.causal:
            width = (torch.minimum(p[:, None] + 1, k1[None, :]) - k0[None, :]).clamp_min(0)
        sel = self.layout[:, :, p // self.block].float()                           # (B, H, Nq, nkb)
        return round((sel * width).sum().item() / (sel.shape[0] * sel.shape[1]))


@dataclass(frozen=True, eq=False)
class QKSparse(LayoutMask):
    topk: int = 1

    def __repr__(self) -> str:
        causal = ", causal=True" if self.causal else ""
        off = f", offset={self.offset}" if self.offset else ""
        return f"qk_sparse(block={self.block}, topk={self.topk}{causal}{off})"


def _pool(x: torch.Tensor, pos: torch.Tensor, block: int, nb: int) -> torch.Tensor:
    """Mean of ``x (B, N, H, D)`` over tokens grouped by ``pos // block``: ``(B, H, nb, D)`` float32."""
    b, _, h, d = x.shape
    ids = pos // block
    tot = torch.zeros(b, nb, h, d, dtype=torch.float32).index_add_(1, ids, x.float())
    cnt = torch.bincount(ids, minlength=nb).clamp_min(1).to(torch.float32)
    return (tot / cnt[None, :, None, None]).transpose(1, 2)                      # (B, H, nb, D)


def qk_sparse(q: torch.Tensor, k: torch.Tensor, block: int, topk: int, *, causal: bool = False,
              offset: int = 0) -> QKSparse:
    """Top-``topk`` key blocks per query block by pooled query-key score, per (batch, head).

    Args:
        q: ``(B, Nq, Hq, D)``; k: ``(B, Nk, Hkv, D)`` (GQA: each query head scores its KV head's blocks).
        block: block size of both queries and keys. topk: key blocks kept per query block (capped at the
            number of candidates).
        causal: keep only keys at or before the query's position; a query block then chooses among the
            blocks that are not in its future, and always keeps its own (diagonal) block.
        offset: query row ``i`` sits at position ``i + offset`` (decoding against a longer key cache).

    Returns:
        A head-dependent :class:`QKSparse` mask with ``lead_shape == (B, Hq)``.

    Example:
        >>> m = ak.masks.qk_sparse(q, k, block=64, topk=4, causal=True)
        >>> out = ak.attention(q, k, v, mask=m)
    """
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
        raise ValueError("qk_sparse: q and k must be (B, N, H, D) tensors")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(f"qk_sparse: q {tuple(q.shape)} and k {tuple(k.shape)} must share B and D, "
                         "with Hq a multiple of Hkv")
    block = int_arg("qk_sparse: block", block, 1)
    topk = int_arg("qk_sparse: topk", topk, 1)
    offset = offset_arg(offset, "qk_sparse", 0)
    nq, nk, hq, hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    nqb, nkb = _ceil_div(offset + nq, block), _ceil_div(nk, block)
    with torch.no_grad():
        qp = _pool(q.detach(), torch.arange(nq) + offset, block, nqb)                 # (B, Hq, nqb, D)
        kp = _pool(k.detach(), torch.arange(nk), block, nkb).repeat_interleave(hq // hkv, 1)  # (B, Hq, nkb, D)
        s = qp @ kp.transpose(-1, -2)                                               # (B, Hq, nqb, nkb)
        qb, kb = torch.arange(nqb)[:, None], torch.arange(nkb)[None, :]
        if causal:
            s = s.masked_fill(kb > qb, float("-inf"))                               # future blocks
            s = s.masked_fill(kb == qb, float("inf"))                               # own block always kept
        idx = s.topk(min(topk, nkb), dim=-1).indices
        layout = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
        if causal:
            layout &= kb <= qb
    return QKSparse(layout, block, bool(causal), offset, topk)
