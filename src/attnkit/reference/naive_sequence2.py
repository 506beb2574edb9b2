"""Naive twins of the second batch of sequence-family ops and modules: obvious loops, torch only.

Each function is the specification its fast op or module is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------- Combiner


def naive_combiner(q, k, v, *, segment, causal=False, scale=None):
    """Combiner-Fixed (arXiv 2107.05768, section 4.1) one query at a time.

    ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)`` -> ``(B, N, H, Dv)``. Query ``i`` of segment ``a = i // s``
    attends its own segment's keys directly (``j <= i`` when causal) and every other segment ``r``
    (``r < a`` when causal) through one summary: key ``max_{j in r} k_j``, value
    ``sum_{j in r} softmax_j(max_{j' in r} q_{j'} . k_j) v_j``; one softmax over both.
    """
    N, D = q.shape[1], q.shape[-1]
    s = segment
    scale = D ** -0.5 if scale is None else scale
    q = q * scale
    n = math.ceil(N / s)
    summ_k, summ_v = [], []
    for r in range(n):
        sl = slice(r * s, min(N, (r + 1) * s))
        qr, kr = q[:, sl].amax(1), k[:, sl].amax(1)  # (B, H, D)
        w = torch.softmax(torch.einsum("bhd,bjhd->bhj", qr, k[:, sl]), -1)
        summ_k.append(kr)
        summ_v.append(torch.einsum("bhj,bjhd->bhd", w, v[:, sl]))
    outs = []
    for i in range(N):
        a = i // s
        hi = min(N, (a + 1) * s) if not causal else i + 1
        direct = range(a * s, hi)
        regions = [r for r in range(n) if (r < a if causal else r != a)]
        keys = torch.stack([k[:, j] for j in direct] + [summ_k[r] for r in regions], 1)  # (B, M, H, D)
        vals = torch.stack([v[:, j] for j in direct] + [summ_v[r] for r in regions], 1)  # (B, M, H, Dv)
        p = torch.softmax(torch.einsum("bhd,bmhd->bhm", q[:, i], keys), -1)
        outs.append(torch.einsum("bhm,bmhd->bhd", p, vals))
    return torch.stack(outs, 1)  # (B, N, H, Dv)


def naive_combiner_module(m, x):
    """:class:`~attnkit.mechanisms.seq_combiner.CombinerAttention` with :func:`naive_combiner`."""
    B, N, C = x.shape
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).view(B, N, 3, m.num_heads, C // m.num_heads).unbind(2)
    o = naive_combiner(q, k, v, segment=m.segment, causal=m.causal)  # (B, N, H, D)
    return F.linear(o.reshape(B, N, C), m.proj.weight, m.proj.bias)


# --------------------------------------------------------------------------------------------- DSF


def naive_dsf_scan(decay, b, c, u, norm=None):
    """The dynamical system of DSF (arXiv 2405.15731, section 2), one step at a time.

    ``h_i = diag(decay_i) h_{i-1} + b_i u_i^T`` (state ``(n, d)`` per head), ``y_i = h_i^T c_i / norm_i``.
    ``decay (B, N, H)`` or ``(B, N, H, n)``, ``b, c (B, N, H, n)``, ``u (B, N, H, d)``, ``norm (B, N, H)``
    or None -> ``(B, N, H, d)``.
    """
    B, N, H, n = b.shape
    lam = decay if decay.dim() == 4 else decay.unsqueeze(-1)  # (B, N, H, n or 1)
    h = u.new_zeros(B, H, n, u.shape[-1])
    ys = []
    for i in range(N):
        h = lam[:, i].unsqueeze(-1) * h + b[:, i].unsqueeze(-1) * u[:, i].unsqueeze(-2)  # (B, H, n, d)
        y = (h * c[:, i].unsqueeze(-1)).sum(-2)  # (B, H, d)
        ys.append(y if norm is None else y / norm[:, i].unsqueeze(-1))
    return torch.stack(ys, 1)


def naive_causal_linear_attention(q, k, v, *, normalize=False, eps=1e-6):
    """``o_i = sum_{j <= i} (q_i . k_j) v_j`` (divided by ``q_i . sum_{j <= i} k_j + eps`` if normalize), with
    the feature map already applied: ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)``."""
    s = torch.einsum("bihd,bjhd->bhij", q, k).tril()  # (B, H, N, N)
    o = torch.einsum("bhij,bjhd->bihd", s, v)
    if normalize:
        o = o / (s.sum(-1).transpose(1, 2).unsqueeze(-1) + eps)
    return o


def naive_selective_scan(x, delta, A, Bm, Cm):
    """S6 (Mamba, arXiv 2312.00752) with the Euler input ``B_bar = delta B``: per channel ``c`` and state ``s``,
    ``h = exp(delta A) h + delta B x``, ``y = C . h``. ``x, delta (B, N, Ch)``, ``A (Ch, n)``, ``Bm, Cm (B, N, n)``."""
    Bt, N, Ch = x.shape
    h = x.new_zeros(Bt, Ch, A.shape[-1])
    ys = []
    for i in range(N):
        d = delta[:, i].unsqueeze(-1)  # (B, Ch, 1)
        h = torch.exp(d * A) * h + d * Bm[:, i].unsqueeze(1) * x[:, i].unsqueeze(-1)  # (B, Ch, n)
        ys.append((h * Cm[:, i].unsqueeze(1)).sum(-1))
    return torch.stack(ys, 1)  # (B, N, Ch)


def naive_gated_rnn(x, f):
    """A diagonal gated linear RNN: ``h_i = f_i * h_{i-1} + (1 - f_i) * x_i``, ``y_i = h_i``; ``x, f (B, N, Ch)``."""
    h = torch.zeros_like(x[:, 0])
    ys = []
    for i in range(x.shape[1]):
        h = f[:, i] * h + (1 - f[:, i]) * x[:, i]
        ys.append(h)
    return torch.stack(ys, 1)


def naive_dsf_module(m, x):
    """:class:`~attnkit.mechanisms.seq_dsf.DSFLayer`, each form in its own native loop (not through the DSF)."""
    B, N, C = x.shape
    if m.form == "linear_attention":
        H = m.num_heads
        q, k, v = F.linear(x, m.inp.weight, m.inp.bias).view(B, N, 3, H, C // H).unbind(2)  # (B, N, H, D)
        o = naive_causal_linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, normalize=True).reshape(B, N, C)
    elif m.form == "s6":
        z = F.linear(x, m.inp.weight, m.inp.bias)
        xs, dt = z[..., :C], F.softplus(z[..., C:2 * C])
        Bm, Cm = z[..., 2 * C:].chunk(2, -1)
        o = naive_selective_scan(xs, dt, -torch.exp(m.a_log), Bm, Cm)
    else:
        xs, g = F.linear(x, m.inp.weight, m.inp.bias).chunk(2, -1)
        o = naive_gated_rnn(xs, torch.sigmoid(g))
    return F.linear(o, m.proj.weight, m.proj.bias)


# ---------------------------------------------------------------------------- hierarchical attention


def uniform_parents(n, branching):
    """The balanced tree over ``n`` leaves in order: groups of ``branching`` consecutive nodes per level, until at
    most ``branching`` nodes remain under the root. Returns ``parents`` as a list of int64 tensors."""
    parents, count = [], n
    while True:
        parents.append(torch.arange(count) // branching)
        count = -(-count // branching)
        if count <= branching:
            return parents


def naive_hierarchical_attention(q, k, v, parents, *, scale=None):
    """Hierarchical attention by brute force: for every query, walk the tree and pool each sibling subtree from
    its leaves directly (no dynamic programming).

    ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)``; ``parents[l][node]`` is the parent (at level ``l + 1``) of a node
    of level ``l`` (level 0 = the ``N`` leaves; the last level's nodes hang from one implicit root). Query ``i``
    attends the leaves of its own level-1 group exactly and, at every level, each sibling ``S`` of its ancestor
    as one key ``mean_{j in S} k_j`` with score bonus ``log |S|`` and value ``mean_{j in S} v_j``.
    """
    N, D = q.shape[1], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    par = [[int(x) for x in p] for p in parents]
    L = len(par)

    def ancestor(j, level):  # the level-`level` node above leaf j (level 0: j itself)
        for t in range(level):
            j = par[t][j]
        return j

    outs = []
    for i in range(N):
        keys, vals, bonus = [], [], []
        for j in range(N):
            if ancestor(j, 1) == ancestor(i, 1):
                keys.append(k[:, j])
                vals.append(v[:, j])
                bonus.append(0.0)
        for level in range(1, L + 1):
            mine = ancestor(i, level)
            up = ancestor(i, level + 1) if level < L else 0
            for node in range(max(par[level - 1]) + 1):  # every node of this level
                node_parent = par[level][node] if level < L else 0
                if node == mine or node_parent != up:
                    continue
                members = [j for j in range(N) if ancestor(j, level) == node]
                if not members:
                    continue
                keys.append(torch.stack([k[:, j] for j in members]).mean(0))
                vals.append(torch.stack([v[:, j] for j in members]).mean(0))
                bonus.append(math.log(len(members)))
        kk, vv = torch.stack(keys, 1), torch.stack(vals, 1)  # (B, M, H, .)
        s = torch.einsum("bhd,bmhd->bhm", q[:, i] * scale, kk) + torch.tensor(bonus, dtype=q.dtype)
        outs.append(torch.einsum("bhm,bmhd->bhd", torch.softmax(s, -1), vv))
    return torch.stack(outs, 1)  # (B, N, H, Dv)


def naive_hierarchical_module(m, x):
    """:class:`~attnkit.mechanisms.seq_hierarchical.HierarchicalAttention` with the brute-force op."""
    B, N, C = x.shape
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).view(B, N, 3, m.num_heads, C // m.num_heads).unbind(2)
    o = naive_hierarchical_attention(q, k, v, uniform_parents(N, m.branching))  # (B, N, H, D)
    return F.linear(o.reshape(B, N, C), m.proj.weight, m.proj.bias)


# ------------------------------------------------------------------------------------------- iLLaMA


def naive_soft_causal_attention(q, k, v, alpha, *, scale=None):
    """iLLaMA's soft mask (arXiv 2404.06773): ``softmax(S + log(alpha + (1 - alpha) [j <= i])) V``, i.e. future
    keys' weights multiplied by ``alpha`` before renormalising. ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)``."""
    N, D = q.shape[1], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    past = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    w = torch.where(past, torch.ones((), dtype=s.dtype), torch.full((), float(alpha), dtype=s.dtype))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(s + w.log(), -1), v)


def naive_llama_vit_module(m, x):
    """:class:`~attnkit.mechanisms.seq_llama_vit.LlamaViTAttention` with :func:`naive_soft_causal_attention`."""
    B, N, C = x.shape
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).view(B, N, 3, m.num_heads, C // m.num_heads).unbind(2)
    o = naive_soft_causal_attention(q, k, v, m.alpha)  # (B, N, H, D)
    return F.linear(o.reshape(B, N, C), m.proj.weight, m.proj.bias)
