"""Chunked causal linear attention with decay: Lightning Attention-2 tiling in log space.

"Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language
Models", arXiv 2401.04658; "Various Lengths, Constant Speed: Efficient Language Modeling with
Lightning Attention", arXiv 2405.17381. Math: papers/linear.md §0.4, §3.2, §3.3.

Chunk c holds C positions with cumulative in-chunk log-decay ``b_i`` (restarted every chunk,
so there is no cumsum over N and every exponent is <= 0):

    intra:  O_c  = [(Q_c K_c^T) * exp(b_i - b_j) [j <= i]] V_c            (C x C masked matmul)
    inter:  O_c += exp(b_i) Q_c S_{c-1}                                   (carried state)
    state:  S_c  = exp(b_C) S_{c-1} + (exp(b_C - b_j) K_c)^T V_c

Work is vectorised over the chunks of a *segment* of ``segment`` tokens (a few thousand), and
segments are walked sequentially; only the state recursion is a Python loop over chunks.

Memory: forward+backward keep only q, k, v (the caller's tensors, not copies), the log-decay and
one state per segment (``(N / segment) * B*H*D*Dv``); every per-chunk tensor (scores, chunk
states) lives for one segment, so extra memory is O(segment * (C + D) * H) regardless of N. The
backward is hand-written (Lightning-2 algorithm generalised to per-token log-decay, including the
decay gradient) and recomputes the chunk states of a segment from the stored segment state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunks(x: torch.Tensor, s: int, e: int, rep: int, lpad: int, c: int, cdt: torch.dtype) -> torch.Tensor:
    """Tokens [s, e) of a heads-last tensor as ``(B, H, nc, C, D)`` in ``cdt``; kv heads repeated, padded."""
    B, _, _, D = x.shape
    xs = x[:, s:e].permute(0, 2, 1, 3)  # (B, Hx, L, D)
    if rep > 1:
        xs = xs.repeat_interleave(rep, dim=1)  # (B, H, L, D): query head h reads kv head h // rep
    if lpad > e - s:
        xs = F.pad(xs, (0, 0, 0, lpad - (e - s)))
    return xs.to(cdt).contiguous().view(B, xs.shape[1], lpad // c, c, D)  # (B, H, nc, C, D)


def _decays(g: torch.Tensor | None, s: int, e: int, lpad: int, c: int, H: int, cdt: torch.dtype):
    """In-chunk decays of tokens [s, e): (qdec, kdec, cdec, Dm) or None when there is no decay.

    qdec (Bg, H, nc, C) = exp(b_i); kdec = exp(b_end - b_j); cdec (Bg, H, nc) = exp(b_end);
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
    # constant decay: exp(b_i - b_j) depends on i - j only, so chunk 0's matrix serves every chunk
    bb = b if per_token else b[:, :, :1]
    diff = bb[..., :, None] - bb[..., None, :]  # (Bg, H, nc|1, C, C)
    tril = torch.ones(c, c, dtype=torch.bool).tril()
    Dm = diff.masked_fill(~tril, float("-inf")).exp()  # mask BEFORE exp: the upper part is >= 0
    return qdec, kdec, cdec, Dm


def _scan_states(U, S, cdec):
    """States before each chunk: Sprev[:, :, c] = S_{c-1}; returns (Sprev, S after the last chunk)."""
    if cdec is None:
        Sprev = torch.cumsum(U, dim=2) - U + S[:, :, None]  # exclusive prefix sum, (B, H, nc, D, Dv)
        return Sprev, Sprev[:, :, -1] + U[:, :, -1]
    Sprev = torch.empty_like(U)
    cd = cdec[..., None, None]  # (Bg, H, nc, 1, 1)
    for i in range(U.shape[2]):
        Sprev[:, :, i] = S
        S = torch.addcmul(U[:, :, i], cd[:, :, i], S)  # S_c = exp(b_C) S_{c-1} + U_c
    return Sprev, S


def _bmm(a, b):
    """Batched matmul of (..., m, k) @ (..., k, n) on the flattened batch (broadcast-free, fast path)."""
    return torch.matmul(a, b)


