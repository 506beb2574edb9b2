"""Naive linear attention: the spec and the test oracle (docs/design.md §3; Katharopoulos et al., arXiv 2006.16236 §3).

Two obvious implementations that must agree with each other and with every fast path:

* :func:`naive_linear_attention` materialises the ``(N, N)`` weight matrix
  ``w(t, s) = prod_{r=s+1..t} decay_r`` (masked *before* ``exp``), O(N^2).
* :func:`naive_recurrent_linear_attention` runs the recurrence one token at a time,
  ``S_t = decay_t S_{t-1} + phi(k_t) v_t^T``, ``o_t = scale phi(q_t) S_t``.

Both compute in the input dtype (tests call them in float64). Layout heads-last:
``q (B, N, H, D)``, ``k (B, M, Hkv, D)``, ``v (B, M, Hkv, Dv)``; state ``(B, H, Dphi, Dv)``;
with ``normalize=True`` the state is the pair ``(S, z)`` with ``z (B, H, Dphi)``.
"""

from __future__ import annotations

import torch

# The feature maps by the book (elu+1: arXiv 2006.16236; ReLU: L2ViT, arXiv 2501.16182; softmax over
# features), written again here so the oracle does not share code with the op it checks.
_PHI = {
    "identity": lambda x: x,
    "elu+1": lambda x: torch.where(x > 0, x + 1, torch.exp(x)),
    "elu1": lambda x: torch.where(x > 0, x + 1, torch.exp(x)),
    "relu": lambda x: x.clamp_min(0),
    "softmax": lambda x: torch.softmax(x.to(torch.promote_types(x.dtype, torch.float32)), -1).to(x.dtype),
}


def _prepare(q, k, v, feature_map, decay, scale):
    phi = feature_map if callable(feature_map) else _PHI[feature_map]
    B, _, H, D = q.shape
    g = k.shape[2]
    rep = H // g
    pq = phi(q) * (D ** -0.5 if scale is None else scale)  # (B, N, H, Dphi)
    pk = phi(k).repeat_interleave(rep, dim=2)  # (B, M, H, Dphi): query head h reads kv head h // rep
    vv = v.repeat_interleave(rep, dim=2)  # (B, M, H, Dv)
    if decay is None:
        logd = torch.zeros(B, k.shape[1], H, dtype=q.dtype)
    else:
        decay = torch.as_tensor(decay, dtype=q.dtype)
        logd = torch.log(decay).expand(B, k.shape[1], H) if decay.dim() <= 1 else torch.log(decay)
    return pq, pk, vv, logd


def _split_state(initial_state, normalize, B, H, Dp, Dv, dtype):
    if initial_state is None:
        return torch.zeros(B, H, Dp, Dv, dtype=dtype), torch.zeros(B, H, Dp, dtype=dtype)
    if normalize:
        return initial_state
    return initial_state, torch.zeros(B, H, Dp, dtype=dtype)


def naive_linear_attention(q, k, v, *, causal=True, feature_map="identity", decay=None, normalize=False,
                           scale=None, initial_state=None, return_state=False, eps=1e-6):
    """Materialised linear attention (fp64 oracle). Same arguments and results as ``ak.linear_attention``.

    Returns ``o (B, N, H, Dv)``, and with ``return_state`` also the final state.
    """
    pq, pk, vv, logd = _prepare(q, k, v, feature_map, decay, scale)
    B, N, H, Dp = pq.shape
    Dv = v.shape[-1]
    S0, z0 = _split_state(initial_state, normalize, B, H, Dp, Dv, pq.dtype)
    scores = torch.einsum("bthd,bshd->bhts", pq, pk)  # (B, H, N, M)
    if causal:
        G = torch.cumsum(logd, dim=1)  # (B, N, H): G_t = sum_{r<=t} log decay_r
        diff = G[:, :, None, :] - G[:, None, :, :]  # (B, Nt, Ns, H) = log w(t, s)
        t_idx = torch.arange(N)[:, None, None]
        s_idx = torch.arange(N)[None, :, None]
        diff = torch.where(s_idx <= t_idx, diff, float("-inf"))  # mask BEFORE exp: the upper part is >= 0
        W = torch.exp(diff).permute(0, 3, 1, 2)  # (B, H, N, N)
        A = scores * W
        qdec = torch.exp(G)[..., None]  # (B, N, H, 1): decay of the initial state seen at t
        kdec = torch.exp(G[:, -1:] - G)  # (B, N, H): decay from s to the end
        SN_dec = torch.exp(G[:, -1])[..., None, None]  # (B, H, 1, 1)
    else:
        A = scores
        qdec = torch.ones(1, dtype=pq.dtype)
        kdec = torch.ones(pk.shape[:3], dtype=pq.dtype)
        SN_dec = torch.ones(1, dtype=pq.dtype)
    num = torch.einsum("bhts,bshe->bthe", A, vv) + qdec * torch.einsum("bthd,bhde->bthe", pq, S0)
    SN = SN_dec * S0 + torch.einsum("bsh,bshd,bshe->bhde", kdec, pk, vv)
    if normalize:
        den = A.sum(-1).permute(0, 2, 1)[..., None] + qdec * torch.einsum("bthd,bhd->bth", pq, z0)[..., None]
        out = num / (den + eps)
        zN = SN_dec[..., 0] * z0 + torch.einsum("bsh,bshd->bhd", kdec, pk)
        state = (SN, zN)
    else:
        out, state = num, SN
    return (out, state) if return_state else out


def naive_recurrent_linear_attention(q, k, v, *, feature_map="identity", decay=None, normalize=False,
                                     scale=None, initial_state=None, return_state=False, eps=1e-6):
    """Causal linear attention as an explicit loop over tokens (second oracle; causal only)."""
    pq, pk, vv, logd = _prepare(q, k, v, feature_map, decay, scale)
    B, N, H, Dp = pq.shape
    S, z = _split_state(initial_state, normalize, B, H, Dp, v.shape[-1], pq.dtype)
    outs = []
    for t in range(N):
        lam = torch.exp(logd[:, t])  # (B, H)
        S = lam[..., None, None] * S + pk[:, t, :, :, None] * vv[:, t, :, None, :]  # (B, H, Dphi, Dv)
        z = lam[..., None] * z + pk[:, t]  # (B, H, Dphi)
        o = torch.einsum("bhd,bhde->bhe", pq[:, t], S)
        if normalize:
            o = o / (torch.einsum("bhd,bhd->bh", pq[:, t], z)[..., None] + eps)
        outs.append(o)
    out = torch.stack(outs, dim=1)  # (B, N, H, Dv)
    state = (S, z) if normalize else S
    return (out, state) if return_state else out
