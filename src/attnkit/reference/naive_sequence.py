"""Naive twins of the sequence-family ops and modules: obvious loops, torch only.

Each function is the specification its fast op or module is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------ Titans


def _mem_apply(ws, x, act):
    for i, w in enumerate(ws):
        x = x @ w
        if i + 1 < len(ws):
            x = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[act](x)
    return x


def naive_titans_memory(q, k, v, alpha, eta, theta, weights, *, momentum=None, chunk_size=1, activation="silu",
                        return_state=False):
    """Titans' memory (arXiv 2501.00663, section 3.1) token by token; the surprise is taken by autograd.

    ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)``, gates ``(B, N, H)``, weights ``(H, ...)`` or ``(B, H, ...)``.
    Gradients inside a chunk of ``chunk_size`` tokens are taken at the chunk's first state.
    """
    B, N, H, _ = q.shape
    wd = torch.promote_types(q.dtype, torch.float32)
    ws = [w.to(wd).expand(B, H, *w.shape[-2:]) if w.dim() == 3 else w.to(wd) for w in weights]
    if momentum is None:
        ms = [torch.zeros_like(w) for w in ws]
    else:
        ms = [m.to(wd).expand(B, H, *m.shape[-2:]) if m.dim() == 3 else m.to(wd) for m in momentum]
    outs = []
    anchor = ws
    for t in range(N):
        if t % chunk_size == 0:
            anchor = ws
        kt = k[:, t].to(wd).unsqueeze(2)  # (B, H, 1, D)
        vt = v[:, t].to(wd).unsqueeze(2)  # (B, H, 1, Dv)

        def loss(ws_, kt=kt, vt=vt):  # summed over (batch, head): each state gets its own gradient
            return ((_mem_apply(ws_, kt, activation) - vt) ** 2).sum()

        # the partial gradient in the weights alone (k, v held fixed), still differentiable for the outer loop
        grads = torch.func.grad(loss)(list(anchor))
        a, e, th = (g[:, t].to(wd)[:, :, None, None] for g in (alpha, eta, theta))  # (B, H, 1, 1)
        ms = [e * m - th * u for m, u in zip(ms, grads)]
        ws = [(1 - a) * w + m for w, m in zip(ws, ms)]
        outs.append(_mem_apply(ws, q[:, t].to(wd).unsqueeze(2), activation).squeeze(2))  # (B, H, Dv)
    y = torch.stack(outs, 1).to(q.dtype)  # (B, N, H, Dv)
    if return_state:
        return y, (tuple(w.to(q.dtype) for w in ws), tuple(m.to(q.dtype) for m in ms))
    return y


def _lin(layer, x):
    return F.linear(x, layer.weight, layer.bias)


def _rms(x, gain, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def _dense_attend(layer, x, heads, allowed):
    from attnkit.reference.naive_dense import naive_masked_attention

    B, N, C = x.shape
    q, k, v = _lin(layer, x).view(B, N, 3, heads, C // heads).unbind(2)  # (B, N, H, D)
    return naive_masked_attention(q, k, v, allowed)[0].reshape(B, N, C)


def naive_titans_module(m, x):
    """:class:`~attnkit.mechanisms.seq_titans.TitansMemory` with the token-loop memory and dense masks."""
    B, N, C = x.shape
    H, P = m.num_heads, m.num_persistent

    def mem_inputs(z):
        b, n, _ = z.shape
        q, k, v = _lin(m.mem_qkv, z).view(b, n, 3, H, C // H).unbind(2)  # (B, N, H, D)
        q, k = F.normalize(F.silu(q), dim=-1), F.normalize(F.silu(k), dim=-1)
        a, e, t = torch.sigmoid(_lin(m.gates, z)).view(b, n, 3, H).unbind(2)  # (B, N, H)
        return q, k, v, a, e, m.inner_lr * t

    def memory(z, state=None):
        q, k, v, a, e, t = mem_inputs(z)
        ws, ms = (tuple(m.memory), None) if state is None else state
        y, st = naive_titans_memory(q, k, v, a, e, t, ws, momentum=ms, chunk_size=m.chunk_size,
                                    activation=m.activation, return_state=True)
        return y.reshape(z.shape), st

    def swa(n):
        i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
        return (j <= i) & ((i - j <= m.window) | (j < P) | (i < P))

    if m.variant == "mac":
        state, outs = None, []
        for s0 in range(0, N, m.segment_size):
            seg = x[:, s0:s0 + m.segment_size]
            L = seg.shape[1]
            q = mem_inputs(seg)[0]
            ws = tuple(m.memory) if state is None else state[0]
            h = _mem_apply([w.to(q.dtype) for w in ws], q.transpose(1, 2), m.activation).transpose(1, 2)
            ctx = torch.cat([m.persistent.expand(B, P, C), h.reshape(B, L, C), seg], 1)
            n = P + 2 * L
            allowed = torch.zeros(n, n, dtype=torch.bool)
            for r in range(n):
                for c in range(n):
                    if r >= P + L:
                        t = r - P - L
                        allowed[r, c] = c < P or (P <= c < P + L and c - P <= t) or (c >= P + L and c - P - L <= t)
                    else:
                        allowed[r, c] = c <= r
            y = _dense_attend(m.attn_qkv, ctx, H, allowed)[:, P + L:]
            mo, state = memory(y, state)
            outs.append(y * torch.sigmoid(mo))
        return _lin(m.proj, torch.cat(outs, 1))
    xt = torch.cat([m.persistent.expand(B, P, C), x], 1)
    if m.variant == "lmm":
        o = memory(xt)[0]
    elif m.variant == "mal":
        o = _dense_attend(m.attn_qkv, memory(xt)[0], H, swa(N + P))
    else:
        eps = 1e-6
        y = _rms(_dense_attend(m.attn_qkv, xt, H, swa(N + P)), m.gain_y, eps)
        o = y * torch.sigmoid(_rms(memory(xt)[0], m.gain_m, eps))
    return _lin(m.proj, o[:, P:])


# ------------------------------------------------------------------------------ minimal attention


def minimal_qkv(x, qk_weight, vo_weight, num_heads, qk, vo):
    """q, k, v ``(B, N, H, .)`` of the reduced forms of arXiv 2410.13732 (see ``minimal_attention``)."""
    B, N, C = x.shape
    H = num_heads
    if qk == "separate":
        q, k = (x @ qk_weight[0]).view(B, N, H, C // H), (x @ qk_weight[1]).view(B, N, H, C // H)
    elif qk in ("shared", "cholesky"):
        w = qk_weight.tril() if qk == "cholesky" else qk_weight
        q = k = (x @ w).view(B, N, H, C // H)
    else:  # collapsed: q_h = x W_QK^h, k = x
        q = torch.einsum("bnc,hcd->bnhd", x, qk_weight)
        k = x.unsqueeze(2).expand(B, N, H, C)
    if vo == "separate":
        v = (x @ vo_weight[0]).view(B, N, H, C // H)
    elif vo == "collapsed":
        v = torch.einsum("bnc,hcd->bnhd", x, vo_weight)
    else:
        v = x.unsqueeze(2).expand(B, N, H, C)
    return q, k, v


def naive_minimal_attention(x, qk_weight, vo_weight=None, *, num_heads=1, qk="shared", vo="identity", causal=False):
    """Explicit scores, softmax and value mixing for every head; ``(B, N, C)``."""
    from attnkit.reference.naive_dense import naive_attention

    B, N, C = x.shape
    q, k, v = minimal_qkv(x, qk_weight, vo_weight, num_heads, qk, vo)
    allowed = torch.ones(N, N, dtype=torch.bool).tril() if causal else None
    o = naive_attention(q, k, v, allowed)  # (B, N, H, Dv)
    if vo == "separate":
        return o.reshape(B, N, C) @ vo_weight[1]
    return o.sum(2) if vo == "collapsed" else o.mean(2)


def naive_minimal_module(m, x):
    """:class:`~attnkit.mechanisms.seq_minimal.MinimalAttention`."""
    return naive_minimal_attention(x, m.qk_weight, m.vo_weight, num_heads=m.num_heads, qk=m.qk, vo=m.vo,
                                   causal=m.causal)
