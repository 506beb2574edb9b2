"""Naive twins of ACMIL's pooling, MEDUSA's multi-scale gate, RISurConv's surface attention and CSA's gates,
and of the modules that call them (``reference(module, *inputs)`` for the registry).

Obvious code, torch only: loops over branches, scales and neighbourhoods; no ``attnkit.ops`` import.
Papers: arXiv 2311.07125 (ACMIL), 2110.06063 (MEDUSA), 2408.06110 (RISurConv), 2109.02613 (CSA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _work(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ------------------------------------------------------------------------------------------- ACMIL


def naive_acmil_pool(logits, x, num_masked=0, mask_drop=0.6, generator=None, return_weights=False):
    """``logits (B, M, N)``, ``x (B, N, C)`` -> ``(B, M, C)`` (and the weights ``(B, M, N)``).

    The random choice is the same draw as the op's: ranks of ``torch.rand((B, M, K), generator)`` in float32."""
    B, M, N = logits.shape
    k = min(num_masked, N)
    drop = int(k * mask_drop)
    u = torch.rand((B, M, k), generator=generator, device=logits.device, dtype=torch.float32) if drop else None
    rows = []
    for b in range(B):
        for m in range(M):
            row = _work(logits[b, m])
            if drop:
                order = torch.argsort(row.detach(), descending=True)[:k]  # the top-K instances
                ranks = torch.argsort(u[b, m])[:drop]  # a uniform random subset of them
                masked = torch.zeros(N, dtype=torch.bool)
                masked[order[ranks].cpu()] = True
                row = torch.where(masked.to(row.device), torch.full_like(row, torch.finfo(row.dtype).min), row)
            rows.append(torch.exp(row - row.max()) / torch.exp(row - row.max()).sum())
    w = torch.stack(rows).view(B, M, N).to(x.dtype)  # (B, M, N)
    out = torch.stack([torch.stack([(w[b, m, :, None] * x[b]).sum(0) for m in range(M)]) for b in range(B)])
    return (out, w) if return_weights else out


def naive_acmil_logits(module, x):
    """ACMIL's gated attention scores (arXiv 2311.07125, Eq. 1-2, from ABMIL 1802.04712): ``(B, N, C)`` ->
    ``(B, M, N)``, ``a_m = w_m^T (tanh(V h + b_V) * sigmoid(U h + b_U)) + b_m``."""
    v = torch.tanh(x @ module.attention_v.weight.t() + module.attention_v.bias)  # (B, N, D)
    u = torch.sigmoid(x @ module.attention_u.weight.t() + module.attention_u.bias)  # (B, N, D)
    return ((v * u) @ module.attention_w.weight.t() + module.attention_w.bias).transpose(1, 2)  # (B, M, N)


def naive_acmil_module(module, x, *, generator=None, return_attention=False):
    """``ACMILPooling``: ``x (B, N, C)`` -> branch embeddings ``(B, M, C)``.

    In training with masking and neither ``generator`` nor the module's ``seed``, the draw is random and has
    no twin: refused."""
    masking = module.training and module.num_masked > 0 and int(min(module.num_masked, x.shape[1])
                                                                * module.mask_drop) > 0
    if masking and generator is None:
        if module.seed is None:
            raise ValueError("naive_acmil_module: a training forward with masking draws a random mask; set the "
                             "module's seed, pass generator=, or call module.eval()")
        generator = torch.Generator(device=x.device).manual_seed(module.seed)
    return naive_acmil_pool(naive_acmil_logits(module, x), x, module.num_masked if module.training else 0,
                            module.mask_drop, generator, return_attention)


# --------------------------------------------------------------------------------------------- CSA


def naive_class_semantic_attention(f, r, w1, b1, w2, b2, wt, bt, wf=None, bf=None, fuse="concat"):
    """CSA (arXiv 2109.02613 Sec. 3) step by step: ``f (B, T, C)``, ``r (B, T, C_r)`` -> ``(B, T, C)``."""
    B, T, _ = f.shape
    k = wt.shape[-1]
    pooled = sum(r[:, t] for t in range(T)) / T  # (B, C_r): mean over time
    hidden = torch.clamp(pooled @ w1.t() + (0 if b1 is None else b1), min=0)
    a_c = 1 / (1 + torch.exp(-(hidden @ w2.t() + (0 if b2 is None else b2))))  # (B, C)
    a_t = []
    for t in range(T):  # zero-padded correlation over the window [t - k//2, t + k//2]
        acc = torch.zeros(B, dtype=r.dtype, device=r.device) + (0 if bt is None else bt[0])
        for j in range(k):
            s = t + j - k // 2
            if 0 <= s < T:
                acc = acc + r[:, s] @ wt[0, :, j]
        a_t.append(1 / (1 + torch.exp(-acc)))
    a_t = torch.stack(a_t, 1)  # (B, T)
    by_channel = f * a_c[:, None, :]
    by_time = f * a_t[:, :, None]
    if fuse == "sum":
        return by_channel + by_time
    return torch.cat([by_channel, by_time], -1) @ wf.t() + (0 if bf is None else bf)


