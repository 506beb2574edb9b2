"""The blocked CPU backend: walk only non-empty tiles, dense math inside, online softmax across chunks.

Where the compiled tile kernel builds (``kernels/flash.py`` over ``kernels/native/flash_tiles_cpu.cpp``)
float32 / bfloat16 / float16 calls run on it, forward and backward; float64 (exact, for gradcheck),
``ATTNKIT_NATIVE=0`` and machines without a compiler run the torch-ops path below. ``explain`` says which.

FlexAttention has no backward on CPU, so this is ours to own. Per query tile the plan lists the
key chunks to visit (contiguous runs of non-empty key tiles, glued together up to ``max_keys``);
each chunk is one matmul ``(bq*G, D) x (D, w)``, the mask is applied only to the PARTIAL
columns, and FULL tiles run unmasked. The backward recomputes scores from the saved
log-sum-exp (FlashAttention-2's recipe), so memory is ``O(N)`` plus one tile's scores.

Internal layout: ``q (B, Hkv, Nq, G, D)`` so that one query tile of every query head of a KV
group is a contiguous ``(bq * G, D)`` matrix — GQA costs no copy of K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.kernels import flash as _flash
from attnkit.kernels import native as _native
from attnkit.kernels.fused import fused_check
from attnkit.kernels.nonfinite import any_nonfinite
from attnkit.ops.base import Backend
from attnkit.ops.dense import reference as _reference
from attnkit.ops.dense.blocked.groups import group_backward, group_forward, group_inference
from attnkit.ops.dense.blocked.plan import Chunk, Plan, build_plan

_NEG_INF = float("-inf")


# score entries one batched group may hold across batch and heads (32 MiB of float32)
_GROUP_SCORES = 8 << 20


def _group_budget(batch: int, heads: int) -> int:
    return max(1, _GROUP_SCORES // (batch * heads))


def tile_sizes(nq: int, nk: int) -> tuple[int, int, int]:
    """``(bq, bk, max_keys)``: 128-row query tiles, 64-key tiles for fine skipping, 4096 keys per chunk."""
    return min(128, nq), min(64, nk), 4096


def plan_for(mask, nq: int, nk: int, batch: int, heads: int, *, inference: bool,
             tiles: tuple[int, int, int] | None = None) -> Plan:
    """The (cached) plan a call runs: one chunk per row for inference (fused SDPA takes any width),
    rows split at ``max_keys`` for training (the backward recomputes one chunk's scores at a time)."""
    bq, bk, max_keys = tiles or tile_sizes(nq, nk)
    return build_plan(mask, nq, nk, bq, bk, 1 << 62 if inference else max_keys,
                      group_elements=_group_budget(batch, heads))


def _keys(t: torch.Tensor, c: Chunk) -> torch.Tensor:
    """Rows of ``t (B, Hkv, Nk, X)`` that chunk ``c`` visits: ``(B, Hkv, w, X)``."""
    return t[:, :, c.k0:c.k1] if c.index is None else t.index_select(2, c.index)


def _masked_scores(qt: torch.Tensor, kc: torch.Tensor, c: Chunk, scale: float, bq: int) -> torch.Tensor:
    """Scaled scores of one tile against one chunk, masked on its partial columns: ``(B, Hkv, bq, G, w)``."""
    b, hkv = qt.shape[:2]
    s = torch.matmul(qt, kc.transpose(-1, -2)).mul_(scale)               # (B, Hkv, bq*G, w)
    s = s.view(b, hkv, bq, -1, s.shape[-1])                              # (B, Hkv, bq, G, w)
    for c0, c1, allowed in c.partial:
        if allowed.dim() == 4:  # head-dependent mask (B|1, Hq|1, bq, w) -> (B|1, Hkv|1, bq, G|1, w)
            allowed = _heads_to_groups(allowed, hkv)
        else:                   # (bq, w) -> broadcast over G
            allowed = allowed[:, None, :]
        s[..., c0:c1].masked_fill_(~allowed, _NEG_INF)
    return s


def _heads_to_groups(allowed: torch.Tensor, hkv: int) -> torch.Tensor:
    bb, hh, bq, w = allowed.shape
    if hh == 1:
        return allowed.view(bb, 1, bq, 1, w)
    return allowed.view(bb, hkv, hh // hkv, bq, w).transpose(2, 3)       # (B, Hkv, bq, G, w)


def _forward(q, k, v, plan: Plan, scale: float):
    """q (B, Hkv, Nq, G, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hkv, Nq, G, Dv), lse (B, Hkv, Nq, G)."""
    b, hkv, nq, g, _ = q.shape
    dv = v.shape[-1]
    out = q.new_zeros(b, hkv, nq, g, dv)
    lse = q.new_full((b, hkv, nq, g), _NEG_INF)
    for grp in plan.groups:
        group_forward(q, k, v, grp, scale, out, lse)
    for q0, q1, chunks in plan.rows:
        bq = q1 - q0
        qt = q[:, :, q0:q1].reshape(b, hkv, bq * g, -1)                 # (B, Hkv, bq*G, D)
        m = l = acc = None
        for c in chunks:
            s = _masked_scores(qt, _keys(k, c), c, scale, bq)             # (B, Hkv, bq, G, w)
            m_c = s.amax(-1)
            m_new = m_c if m is None else torch.maximum(m, m_c)
            m_safe = torch.where(m_new == _NEG_INF, 0.0, m_new)           # empty rows: exp(-inf) = 0
            p = s.sub_(m_safe[..., None]).exp_()
            pv = torch.matmul(p.view(b, hkv, bq * g, -1), _keys(v, c)).view(b, hkv, bq, g, dv)
            if m is None:
                l, acc = p.sum(-1), pv
            else:
                alpha = torch.exp(m - m_safe)
                l = l * alpha + p.sum(-1)
                acc = acc * alpha[..., None] + pv
            m = m_new
        nonempty = l > 0
        out[:, :, q0:q1] = acc / torch.where(nonempty, l, 1.0)[..., None]
        m_safe = torch.where(m == _NEG_INF, 0.0, m)
        lse[:, :, q0:q1] = torch.where(nonempty, m_safe + torch.log(torch.where(nonempty, l, 1.0)), _NEG_INF)
    return out, lse


def _backward(q, k, v, out, lse, dout, dlse, plan: Plan, scale: float):
    b, hkv, _, g, _ = q.shape
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = (dout * out).sum(-1)                                          # (B, Hkv, Nq, G)
    if dlse is not None:
        delta = delta - dlse
    lse_safe = torch.where(lse == _NEG_INF, float("inf"), lse)          # empty rows -> P = 0
    for grp in plan.groups:
        group_backward(q, k, v, out, lse_safe, dout, delta, grp, scale, dq, dk, dv, fused=dlse is None)
    for q0, q1, chunks in plan.rows:
        bq = q1 - q0
        qt = q[:, :, q0:q1].reshape(b, hkv, bq * g, -1)                 # (B, Hkv, bq*G, D)
        dot = dout[:, :, q0:q1].reshape(b, hkv, bq * g, -1)             # (B, Hkv, bq*G, Dv)
        dqt = torch.zeros_like(qt)
        for c in chunks:
            kc, vc = _keys(k, c), _keys(v, c)
            s = _masked_scores(qt, kc, c, scale, bq)                      # (B, Hkv, bq, G, w)
            p = s.sub_(lse_safe[:, :, q0:q1, :, None]).exp_().view(b, hkv, bq * g, -1)
            dvc = torch.matmul(p.transpose(-1, -2), dot)                  # (B, Hkv, w, Dv)
            dp = torch.matmul(dot, vc.transpose(-1, -2))                  # (B, Hkv, bq*G, w)
            ds = p.mul_(dp.sub_(delta[:, :, q0:q1].reshape(b, hkv, bq * g, 1))).mul_(scale)
            dqt += torch.matmul(ds, kc)
            dkc = torch.matmul(ds.transpose(-1, -2), qt)                  # (B, Hkv, w, D)
            if c.index is None:
                dk[:, :, c.k0:c.k1] += dkc
                dv[:, :, c.k0:c.k1] += dvc
            else:
                dk.index_add_(2, c.index, dkc)
                dv.index_add_(2, c.index, dvc)
        dq[:, :, q0:q1] = dqt.view(b, hkv, bq, g, -1)
    return dq, dk, dv


def _forward_sdpa_tiles(q, k, v, plan: Plan, scale: float, gqa: bool) -> torch.Tensor:
    """Inference path: one fused SDPA call per query tile on its (gathered) keys with the tile's small mask.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv). The plan must have
    one chunk per row (built with unbounded ``max_keys``). SDPA's fused softmax beats our
    multi-pass one by ~30% here; it returns no log-sum-exp, so training uses :func:`_forward`.
    """
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    for grp in plan.groups:
        group_inference(q, k, v, grp, scale, gqa, out)
    for q0, q1, (c,) in plan.rows:
        allowed = _tile_mask(c, q1 - q0) if c.partial else None
        empty = None
        if allowed is not None:
            empty = ~allowed.any(-1, keepdim=True)                         # (.., bq, 1)
            allowed = allowed | empty if bool(empty.any()) else allowed
        o = F.scaled_dot_product_attention(q[:, :, q0:q1], _keys(k, c), _keys(v, c), attn_mask=allowed,
                                           scale=scale, enable_gqa=gqa)   # (B, Hq, bq, Dv)
        out[:, :, q0:q1] = o if empty is None else o.masked_fill(empty, 0.0)
    return out


def _tile_mask(c: Chunk, bq: int) -> torch.Tensor:
    """A chunk's whole mask, True outside its partial ranges: ``(bq, w)``, or ``(B|1, Hq|1, bq, w)``
    when the mask is head-dependent."""
    lead = torch.broadcast_shapes(*(a.shape[:-2] for _, _, a in c.partial))
    allowed = torch.ones(*lead, bq, c.width, dtype=torch.bool)
    for c0, c1, a in c.partial:
        allowed[..., c0:c1] = a
    return allowed


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        out, lse = _forward(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        ctx.set_materialize_grads(False)  # dlse stays None unless the caller differentiates the lse
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None


def blocked_attention(q, k, v, mask, scale: float, *, tiles: tuple[int, int, int] | None = None):
    """Blocked attention on heads-last inputs; returns ``(out (B, Nq, Hq, Dv), lse (B, Nq, Hq))``.

    Half-precision inputs are computed in float32 (CPU matmuls accumulate there anyway) and the
    output cast back; float64 stays float64 so gradcheck runs on this path.
    """
    bsz, nq, hq, d = q.shape
    nk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    plan = plan_for(mask, nq, nk, bsz, hq, inference=False, tiles=tiles)
    qi = q.to(work).view(bsz, nq, hkv, g, d).permute(0, 2, 1, 3, 4).contiguous()   # (B, Hkv, Nq, G, D)
    ki = k.to(work).permute(0, 2, 1, 3).contiguous()                                 # (B, Hkv, Nk, D)
    vi = v.to(work).permute(0, 2, 1, 3).contiguous()                                 # (B, Hkv, Nk, Dv)
    out, lse = _BlockedAttention.apply(qi, ki, vi, plan, scale)
    out = out.permute(0, 2, 1, 3, 4).reshape(bsz, nq, hq, dv).to(q.dtype)           # (B, Nq, Hq, Dv)
    lse = lse.permute(0, 2, 1, 3).reshape(bsz, nq, hq)                              # (B, Nq, Hq)
    return out, lse


def _supports(call):
    # plans, tile masks and key indices are built on the CPU and indexed into the inputs
    if call.q.device.type != "cpu":
        return False, f"needs CPU tensors, got {call.q.device.type}"
    return True, ""


def native_tiles(call, build: bool = True) -> str | None:
    """None when the call runs on the compiled tile kernel, else why not (``build=False``: never builds)."""
    return _flash.native_reason(call.q, build=build)


def kernel_tiles(nq: int, nk: int, hq: int, hkv: int) -> tuple[int, int]:
    """``(bq, bk)`` of the compiled kernel's tile list."""
    return _flash.tile_sizes(nq, nk, hq // hkv)


def _run_native(call):
    bq, bk = kernel_tiles(call.nq, call.nk, call.hq, call.hkv)
    tl = _flash.tile_list(call.mask, call.nq, call.nk, bq, bk, call.hkv)
    out, lse = _flash.flash_attention(call.q, call.k, call.v, tl, call.scale)
    return (out, lse) if call.return_lse else out


def _inference(call) -> bool:
    """The forward-only path: nothing to differentiate and no lse to return."""
    return not call.needs_grad and not call.return_lse


def _detail(call) -> str:
    why_not = native_tiles(call, build=False)
    if why_not is None:
        path = "forward only" if _inference(call) else "forward + hand-written backward, lse float32"
        low = call.q.dtype in (torch.float16, torch.bfloat16)
        half = " (half inputs upcast to float32 tile by tile)" if low else ""
        return f"compiled tile kernel (attnkit.kernels.native: {_native.status()}): {path}{half}"
    prefix = f"torch-ops path ({why_not}); "
    return prefix + _detail_torch(call)


def _detail_torch(call) -> str:
    if _inference(call):
        return "inference (fused SDPA per tile): no input needs a gradient and no lse is asked"
    why = "an input needs a gradient" if call.needs_grad else "the lse is asked"
    upcast = " in float32" if call.q.dtype in (torch.float16, torch.bfloat16) else ""
    ok, no_fuse = fused_check(call.q, call.v)
    groups = "fused CPU flash op" if ok else f"matmul softmax ({no_fuse})"
    return f"training (online softmax + lse{upcast}, hand-written backward; tile groups: {groups}): {why}"


def _run(call):
    if native_tiles(call) is None:
        return _run_native(call)
    if call.q.device.type == "cpu" and any_nonfinite(call.q, call.k, call.v):
        # the torch-ops path multiplies masked probabilities by V (0 * NaN = NaN); the compiled kernel
        # handles non-finite inputs itself, this fallback hands them to the exact reference
        return _reference.BACKEND.run(call)
    if _inference(call):
        plan = plan_for(call.mask, call.nq, call.nk, call.batch, call.hq, inference=True)
        q, k, v = (t.transpose(1, 2) for t in (call.q, call.k, call.v))  # (B, H, N, D)
        return _forward_sdpa_tiles(q, k, v, plan, call.scale, call.hq != call.hkv).transpose(1, 2)
    out, lse = blocked_attention(call.q, call.k, call.v, call.mask, call.scale)
    return (out, lse) if call.return_lse else out


BACKEND = Backend(name="blocked", run=_run, supports=_supports, detail=_detail,
                  note="tiles with online softmax; skips empty tiles, masks only partial ones")
