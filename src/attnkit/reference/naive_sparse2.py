"""Naive twins of Sparsifiner (arXiv 2303.13755) and Orion-MSP (arXiv 2511.02818): obvious code, torch only.

Each builds its boolean connectivity ``(.., N, Nk)`` (True = attend) straight from the paper's rule and runs a
dense masked softmax; rows that allow no key give zeros. These are the specifications the fast ops and the
modules are tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def naive_masked_attention(q, k, v, allowed, scale=None):
    """Dense softmax attention restricted to ``allowed``.

    ``q (B, N, H, D)``, ``k (B, Nk, H, D)``, ``v (B, Nk, H, Dv)``, ``allowed`` bool broadcastable to
    ``(B, H, N, Nk)`` -> ``(B, N, H, Dv)``; a row with no allowed key is zero.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale  # (B, H, N, Nk)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(allowed.any(-1, keepdim=True), p, torch.zeros((), dtype=p.dtype))  # empty rows: zeros
    return torch.einsum("bhnm,bmhd->bnhd", p, v)


# ------------------------------------------------------------------------------------- Sparsifiner


def naive_sparsifiner_scores(coef, basis):
    """Predicted connectivity ``M~ = C U`` (arXiv 2303.13755, section 3.2), float32 at least.

    ``coef (B, N, H, R)`` basis coefficients, ``basis (R, Nk)`` -> ``(B, H, N, Nk)``.
    """
    dt = torch.promote_types(coef.dtype, torch.float32)
    return torch.einsum("bnhr,rm->bhnm", coef.detach().to(dt), basis.detach().to(dt))


def _top_rows(scores, k):
    """Bool with ``True`` at each row's ``k`` largest entries (ties to the lower index)."""
    idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def naive_sparsifiner_mask(coef, basis, top_k, *, granularity="token", block=64, cls_tokens=0):
    """The binary connectivity ``(B, H, N, Nk)`` of Sparsifiner.

    ``granularity="token"`` (the paper): each query row keeps its ``top_k`` highest predicted scores.
    ``"block"``: the scores are averaged over ``block x block`` tiles and each query block keeps its
    ``ceil(top_k / block)`` best key blocks. The first ``cls_tokens`` query rows attend every key.
    """
    scores = naive_sparsifiner_scores(coef, basis)  # (B, H, N, Nk)
    b, h, n, nk = scores.shape
    if granularity == "token":
        allowed = _top_rows(scores, min(top_k, nk))
    else:
        nqb, nkb = math.ceil(n / block), math.ceil(nk / block)
        pooled = torch.empty(b, h, nqb, nkb, dtype=scores.dtype)
        for i in range(nqb):
            for j in range(nkb):
                pooled[:, :, i, j] = scores[:, :, i * block:(i + 1) * block, j * block:(j + 1) * block].mean((-2, -1))
        lay = _top_rows(pooled, min(math.ceil(top_k / block), nkb))  # (B, H, nqb, nkb)
        allowed = lay.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :n, :nk]
    allowed[:, :, :cls_tokens] = True
    return allowed


def naive_sparsifiner(q, k, v, coef, basis, *, top_k, granularity="token", block=64, cls_tokens=0, scale=None):
    """Sparsifiner attention: dense masked softmax on the predicted top-k connectivity.

    ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)``, ``coef (B, N, H, R)``, ``basis (R, N)`` -> ``(B, N, H, Dv)``.
    """
    allowed = naive_sparsifiner_mask(coef, basis, top_k, granularity=granularity, block=block,
                                     cls_tokens=cls_tokens)
    return naive_masked_attention(q, k, v, allowed, scale)