class _ChunkLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, c, seg, out_dtype):
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
            Q = _chunks(q, s, e, 1, lpad, c, cdt)  # (B, H, nc, C, D)
            if scale != 1.0:
                Q = Q * scale
            K = _chunks(k, s, e, rep, lpad, c, cdt)  # (B, H, nc, C, D)
            V = _chunks(v, s, e, rep, lpad, c, cdt)  # (B, H, nc, C, Dv)
            dec = _decays(g, s, e, lpad, c, H, cdt)
            A = _bmm(Q, K.transpose(-1, -2))  # (B, H, nc, C, C)
            if dec is None:
                A.tril_()
                U = _bmm(K.transpose(-1, -2), V)  # (B, H, nc, D, Dv)
                Sprev, S = _scan_states(U, S, None)
                Qd = Q
            else:
                qdec, kdec, cdec, Dm = dec
                A.mul_(Dm)
                U = _bmm((K * kdec[..., None]).transpose(-1, -2), V)  # (B, H, nc, D, Dv)
                Sprev, S = _scan_states(U, S, cdec)
                Qd = Q * qdec[..., None]
            O = torch.matmul(Qd, Sprev).add_(_bmm(A, V))  # (B, H, nc, C, Dv)
            O = O.view(B, H, lpad, Dv)[:, :, : e - s].permute(0, 2, 1, 3)  # (B, L, H, Dv)
            o[:, s:e] = O
        ctx.save_for_backward(q, k, v, g, torch.stack(bounds))
        ctx.conf = (scale, c, seg, s0 is not None, out_dtype)
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, g, bounds = ctx.saved_tensors
        scale, c, seg, has_s0, _ = ctx.conf
        B, N, H, D = q.shape
        Hkv, Dv = k.shape[2], v.shape[-1]
        rep = H // Hkv
        cdt = bounds.dtype
        need_g = g is not None and ctx.needs_input_grad[3]
        dq = torch.empty(B, N, H, D, dtype=cdt)
        dk = torch.empty(B, N, Hkv, D, dtype=cdt)
        dv = torch.empty(B, N, Hkv, Dv, dtype=cdt)
        dg = torch.zeros(g.shape, dtype=cdt) if need_g else None
        dS = torch.zeros(B, H, D, Dv, dtype=cdt) if dS is None else dS.to(cdt).clone()
        starts = list(range(0, N, seg))
        for i in reversed(range(len(starts))):
            s = starts[i]
            e = min(s + seg, N)
            L = e - s
            lpad = -(-L // c) * c
            Q = _chunks(q, s, e, 1, lpad, c, cdt)  # (B, H, nc, C, D)
            if scale != 1.0:
                Q = Q * scale
            K = _chunks(k, s, e, rep, lpad, c, cdt)
            V = _chunks(v, s, e, rep, lpad, c, cdt)
            dO = _chunks(do, s, e, 1, lpad, c, cdt)  # (B, H, nc, C, Dv)
            dec = _decays(g, s, e, lpad, c, H, cdt)
            QK = _bmm(Q, K.transpose(-1, -2))  # (B, H, nc, C, C)
            dP = _bmm(dO, V.transpose(-1, -2))  # (B, H, nc, C, C): dL/dA
            if dec is None:
                A = QK.tril()
                Kd, Qd, cdec = K, Q, None
                U = _bmm(K.transpose(-1, -2), V)
            else:
                qdec, kdec, cdec, Dm = dec
                A = QK.mul_(Dm)
                Kd, Qd = K * kdec[..., None], Q * qdec[..., None]
                U = _bmm(Kd.transpose(-1, -2), V)
            Sprev, _ = _scan_states(U, bounds[i], cdec)  # (B, H, nc, D, Dv): state before each chunk
            # dSc[:, :, j] = dL/d(state after chunk j); W_j = dL/dS_{j-1} through chunk j's inter term
            W = _bmm(Qd.transpose(-1, -2), dO)  # (B, H, nc, D, Dv)
            dSc = torch.empty_like(W)
            for j in reversed(range(W.shape[2])):
                dSc[:, :, j] = dS
                dS = W[:, :, j] + (dS if cdec is None else cdec[:, :, j, None, None] * dS)
            X = _bmm(dO, Sprev.transpose(-1, -2))  # (B, H, nc, C, D) = dO S_{c-1}^T
            Y = _bmm(V, dSc.transpose(-1, -2))  # (B, H, nc, C, D) = V dS_c^T
            if need_g:
                gb = (dP * A).sum(-1) - (dP * A).sum(-2)  # (B, H, nc, C): d/db through exp(b_i - b_j)
                gb += qdec * (Q * X).sum(-1)  # through exp(b_i) on the inter term
                kterm = kdec * (K * Y).sum(-1)  # through exp(b_end - b_j) on the state update
                gb -= kterm
                gend = kterm.sum(-1) + cdec * (dSc * Sprev).sum((-1, -2))  # (B, H, nc): d/db_end
                gb[..., -1] += gend
                dgs = gb.flip(-1).cumsum(-1).flip(-1)  # b_i = sum_{r<=i} g_r  =>  dg_r = sum_{i>=r} db_i
                dgs = dgs.reshape(B, H, lpad)[:, :, :L]  # (B, H, L)
                if g.dim() == 3:
                    dg[:, s:e] = dgs.permute(0, 2, 1)
                else:
                    dg += dgs.sum((0, 2))
            if dec is not None:
                dP.mul_(Dm)
                X.mul_(qdec[..., None])
                Y.mul_(kdec[..., None])
            else:
                dP.tril_()
            dQ = torch.matmul(dP, K).add_(X)  # (B, H, nc, C, D)
            dK = torch.matmul(dP.transpose(-1, -2), Q).add_(Y)
            dV = torch.matmul(A.transpose(-1, -2), dO).add_(_bmm(Kd, dSc))  # (B, H, nc, C, Dv)
            if scale != 1.0:
                dQ.mul_(scale)
            dq[:, s:e] = dQ.view(B, H, lpad, D)[:, :, :L].permute(0, 2, 1, 3)  # (B, L, H, D)
            dK = dK.view(B, Hkv, rep, lpad, D)[:, :, :, :L].sum(2)  # (B, Hkv, L, D): sum over the group
            dV = dV.view(B, Hkv, rep, lpad, Dv)[:, :, :, :L].sum(2)
            dk[:, s:e] = dK.permute(0, 2, 1, 3)
            dv[:, s:e] = dV.permute(0, 2, 1, 3)
        ds0 = dS if has_s0 else None
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dg is None else dg.to(g.dtype),
                ds0, None, None, None, None)


def chunk_linear_attention(q, k, v, g=None, initial_state=None, *, scale=1.0, chunk_size=64, segment=4096,
                           out_dtype=None):
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

    Returns:
        ``(o (B, N, H, Dv), S_N (B, H, D, Dv))``; the state is float32 (float64 for float64 inputs).

    Example:
        >>> o, S = chunk_linear_attention(q, k, v, torch.full((H,), -0.1))
    """
    seg = max(chunk_size, (segment // chunk_size) * chunk_size)
    return _ChunkLinearAttention.apply(q, k, v, g, initial_state, float(scale), int(chunk_size), seg,
                                       out_dtype or q.dtype)