def naive_csa_module(module, x, r=None):
    """``ClassSemanticAttention``: ``x (B, T, C)`` (and ``r (B, T, C_r)``, default ``x``) -> ``(B, T, C)``."""
    r = x if r is None else r
    fuse = module.fuse
    return naive_class_semantic_attention(
        x, r, module.channel_fc1.weight, module.channel_fc1.bias, module.channel_fc2.weight, module.channel_fc2.bias,
        module.temporal_conv.weight, module.temporal_conv.bias,
        module.fusion.weight if fuse == "concat" else None, module.fusion.bias if fuse == "concat" else None, fuse)


# ------------------------------------------------------------------------------------------ MEDUSA


def naive_adaptive_mean(x, size):
    """Adaptive average pooling of ``(B, C, H, W)`` to ``size``: bin ``(i, j)`` averages rows
    ``[floor(i H / h), ceil((i + 1) H / h))`` and the same columns."""
    B, C, H, W = x.shape
    h, w = size
    out = torch.zeros(B, C, h, w, dtype=x.dtype, device=x.device)
    for i in range(h):
        r0, r1 = (i * H) // h, -(-((i + 1) * H) // h)
        for j in range(w):
            c0, c1 = (j * W) // w, -(-((j + 1) * W) // w)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean((2, 3))
    return out


def naive_multiscale_gate(body, stages, weights, biases, mode="residual"):
    """MEDUSA's heads (arXiv 2110.06063) stage by stage: pool the body to the stage, 1x1 head, sigmoid, gate."""
    out = []
    for x, w, b in zip(stages, weights, biases, strict=True):
        pooled = naive_adaptive_mean(_work(body), tuple(x.shape[2:]))  # (B, C_b, H_s, W_s)
        logits = torch.einsum("bkhw,ck->bchw", pooled, _work(w))
        if b is not None:
            logits = logits + _work(b)[None, :, None, None]
        a = (1 / (1 + torch.exp(-logits))).to(x.dtype)
        out.append(x * (1 + a) if mode == "residual" else x * a)
    return out


def naive_medusa_body(module, x):
    """MEDUSA's attention body as the module builds it: a two-level encoder-decoder of 3x3 convs."""
    e1 = F.relu(F.conv2d(x, module.enc1.weight, module.enc1.bias, padding=1))  # (B, C_b, H, W)
    down = F.avg_pool2d(e1, 2, ceil_mode=True)  # (B, C_b, ceil(H/2), ceil(W/2))
    e2 = F.relu(F.conv2d(down, module.enc2.weight, module.enc2.bias, padding=1))
    up = e2.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :x.shape[2], :x.shape[3]]  # nearest x2
    return F.relu(F.conv2d(e1 + up, module.dec.weight, module.dec.bias, padding=1))  # (B, C_b, H, W)


def naive_medusa_module(module, x, stages=None):
    """``MEDUSAAttention``: ``x (B, C, H, W)`` -> ``x`` gated (no stages) or the gated ``stages``."""
    body = naive_medusa_body(module, x)
    maps = [x] if stages is None else list(stages)
    heads = module.heads[:len(maps)]
    out = naive_multiscale_gate(body, maps, [h.weight[:, :, 0, 0] for h in heads], [h.bias for h in heads],
                                module.mode)
    return out[0] if stages is None else out


# --------------------------------------------------------------------------------------- RISurConv


def naive_surface_attention(q, k, v, normalize="neighbours"):
    """Offset-attention's read (arXiv 2012.09688 Sec. 3.3) group by group: ``(B, G, K, D)`` -> ``(B, G, K, Dv)``."""
    q, k, v_w = _work(q), _work(k), _work(v)
    B, G, K, _ = q.shape
    probs = torch.zeros(B, G, K, K, dtype=q.dtype, device=q.device)
    for b in range(B):
        for g in range(G):
            s = q[b, g] @ k[b, g].t()  # (K_i, K_j), no scale
            e = torch.exp(s - s.max(-1, keepdim=True).values)
            probs[b, g] = e / e.sum(-1, keepdim=True)  # softmax over the keys j
    total = probs.sum(2, keepdim=True) if normalize == "neighbours" else probs.sum(1, keepdim=True)
    probs = probs / (1e-9 + total)  # renormalise each key's column
    out = torch.zeros(B, G, K, v.shape[-1], dtype=v_w.dtype, device=v.device)
    for j in range(K):
        out[:, :, j] = (probs[:, :, :, j, None] * v_w).sum(2)  # out_j = sum_i A_ij v_i
    return out.to(v.dtype)


def _nunit(v):
    return v / (torch.sqrt((v * v).sum(-1, keepdim=True)) + 1e-7)


