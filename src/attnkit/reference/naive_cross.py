"""Naive twins of the cross-attention ops and modules: obvious code, torch only, the test oracle.

Every op twin materialises its scores and works in float64 for float64 inputs, float32 otherwise.
Module twins take ``(module, x, context=None)`` and recompute the module's forward from its
parameters with plain tensor code and these op twins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.reference.naive_dense import naive_attention

# ------------------------------------------------------------------------------------------- ops


def naive_varlen_cross_attention(q, k, v, cu_q, cu_k, causal=False, scale=None):
    """Packed sequences, one at a time: ``q (1, Tq, H, D)``, ``k, v (1, Tk, Hkv, D)`` -> ``(1, Tq, H, Dv)``."""
    outs = []
    for s in range(len(cu_q) - 1):
        qs, ks, vs = q[:, cu_q[s]:cu_q[s + 1]], k[:, cu_k[s]:cu_k[s + 1]], v[:, cu_k[s]:cu_k[s + 1]]
        nq, nk = qs.shape[1], ks.shape[1]
        allowed = None
        if causal:  # bottom-right aligned inside the sequence
            allowed = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
        if nq == 0:
            continue
        if nk == 0:
            outs.append(torch.zeros(*qs.shape[:-1], v.shape[-1], dtype=q.dtype))
            continue
        outs.append(naive_attention(qs, ks, vs, allowed, scale=scale))
    return torch.cat(outs, 1)


def naive_ip_adapter_attention(q, k, v, k_ip, v_ip, ip_scale=1.0, allowed=None, scale=None):
    """IP-Adapter's decoupled cross-attention: two separate softmaxes, the image one scaled by ``ip_scale``."""
    text = naive_attention(q, k, v, allowed, scale=scale)
    if k_ip is None:
        return text
    return text + ip_scale * naive_attention(q, k_ip, v_ip, scale=scale)


def naive_attention_rollout(maps, residual=0.5):
    """``maps (L, B, N, N)`` head-averaged probabilities -> rollout ``(B, N, N)``: ``S_l' = r I + (1-r) S_l``,
    multiplied from the first layer up (``R = S_L' ... S_1'``)."""
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype)
    out = None
    for s in maps:
        s = (1 - residual) * s + residual * eye
        out = s if out is None else s @ out
    return out


def naive_glca_attention(q, k, v, scores, topk, scale=None):
    """Global-local cross-attention: the ``topk`` query rows with the highest ``scores (B, N)`` attend to every
    key. Returns ``(out (B, R, H, Dv), index (B, R))``: every row computed, then the selected ones taken."""
    idx = scores.detach().topk(topk, dim=-1).indices                    # (B, R)
    full = naive_attention(q, k, v, scale=scale)                        # (B, N, H, Dv)
    out = torch.stack([full[b, idx[b]] for b in range(q.shape[0])])
    return out, idx


