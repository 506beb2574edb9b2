"""Naive twins of the fourth batch of sequence-family ops and modules: graph-of-tokens routing (arXiv 2505.00792),
BAM's soft mixture of attention experts (arXiv 2408.08274) and the deconstructed-attention variants
(arXiv 2510.11602). Explicit score matrices and loops, torch only: the specification the ops are tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.reference.naive_dense import naive_attention

# ------------------------------------------------------------------------------------- shared pieces


def _scores(q, k, scale):
    """``q, k (B, N, H, D)`` -> scaled scores ``(B, H, N, N)``."""
    return torch.einsum("bihd,bjhd->bhij", q, k) * scale


def _causal(n, device):
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def naive_softmax_attention(q, k, v, *, causal=False, scale=None):
    """``softmax(q k^T * scale) v`` with an explicit ``(B, H, N, N)`` matrix; ``k, v`` may have fewer heads (GQA)."""
    return naive_attention(q, k, v, _causal(q.shape[1], q.device) if causal else None, scale=scale)


# ----------------------------------------------------------------------------------- graph of tokens


def naive_token_graph(q, k, *, causal=False, scale=None):
    """The token graph ``S = mean_h softmax_j(q_i . k_j * scale)``: ``q, k (B, N, H, D)`` -> ``(B, N, N)``,
    rows sum to 1 (lower-triangular when causal)."""
    s = _scores(q, k, q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        s = s.masked_fill(~_causal(s.shape[-1], s.device), float("-inf"))
    return torch.softmax(s, -1).mean(1)


def naive_got_route(logits, graph=None, *, topk):
    """Graph-of-tokens routing (arXiv 2505.00792, sections 2-3): ``P = softmax_E(logits)``, ``P' = S P`` (``S`` =
    ``graph (B, N, N)``, identity when None), top-``k`` experts of ``P'`` with their probabilities renormalised.

    ``logits (B, N, E)`` -> ``(P' (B, N, E), weights (B, N, k), indices (B, N, k))``.
    """
    p = torch.softmax(logits, -1)
    if graph is not None:
        p = torch.einsum("bij,bje->bie", graph, p)
    w, idx = p.topk(topk, -1)
    return p, w / w.sum(-1, keepdim=True), idx


def naive_experts(x, weights, indices, w1, w2):
    """``y_i = sum_r weights_ir * GELU(x_i W1[e_ir]) W2[e_ir]``, one token and one slot at a time.

    ``x (B, N, C)``, ``weights, indices (B, N, k)``, ``w1 (E, C, F)``, ``w2 (E, F, C)`` -> ``(B, N, C)``.
    """
    B, N, _ = x.shape
    rows = []
    for b in range(B):
        for i in range(N):
            acc = torch.zeros_like(x[b, i])
            for r in range(indices.shape[-1]):
                e = int(indices[b, i, r])
                acc = acc + weights[b, i, r] * (F.gelu(x[b, i] @ w1[e]) @ w2[e])
            rows.append(acc)
    return torch.stack(rows).view_as(x)


def naive_got_module(m, x):
    """:class:`~attnkit.mechanisms.seq_got.GoTMoE` with explicit graphs and per-token experts."""
    B, N, C = x.shape
    if m.mode == "attention":
        q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).view(B, N, 3, m.num_heads, C // m.num_heads).unbind(2)
        u = x + F.linear(naive_softmax_attention(q, k, v, causal=m.causal).reshape(B, N, C), m.proj.weight,
                         m.proj.bias)
        graph = naive_token_graph(q, k, causal=m.causal)
    else:
        u = x
        z = (x @ m.sim_weight).unsqueeze(2)  # (B, N, 1, Ds): one similarity head, q = k
        graph = naive_token_graph(z, z, causal=m.causal, scale=z.shape[-1] ** -0.5 / m.tau)
    _, w, idx = naive_got_route(u @ m.router_weight, graph, topk=m.topk)
    return u + naive_experts(u, w, idx, m.w1, m.w2)


# ----------------------------------------------------------------------------------------------- BAM


def naive_bam(x, router_weight, wq, wk, wv, wo, *, router_bias=None, bq=None, bk=None, bv=None, bo=None,
              num_heads, num_kv_heads=None, causal=False):
    """BAM's soft mixture of attention experts (arXiv 2408.08274, section 3), one expert at a time:
    ``y = sum_e g_e(x) (Attn(x Wq_e, x Wk_e, x Wv_e) Wo_e + bo_e)``, ``g = softmax(x W_r + b_r)``.

    ``x (B, N, C)``, ``router_weight (C, E)``, ``wq (E, C, H D)``, ``wk, wv (E or 1, C, Hkv D)`` (1 = keys and
    values shared by every expert), ``wo (E, H D, C)``; biases ``(E, .)`` like their weights -> ``(B, N, C)``.
    """
    B, N, _ = x.shape
    H = num_heads
    hkv = num_kv_heads or H
    g = torch.softmax(x @ router_weight + (0 if router_bias is None else router_bias), -1)  # (B, N, E)
    D = wq.shape[-1] // H
    y = 0
    for e in range(wq.shape[0]):
        ek = e if wk.shape[0] > 1 else 0
        q = (x @ wq[e] + (0 if bq is None else bq[e])).view(B, N, H, D)
        k = (x @ wk[ek] + (0 if bk is None else bk[ek])).view(B, N, hkv, D)
        v = (x @ wv[ek] + (0 if bv is None else bv[ek])).view(B, N, hkv, D)
        o = naive_softmax_attention(q, k, v, causal=causal).reshape(B, N, H * D) @ wo[e]
        y = y + g[..., e:e + 1] * (o + (0 if bo is None else bo[e]))
    return y


def naive_bam_module(m, x):
    """:class:`~attnkit.mechanisms.seq_bam.BAMAttention` through :func:`naive_bam`."""
    return naive_bam(x, m.router_weight, m.wq, m.wk, m.wv, m.wo, router_bias=m.router_bias, bq=m.bq, bk=m.bk,
                     bv=m.bv, bo=m.bo, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, causal=m.causal)


# ------------------------------------------------------------------------------ deconstructed attention


def naive_deconstructed(q, k, v, *, form="softmax", mixing="attention", causal=False, scale=None):
    """The deconstructed-attention mixing matrix ``A (B, H, N, N)`` built entry by entry, then ``A v``.

    ``mixing``: ``attention`` (``A`` from the scores ``s = q k^T * scale`` through ``form``), ``uniform``
    (``A_ij = 1 / n_i`` over the ``n_i`` visible keys: fixed, input-independent mixing) or ``none``
    (``A = I``: no token mixing). ``form`` for ``attention``: ``softmax``; ``relu``: ``relu(s) / n_i``;
    ``sigmoid``: ``sigmoid(s - log n_i)``; ``linear``: ``s / n_i``; ``taylor``: ``t / sum_j t`` with
    ``t = 1 + s + s^2 / 2``. ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)`` -> ``(B, N, H, Dv)``.
    """
    B, N, H, _ = v.shape
    scale = (q.shape[-1] ** -0.5 if scale is None else scale) if mixing == "attention" else None
    A = torch.zeros(B, H, N, N, dtype=v.dtype, device=v.device)
    s = _scores(q, k, scale) if mixing == "attention" else None
    for i in range(N):
        keys = list(range(i + 1)) if causal else list(range(N))
        n = len(keys)
        if mixing == "none":
            A[:, :, i, i] = 1
            continue
        if mixing == "uniform":
            A[:, :, i, keys] = 1.0 / n
            continue
        si = s[:, :, i, keys]  # (B, H, n)
        if form == "softmax":
            a = torch.softmax(si, -1)
        elif form == "relu":
            a = torch.relu(si) / n
        elif form == "sigmoid":
            a = torch.sigmoid(si - math.log(n))
        elif form == "linear":
            a = si / n
        else:  # taylor
            t = 1 + si + si * si / 2
            a = t / t.sum(-1, keepdim=True)
        A[:, :, i, keys] = a
    return torch.einsum("bhij,bjhd->bihd", A, v)


def naive_deconstructed_module(m, x, qk_input=None):
    """:class:`~attnkit.mechanisms.seq_deconstructed.DeconstructedAttention` through :func:`naive_deconstructed`."""
    B, N, C = x.shape
    H, D = m.num_heads, C // m.num_heads
    q = k = None
    if m.mixing == "attention":
        src = {"hidden": x, "external": qk_input}.get(m.qk_source)
        if m.qk_source == "position":
            src = m.pos_emb[:N].unsqueeze(0).expand(B, N, -1)  # (B, N, C): the same for every input
        wk = m.wq if m.shared_qk else m.wk
        q, k = (src @ m.wq).view(B, N, H, D), (src @ wk).view(B, N, H, D)
    v = (x @ m.wv).view(B, N, H, D)
    o = naive_deconstructed(q, k, v, form=m.form, mixing=m.mixing, causal=m.causal)
    return o.reshape(B, N, C) @ m.wo
