"""Naive twins of the third batch of sequence-family ops and modules: obvious loops, torch only.

KArAt (arXiv 2503.10632), ST-LINK's spatially-enhanced attention (arXiv 2509.13753), Pointer Networks
(arXiv 1506.03134), multi-layer trainable pooling (arXiv 2409.02727) and token-coordinated prompt attention
(arXiv 2505.02406). Each function is the specification its fast op or module is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _plain_attention(q, k, v, allowed=None, scale=None):
    """``softmax(q k^T * scale)`` over allowed keys, times ``v``; ``q (B, Nq, H, D)``, ``k, v (B, Nk, H, *)``;
    ``allowed`` bool broadcastable to ``(B, H, Nq, Nk)``; a row without an allowed key gives 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Nq, Nk)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
    p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


# ------------------------------------------------------------------------------------------ KArAt


def naive_kat_attention(q, k, v, alpha, beta, w, *, causal=False, scale=None):
    """KArAt's modular Fourier operator (arXiv 2503.10632, section 3) one query row and one head at a time.

    ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)``, ``alpha, beta (H, r, Nmax, G)``, ``w (H, Nmax, r)`` with
    ``N <= Nmax`` (the leading ``N`` columns / rows are used) -> ``(B, N, H, Dv)``. For score row ``a`` of query
    ``i``: ``Phi_p = sum_q sum_m alpha[p, q, m] cos(m a_q) + beta[p, q, m] sin(m a_q)``, ``sigma_j = sum_p
    w[j, p] Phi_p``, ``o_i = sum_j sigma_j v_j``; causal keeps only ``q <= i`` in ``Phi`` and ``j <= i`` in
    ``o``.
    """
    B, N, H, D = q.shape
    G = alpha.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    m = torch.arange(1, G + 1, dtype=q.dtype, device=q.device)  # (G,)
    out = torch.zeros(B, N, H, v.shape[-1], dtype=q.dtype, device=q.device)
    for h in range(H):
        a_all = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, h]) * scale  # (B, N, N)
        for i in range(N):
            keys = i + 1 if causal else N
            a = a_all[:, i, :keys]  # (B, keys)
            ang = a.unsqueeze(-1) * m  # (B, keys, G)
            phi = (torch.einsum("bqg,pqg->bp", torch.cos(ang), alpha[h, :, :keys])
                   + torch.einsum("bqg,pqg->bp", torch.sin(ang), beta[h, :, :keys]))  # (B, r)
            sigma = torch.einsum("bp,jp->bj", phi, w[h, :keys])  # (B, keys)
            out[:, i, h] = torch.einsum("bj,bjd->bd", sigma, v[:, :keys, h])
    return out


