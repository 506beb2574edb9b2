"""Ring Attention with Blockwise Transformers for Near-Infinite Context, arXiv 2310.01889
(P2P ring, zigzag balancing as in "Long-Context Attention Benchmark", arXiv 2510.17896).

Each rank keeps its query shard and passes its K/V shard around the ring: at step i it holds the
block of rank ``(r - i) mod P``, computes that block's partial ``(out, lse)`` while the block
travels on, and merges the partials exactly in log-sum-exp form. The backward sends K/V round
again together with dK/dV accumulators that travel with their block and are home after P steps;
every block's flash backward uses the FINAL out and lse (per-step lse would give wrong grads).

Causal masks use global positions from the layout (:mod:`attnkit.distributed.zigzag`):
contiguous: blocks from later ranks are skipped, the own block is causal; zigzag (rank r holds
chunks r and 2P-1-r): own block causal, a block from s < r is seen by all local queries through its
first half, a block from s > r only by the second local query half (whole block), no masks.
"""

from __future__ import annotations

import torch

from attnkit._validate import assert_finite, check_qkv, resolve_scale
from attnkit.distributed import _comm
from attnkit.distributed.zigzag import LAYOUTS
from attnkit.kernels.fused import can_fuse, fused_ops
from attnkit.kernels.merge import merge_partials as merge  # empty blocks are (0, -inf)
from attnkit.kernels.nonfinite import causal_correction, finite_part

_ALL = slice(None)


def plan(rank: int, src: int, world: int, n_q: int, causal: bool, layout: str):
    """The (query slice, key slice, causal) pieces of block ``src`` that rank ``rank`` evaluates."""
    if not causal:
        return [(_ALL, _ALL, False)]
    if src == rank:
        return [(_ALL, _ALL, True)]  # local positions increase in both layouts
    if layout == "contiguous":
        return [(_ALL, _ALL, False)] if src < rank else []
    half = n_q // 2
    if src < rank:  # all local queries see that block's early chunk c_s (its first half)
        return [(_ALL, slice(0, half), False)]
    return [(slice(half, None), _ALL, False)]  # only our late chunk c_{2P-1-r} sees the block


def _causal_fill(s: torch.Tensor) -> torch.Tensor:
    nq, nk = s.shape[-2:]
    return s.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))