def naive_sparsifiner_coef(m, q, k):
    """The module's low-rank predictor: ``softmax((q W_cq)(W_n^T k W_ck)^T s)`` per head, ``(B, N, H, R)``."""
    qc = F.linear(q, m.proj_c_q.weight, m.proj_c_q.bias)  # (B, N, H, c)
    kc = F.linear(k, m.proj_c_k.weight, m.proj_c_k.bias)  # (B, N, H, c)
    kr = torch.einsum("bnhc,nr->brhc", kc, m.proj_n[:q.shape[1]])  # (B, R, H, c): first N rows of W_n
    logits = torch.einsum("bnhc,brhc->bnhr", qc, kr) * m.coef_scale
    return torch.softmax(logits, dim=-1)


def naive_sparsifiner_basis(m, n):
    """``U = threshold(|W_up|, tau)`` over the first ``n`` tokens: ``(R, n)``, entries ``<= tau`` set to zero."""
    w = m.proj_back_n[:n].t().abs()  # (R, n)
    return torch.where(w > m.basis_threshold, w, torch.zeros((), dtype=w.dtype))


def naive_sparsifiner_module(m, x):
    """:class:`~attnkit.mechanisms.sparsifiner.SparsifinerAttention` on ``x (B, N, C)``."""
    b, n, c = x.shape
    h = m.num_heads
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).view(b, n, 3, h, c // h).unbind(2)  # (B, N, H, D)
    coef = naive_sparsifiner_coef(m, q, k)
    o = naive_sparsifiner(q, k, v, coef, naive_sparsifiner_basis(m, n), top_k=math.ceil(m.keep_rate * n),
                          granularity=m.granularity, block=m.block_size, cls_tokens=min(m.cls_tokens, n))
    return F.linear(o.reshape(b, n, c), m.proj.weight, m.proj.bias)


# ---------------------------------------------------------------------------------------- Orion-MSP


def naive_orion_random_links(n, num_special, num_random, random_block=1, seed=0):
    """Random links ``(N, N)`` bool: query block ``I`` (of ``random_block`` positions, from the block holding the
    first non-special position on) links ``num_random`` distinct key blocks drawn by ``randperm`` from a
    generator seeded with ``seed``; ``random_block=1`` draws keys per query, as the released builder does."""
    out = torch.zeros(n, n, dtype=torch.bool)
    if num_random <= 0 or n <= num_special + 1:
        return out
    b = random_block
    nb = math.ceil(n / b)
    first = num_special // b
    g = torch.Generator().manual_seed(seed)
    for i in range(first, nb):
        for j in (torch.randperm(nb - first, generator=g)[:num_random] + first).tolist():
            out[i * b:(i + 1) * b, j * b:(j + 1) * b] = True
    return out


def naive_orion_mask(n, num_special, window, num_random=0, random_block=1, seed=0):
    """Orion-MSP's connectivity ``(N, N)`` (True = attend): special rows and columns, the window
    ``|i - j| <= window``, the random links and the diagonal (arXiv 2511.02818, row interaction)."""
    allowed = naive_orion_random_links(n, num_special, num_random, random_block, seed)
    for i in range(n):
        for j in range(n):
            if i < num_special or j < num_special or abs(i - j) <= window or i == j:
                allowed[i, j] = True
    return allowed


def naive_orion_msp(q, k, v, *, num_special, window, num_random=0, random_block=1, seed=0, scale=None):
    """Orion-MSP sparse attention: ``q, k (B, L, H, D)``, ``v (B, L, H, Dv)`` -> ``(B, L, H, Dv)``."""
    allowed = naive_orion_mask(q.shape[1], num_special, window, num_random, random_block, seed)
    return naive_masked_attention(q, k, v, allowed, scale)


def naive_orion_msp_module(m, x):
    """:class:`~attnkit.mechanisms.orion_msp.OrionMSPAttention` on ``x (B, L, C)``."""
    b, n, c = x.shape
    h = m.num_heads
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).view(b, n, 3, h, c // h).unbind(2)  # (B, L, H, D)
    o = naive_orion_msp(q, k, v, num_special=m.num_special, window=m.window, num_random=m.num_random,
                        random_block=m.random_block, seed=m.seed)
    return F.linear(o.reshape(b, n, c), m.proj.weight, m.proj.bias)
