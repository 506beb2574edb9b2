"""S2-Attention: Hardware-Aware Context Sharding Among Attention Heads (arXiv 2407.17678).

Each head sees a local band of blocks plus a strided shard of distant blocks, at absolute
block positions offset per head, so that the heads together cover the context (HHST).

The op is :func:`attnkit.ops.per_head.call.per_head_attention`'s head groups: every KV head (its
query group shares the pattern) gets its pattern as an exact :class:`S2Mask`, so the default
``masked`` path's ``ak.attention`` call walks only the head's band and stripe tiles on the blocked
backend, with the causal mask on the diagonal tiles only. Dense heads (and the bidirectional rule,
equal for all heads) share one group. ``backend="gather"`` runs the per-head layout on the
block-gather engine; ``backend="reference"`` is naive attention under ``naive_s2_mask``.
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import attnkit.masks as M
from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.masks.base import EMPTY, FULL, PARTIAL, Mask
from attnkit.masks.causal import causal as causal_mask
from attnkit.ops.base import Dispatcher, register_op
from attnkit.ops.per_head.call import BACKENDS, GatherPlan, HeadGroup, PerHeadCall, resolve_backend
from attnkit.reference.naive_dense import causal_dense
from attnkit.reference.naive_per_head import naive_s2_mask


def _Causal():
    return causal_mask()



GQA_RULES = ("dkernel", "kv")


def _sigma(hq: int, hkv: int, vert_stride: int, homo_head: bool, gqa_rule: str) -> int:
    """Stripe step between consecutive KV heads: ``max(1, v // Hq)`` (dkernel, the default) or
    ``max(1, v // Hkv)`` (``gqa_rule="kv"``); 0 for homogeneous heads. Equal without GQA and when ``v <= Hkv``."""
    if gqa_rule not in GQA_RULES:
        raise ValueError(f"s2_attention: gqa_rule must be one of {GQA_RULES}, got {gqa_rule!r}")
    if homo_head:
        return 0
    return max(1, vert_stride // (hq if gqa_rule == "dkernel" else hkv))


def s2_layout(num_heads: int, n_blocks: int, local_blocks: int, vert_stride: int, *, causal: bool = True,
              num_dense_heads: int = 0, head_offset: int = 0, homo_head: bool = False,
              num_query_heads: int | None = None, gqa_rule: str = "dkernel",
              device: torch.device | None = None) -> torch.Tensor:
    """Block layout ``(H, n, n)`` of S2-Attention per KV head (the rule of its released dkernel).

    causal: ``i >= j and (i - j < l or (j + h*sigma + o) % v == 0)`` for KV head ``h`` with
    ``sigma = max(1, v // Hq)`` (``Hq = num_query_heads``, default ``num_heads``: without GQA ``Hq = H``;
    ``gqa_rule="kv"`` uses ``max(1, v // H)`` instead; ``sigma = 0`` for homogeneous heads);
    bidirectional: ``((left + right) % v == 0)`` with ``left = max(0, i - j - l + 1)``,
    ``right = max(0, j - i - l + 1)``. The last ``num_dense_heads`` heads are dense (causal or full).
    """
    int_arg("local_blocks", local_blocks, 1)
    int_arg("vert_stride", vert_stride, 1)
    hq = num_heads if num_query_heads is None else int_arg("num_query_heads", num_query_heads, 1)
    if hq % num_heads:
        raise ValueError(f"s2_layout: num_query_heads ({hq}) must be a multiple of num_heads ({num_heads})")
    if not 0 <= num_dense_heads <= num_heads:
        raise ValueError(f"num_dense_heads must be in [0, {num_heads}], got {num_dense_heads}")
    i = torch.arange(n_blocks, device=device).view(1, -1, 1)
    j = torch.arange(n_blocks, device=device).view(1, 1, -1)
    h = torch.arange(num_heads, device=device).view(-1, 1, 1)
    sigma = _sigma(hq, num_heads, vert_stride, homo_head, gqa_rule)
    if causal:
        lay = (i >= j) & ((i - j < local_blocks) | ((j + h * sigma + head_offset) % vert_stride == 0))
        dense = (i >= j).expand_as(lay)
    else:
        left = (i - j - local_blocks + 1).clamp_min(0)
        right = (j - i - local_blocks + 1).clamp_min(0)
        lay = ((left + right) % vert_stride == 0).expand(num_heads, n_blocks, n_blocks)
        dense = torch.ones_like(lay)
    is_dense = (h >= num_heads - num_dense_heads).expand_as(lay)
    return torch.where(is_dense, dense, lay)



@dataclass(frozen=True)
class S2Mask(Mask):
    """One head's S2 pattern at token level: block pair ``(t // b, u // b)`` allowed by :func:`s2_layout`'s rule
    (``phase = h * sigma + o``), and ``u <= t`` when causal.

    Frozen and hashable, so the blocked backend's plan is built once per configuration; tiles are
    classified from block-pair counts per tile (2-D prefix sums), any tile size.
    """

    block: int
    local: int
    vert: int
    phase: int
    causal: bool = True

    def __repr__(self) -> str:
        kind = "causal" if self.causal else "bidirectional"
        return f"s2(block={self.block}, local={self.local}, vert={self.vert}, phase={self.phase}, {kind})"

    def _allow_blocks(self, i, j):
        if self.causal:
            return (i >= j) & ((i - j < self.local) | ((j + self.phase) % self.vert == 0))
        left = (i - j - self.local + 1).clamp_min(0)
        right = (j - i - self.local + 1).clamp_min(0)
        return (left + right) % self.vert == 0

    def mask_mod(self, b, h, q_idx, kv_idx):
        ok = self._allow_blocks(q_idx // self.block, kv_idx // self.block)
        return ok & (kv_idx <= q_idx) if self.causal else ok

    def _coarse_blocks(self, nq, nk, bq, bk):
        """EMPTY/FULL where certain, PARTIAL otherwise (the base class then evaluates those tiles:
        the causal diagonal and the band edges, a few per query tile)."""
        b = self.block
        nbq, nbk = -(-nq // b), -(-nk // b)
        lay = self._allow_blocks(torch.arange(nbq)[:, None], torch.arange(nbk)[None]).long()  # (nbq, nbk)
        cum = torch.zeros(nbq + 1, nbk + 1, dtype=torch.long)
        cum[1:, 1:] = lay.cumsum(0).cumsum(1)
        q0 = torch.arange(0, nq, bq)
        k0 = torch.arange(0, nk, bk)
        q1, k1 = (q0 + bq).clamp_max(nq) - 1, (k0 + bk).clamp_max(nk) - 1  # last token of each tile
        r0, r1 = (q0 // b)[:, None], (q1 // b + 1)[:, None]  # block rows [r0, r1) of each query tile
        c0, c1 = (k0 // b)[None], (k1 // b + 1)[None]
        hits = cum[r1, c1] - cum[r0, c1] - cum[r1, c0] + cum[r0, c0]  # allowed block pairs per tile
        cells = (r1 - r0) * (c1 - c0)
        # each block pair a tile meets holds one of its token pairs: without the causal cut, 0 hits
        # is EMPTY and all hits FULL
        cls = torch.where(hits == cells, FULL, torch.where(hits > 0, PARTIAL, EMPTY))
        if self.causal:
            below = q0[:, None] >= k1[None]  # every pair of the tile has u <= t
            above = q1[:, None] < k0[None]  # no pair has
            cls = torch.where(above, EMPTY, torch.where(below | (cls == EMPTY), cls, PARTIAL))
        return cls.to(torch.int8)



def _phases(hq: int, hkv: int, vert_stride: int, head_offset: int, homo_head: bool, causal: bool,
            gqa_rule: str = "dkernel") -> list[int]:
    """Stripe phase ``(h * sigma + o) mod v`` of every KV head (0 for all under the bidirectional rule)."""
    sigma = _sigma(hq, hkv, vert_stride, homo_head, gqa_rule) if causal else 0
    return [(h * sigma + head_offset) % vert_stride for h in range(hkv)]


def _reference_mask(hq, hkv, n, block_size, local_blocks, vert_stride, causal, num_dense_heads, phases):
    """``(1, Hq, N, N)`` from ``naive_s2_mask``: its head ``h`` has phase ``h * max(1, v // H)``, so with
    ``H = v`` heads it lists every phase ``0..v-1`` once (used when an offset or homogeneous heads move
    the phases off ``h * max(1, v // Hkv)``: GQA under dkernel's rule, an offset or homogeneous heads)."""
    if not causal:
        m = naive_s2_mask(1, n, block_size, local_blocks, vert_stride, False).expand(1, hkv, n, n)
    elif phases == _phases(hkv, hkv, vert_stride, 0, False, True):
        m = naive_s2_mask(hkv, n, block_size, local_blocks, vert_stride, True)
    else:
        m = naive_s2_mask(vert_stride, n, block_size, local_blocks, vert_stride, True)[:, phases]
    m = m.clone()
    if num_dense_heads:
        m[:, hkv - num_dense_heads:] = causal_dense(n, n) if causal else True
    return m.repeat_interleave(hq // hkv, dim=1)  # (1, Hq, N, N): the pattern is indexed by KV head


def make_call(q, k, v, block_size, local_blocks, vert_stride, *, causal=True, num_dense_heads=0, head_offset=0,
              homo_head=False, gqa_rule="dkernel", scale=None) -> PerHeadCall:
    hq, hkv = check_qkv(q, k, v, same_extent=True)
    block_size = int_arg("block_size", block_size, 1)
    local_blocks = int_arg("local_blocks", local_blocks, 1)
    vert_stride = int_arg("vert_stride", vert_stride, 1)
    if not 0 <= num_dense_heads <= hkv:
        raise ValueError(f"num_dense_heads must be in [0, {hkv}], got {num_dense_heads}")
    n, g = q.shape[1], hq // hkv
    if gqa_rule not in GQA_RULES:
        raise ValueError(f"s2_attention: gqa_rule must be one of {GQA_RULES}, got {gqa_rule!r}")
    phases = _phases(hq, hkv, vert_stride, head_offset, homo_head, causal, gqa_rule)
    # KV heads with one pattern share a group: dense heads, and every sparse head when the rule does
    # not depend on the head (bidirectional, homogeneous)
    dense_mask = M.causal() if causal else None
    by_mask: dict[object, list[int]] = {}
    for h in range(hkv):
        if h >= hkv - num_dense_heads:
            key: object = dense_mask if dense_mask is not None else "full"
        else:
            key = S2Mask(block_size, local_blocks, vert_stride, phases[h], causal)
        by_mask.setdefault(key, []).append(h)
    groups = tuple(HeadGroup(tuple(h * g + i for h in kv_heads for i in range(g)), None if key == "full" else key)
                   for key, kv_heads in by_mask.items())

    def gather() -> GatherPlan:
        lay = s2_layout(hkv, math.ceil(n / block_size), local_blocks, vert_stride, causal=causal,
                        num_dense_heads=num_dense_heads, head_offset=head_offset, homo_head=homo_head,
                        num_query_heads=hq, gqa_rule=gqa_rule, device=q.device)  # (Hkv, nb, nb)
        return GatherPlan(lay.repeat_interleave(g, dim=0).unsqueeze(0), block_size,  # (1, Hq, nb, nb)
                          _Causal() if causal else None)

    def reference_mask() -> torch.Tensor:
        return _reference_mask(hq, hkv, n, block_size, local_blocks, vert_stride, causal, num_dense_heads, phases)

    label = (f"s2(block={block_size}, local={local_blocks}, vert={vert_stride}, "
             f"{'causal' if causal else 'bidirectional'}, dense heads={num_dense_heads}"
             f"{f', GQA {hq}:{hkv} stripe step {gqa_rule}' if hq != hkv else ''})")
    return PerHeadCall(q, k, v, groups, resolve_scale(scale, q.shape[-1]), reference_mask, gather, label)


DISPATCHER = Dispatcher("s2_attention", BACKENDS)
register_op("s2_attention", make_call, DISPATCHER)


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, local_blocks: int,
                 vert_stride: int, *, causal: bool = True, num_dense_heads: int = 0, head_offset: int = 0,
                 homo_head: bool = False, gqa_rule: str = "dkernel", scale: float | None = None,
                 impl: str | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """S2-Attention (heterogeneous strided + local block-sparse heads).

    Args:
        q: ``(B, N, Hq, D)``; k: ``(B, N, Hkv, D)``; v: ``(B, N, Hkv, Dv)``. With GQA the pattern is
            indexed by the KV head and shared by its query group (keeps the KV savings).
        block_size: ``b``; local_blocks: ``l`` (incl. the current block); vert_stride: ``v``.
        causal, num_dense_heads, head_offset, homo_head: see :func:`s2_layout`.
        gqa_rule: under GQA, the stripe step between KV heads: ``"dkernel"`` (default, the released code:
            ``max(1, v // Hq)``) or ``"kv"`` (``max(1, v // Hkv)``, spreading the KV heads' stripes over the
            whole stride; attnkit's rule before it followed dkernel). Equal without GQA or when ``v <= Hkv``.
        scale: score scale, default ``D ** -0.5``.
        impl: older spelling of the path: ``"masked"`` or ``"gather"``
            (see ``attnkit.ops.per_head.call.resolve_backend``).
        backend: None (automatic: ``"masked"``, one ``ak.attention`` call per KV-head pattern),
            ``"masked"``, ``"sdpa"`` / ``"blocked"`` / ``"flex"`` (those calls forced onto that
            backend), ``"gather"`` (the per-head layout on the block-gather engine) or ``"reference"``;
            ``ak.explain("s2_attention", q, k, v, block_size=..., ...)`` says which and why.

    Returns:
        ``(B, N, Hq, Dv)``.

    Example:
        >>> q = k = v = torch.randn(1, 1024, 8, 32)
        >>> out = s2_attention(q, k, v, block_size=64, local_blocks=4, vert_stride=8)
    """
    path = resolve_backend(impl, backend)
    call = make_call(q, k, v, block_size, local_blocks, vert_stride, causal=causal, num_dense_heads=num_dense_heads,
                     head_offset=head_offset, homo_head=homo_head, gqa_rule=gqa_rule, scale=scale)
    return DISPATCHER.run(call, path)