def block_forward(q, k, v, causal: bool, scale: float, acc: torch.dtype):
    """``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)`` -> ``(o, lse)`` in ``acc``.

    A causal (diagonal) block multiplies zero probabilities with the values above the diagonal, and
    ``0 * NaN = NaN``: it runs on the finite part of ``v`` and adds the non-finite values back to the
    queries at or after them (a running OR, O(N Dv)), so NaN propagates as in ``ak.attention``.
    """
    if causal:
        o, lse = _block_forward(q, k, finite_part(v), True, scale, acc)
        fix = causal_correction(v, dim=-2, dtype=acc)                      # (B, Hkv, Nk, Dv)
        return o + fix.repeat_interleave(q.shape[1] // k.shape[1], dim=1), lse
    return _block_forward(q, k, v, False, scale, acc)


def _block_forward(q, k, v, causal: bool, scale: float, acc: torch.dtype):
    if can_fuse(q, v):
        o, lse = fused_ops()[0](q, k, v, is_causal=causal, scale=scale)
        return o.to(acc), lse.to(acc)
    b, hq, nq, _ = q.shape
    hkv = k.shape[1]
    qg = q.to(acc).reshape(b, hkv, hq // hkv, nq, -1)                     # (B, Hkv, G, Nq, D)
    s = torch.matmul(qg, k.to(acc).unsqueeze(2).transpose(-1, -2)) * scale  # (B, Hkv, G, Nq, Nk)
    if causal:
        s = _causal_fill(s)
    lse = torch.logsumexp(s, dim=-1)                                       # (B, Hkv, G, Nq)
    p = torch.exp(s - lse.unsqueeze(-1))
    o = torch.matmul(p, v.to(acc).unsqueeze(2))                            # (B, Hkv, G, Nq, Dv)
    return o.reshape(b, hq, nq, -1), lse.reshape(b, hq, nq)


def block_backward(q, k, v, out, lse, dout, dlse, causal: bool, scale: float, acc: torch.dtype):
    """Flash backward of one block with the FINAL ``out (B, Hq, Nq, Dv)`` and ``lse (B, Hq, Nq)``;
    ``dlse`` (or None) is the gradient reaching the returned lse. Returns ``(dq, dk, dv)`` in ``acc``."""
    lse_safe = lse.masked_fill(torch.isneginf(lse), float("inf"))  # fully masked rows: P = 0
    if dlse is None and can_fuse(q, v):
        gq, gk, gv = fused_ops()[1](dout, q, k, v, out.to(q.dtype), lse_safe, 0.0, causal, scale=scale)
        return gq.to(acc), gk.to(acc), gv.to(acc)
    b, hq, nq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.to(acc).reshape(b, hkv, g, nq, -1)                              # (B, Hkv, G, Nq, D)
    kc, vc = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)               # (B, Hkv, 1, Nk, X)
    s = torch.matmul(qg, kc.transpose(-1, -2)) * scale                     # (B, Hkv, G, Nq, Nk)
    if causal:
        s = _causal_fill(s)
    p = torch.exp(s - lse_safe.reshape(b, hkv, g, nq, 1))
    do = dout.to(acc).reshape(b, hkv, g, nq, -1)                           # (B, Hkv, G, Nq, Dv)
    delta = (do * out.to(acc).reshape(b, hkv, g, nq, -1)).sum(-1, keepdim=True)
    dp = torch.matmul(do, vc.transpose(-1, -2))                            # (B, Hkv, G, Nq, Nk)
    ds = dp - delta
    if dlse is not None:  # d lse / d s_j = p_j
        ds = ds + dlse.to(acc).reshape(b, hkv, g, nq, 1)
    ds = p * ds
    dq = torch.matmul(ds, kc) * scale                                      # (B, Hkv, G, Nq, D)
    dk = torch.matmul(ds.transpose(-1, -2), qg).sum(2) * scale             # (B, Hkv, Nk, D)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(2)                      # (B, Hkv, Nk, Dv)
    return dq.reshape(b, hq, nq, -1), dk, dv


def _hf(x: torch.Tensor) -> torch.Tensor:
    """Heads-first view of a heads-last tensor: ``(B, N, H, X)`` -> ``(B, H, N, X)`` (no copy; the fused
    op and the matmuls take the strides, and buffers stay heads-last so sends need no copy)."""
    return x.transpose(1, 2)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, layout, scale, group):
        rank, world = _comm.rank_world(group)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        k, v = k.contiguous(), v.contiguous()                              # (B, Nk, Hkv, X), sent as is
        qh = _hf(q)                                                        # (B, Hq, Nq, D)
        b, hq, nq, _ = qh.shape
        out = lse = None  # (B, Hq, Nq, Dv), (B, Hq, Nq) once the first block is in
        kc, vc = k, v
        for i in range(world):
            if i < world - 1:  # the block travels on while we compute with it
                (kn, vn), wait = _comm.ring_shift_start([kc, vc], group)
            for qs, ks, c in plan(rank, (rank - i) % world, world, nq, causal, layout):
                ob, lb = block_forward(qh[:, :, qs], _hf(kc)[:, :, ks], _hf(vc)[:, :, ks], c, scale, acc)
                if out is None and qs == _ALL:  # step 0 covers every query row: nothing to merge yet
                    out, lse = ob, lb
                    continue
                if out is None:
                    out = qh.new_zeros((b, hq, nq, v.shape[-1]), dtype=acc)
                    lse = qh.new_full((b, hq, nq), float("-inf"), dtype=acc)
                out[:, :, qs], lse[:, :, qs] = merge(out[:, :, qs], lse[:, :, qs], ob, lb)
            if i < world - 1:
                wait()
                kc, vc = kn, vn
        out_q = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out_q, lse)
        ctx.cfg = (causal, layout, scale, group, acc)
        ctx.set_materialize_grads(False)
        return out_q.transpose(1, 2), lse.transpose(1, 2)                  # (B, Nq, Hq, Dv), (B, Nq, Hq)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, layout, scale, group, acc = ctx.cfg
        rank, world = _comm.rank_world(group)
        qh, nq = _hf(q), q.shape[1]
        doh = torch.zeros_like(out) if dout is None else _hf(dout).to(q.dtype)  # (B, Hq, Nq, Dv)
        dlh = None if dlse is None else _hf(dlse)                          # (B, Hq, Nq)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)              # (B, Nq, Hq, D)
        kc, vc = k, v
        incoming = wait_d = None  # dK/dV accumulators of the block we will hold next, on their way
        for i in range(world):
            if i < world - 1:
                (kn, vn), wait_kv = _comm.ring_shift_start([kc, vc], group)
            gk = torch.zeros(k.shape, dtype=acc, device=k.device)          # (B, Nk, Hkv, D): this step's part
            gv = torch.zeros(v.shape, dtype=acc, device=v.device)
            for qs, ks, c in plan(rank, (rank - i) % world, world, nq, causal, layout):
                bq, bk, bv = block_backward(qh[:, :, qs], _hf(kc)[:, :, ks], _hf(vc)[:, :, ks], out[:, :, qs],
                                            lse[:, :, qs], doh[:, :, qs], None if dlh is None else dlh[:, :, qs],
                                            c, scale, acc)
                _hf(dq)[:, :, qs] += bq
                _hf(gk)[:, :, ks] += bk
                _hf(gv)[:, :, ks] += bv
            if incoming is not None:  # the block's accumulators arrived while we computed its part
                wait_d()
                gk, gv = gk.add_(incoming[0]), gv.add_(incoming[1])
            if world > 1:  # pass them on with the block; after P shifts they are home
                incoming, wait_d = _comm.ring_shift_start([gk, gv], group)
            else:
                incoming = (gk, gv)
            if i < world - 1:
                wait_kv()
                kc, vc = kn, vn
        if world > 1:
            wait_d()
        dkc, dvc = incoming
        return dq.to(q.dtype), dkc.to(k.dtype), dvc.to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   layout: str = "contiguous", scale: float | None = None, group=None,
                   return_lse: bool = False):
    """Softmax attention over a sequence sharded across the ranks of ``group`` (P2P ring).

    Every rank of the group calls this with its own shards; all shards have equal shapes, and all
    ranks agree on whether q, k, v require grad (the backward is a collective: every rank runs it).

    Args:
        q: this rank's queries ``(B, Nq_local, Hq, D)``.
        k: this rank's keys ``(B, Nk_local, Hkv, D)``, ``Hq % Hkv == 0`` (GQA).
        v: this rank's values ``(B, Nk_local, Hkv, Dv)``.
        causal: causal self-attention over GLOBAL positions (needs ``Nq_local == Nk_local``);
            noncausal allows cross attention with ``Nq_local != Nk_local``.
        layout: how the sequence was sharded: ``"contiguous"`` or ``"zigzag"`` (balanced causal work;
            see :func:`attnkit.distributed.zigzag.shard`). Only matters when ``causal``.
        scale: score scale, default ``D ** -0.5``.
        group: process group, None = the default group.
        return_lse: also return this rank's log-sum-exp ``(B, Nq_local, Hq)``.

    Returns:
        ``out (B, Nq_local, Hq, Dv)`` (the rows of this rank's queries) in the input dtype, and with
        ``return_lse`` the lse (float32; float64 for float64 inputs; -inf for rows with no key).

    Non-finite inputs propagate exactly as in ``ak.attention``: to the queries that see them, no
    further. ``attnkit.check_finite(True)`` raises ``ValueError`` naming the argument instead.

    Example:
        >>> # inside torchrun / run_local, P ranks, x_full (B, N, H, D)
        >>> q = zigzag.shard(x_full, rank, P, "zigzag")
        >>> out = ring_attention(q, q, q, causal=True, layout="zigzag")   # this rank's rows
    """
    check_qkv(q, k, v)
    if layout not in LAYOUTS:
        raise ValueError(f"ring_attention: layout must be one of {LAYOUTS}, got {layout!r}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"ring_attention: causal needs q and k shards of one length, got Nq_local={q.shape[1]}, "
                         f"Nk_local={k.shape[1]} (cross attention is supported without causal)")
    if causal and layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"ring_attention: zigzag needs an even local length (two chunks), got {q.shape[1]}")
    _comm.check_same_shapes("ring_attention", group, q=q, k=k, v=v)
    assert_finite("ring_attention", q=q, k=k, v=v)  # only under the debug switch
    out, lse = _RingAttention.apply(q, k, v, bool(causal), layout, resolve_scale(scale, q.shape[-1]), group)
    return (out, lse) if return_lse else out