def naive_risp_features(points, normals, k=16, shift=1):
    """RISurConv's RISP (arXiv 2408.06110 Sec. 3.2) point by point: ``(B, N, 3)`` twice -> ``((B, N, K, 14), idx)``."""
    pts, nrm = _work(points), _work(normals)
    nrm = nrm / torch.sqrt((nrm * nrm).sum(-1, keepdim=True)).clamp_min(1e-12)
    B, N, _ = pts.shape
    feats = torch.zeros(B, N, k, 14, dtype=pts.dtype, device=pts.device)
    index = torch.zeros(B, N, k, dtype=torch.long, device=pts.device)
    for b in range(B):
        for p in range(N):
            c, n_p = pts[b, p], nrm[b, p]
            dist = torch.sqrt(((pts[b] - c) ** 2).sum(-1)).detach()
            dist[p] = torch.inf  # not the point itself
            near = torch.argsort(dist)[:k].tolist()  # the k nearest other points
            local = [pts[b, j] - c for j in near]
            tangent = [(v - (v @ n_p) * n_p).detach() for v in local]
            lengths = [float(torch.sqrt((t * t).sum())) for t in tangent]
            longest = lengths.index(max(lengths))
            ref = tangent[longest] / (max(lengths) + 1e-7)
            keys = []
            for i, (t, ln) in enumerate(zip(tangent, lengths, strict=True)):
                u = t / (ln + 1e-7)
                cos = float(u @ ref)
                side = 1.0 if i == longest else float(torch.linalg.cross(u, ref) @ n_p.detach())
                keys.append(cos if side >= 0 else -cos - 2)  # the positive half-plane first, then the other
            order = sorted(range(k), key=lambda i: -keys[i])
            near = [near[i] for i in order]
            index[b, p] = torch.tensor(near)
            # neighbour i with its ordered predecessor (i - shift) and successor (i + shift), all at once
            rows = torch.tensor(near)
            prev, succ = rows.roll(shift), rows.roll(-shift)
            xi, x3, x4 = pts[b, rows] - c, pts[b, prev] - c, pts[b, succ] - c  # (K, 3) each
            ni, n3, n4 = nrm[b, rows], nrm[b, prev], nrm[b, succ]
            u_pi, u_p3, u_p4, u_3i, u_i4 = _nunit(xi), _nunit(x3), _nunit(x4), _nunit(xi - x3), _nunit(x4 - xi)

            def dot(a, b_):
                return (a * b_).sum(-1)

            feats[b, p] = torch.stack([
                torch.sqrt((xi * xi).sum(-1)), dot(u_pi, n_p), -dot(u_pi, ni), dot(u_pi, u_p3),
                dot(u_p3, n_p), -dot(u_p3, n3), -dot(u_p3, u_3i), -dot(u_3i, ni), dot(u_3i, n3),
                dot(u_p4, u_pi), dot(u_p4, u_i4), dot(u_i4, n4), dot(u_pi, n4),
                dot(torch.linalg.cross(u_p4, u_pi, dim=-1), torch.linalg.cross(u_p3, u_pi, dim=-1))], -1)
    return feats.to(points.dtype), index


def _naive_bn(x, bn):
    """BatchNorm over every axis but the last (channels): batch statistics in training, running ones in eval."""
    flat = x.reshape(-1, x.shape[-1])
    if bn.training:
        mean, var = flat.mean(0), flat.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean.to(x.dtype), bn.running_var.to(x.dtype)
    return ((x - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias).reshape(x.shape)


def _naive_offset_layer(layer, x, normalize):
    """Offset-attention layer on ``(B, G, K, C)``: ``x + relu(BN(W_t (x - attention read) + b_t))``."""
    q, k = x @ layer.q.weight.t(), x @ layer.k.weight.t()
    v = x @ layer.v.weight.t() + layer.v.bias
    read = naive_surface_attention(q, k, v, normalize)
    return x + torch.relu(_naive_bn((x - read) @ layer.trans.weight.t() + layer.trans.bias, layer.norm))


def naive_risur_module(module, x, features=None):
    """``RISurAttention``: ``x (B, N, 6)`` (points, normals), ``features (B, N, C_in)`` -> ``(B, N, out_dim)``."""
    ri, idx = naive_risp_features(x[..., :3], x[..., 3:], module.k, module.shift)  # (B, N, K, 14)
    h = _naive_bn(ri @ module.embed1.weight.t(), module.embed_norm1)
    h = torch.relu(_naive_bn(h @ module.embed2.weight.t(), module.embed_norm2))  # (B, N, K, E)
    h = _naive_offset_layer(module.local_attention, h, module.normalize)
    if features is not None:
        grouped = torch.stack([features[b][idx[b]] for b in range(idx.shape[0])])  # (B, N, K, C_in)
        h = torch.cat([h, grouped], -1)
    h = torch.relu(_naive_bn(h @ module.conv.weight.t() + module.conv.bias, module.conv_norm))
    pooled = h.max(2).values  # (B, N, out_dim): max over the neighbourhood
    return _naive_offset_layer(module.global_attention, pooled[:, None], "neighbours")[:, 0]
