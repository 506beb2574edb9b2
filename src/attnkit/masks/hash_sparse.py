"""Hash-bucketed sparsity: a query attends the keys that fall in its bucket (angular LSH).

LongCA-bench ("Long-Context Attention Benchmark", arXiv 2510.17896, §3) names this data-dependent
pattern; the hashing is Reformer's ("Reformer: The Efficient Transformer", arXiv 2001.04451, §3):
project onto ``n_buckets / 2`` random directions and take ``argmax([xR, -xR])``. Queries and keys are
hashed with the same rotation (per KV head group), and each (batch, head) has its own buckets, so the
mask is head-dependent. Hashing works per block here (``block > 1``: the mean of each block is hashed) so
that whole tiles are chosen and the kernel skips the rest; ``block=1`` is token-level hashing, exact but
with nearly every tile partial (Reformer sorts tokens by bucket first to regain locality).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit._validate import int_arg
from attnkit.masks.base import _ceil_div, offset_arg
from attnkit.masks.qk_sparse import LayoutMask, _pool


@dataclass(frozen=True, eq=False)
class HashSparse(LayoutMask):
    n_buckets: int = 2

    def __repr__(self) -> str:
        causal = ", causal=True" if self.causal else ""
        off = f", offset={self.offset}" if self.offset else ""
        return f"hash_sparse(block={self.block}, n_buckets={self.n_buckets}{causal}{off})"


def hash_sparse(q: torch.Tensor, k: torch.Tensor, n_buckets: int, *, block: int = 64, causal: bool = False,
                offset: int = 0, seed: int = 0) -> HashSparse:
    """Query block ``i`` attends key block ``j`` when their pooled vectors hash to the same bucket.

    Args:
        q: ``(B, Nq, Hq, D)``; k: ``(B, Nk, Hkv, D)`` (GQA: query heads use their KV head's rotation).
        n_buckets: an even number of buckets (``argmax`` over ``n_buckets / 2`` signed projections).
        block: tokens per hashed block (1: token-level hashing).
        causal: also keep only keys at or before the query's position; a query block then always keeps
            its own (diagonal) block, so no causal row is left without keys. Without it, a query block whose
            bucket holds no key block attends nothing (zero output, lse ``-inf``).
        offset: query row ``i`` sits at position ``i + offset``. seed: seeds the random rotation.

    Returns:
        A head-dependent :class:`HashSparse` mask with ``lead_shape == (B, Hq)``.

    Example:
        >>> m = ak.masks.hash_sparse(q, k, n_buckets=8, block=64)
        >>> out = ak.attention(q, k, v, mask=m)
    """
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
        raise ValueError("hash_sparse: q and k must be (B, N, H, D) tensors")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(f"hash_sparse: q {tuple(q.shape)} and k {tuple(k.shape)} must share B and D, "
                         "with Hq a multiple of Hkv")
    n_buckets = int_arg("hash_sparse: n_buckets", n_buckets, 2)
    if n_buckets % 2:
        raise ValueError(f"hash_sparse: n_buckets must be even (argmax over [xR, -xR]), got {n_buckets}")
    block = int_arg("hash_sparse: block", block, 1)
    offset = offset_arg(offset, "hash_sparse", 0)
    nq, hq, d = q.shape[1:]
    nk, hkv = k.shape[1], k.shape[2]
    nqb, nkb = _ceil_div(offset + nq, block), _ceil_div(nk, block)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(int(seed))
        rot = torch.randn(hkv, d, n_buckets // 2, generator=gen).repeat_interleave(hq // hkv, 0)  # (Hq, D, nb/2)
        qp = _pool(q.detach(), torch.arange(nq) + offset, block, nqb)                 # (B, Hq, nqb, D)
        kp = _pool(k.detach(), torch.arange(nk), block, nkb).repeat_interleave(hq // hkv, 1)  # (B, Hq, nkb, D)

        def bucket(x: torch.Tensor) -> torch.Tensor:
            r = torch.einsum("bhnd,hdr->bhnr", x, rot)                                # (B, Hq, n, nb/2)
            return torch.cat([r, -r], -1).argmax(-1)                                   # (B, Hq, n)

        layout = bucket(qp)[..., :, None] == bucket(kp)[..., None, :]                 # (B, Hq, nqb, nkb)
        if causal:
            qb, kb = torch.arange(nqb)[:, None], torch.arange(nkb)[None, :]
            layout = (layout | (qb == kb)) & (kb <= qb)
    return HashSparse(layout, block, bool(causal), offset, n_buckets)