def naive_filip_similarity(x, y, x_valid=None, y_valid=None):
    """FILIP's token-wise late interaction between every image ``x (BI, n1, d)`` and text ``y (BT, n2, d)``.

    Tokens are L2-normalised; invalid tokens are excluded from the max and from the mean.
    Returns ``(s_i2t, s_t2i)``, each ``(BI, BT)``."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = F.normalize(x.to(work), dim=-1), F.normalize(y.to(work), dim=-1)
    bi, bt = x.shape[0], y.shape[0]
    xv = torch.ones(x.shape[:2], dtype=torch.bool) if x_valid is None else x_valid
    yv = torch.ones(y.shape[:2], dtype=torch.bool) if y_valid is None else y_valid
    s_i2t = torch.zeros(bi, bt, dtype=work)
    s_t2i = torch.zeros(bi, bt, dtype=work)
    for i in range(bi):
        for j in range(bt):
            xi, yj = x[i][xv[i]], y[j][yv[j]]
            sim = xi @ yj.T                                                  # (n1', n2')
            s_i2t[i, j] = sim.max(1).values.mean()
            s_t2i[i, j] = sim.max(0).values.mean()
    return s_i2t, s_t2i


def naive_zero_param_pool(tokens, queries=("max", "mean"), scale=None, cls=True):
    """GreenPLM's parameter-free pooling: summary queries (max / mean over tokens) attend to the tokens
    (``K = V = tokens``). ``tokens (B, N, C)`` with the class token first when ``cls``.

    Returns ``(B, cls + len(queries), C)``: ``[cls token, one pooled token per query]``."""
    work = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    t = tokens.to(work)
    body = t[:, 1:] if cls else t
    scale = t.shape[-1] ** -0.5 if scale is None else scale
    outs = [t[:, :1]] if cls else []
    for kind in queries:
        qv = body.amax(1, keepdim=True) if kind == "max" else body.mean(1, keepdim=True)   # (B, 1, C)
        w = torch.softmax(qv @ body.transpose(1, 2) * scale, -1)                           # (B, 1, N)
        outs.append(w @ body)
    return torch.cat(outs, 1).to(tokens.dtype)


def naive_adem_fusion(x, xv, feature_map="silu", drop_ratio=0.0, normalize="count", weight=1.0):
    """ADEM-VL's projection-free fusion: ``x + weight * drop(phi(x) phi(xv)^T) xv / norm``.

    ``x (B, Nt, C)``, ``xv (B, Nv, C)``; the ``floor(drop_ratio * Nv)`` lowest scores of each row are
    dropped (zeroed, or excluded from the softmax)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xw, vw = x.to(work), xv.to(work)
    phi = {"silu": F.silu, "relu": F.relu, "identity": lambda t: t}[feature_map]
    s = phi(xw) @ phi(vw).transpose(1, 2)                                   # (B, Nt, Nv)
    nv = s.shape[-1]
    drop = int(drop_ratio * nv)
    keep = torch.ones_like(s, dtype=torch.bool)
    if drop > 0:
        low = s.topk(drop, dim=-1, largest=False).indices
        keep = keep.scatter(-1, low, False)
    if normalize == "softmax":
        w = torch.softmax(s.masked_fill(~keep, float("-inf")) * xw.shape[-1] ** -0.5, -1)
    else:
        w = s.masked_fill(~keep, 0.0)
        if normalize == "count":
            w = w / (nv - drop)
    return (xw + weight * (w @ vw)).to(x.dtype)


def naive_composite_attention(q, k, v, num_visual, scale=None):
    """EE-MLLM's composite attention over ``[visual (Nv); text]``: visual rows see only themselves,
    text rows are causal over everything before them."""
    n = q.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = torch.where(i < num_visual, i == j, j <= i)
    return naive_attention(q, k, v, allowed, scale=scale)


