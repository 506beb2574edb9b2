"""Naive reference of HyperAttention (arXiv 2310.05869): the paper's estimator, token by token.

``o_i = (sum_{j in block(i)} A_ij v_j + n_k/m sum_{s in S, s not in block(i)} A_is v_s) / D~_ii``
with the matching ``D~_ii``, kept as unnormalised (numerator, denominator) pairs so that the
causal recursion (Algorithm 4) merges pieces by plain addition. Same randomness as the fast
path: per non-causal call ``W = randn(D, r)`` then ``S = randint(0, n_k, (B, H, m))``. Imports
only torch. Oracle of ``mechanisms/hyper_attention.py``; the exactness oracle is dense softmax.
"""

from __future__ import annotations

import math

import torch


def gray_inverse(c: int) -> int:
    """``g^{-1}(c)``: the position of code ``c`` in the reflected Gray sequence."""
    r, shift = c, c >> 1
    while shift:
        r ^= shift
        shift >>= 1
    return r


def _rank(x, w):
    return [gray_inverse(sum(int(float(x[t] @ w[:, i]) > 0) << i for i in range(w.shape[1]))) for t in range(len(x))]


def _parts(q, k, v, hq, hk, block, m, bits, scale, gen):
    """Unnormalised HyperAttention numerator ``(B, H, nq, Dv)`` and denominator ``(B, H, nq)``."""
    B, H, nq, D = q.shape
    nk = k.shape[2]
    w = torch.randn(D, bits, generator=gen, dtype=torch.float64)
    S = torch.randint(0, nk, (B, H, m), generator=gen)
    nb = math.ceil(nk / block)
    bq = math.ceil(nq / nb)
    num = torch.zeros(B, H, nq, v.shape[-1], dtype=q.dtype)
    den = torch.zeros(B, H, nq, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            rq, rk = _rank(hq[b, h], w), _rank(hk[b, h], w)
            pos_q = {i: p for p, i in enumerate(sorted(range(nq), key=lambda i: (rq[i], i)))}
            pos_k = {j: p for p, j in enumerate(sorted(range(nk), key=lambda j: (rk[j], j)))}
            for i in range(nq):
                blk = pos_q[i] // bq
                same = torch.tensor([pos_k[j] // block == blk for j in range(nk)])
                a = torch.exp(k[b, h] @ q[b, h, i] * scale)  # (nk,)
                num[b, h, i] = (a * same) @ v[b, h]
                den[b, h, i] = (a * same).sum()
                for s in S[b, h].tolist():
                    if pos_k[s] // block != blk:
                        num[b, h, i] = num[b, h, i] + nk / m * a[s] * v[b, h, s]
                        den[b, h, i] = den[b, h, i] + nk / m * a[s]
    return num, den


def _exact_parts(q, k, v, scale, causal):
    a = torch.exp(torch.einsum("bhqd,bhkd->bhqk", q, k) * scale)
    if causal:
        a = a * torch.ones(q.shape[2], k.shape[2]).tril()
    return a @ v, a.sum(-1)


def _causal(q, k, v, hq, hk, block, m, bits, min_len, scale, gen):
    n = q.shape[2]
    if n <= min_len:
        return _exact_parts(q, k, v, scale, True)
    h = n // 2
    top = _causal(q[:, :, :h], k[:, :, :h], v[:, :, :h], hq[:, :, :h], hk[:, :, :h], block, m, bits, min_len,
                  scale, gen)
    diag = _causal(q[:, :, h:], k[:, :, h:], v[:, :, h:], hq[:, :, h:], hk[:, :, h:], block, m, bits, min_len,
                   scale, gen)
    off = _parts(q[:, :, h:], k[:, :, :h], v[:, :, :h], hq[:, :, h:], hk[:, :, :h], block, m, bits, scale, gen)
    return torch.cat([top[0], diag[0] + off[0]], 2), torch.cat([top[1], diag[1] + off[1]], 2)


def naive_hyper_attention(q, k, v, block_size, sample_size, lsh_bits, min_seq_len, causal=False, scale=None,
                          generator=None, hash_q=None, hash_k=None):
    """HyperAttention ``(B, Nq, H, Dv)`` from the estimator's sums; ``hash_q/k`` (default q/k) feed the LSH."""
    H = q.shape[2]
    rep = H // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh = q.transpose(1, 2)  # (B, H, Nq, D)
    kh, vh = (t.repeat_interleave(rep, 2).transpose(1, 2) for t in (k, v))  # (B, H, Nk, *)
    hq = (q if hash_q is None else hash_q).detach().double().transpose(1, 2)
    hk = (k if hash_k is None else hash_k).detach().double().repeat_interleave(rep, 2).transpose(1, 2)
    if causal:
        num, den = _causal(qh, kh, vh, hq, hk, block_size, sample_size, lsh_bits, min_seq_len, scale, generator)
    elif max(q.shape[1], k.shape[1]) <= min_seq_len:
        num, den = _exact_parts(qh, kh, vh, scale, False)
    else:
        num, den = _parts(qh, kh, vh, hq, hk, block_size, sample_size, lsh_bits, scale, generator)
    return (num / den.unsqueeze(-1)).transpose(1, 2)