def naive_kat_module(m, x):
    """:class:`~attnkit.mechanisms.seq_kat.KArAtAttention` with :func:`naive_kat_attention`."""
    B, N, C = x.shape
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).view(B, N, 3, m.num_heads, C // m.num_heads).unbind(2)
    o = naive_kat_attention(q, k, v, m.alpha, m.beta, m.w, causal=m.causal)  # (B, N, H, D)
    return F.linear(o.reshape(B, N, C), m.proj.weight, m.proj.bias)


# ----------------------------------------------------------------------------- ST-LINK SE-attention


def naive_se_rotate(x, time_pos, coords, *, spatial_dim, time_base=10000.0, spatial_base=100.0):
    """Rotate every (token, pair) of ``x (B, N, H, D)`` by an explicit 2x2 matrix.

    Pairs ``(x[2f], x[2f+1])``. The first ``(D - spatial_dim) / 2`` pairs turn by ``t * time_base^(-f / Pt)``
    (RoPE over the time position ``t``); spatial pair ``f`` turns by ``coords[axis] * spatial_base^(-(f // S) /
    ceil(Ps / S))`` with ``axis = f % S``. ``time_pos (N,)`` or ``(B, N)``, ``coords (N, S)`` or ``(B, N, S)``.
    """
    B, N, _, D = x.shape  # (B, N, H, D)
    pt, ps = (D - spatial_dim) // 2, spatial_dim // 2
    t = time_pos.to(x.dtype).expand(B, N) if time_pos.dim() == 1 else time_pos.to(x.dtype)
    c = coords.to(x.dtype)
    c = c.expand(B, *c.shape) if c.dim() == 2 else c  # (B, N, S)
    S = c.shape[-1]
    out = x.clone()
    for b in range(B):
        for n in range(N):
            for f in range(pt + ps):
                if f < pt:
                    theta = t[b, n] * time_base ** (-f / pt)
                else:
                    g = f - pt
                    theta = c[b, n, g % S] * spatial_base ** (-(g // S) / math.ceil(ps / S))
                rot = torch.stack([torch.stack([torch.cos(theta), -torch.sin(theta)]),
                                   torch.stack([torch.sin(theta), torch.cos(theta)])])  # (2, 2)
                out[b, n, :, 2 * f:2 * f + 2] = x[b, n, :, 2 * f:2 * f + 2] @ rot.T
    return out


def naive_se_attention(q, k, v, time_pos, coords, *, spatial_dim, causal=False, time_base=10000.0,
                       spatial_base=100.0, scale=None):
    """Spatially-enhanced attention: rotate q and k (:func:`naive_se_rotate`), then softmax attention."""
    kw = {"spatial_dim": spatial_dim, "time_base": time_base, "spatial_base": spatial_base}
    qr, kr = naive_se_rotate(q, time_pos, coords, **kw), naive_se_rotate(k, time_pos, coords, **kw)
    N = q.shape[1]
    allowed = torch.ones(N, N, dtype=torch.bool, device=q.device).tril() if causal else None
    return _plain_attention(qr, kr, v, allowed, scale)


def naive_se_module(m, x):
    """:class:`~attnkit.mechanisms.seq_se.SEAttention` with :func:`naive_se_attention` (default positions)."""
    B, N, C = x.shape
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).view(B, N, 3, m.num_heads, C // m.num_heads).unbind(2)
    n = torch.arange(N)
    time_pos, coords = n // m.num_nodes, m.node_coords[n % m.num_nodes]
    o = naive_se_attention(q, k, v, time_pos, coords, spatial_dim=m.spatial_dim, causal=m.causal,
                           time_base=m.time_base, spatial_base=m.spatial_base)
    return F.linear(o.reshape(B, N, C), m.proj.weight, m.proj.bias)


# ---------------------------------------------------------------------------------- Pointer Networks


def naive_pointer_attention(dec, enc, v, mask=None, *, log=False):
    """Pointer Networks (arXiv 1506.03134, section 2.3), one decoder step and one input position at a time.

    ``u_ij = v . tanh(enc_j + dec_i)`` with the projections ``W1 e_j`` / ``W2 d_i`` already applied:
    ``dec (B, Nd, A)``, ``enc (B, Ne, A)``, ``v (A,)``; ``mask (B, Nd, Ne)`` bool (True = may point) or None.
    Returns ``(B, Nd, Ne)``: ``softmax_j`` over allowed positions (0 elsewhere; a row with none is all 0), or its
    log (``-inf`` where not allowed).
    """
    Nd = dec.shape[1]
    Ne = enc.shape[1]
    rows = []
    for i in range(Nd):
        u = torch.stack([torch.tanh(enc[:, j] + dec[:, i]) @ v for j in range(Ne)], -1)  # (B, Ne)
        allowed = torch.ones_like(u, dtype=torch.bool) if mask is None else mask[:, i]
        u = u.masked_fill(~allowed, float("-inf"))
        m = u.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(u - m)
        z = e.sum(-1, keepdim=True)
        if log:
            rows.append((u - m - torch.log(z.clamp_min(torch.finfo(u.dtype).tiny))).masked_fill(~allowed,
                                                                                                  float("-inf")))
        else:
            rows.append(e / z.clamp_min(torch.finfo(u.dtype).tiny))
    return torch.stack(rows, 1)


def naive_pointer_module(m, x, context=None, mask=None):
    """:class:`~attnkit.mechanisms.seq_pointer.PointerAttention` with :func:`naive_pointer_attention`."""
    enc = x if context is None else context
    return naive_pointer_attention(F.linear(x, m.w2.weight), F.linear(enc, m.w1.weight), m.v, mask,
                                   log=m.output == "log_probs")


# ------------------------------------------------------------------- multi-layer trainable pooling


def naive_latent_pool(latents, k, v, *, scale=None):
    """Learned queries read a stack: ``latents (r, H, D)``, ``k (B, L, H, D)``, ``v (B, L, H, Dv)`` ->
    ``(B, r, H, Dv)``, each (latent, head) a softmax over the ``L`` entries."""
    q = latents.unsqueeze(0).expand(k.shape[0], *latents.shape)  # (B, r, H, D)
    return _plain_attention(q, k, v, None, scale)


def naive_embedding_pool_module(m, x):
    """:class:`~attnkit.mechanisms.seq_embed_pool.MultiLayerTrainablePooling` with :func:`naive_latent_pool`."""
    B, L, C = x.shape
    H = m.num_heads
    h = x + m.layer_embed[:L]  # (B, L, C)
    k, v = F.linear(h, m.to_kv.weight, m.to_kv.bias).view(B, L, 2, H, C // H).unbind(2)  # (B, L, H, D)
    z = naive_latent_pool(m.latents.view(-1, H, C // H), k, v).reshape(B, -1, C)  # (B, r, C)
    z = F.linear(z, m.proj.weight, m.proj.bias)
    z = F.linear(F.gelu(F.linear(z, m.mlp[0].weight, m.mlp[0].bias)), m.mlp[2].weight, m.mlp[2].bias)
    emb = z.mean(1)  # (B, C_out)
    return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12) if m.normalize else emb


# ------------------------------------------------------------------------------------------- TCPA


def naive_prompt_mask(x, image_prompts, *, num_cls_tokens, num_cls_prompts, top_k, coordination):
    """TCPA's visibility of ``Nc`` CLS prompts then ``Np`` image prompts per token: ``(B, N, Nc + Np)`` bool.

    ``coordination="none"``: every token sees every prompt (VPT-deep). ``"role"``: the first ``num_cls_tokens``
    tokens see the CLS prompts only, the others the image prompts only. ``"token"``: as ``"role"``, but each image
    token sees only its ``top_k`` image prompts by cosine similarity to its own input, one token at a time.
    """
    B, N, _ = x.shape
    Nc, Np = num_cls_prompts, image_prompts.shape[0]
    mask = torch.zeros(B, N, Nc + Np, dtype=torch.bool)
    if coordination == "none":
        return mask | True
    mask[:, :num_cls_tokens, :Nc] = True
    work = torch.promote_types(x.dtype, torch.float32)
    for b in range(B):
        for t in range(num_cls_tokens, N):
            if coordination == "role" or Np == 0:
                mask[b, t, Nc:] = True
                continue
            sim = F.cosine_similarity(x[b, t].to(work).unsqueeze(0), image_prompts.to(work), dim=-1)  # (Np,)
            for p in torch.topk(sim, min(top_k, Np)).indices.tolist():
                mask[b, t, Nc + p] = True
    return mask


def naive_prompt_attention(q, k, v, pk, pv, prompt_mask=None, *, scale=None):
    """Softmax attention of ``q (B, N, H, D)`` over ``[k; pk]`` / ``[v; pv]`` with ``pk, pv (P, H, *)`` shared by
    the batch; token keys always visible, prompt key ``p`` visible to token ``t`` iff ``prompt_mask[b, t, p]``."""
    B, N = q.shape[:2]
    P = pk.shape[0]
    kk = torch.cat([k, pk.unsqueeze(0).expand(B, *pk.shape)], 1)  # (B, N + P, H, D)
    vv = torch.cat([v, pv.unsqueeze(0).expand(B, *pv.shape)], 1)
    if prompt_mask is None:
        prompt_mask = torch.ones(B, N, P, dtype=torch.bool, device=q.device)
    allowed = torch.cat([torch.ones(B, N, N, dtype=torch.bool, device=q.device), prompt_mask], -1)  # (B, N, N+P)
    return _plain_attention(q, kk, vv, allowed.unsqueeze(1), scale)


def naive_prompt_module(m, x):
    """:class:`~attnkit.mechanisms.seq_prompt.TokenCoordinatedPromptAttention` with the twins above."""
    B, N, C = x.shape
    H = m.num_heads
    prompts = torch.cat([m.cls_prompts, m.image_prompts], 0)  # (P, C)
    mask = naive_prompt_mask(x.detach(), m.image_prompts.detach(), num_cls_tokens=m.num_cls_tokens,
                             num_cls_prompts=m.num_cls_prompts, top_k=m.top_k, coordination=m.coordination)
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).view(B, N, 3, H, C // H).unbind(2)  # (B, N, H, D)
    _, pk, pv = F.linear(prompts, m.qkv.weight, m.qkv.bias).view(-1, 3, H, C // H).unbind(1)  # (P, H, D)
    o = naive_prompt_attention(q, k, v, pk, pv, mask.to(x.device))
    return F.linear(o.reshape(B, N, C), m.proj.weight, m.proj.bias)