def naive_cell_local_attention(q, feats, grid, scale=None):
    """Cell-local cross-attention (Cambrian-1's SVA): query ``(i, j)`` of an ``L x L`` grid attends to
    the ``m_e x m_e`` cell ``[m_e i, m_e (i + 1)) x [m_e j, m_e (j + 1))`` of every feature map.

    Args:
        q: ``(B, L*L, H, D)`` raster order; feats: a list of ``(k, v)`` pairs, each ``(B, Y_e, X_e, H, D)``
            with ``Y_e = X_e = m_e * L``; grid: ``L``.
    Returns ``(B, L*L, H, Dv)``."""
    ks, vs, masks = [], [], []
    L = grid
    qi = torch.arange(L * L)
    for k, v in feats:
        y, x = k.shape[1], k.shape[2]
        m = y // L
        ky = torch.arange(y)[:, None].expand(y, x).reshape(-1)
        kx = torch.arange(x)[None, :].expand(y, x).reshape(-1)
        masks.append(((ky[None] // m) == (qi[:, None] // L)) & ((kx[None] // m) == (qi[:, None] % L)))
        ks.append(k.reshape(k.shape[0], y * x, *k.shape[3:]))
        vs.append(v.reshape(v.shape[0], y * x, *v.shape[3:]))
    return naive_attention(q, torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(masks, 1), scale=scale)


# ----------------------------------------------------------------------------------- module helpers


def _lin(layer, x):
    return F.linear(x, layer.weight, layer.bias)


def _ln(ln, x):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + ln.eps)
    return y * ln.weight + ln.bias if ln.weight is not None else y


def _heads(t, h):
    return t.reshape(t.shape[0], t.shape[1], h, t.shape[-1] // h)        # (B, N, H, D)


# ----------------------------------------------------------------------------------- module twins


def naive_ip_adapter_module(m, x, context=None):
    """IP-Adapter layer: ``to_out(Attn(q, K_text, V_text) + s * Attn(q, K'_img, V'_img))``, the last
    ``num_image_tokens`` context tokens being the image prompt."""
    ctx = x if context is None else context
    h = m.num_heads
    nt = ctx.shape[1] - m.num_image_tokens
    text, img = ctx[:, :nt], ctx[:, nt:]
    q = _heads(_lin(m.to_q, x), h)
    ki, vi = _heads(_lin(m.to_k_ip, img), h), _heads(_lin(m.to_v_ip, img), h)
    if nt == 0:
        o = m.ip_scale * naive_attention(q, ki, vi)
    else:
        k, v = _heads(_lin(m.to_k, text), h), _heads(_lin(m.to_v, text), h)
        o = naive_ip_adapter_attention(q, k, v, ki, vi, m.ip_scale)
    return _lin(m.to_out, o.reshape(x.shape[0], x.shape[1], -1))


def naive_crossvit_cls_module(m, x, context=None):
    """CrossViT fusion of branch ``x``'s CLS token with ``context``'s patch tokens (``x`` itself if None)."""
    ctx = x if context is None else context
    h = m.num_heads
    cls = x[:, :1]
    if m.fusion == "full":
        cls = _lin(m.f_proj, F.gelu(_ln(m.f_norm, cls)))                     # (B, 1, Cctx)
    z = torch.cat([cls, ctx[:, 1:]], 1)                                      # (B, 1 + M - 1, Cctx)
    zn = _ln(m.norm, z) if m.fusion == "full" else z
    q = _heads(_lin(m.wq, zn[:, :1]), h)
    k, v = _heads(_lin(m.wk, zn), h), _heads(_lin(m.wv, zn), h)
    o = _lin(m.proj, naive_attention(q, k, v).reshape(x.shape[0], 1, -1))
    if m.fusion == "full":
        o = _lin(m.g_proj, F.gelu(_ln(m.g_norm, cls + o)))                   # (B, 1, C)
    return torch.cat([o, x[:, 1:]], 1)


def _frame_causal_dense(nq, nk, tokens_per_frame):
    """Video-CCAM's mask ``(Nq, Nk)``: query ``i`` sees frames ``0..ceil((i + 1) T / Nq) - 1``, ``T = ceil(Nk / P)``."""
    t = -(-nk // tokens_per_frame)
    last = -((-(torch.arange(nq) + 1) * t) // nq) - 1                      # ceil((i + 1) T / Q) - 1
    return (torch.arange(nk)[None, :] // tokens_per_frame) <= last[:, None]


def naive_video_ccam_module(m, x, context=None):
    """Video-CCAM projector attention: queries ``x`` over frame-major visual tokens under the causal frame mask."""
    ctx = x if context is None else context
    h = m.num_heads
    q = _heads(_lin(m.q_proj, x), h)
    k, v = _heads(_lin(m.k_proj, ctx), h), _heads(_lin(m.v_proj, ctx), h)
    o = naive_attention(q, k, v, _frame_causal_dense(x.shape[1], ctx.shape[1], m.tokens_per_frame))
    return _lin(m.out_proj, o.reshape(x.shape[0], x.shape[1], -1))


def glca_scores(q, k, keep_cls=True):
    """The selection scores of the GLCA module: the CLS row of one layer's rollout ``0.5 S + 0.5 I``
    (S head-averaged), CLS itself ``+inf`` when kept. In ``float32`` (``float64`` for float64 inputs)."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * q.shape[-1] ** -0.5, -1)
    r = 0.5 * s.mean(1)[:, 0] + 0.5 * torch.eye(q.shape[1], dtype=work)[0]    # (B, N)
    if keep_cls:
        r = r.clone()
        r[:, 0] = float("inf")
    return r


def naive_glca_module(m, x, rollout=None):
    """DCAL GLCA layer: top-R rows by the CLS rollout attend to all tokens; unselected rows are zero."""
    b, n, _ = x.shape
    h = m.num_heads
    q, k, v = (_heads(t, h) for t in _lin(m.qkv, x).chunk(3, -1))
    with torch.no_grad():
        scores = glca_scores(q, k) if rollout is None else rollout.clone().to(torch.float64)
        if rollout is not None:
            scores[:, 0] = float("inf")
    out, idx = naive_glca_attention(q, k, v, scores, m.num_selected(n))
    o = _lin(m.proj, out.reshape(b, idx.shape[1], -1))                         # (B, R, C)
    full = torch.zeros(b, n, o.shape[-1], dtype=o.dtype)
    return full.index_put((torch.arange(b)[:, None].expand_as(idx), idx), o)


def naive_pwca_module(m, x, context=None):
    """DCAL PWCA layer: queries of ``x`` over the concatenated keys/values of ``x`` and a distractor."""
    other = x.roll(1, 0) if context is None else context
    h = m.num_heads
    q, k, v = (_heads(t, h) for t in _lin(m.qkv, x).chunk(3, -1))
    _, k2, v2 = (_heads(t, h) for t in _lin(m.qkv, other).chunk(3, -1))
    o = naive_attention(q, torch.cat([k, k2], 1), torch.cat([v, v2], 1))
    return _lin(m.proj, o.reshape(x.shape[0], x.shape[1], -1))


def _frame_local_dense(nq, nk, frames):
    """Frame-local cross mask: frame ``t`` holds query rows ``floor(t Nq / T)..floor((t + 1) Nq / T) - 1`` and
    keys ``floor(t Nk / T)..``; a query sees its own frame's keys."""
    def frame(n):
        edges = torch.tensor([t * n // frames for t in range(1, frames)], dtype=torch.long)
        return torch.bucketize(torch.arange(n), edges, right=True)

    return frame(nq)[:, None] == frame(nk)[None, :]


def naive_crosslmm_module(m, x, context=None):
    """CrossLMM cross-attention block: ``x + tanh(gate) * W_o Attn(W_q LN(x), W_k V, W_v V)``."""
    ctx = x if context is None else context
    h = m.num_heads
    q = _heads(_lin(m.q_proj, _ln(m.norm, x)), h)
    k, v = _heads(_lin(m.k_proj, ctx), h), _heads(_lin(m.v_proj, ctx), h)
    allowed = _frame_local_dense(x.shape[1], ctx.shape[1], m.num_frames) if m.local == "frame" else None
    o = _lin(m.out_proj, naive_attention(q, k, v, allowed).reshape(x.shape[0], x.shape[1], -1))
    return x + torch.tanh(m.gate) * o


def naive_spatial_token_map(q_s, k, scale=None):
    """SAT's foreground map ``sigmoid(mean_h(q_s . k_j * scale))``: ``q_s (B, 1, H, D)``, ``k (B, N, H, D)``
    -> ``(B, N)``."""
    work = torch.float64 if q_s.dtype == torch.float64 else torch.float32
    scale = q_s.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q_s.to(work), k.to(work))[:, :, 0] * scale   # (B, H, N)
    return torch.sigmoid(s.mean(1)).to(q_s.dtype)


def _qkv(m, x):
    return (_heads(t, m.num_heads) for t in _lin(m.qkv, x).chunk(3, -1))


def naive_mixformer_module(m, x):
    """MixFormer MAM on ``[template; search]``: template rows see the template only (unless symmetric)."""
    q, k, v = _qkv(m, x)
    n = x.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = None if m.symmetric else (i >= m.num_template) | (j < m.num_template)
    return _lin(m.proj, naive_attention(q, k, v, allowed).reshape(x.shape))


def naive_ee_mllm_module(m, x):
    """EE-MLLM composite attention layer on ``[visual; text]``."""
    q, k, v = _qkv(m, x)
    return _lin(m.proj, naive_composite_attention(q, k, v, min(m.num_visual, x.shape[1])).reshape(x.shape))


def naive_adem_module(m, x, context=None):
    """ADEM-VL fusion: ``x + weight * norm(drop(phi(x) phi(xv)^T)) xv``, no parameters."""
    return naive_adem_fusion(x, x if context is None else context, m.feature_map, m.drop_ratio, m.normalize, m.weight)


def _modality_ids(n, lengths):
    a, b = lengths
    return torch.where(torch.arange(n) < a, 0, torch.where(torch.arange(n) < a + b, 1, 2))


def naive_itcfn_module(m, x, present=None):
    """ITCFN co-attention on ``[M_a; M_b; M_c]``: every token attends to the tokens of the two other modalities
    (of those present)."""
    q, k, v = _qkv(m, x)
    mod = _modality_ids(x.shape[1], m.modality_lengths)
    allowed = (mod[:, None] != mod[None, :])[None, None]                     # (1, 1, N, N)
    if present is not None:
        allowed = allowed & present[:, mod][:, None, None, :]                 # (B, 1, N, N)
    return _lin(m.proj, naive_attention(q, k, v, allowed).reshape(x.shape))


def naive_fca_module(m, x, context=None):
    """Fcaformer attention: queries of ``x`` over ``[x; alpha * cross tokens]``."""
    h = m.num_heads
    q = _heads(_lin(m.q_proj, x), h)
    kv_in = x if context is None else torch.cat([x, context * m.alpha], 1)
    k, v = (_heads(t, h) for t in _lin(m.kv_proj, kv_in).chunk(2, -1))
    return _lin(m.proj, naive_attention(q, k, v).reshape(x.shape))


def naive_videobooth_module(m, x, context=None):
    """VideoBooth cross-frame attention with image-prompt keys/values on frame 0."""
    h, n, p = m.num_heads, x.shape[1], m.tokens_per_frame
    q = _heads(_lin(m.to_q, x), h)
    k, v = _heads(_lin(m.to_k, x), h), _heads(_lin(m.to_v, x), h)
    ni = 0
    if context is not None:
        ni = context.shape[1]
        k = torch.cat([_heads(_lin(m.to_k_img, context), h), k], 1)
        v = torch.cat([_heads(_lin(m.to_v_img, context), h), v], 1)
    f = torch.arange(n) // p
    kf = torch.cat([torch.full((ni,), -1), torch.arange(n) // p])          # -1: prompt keys
    allowed = torch.where(f[:, None] == 0, (kf[None, :] <= 0), (kf[None, :] == 0) | (kf[None, :] == f[:, None]))
    return _lin(m.to_out, naive_attention(q, k, v, allowed).reshape(x.shape))


def naive_sat_module(m, x):
    """SAT spatial-query attention on ``[spatial token; patches]``: patches times their foreground probability,
    the spatial token plus the probability-weighted mean of the patch values."""
    h = m.num_heads
    q_s = _heads(_lin(m.q_proj, x[:, :1]), h)
    k = _heads(_lin(m.k_proj, x[:, 1:]), h)
    prob = naive_spatial_token_map(q_s, k)                                     # (B, N)
    pooled = (prob[..., None] * _lin(m.v_proj, x[:, 1:])).sum(1, keepdim=True) / prob.sum(1)[:, None, None]
    return torch.cat([x[:, :1] + _lin(m.out_proj, pooled), x[:, 1:] * prob[..., None]], 1)


def naive_biased_attention(q, k, v, bias, scale=None):
    """Softmax attention with additive logits ``bias (B, H, Nq, Nk)``: ``softmax(q k^T * scale + bias) v``."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale + bias.to(work)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.to(work)).to(q.dtype)


def naive_pointer_probs(q, k, allowed=None, scale=None):
    """Pointer distribution ``softmax_j(q . k_j * scale)`` over keys: ``(B, H, Nq, Nk)``, masked keys 0."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(work), k.to(work)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1).to(q.dtype)


def sincos_embed(delta, dim):
    """``delta (..., 2)`` -> ``(..., dim)``: sines and cosines of both coordinates at ``dim / 4`` frequencies."""
    f = 1.0 / (10000.0 ** (torch.arange(dim // 4, dtype=delta.dtype) / max(1, dim // 4)))
    ax = delta[..., :1] * f
    ay = delta[..., 1:2] * f
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], -1)


def _bvr_positions(n, dtype):
    return torch.stack([torch.arange(n, dtype=dtype), torch.zeros(n, dtype=dtype)], -1)      # (N, 2)


def naive_bvr_module(m, x, context=None, q_pos=None, k_pos=None):
    """RelationNet++ BVR: queries attend to the top-k scored keys with appearance + geometry logits, residual."""
    ctx = x if context is None else context
    b, n, _ = x.shape
    h = m.num_heads
    qp = _bvr_positions(n, x.dtype) if q_pos is None else q_pos
    kp = _bvr_positions(ctx.shape[1], x.dtype) if k_pos is None else k_pos
    with torch.no_grad():
        idx = _lin(m.key_score, ctx)[..., 0].topk(min(m.topk, ctx.shape[1]), -1).indices    # (B, K)
    sel = torch.stack([ctx[i, idx[i]] for i in range(b)])                                    # (B, K, C)
    kps = kp[idx] if kp.dim() == 2 else torch.stack([kp[i, idx[i]] for i in range(b)])      # (B, K, 2)
    qps = qp.expand(b, n, 2) if qp.dim() == 2 else qp
    delta = (kps[:, None] - qps[:, :, None]) / m.pos_scale                                   # (B, N, K, 2)
    g = _lin(m.geo[2], F.relu(_lin(m.geo[0], sincos_embed(delta, m.sincos_dim))))           # (B, N, K, H)
    q = _heads(_lin(m.q_proj, x), h)
    k, v = _heads(_lin(m.k_proj, sel), h), _heads(_lin(m.v_proj, sel), h)
    o = naive_biased_attention(q, k, v, g.permute(0, 3, 1, 2))
    return x + _lin(m.out_proj, o.reshape(b, n, -1))


def naive_sva_module(m, maps, queries=None):
    """Cambrian-1 SVA: grid queries plus the cell-local attention over every encoder's map."""
    b = maps[0].shape[0]
    q0 = m.queries.expand(b, -1, -1) if queries is None else queries
    h = m.num_heads
    q = _heads(_lin(m.q_proj, q0), h)
    feats = []
    for f, kp, vp in zip(maps, m.k_proj, m.v_proj):
        k = _lin(kp, f).reshape(*f.shape[:3], h, -1)                       # (B, Y, X, H, D)
        v = _lin(vp, f).reshape(*f.shape[:3], h, -1)
        feats.append((k, v))
    o = naive_cell_local_attention(q, feats, m.grid)
    return q0 + _lin(m.out_proj, o.reshape(b, q0.shape[1], -1))


def naive_filip_module(m, image_tokens, text_tokens, text_mask=None):
    """FILIP similarities after the two projections."""
    return naive_filip_similarity(_lin(m.image_proj, image_tokens), _lin(m.text_proj, text_tokens), None, text_mask)
