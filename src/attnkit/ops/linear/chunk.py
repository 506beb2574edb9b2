"""Chunked causal linear attention with decay: Lightning Attention-2 tiling in log space.

"Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language
Models", arXiv 2401.04658; "Various Lengths, Constant Speed: Efficient Language Modeling with
Lightning Attention", arXiv 2405.17381. Math: the forward and backward passes of arXiv 2401.04658
(Algorithms 1 and 2), written with a cumulative log-decay inside each chunk.

Chunk c holds C positions with cumulative in-chunk log-decay ``b_i`` (restarted every chunk,
so there is no cumsum over N and every exponent is <= 0):

    intra:  O_c  = [(Q_c K_c^T) * exp(b_i - b_j) [j <= i]] V_c            (C x C masked matmul)
    inter:  O_c += exp(b_i) Q_c S_{c-1}                                   (carried state)
    state:  S_c  = exp(b_C) S_{c-1} + (exp(b_C - b_j) K_c)^T V_c

Work is batched over the chunks of a *segment* of ``segment`` tokens (a few thousand); segments
are walked sequentially. Inside a segment each (batch, head) runs batched matmuls directly on
strided views of the heads-last inputs and writes straight into the heads-last outputs (BLAS takes
the row stride H*D), so q, k, v, o are never permuted or copied (GQA: a query head reads its kv
head's view). The state recursion over the chunks of a segment runs in two levels (a small matmul
inside groups of 8 chunks, a sequential carry between groups), batched over (batch, head); the
backward runs the same scan on the flipped chunks.

Two implementations of the same algorithm and contract. Where ``attnkit.kernels.native`` can build its C++
kernel (``kernels/native/linear_chunk_cpu.cpp``: fp32/fp64 CPU inputs, a C++ compiler) forward and backward run
there: one thread walks the chunks of one head in order with the state in cache, so no intermediate
leaves the cache and no prefix scan is needed (linear benchmark, now ``attnkit bench --suite linear``:
N=16384 forward 58-65 ms vs 89-114 ms for the torch-ops path, fwd+bwd 263 vs 400 ms; bf16 inputs,
upcast to fp32 as a whole: 67 vs 94 ms, fwd+bwd 273 vs 433 ms). Otherwise (no compiler,
``ATTNKIT_NATIVE=0``, a strided feature dim) the torch-ops path below runs; ``ak.explain`` says which
and why. Both save the same segment-entry states, so either backward can follow either forward.

Memory: forward+backward keep only q, k, v (the caller's tensors, not copies), the log-decay and
one state per segment (``(N / segment) * B*H*D*Dv``); every per-chunk tensor (scores, chunk
states) lives for one segment, so extra memory is O(segment * (C + D) * H) regardless of N. The
backward is hand-written (Lightning-2 algorithm generalised to per-token log-decay, including the
decay gradient) and recomputes the chunk states of a segment from the stored segment state.
At B=1, H=8, D=Dv=64, fp32, segment 4096 the per-segment workspace is ~50 MiB (chunk states U, P,
their gradients W, R: 8 MiB each; one head's C x C tiles); the linear benchmark suite measured a
peak RSS of 1.37 GiB for forward+backward at N=65536, of which q, k, v, dO, o, dq, dk, dv are 1 GiB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.kernels import native as _native
from attnkit.kernels.alloc import recycle_work_buffers


def _seg(x: torch.Tensor, s: int, e: int, lpad: int, cdt: torch.dtype) -> torch.Tensor:
    """Tokens [s, e) of a heads-last tensor in ``cdt`` with ``lpad`` rows: a view when possible, else a copy."""
    if x.dtype == cdt and lpad == e - s and x.stride(-1) == 1:
        return x[:, s:e]
    buf = x.new_zeros((x.shape[0], lpad, *x.shape[2:]), dtype=cdt)  # (B, Lpad, Hx, D); padded rows are 0
    buf[:, : e - s] = x[:, s:e]
    return buf


def _decays(g: torch.Tensor | None, s: int, e: int, lpad: int, c: int, H: int, cdt: torch.dtype):
    """In-chunk decays of tokens [s, e): (qdec, kdec, cdec, Dm, lend) or None when there is no decay.

    qdec (Bg, H, nc, C) = exp(b_i); kdec = exp(b_end - b_j); cdec (Bg, H, nc) = exp(b_end), lend = b_end;
    Dm (Bg, H, nc or 1, C, C) = exp(b_i - b_j) for j <= i, else 0. Padded positions get log-decay 0,
    so b_end of a ragged last chunk is the decay up to its last real token.
    """
    if g is None:
        return None
    L, nc = e - s, lpad // c
    per_token = g.dim() == 3
    if per_token:
        gs = g[:, s:e].permute(0, 2, 1).to(cdt)  # (B, H, L)
    else:
        gs = g.to(cdt)[None, :, None].expand(1, H, L)  # (1, H, L)
    if lpad > L:
        gs = F.pad(gs, (0, lpad - L))
    b = gs.reshape(gs.shape[0], H, nc, c).cumsum(-1)  # (Bg, H, nc, C), restarted every chunk
    bend = b[..., -1:]  # (Bg, H, nc, 1)
    qdec, kdec, cdec = b.exp(), (bend - b).exp(), bend[..., 0].exp()
    lend = bend[..., 0]
    # constant decay: exp(b_i - b_j) depends on i - j only, so chunk 0's matrix serves every chunk
    bb = b if per_token else b[:, :, :1]
    diff = bb[..., :, None] - bb[..., None, :]  # (Bg, H, nc|1, C, C)
    tril = torch.ones(c, c, dtype=torch.bool).tril()
    Dm = diff.masked_fill(~tril, float("-inf")).exp()  # mask BEFORE exp: the upper part is >= 0
    return qdec, kdec, cdec, Dm, lend


def _tril(c: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.ones(1, 1, 1, c, c, dtype=dtype).tril_()  # (1, 1, 1, C, C)


def _views(xs: torch.Tensor, b: int, h: int, c: int) -> torch.Tensor:
    """Head h of batch b of a heads-last segment as chunks ``(nc, C, D)`` (a strided view, no copy)."""
    return xs[b, :, h].view(-1, c, xs.shape[-1])  # (nc, C, D), row stride Hx*D


GROUP = 8  # chunks per group of the two-level state scan


def _prefix_states(U: torch.Tensor, S: torch.Tensor, lend: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """States before every chunk and after the last, for ``S_c = exp(lend_c) S_{c-1} + U_c``.

    ``U (B, H, nc, D, Dv)``, ``S (B, H, D, Dv)``, ``lend (Bg, H, nc)`` or None (no decay). Returns
    ``(P (B, H, nc, D, Dv), S_end (B, H, D, Dv))``. Two levels: the recursion runs from a zero
    state inside every group of GROUP chunks at once (GROUP ops over all groups), then the group
    entry states are carried sequentially (nc / GROUP small ops) and added with their decay
    ``exp(Bc[i])`` (``Bc`` the cumulative log decay inside the group, <= 0). That is ~2 nc / GROUP
    ops over the states instead of nc, which mattered: the states are 8 MiB per segment.
    """
    B, H, nc, D, Dv = U.shape
    g = GROUP
    ng = -(-nc // g)
    pad = ng * g - nc
    Uf = U.view(B, H, nc, D * Dv)
    if pad:
        Uf = F.pad(Uf, (0, 0, 0, pad))
    Ug = Uf.view(B, H, ng, g, D * Dv)  # (B, H, ng, g, D*Dv)
    l = torch.zeros(1, 1, ng * g, dtype=U.dtype) if lend is None else F.pad(lend, (0, pad))
    eB = F.pad(l.reshape(*l.shape[:2], ng, g).cumsum(-1), (1, 0)).exp()  # (Bg, H, ng, g + 1) = exp(Bc)
    # inside each group: P[i + 1] = exp(l_i) P[i] + U_i from P[0] = 0, all groups and heads at once
    # (a loop of g elementwise ops; a (g x g) @ (g x D*Dv) bmm is far slower, BLAS handles K = 8 badly)
    cd = l.reshape(*l.shape[:2], ng, g).exp()[..., None]  # (Bg, H, ng, g, 1)
    P = torch.empty(B, H, ng, g, D * Dv, dtype=U.dtype)
    P[:, :, :, 0] = 0
    for i in range(g - 1):
        torch.addcmul(Ug[:, :, :, i], cd[:, :, :, i], P[:, :, :, i], out=P[:, :, :, i + 1])
    ends = torch.addcmul(Ug[:, :, :, g - 1:], cd[:, :, :, g - 1:], P[:, :, :, g - 1:])  # (B, H, ng, 1, D*Dv)
    gdec = eB[..., g]  # (Bg, H, ng) decay across a whole group
    carry = S.reshape(B, H, D * Dv)
    Sin = torch.empty(B, H, ng, D * Dv, dtype=U.dtype)
    for j in range(ng):
        Sin[:, :, j] = carry
        carry = torch.addcmul(ends[:, :, j, 0], gdec[:, :, j, None], carry)
    P.addcmul_(eB[..., :g, None], Sin[:, :, :, None])  # + exp(Bc[i]) * entry state of the group
    return P.view(B, H, ng * g, D, Dv)[:, :, :nc], carry.view(B, H, D, Dv)


def _state_updates(Ks, Vs, dec, B, H, rep, c, cdt):
    """U[b, h, i] = (kdec * K_chunk)^T V_chunk for every chunk: (B, H, nc, D, Dv) (each U[b, h] contiguous:
    bmm into a batch-strided ``out`` falls back to one gemm per chunk)."""
    nc, D, Dv = Ks.shape[1] // c, Ks.shape[-1], Vs.shape[-1]
    U = torch.empty(B, H, nc, D, Dv, dtype=cdt)
    for b in range(B):
        for h in range(H):
            K, V = _views(Ks, b, h // rep, c), _views(Vs, b, h // rep, c)
            if dec is not None:
                K = K * dec[1][b if dec[1].shape[0] > 1 else 0, h, :, :, None]
            torch.bmm(K.transpose(1, 2), V, out=U[b, h])
    return U


# the kernel computes in fp32 (fp64 for fp64); half inputs are upcast as a whole, which costs a transient
# fp32 copy of q, k, v but runs ~1.5x faster than the torch-ops path that upcasts one segment at a time
_KERNEL_DTYPE = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32,
                 torch.float16: torch.float32}


def _kernel_inputs(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x if x.dtype == _KERNEL_DTYPE[x.dtype] else x.to(_KERNEL_DTYPE[x.dtype]) for x in xs]


def native_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, build: bool = True) -> str | None:
    """None when the compiled forward (``kernels/native/linear_chunk_cpu.cpp``) takes these inputs, else why not.

    ``build=False`` never triggers the build (for ``explain``): an unbuilt kernel counts as usable.
    """
    if q.device.type != "cpu":
        return f"inputs on {q.device.type}"
    if q.dtype not in _KERNEL_DTYPE or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} (the kernel takes one float dtype)"
    if _KERNEL_DTYPE[q.dtype] == q.dtype and min(x.stride(-1) for x in (q, k, v)) != 1:
        return "feature dim not contiguous"
    if build:
        _native.available()
    st = _native.status()
    return None if st in ("loaded", _native.NOT_BUILT) else f"native kernel {st}"


class _ChunkLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, c, seg, out_dtype, native):
        ctx.native = native and native_reason(q, k, v) is None
        if ctx.native:
            qc, kc, vc = _kernel_inputs(q, k, v)
            empty = qc.new_empty(0)
            o, S, bounds = _native.ops().linear_chunk_fwd(qc, kc, vc, empty if g is None else g,
                                                          empty if s0 is None else s0, scale, c, seg)
            ctx.save_for_backward(q, k, v, g, bounds)  # the caller's tensors: half inputs are upcast again
            ctx.conf = (scale, c, seg, s0 is not None)
            return o.to(out_dtype), S
        recycle_work_buffers()
        B, N, H, D = q.shape
        rep, Dv = H // k.shape[2], v.shape[-1]
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        S = torch.zeros(B, H, D, Dv, dtype=cdt) if s0 is None else s0.to(cdt)
        o = torch.empty(B, N, H, Dv, dtype=out_dtype)
        bounds = []
        for s in range(0, N, seg):
            e = min(s + seg, N)
            lpad = -(-(e - s) // c) * c
            bounds.append(S)
            Qs, Ks, Vs = (_seg(x, s, e, lpad, cdt) for x in (q, k, v))  # (B, Lpad, H|Hkv, D) heads-last
            Os = o[:, s:e] if (out_dtype == cdt and lpad == e - s) else torch.empty(B, lpad, H, Dv, dtype=cdt)
            dec = _decays(g, s, e, lpad, c, H, cdt)
            Dm = (_tril(c, cdt).expand(1, H, 1, c, c) if dec is None else dec[3]) * scale  # scale rides on the tile
            U = _state_updates(Ks, Vs, dec, B, H, rep, c, cdt)
            P, S = _prefix_states(U, S, None if dec is None else dec[4])  # (B, H, nc, D, Dv)
            for b in range(B):
                bg = b if Dm.shape[0] > 1 else 0
                for h in range(H):
                    Q, K, V = _views(Qs, b, h, c), _views(Ks, b, h // rep, c), _views(Vs, b, h // rep, c)
                    A = torch.bmm(Q, K.transpose(1, 2)).mul_(Dm[bg, h])  # (nc, C, C) masked, decayed, scaled
                    Qd = Q * scale if dec is None else Q * (dec[0][bg, h, :, :, None] * scale)
                    # inter + intra in one contiguous buffer (baddbmm_ on a strided self would run one
                    # addmm per chunk), then a single strided copy into the heads-last output
                    _views(Os, b, h, c).copy_(torch.bmm(Qd, P[b, h]).baddbmm_(A, V))
            if Os.data_ptr() != o[:, s:e].data_ptr():
                o[:, s:e] = Os[:, : e - s]
        ctx.save_for_backward(q, k, v, g, torch.stack(bounds))
        ctx.conf = (scale, c, seg, s0 is not None)
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, g, bounds = ctx.saved_tensors
        scale, c, seg, has_s0 = ctx.conf
        if ctx.native:
            need_g = g is not None and ctx.needs_input_grad[3]
            qc, kc, vc = _kernel_inputs(q, k, v)
            empty = qc.new_empty(0)
            do = do.to(qc.dtype)
            if do.stride(-1) != 1:
                do = do.contiguous()
            dq, dk, dv, dgt, ds0 = _native.ops().linear_chunk_bwd(
                qc, kc, vc, empty if g is None else g, do, bounds.to(qc.dtype).contiguous(),
                empty if dS is None else dS, scale, c, seg, need_g)
            dg = None
            if need_g:
                dg = (dgt if g.dim() == 3 else dgt.sum((0, 1))).to(g.dtype)  # per token (B, N, H) or per head
            return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, ds0 if has_s0 else None,
                    None, None, None, None, None)
        B, N, H, D = q.shape
        Hkv, Dv = k.shape[2], v.shape[-1]
        rep = H // Hkv
        cdt = bounds.dtype
        need_g = g is not None and ctx.needs_input_grad[3]
        do = do.contiguous()
        dq = torch.empty(B, N, H, D, dtype=cdt)
        dk = torch.empty(B, N, Hkv, D, dtype=cdt)
        dv = torch.empty(B, N, Hkv, Dv, dtype=cdt)
        dg = torch.zeros(g.shape, dtype=cdt) if need_g else None
        dS = torch.zeros(B, H, D, Dv, dtype=cdt) if dS is None else dS.to(cdt)
        starts = list(range(0, N, seg))
        for i in reversed(range(len(starts))):
            s = starts[i]
            e = min(s + seg, N)
            L = e - s
            lpad = -(-L // c) * c
            direct = lpad == L
            Qs, Ks, Vs, dOs = (_seg(x, s, e, lpad, cdt) for x in (q, k, v, do))
            dQs = dq[:, s:e] if direct else torch.zeros(B, lpad, H, D, dtype=cdt)
            dKs = dk[:, s:e] if direct else torch.zeros(B, lpad, Hkv, D, dtype=cdt)
            dVs = dv[:, s:e] if direct else torch.zeros(B, lpad, Hkv, Dv, dtype=cdt)
            dec = _decays(g, s, e, lpad, c, H, cdt)
            nc = lpad // c
            Dm = (_tril(c, cdt).expand(1, H, 1, c, c) if dec is None else dec[3]) * scale
            cdec = None if dec is None else dec[2]
            lend = None if dec is None else dec[4]
            P, _ = _prefix_states(_state_updates(Ks, Vs, dec, B, H, rep, c, cdt), bounds[i], lend)  # (B, H, nc, D, Dv)
            # W[j] = dL/dS_{j-1} through chunk j's inter term. The reverse recursion T[j] = W[j] + cd[j] T[j+1]
            # (T[nc] = incoming dS) is the forward scan on the flipped chunks; R[j] = T[j+1] = dL/d(state after j)
            W = torch.empty(B, H, nc, D, Dv, dtype=cdt)
            for b in range(B):
                bg = b if Dm.shape[0] > 1 else 0
                for h in range(H):
                    Q, dO = _views(Qs, b, h, c), _views(dOs, b, h, c)
                    Qd = Q * scale if dec is None else Q * (dec[0][bg, h, :, :, None] * scale)
                    torch.bmm(Qd.transpose(1, 2), dO, out=W[b, h])
            Rf, dS = _prefix_states(W.flip(2), dS, None if lend is None else lend.flip(-1))
            R = Rf.flip(2)  # (B, H, nc, D, Dv)
            gb = torch.empty(B, H, nc, c, dtype=cdt) if need_g else None
            gend = torch.empty(B, H, nc, dtype=cdt) if need_g else None
            for b in range(B):
                bg = b if Dm.shape[0] > 1 else 0
                for h in range(H):
                    hk = h // rep
                    Q, K, V, dO = (_views(Qs, b, h, c), _views(Ks, b, hk, c), _views(Vs, b, hk, c),
                                   _views(dOs, b, h, c))
                    A = torch.bmm(Q, K.transpose(1, 2)).mul_(Dm[bg, h])  # (nc, C, C), as in forward
                    dP = torch.bmm(dO, V.transpose(1, 2))  # (nc, C, C): dL/dA
                    X = torch.bmm(dO, P[b, h].transpose(1, 2))  # (nc, C, D) = dO S_{c-1}^T
                    Y = torch.bmm(V, R[b, h].transpose(1, 2))  # (nc, C, D) = V dS_c^T
                    if need_g:
                        M = dP * A
                        kterm = dec[1][bg, h] * (K * Y).sum(-1)  # (nc, C): through exp(b_end - b_j)
                        gb[b, h] = M.sum(-1) - M.sum(-2) - kterm
                        gb[b, h] += (dec[0][bg, h] * scale) * (Q * X).sum(-1)  # through exp(b_i), inter
                        gend[b, h] = kterm.sum(-1) + cdec[bg, h] * (R[b, h] * P[b, h]).sum((-1, -2))
                    dP.mul_(Dm[bg, h])
                    if dec is None:
                        X.mul_(scale)
                        Kd = K
                    else:
                        X.mul_(dec[0][bg, h, :, :, None] * scale)
                        Y.mul_(dec[1][bg, h, :, :, None])
                        Kd = K * dec[1][bg, h, :, :, None]
                    # products go straight into the heads-last grads (bmm takes a strided out, baddbmm
                    # would loop addmm per chunk); the second term is added in place
                    torch.bmm(dP, K, out=_views(dQs, b, h, c)).add_(X)
                    KdR = torch.bmm(Kd, R[b, h])  # (nc, C, Dv)
                    if rep == 1:
                        torch.bmm(dP.transpose(1, 2), Q, out=_views(dKs, b, hk, c)).add_(Y)
                        torch.bmm(A.transpose(1, 2), dO, out=_views(dVs, b, hk, c)).add_(KdR)
                        continue
                    dK = torch.baddbmm(Y, dP.transpose(1, 2), Q)  # (nc, C, D)
                    dV = torch.baddbmm(KdR, A.transpose(1, 2), dO)  # (nc, C, Dv)
                    if h % rep == 0:  # GQA: the group's first head writes, the others add
                        _views(dKs, b, hk, c).copy_(dK)
                        _views(dVs, b, hk, c).copy_(dV)
                    else:
                        _views(dKs, b, hk, c).add_(dK)
                        _views(dVs, b, hk, c).add_(dV)
            if need_g:
                gb[..., -1] += gend
                dgs = gb.flip(-1).cumsum(-1).flip(-1)  # b_i = sum_{r<=i} g_r  =>  dg_r = sum_{i>=r} db_i
                dgs = dgs.reshape(B, H, lpad)[:, :, :L]  # (B, H, L)
                if g.dim() == 3:
                    dg[:, s:e] = dgs.permute(0, 2, 1)
                else:
                    dg += dgs.sum((0, 2))
            if not direct:
                dq[:, s:e], dk[:, s:e], dv[:, s:e] = dQs[:, :L], dKs[:, :L], dVs[:, :L]
        ds0 = dS if has_s0 else None
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dg is None else dg.to(g.dtype),
                ds0, None, None, None, None, None)


def chunk_linear_attention(q, k, v, g=None, initial_state=None, *, scale=1.0, chunk_size=64, segment=4096,
                           out_dtype=None, native=True):
    """Causal (decayed) linear attention, chunked; the core of the ``"chunk"`` backend.

    Args:
        q: ``(B, N, H, D)`` feature-mapped queries (``scale`` is applied inside, no copy of q is kept).
        k: ``(B, N, Hkv, D)`` feature-mapped keys; ``H % Hkv == 0``.
        v: ``(B, N, Hkv, Dv)``.
        g: log-decay ``(H,)`` or ``(B, N, H)``, values <= 0, or None.
        initial_state: ``(B, H, D, Dv)`` or None.
        scale: multiplies q.
        chunk_size: tokens per chunk C (the C x C intra tile).
        segment: tokens processed together (rounded up to a multiple of C); bounds extra memory.
        out_dtype: dtype of ``o`` (default q's).
        native: use the compiled kernel when it can run (``native_reason``); False forces the torch-ops
            path (benchmarks compare the two).

    Returns:
        ``(o (B, N, H, Dv), S_N (B, H, D, Dv))``; the state is float32 (float64 for float64 inputs).

    Example:
        >>> o, S = chunk_linear_attention(q, k, v, torch.full((H,), -0.1))
    """
    seg = max(chunk_size, (segment // chunk_size) * chunk_size)
    return _ChunkLinearAttention.apply(q, k, v, g, initial_state, float(scale), int(chunk_size), seg,
                                       out_dtype or q.dtype, bool(native))
