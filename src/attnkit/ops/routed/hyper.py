"""HyperAttention: Long-context Attention in Near-Linear Time (arXiv 2310.05869).

Attention is ``D^-1 A V`` with ``A = exp(s Q K^T)``. sortLSH hashes queries and keys with
angular LSH (Gray-ranked buckets), sorts both, and computes ``A`` exactly inside the
block-diagonal of the sorted order; everything outside is estimated from ``m`` uniformly
sampled key columns, weighted by ``n_k / m`` (samples inside the query's own block are
dropped: already counted). The two partial attentions are merged with their log-sum-exps.
Causal attention recurses (Algorithm 4): exact below ``min_seq_len``, else two causal halves
plus a non-causal HyperAttention of the bottom queries over the top keys.

Randomness (``generator``): every non-causal call draws, in order, the LSH directions
``W = randn(D, lsh_bits)`` and the samples ``randint(0, n_k, (B, Hq, m))`` on the CPU; the
causal recursion visits top half, bottom half, then the off-diagonal part.

Backends (``ak.explain("hyper_attention", q, k, v, ..)`` shows the choice):

* ``fused`` -- without autograd: one fused-op softmax per sorted block over [its keys, the
  samples] (the sample weight as an ``ln(n_k/m)`` bias), fused exact leaves;
* ``matmul`` -- differentiable: block-diagonal part and sampled residual as explicit softmaxes
  merged by log-sum-exp, exact leaves on ``ak.attention``;
* ``reference`` -- the naive estimator of ``attnkit.reference.naive_routed`` (never automatic).
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnkit import masks
from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.kernels.fused import fused_ops
from attnkit.kernels.gather import attend_gathered, compute_dtype, needs_grad
from attnkit.kernels.merge import merge_partials
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.dense.call import attention
from attnkit.ops.routed._common import cpu_only, grad_words, no_grad_fused_check, reference_dtype, upcast_words
from attnkit.reference.naive_routed import naive_hyper_attention


def gray_rank_table(bits: int) -> torch.Tensor:
    """``rank[c] = g^{-1}(c)`` for the reflected Gray code ``g(i) = i ^ (i >> 1)``: buckets with
    consecutive ranks differ in one bit, so sorting by rank keeps near buckets adjacent."""
    table = torch.empty(2 ** bits, dtype=torch.long)
    i = torch.arange(2 ** bits)
    table[i ^ (i >> 1)] = i
    return table



def lsh_rank(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Gray rank of the angular-LSH bucket of ``x (..., n, D)`` under directions ``w (D, r)`` -> ``(..., n)``."""
    bits = (x @ w > 0).long()  # (..., n, r)
    code = (bits << torch.arange(w.shape[1], device=x.device)).sum(-1)  # (..., n): sum_i bit_i 2^i
    return gray_rank_table(w.shape[1]).to(x.device)[code]



def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, h, idx[b, h, i]]`` for ``x (B, H, n, D)``, ``idx (B, H, M)`` -> ``(B, H, M, D)``.

    One ``index_select`` of whole rows: ``torch.gather`` with an index expanded over D read an
    index per element and ran ~10x slower. When ``x`` is a heads-last tensor seen as
    ``(B, H, n, D)`` its rows are addressed in place (no transposed copy).
    """
    B, H, n, D = x.shape
    M = idx.shape[-1]
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    h = torch.arange(H, device=x.device).view(1, H, 1)
    if x.transpose(1, 2).is_contiguous():  # heads-last storage: row (b, i, h) at (b * n + i) * H + h
        flat, rows = ((b * n + idx) * H + h).reshape(-1), x.transpose(1, 2).reshape(B * n * H, D)
    else:
        flat, rows = ((b * H + h) * n + idx).reshape(-1), x.reshape(B * H * n, D)
    return rows.index_select(0, flat).view(B, H, M, D)



def _noncausal(q, k, v, block, m, bits, scale, gen, fused):
    """Sampled non-causal HyperAttention on ``(B, H, n, D)`` tensors -> ``(out, lse)`` ``(B, H, nq, *)``;
    ``fused``: the no-grad fused op, else the differentiable matmul path."""
    B, H, nq, D = q.shape
    nk, Dv = k.shape[2], v.shape[-1]
    dev = q.device
    w = torch.randn(D, bits, generator=gen, dtype=torch.float64).to(dev, q.dtype)
    samples = torch.randint(0, nk, (B, H, m), generator=gen).to(dev)
    nb = math.ceil(nk / block)
    bq = math.ceil(nq / nb)
    with torch.no_grad():  # hashing and sorting carry no gradient
        pq = torch.sort(lsh_rank(q, w), dim=-1, stable=True).indices  # (B, H, nq): sorted -> original
        pk = torch.sort(lsh_rank(k, w), dim=-1, stable=True).indices  # (B, H, nk)
        blk_k = torch.empty_like(pk).scatter_(-1, pk, torch.arange(nk, device=dev).expand_as(pk)) // block
    qs, ks, vs = _take(q, pq), _take(k, pk), _take(v, pk)  # (B, H, n, D|Dv) sorted
    # block-diagonal part: query tile i (bq sorted queries) vs key tile i (block sorted keys), exact
    qs_p = torch.cat([qs, qs.new_zeros(B, H, nb * bq - nq, D)], 2).view(B, H, nb, bq, D)  # (B, H, nb, bq, D)
    ks_p = torch.cat([ks, ks.new_zeros(B, H, nb * block - nk, D)], 2).view(B, H, nb, block, D)  # (B, H, nb, b, D)
    vs_p = torch.cat([vs, vs.new_zeros(B, H, nb * block - nk, Dv)], 2).view(B, H, nb, block, Dv)
    real = (torch.arange(nb * block, device=dev) < nk).view(nb, 1, block)  # padded keys never attended
    kx, vx = _take(k, samples), _take(v, samples)  # (B, H, m, D|Dv)
    if fused:
        fwd = fused_ops()[0]
        # one softmax per sorted block over [its keys, the m samples]: the LSE merge of the two
        # partial attentions below is exactly this softmax with ln(n_k/m) on the samples and -inf on
        # padded keys and on samples inside the block (already counted)
        other = torch.gather(blk_k, 2, samples).unsqueeze(2) != torch.arange(nb, device=dev).view(1, 1, nb, 1)
        bias = torch.cat([torch.where(real.view(1, 1, nb, block), 0.0, float("-inf")).expand(B, H, nb, block),
                          torch.where(other, math.log(nk / m), float("-inf"))], -1).to(q.dtype)  # (B, H, nb, b+m)
        kc = torch.cat([ks_p, kx.unsqueeze(2).expand(B, H, nb, m, D)], 3)  # (B, H, nb, b+m, D)
        vc = torch.cat([vs_p, vx.unsqueeze(2).expand(B, H, nb, m, Dv)], 3)
        o, lse = fwd(qs_p.reshape(B * H * nb, 1, bq, D), kc.reshape(B * H * nb, 1, block + m, D),
                     vc.reshape(B * H * nb, 1, block + m, Dv), attn_mask=bias.reshape(B * H * nb, 1, 1, block + m),
                     scale=scale)
        o, lse = o.reshape(B, H, nb * bq, Dv)[:, :, :nq], lse.reshape(B, H, nb * bq)[:, :, :nq]  # sorted order
    else:
        o, lse = _two_part(qs, qs_p, ks_p, vs_p, kx, vx, real, blk_k, samples, nb, bq, nq, nk, m, scale)
    inv = torch.empty_like(pq).scatter_(-1, pq, torch.arange(nq, device=dev).expand_as(pq))  # original -> sorted
    o = _take(o, inv)  # (B, H, nq, Dv)
    return o, torch.gather(lse, 2, inv)



def _two_part(qs, qs_p, ks_p, vs_p, kx, vx, real, blk_k, samples, nb, bq, nq, nk, m, scale):
    """Differentiable: exact block-diagonal part and sampled residual, merged by log-sum-exp (sorted order)."""
    dev = qs.device
    o_blk, l_blk = attend_gathered(qs_p, ks_p, vs_p, real, scale)  # (B, H, nb, bq, Dv), (B, H, nb, bq)
    o_blk, l_blk = o_blk.flatten(2, 3)[:, :, :nq], l_blk.flatten(2, 3)[:, :, :nq]  # (B, H, nq, *)
    # residual: all queries vs the m shared samples, own-block samples dropped, weight n_k / m
    q_blk = (torch.arange(nq, device=dev) // bq).view(1, 1, nq, 1)  # sorted query i lies in block i // bq
    other = torch.gather(blk_k, 2, samples).unsqueeze(2) != q_blk  # (B, H, nq, m)
    o_res, l_res = attend_gathered(qs, kx, vx, other, scale, math.log(nk / m))
    return merge_partials(o_blk, l_blk, o_res, l_res)  # sorted query order



def _exact(q, k, v, scale, causal, fused):
    """Exact attention with lse on ``(B, H, n, D)``: the fused op (no grad), else ``attention``."""
    if fused:
        return fused_ops()[0](q, k, v, is_causal=causal, scale=scale)  # (B, H, n, Dv), (B, H, n)
    mask = masks.causal() if causal else None
    o, lse = attention(*(t.transpose(1, 2) for t in (q, k, v)), mask=mask, scale=scale, return_lse=True)
    return o.transpose(1, 2), lse.transpose(1, 2)  # (B, H, n, Dv), (B, H, n)



def _causal(q, k, v, block, m, bits, min_len, scale, gen, fused):
    n = q.shape[2]
    if n <= min_len:
        return _exact(q, k, v, scale, True, fused)
    h = n // 2
    o_top, l_top = _causal(q[:, :, :h], k[:, :, :h], v[:, :, :h], block, m, bits, min_len, scale, gen, fused)
    o_bd, l_bd = _causal(q[:, :, h:], k[:, :, h:], v[:, :, h:], block, m, bits, min_len, scale, gen, fused)
    o_off, l_off = _noncausal(q[:, :, h:], k[:, :, :h], v[:, :, :h], block, m, bits, scale, gen, fused)
    o_bot, l_bot = merge_partials(o_bd, l_bd, o_off, l_off)
    return torch.cat([o_top, o_bot], 2), torch.cat([l_top, l_bot], 2)



@dataclass(frozen=True)
class HyperCall:
    """A validated ``hyper_attention`` call (what backends and ``explain`` see)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_size: int
    sample_size: int
    lsh_bits: int
    min_seq_len: int
    causal: bool
    scale: float
    generator: torch.Generator | None
    return_lse: bool
    needs_grad: bool  # autograd will record the attention (read once, when the call is built)

    def describe(self) -> str:
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, "
                f"{'causal' if self.causal else 'non-causal'}, block_size={self.block_size}, "
                f"sample_size={self.sample_size}, lsh_bits={self.lsh_bits}, min_seq_len={self.min_seq_len}, "
                f"scale={self.scale:.4g}, {grad_words(self.needs_grad)}")

    def algorithm(self) -> str:
        """Which part of the algorithm runs: exact, sortLSH + sampling, or the causal recursion."""
        nq, nk = self.q.shape[1], self.k.shape[1]
        if self.causal:
            if nq <= self.min_seq_len:
                return f"exact causal attention (N={nq} <= min_seq_len={self.min_seq_len})"
            return f"causal recursion (Algorithm 4) down to exact leaves of <= {self.min_seq_len} tokens"
        if max(nq, nk) <= self.min_seq_len:
            return f"exact attention (max(Nq, Nk)={max(nq, nk)} <= min_seq_len={self.min_seq_len})"
        return "sortLSH block-diagonal + uniform column samples, merged by log-sum-exp"


def make_call(q, k, v, *, block_size=256, sample_size=256, lsh_bits=7, min_seq_len=4096, causal=False,
              scale=None, generator=None, return_lse=False) -> HyperCall:
    """Validate a ``hyper_attention`` call; errors name the argument."""
    check_qkv(q, k, v)
    for name, val in (("block_size", block_size), ("sample_size", sample_size), ("lsh_bits", lsh_bits),
                      ("min_seq_len", min_seq_len)):
        int_arg(name, val, 1)
    if lsh_bits > 30:
        raise ValueError(f"lsh_bits must be <= 30, got {lsh_bits}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal HyperAttention needs self-attention (Nq == Nk), got {q.shape[1]} and {k.shape[1]}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return HyperCall(q, k, v, block_size, sample_size, lsh_bits, min_seq_len, bool(causal),
                     resolve_scale(scale, q.shape[-1]), generator, bool(return_lse), needs_grad(q, k, v))


def _run(call: HyperCall, fused: bool):
    q, k, v = call.q, call.k, call.v
    hq, hkv = q.shape[2], k.shape[2]
    cdt = compute_dtype(q.dtype)
    # (B, H, n, D) internally; KV heads expanded to query heads (each query head hashes on its own)
    qh = q.to(cdt).transpose(1, 2)  # (B, Hq, Nq, D)
    kh = k.to(cdt).repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, Hq, Nk, D)
    vh = v.to(cdt).repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, Hq, Nk, Dv)
    args = (call.block_size, call.sample_size, call.lsh_bits)
    if call.causal:
        o, lse = _causal(qh, kh, vh, *args, call.min_seq_len, call.scale, call.generator, fused)
    elif max(q.shape[1], k.shape[1]) <= call.min_seq_len:
        o, lse = _exact(qh, kh, vh, call.scale, False, fused)
    else:
        o, lse = _noncausal(qh, kh, vh, *args, call.scale, call.generator, fused)
    out = o.transpose(1, 2).to(q.dtype)  # (B, Nq, Hq, Dv)
    # the lse stays in the compute dtype: float32 (float64 for float64 inputs), never a half type
    return (out, lse.transpose(1, 2).to(cdt)) if call.return_lse else out  # lse (B, Nq, Hq)


def _fused_supports(call: HyperCall) -> tuple[bool, str]:
    return no_grad_fused_check(call.q, call.v, call.needs_grad)


def _reference_supports(call: HyperCall) -> tuple[bool, str]:
    if call.return_lse:
        return False, "the naive estimator returns no lse (return_lse=True)"
    return cpu_only(call)


def _run_reference(call: HyperCall):
    """The naive estimator with the same draws from ``generator`` (float32 for half inputs)."""
    dt = reference_dtype(call.q.dtype)
    q, k, v = (t.to(dt) for t in (call.q, call.k, call.v))
    out = naive_hyper_attention(q, k, v, call.block_size, call.sample_size, call.lsh_bits, call.min_seq_len,
                                call.causal, call.scale, call.generator)
    return out.to(call.q.dtype)


DISPATCHER = Dispatcher("hyper_attention", [
    Backend("fused", lambda call: _run(call, True), _fused_supports,
            lambda call: (True, "no autograd: one fused softmax per sorted block"),
            detail=lambda call: f"{call.algorithm()}; fused CPU op{upcast_words(call.q.dtype)}",
            note="no-grad path on the fused CPU op"),
    Backend("matmul", lambda call: _run(call, False), suits=lambda call: (True, "differentiable"),
            detail=lambda call: (f"{call.algorithm()}; explicit softmaxes (exact leaves on ak.attention)"
                                 f"{upcast_words(call.q.dtype)}"),
            note="differentiable matmul path"),
    Backend("reference", _run_reference, _reference_supports, auto=False, note="naive estimator (the oracle)"),
])

register_op("hyper_attention", make_call, DISPATCHER)


def hyper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 256,
                    sample_size: int = 256, lsh_bits: int = 7, min_seq_len: int = 4096, causal: bool = False,
                    scale: float | None = None, generator: torch.Generator | None = None,
                    return_lse: bool = False, backend: str | None = None):
    """HyperAttention (sortLSH block-diagonal + uniform column sampling; causal by recursion).

    Args:
        q: ``(B, Nq, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)``; GQA by ``Hq % Hkv``.
        block_size: sorted key block ``b`` (query block ``ceil(Nq / ceil(Nk / b))``); ragged ends padded.
        sample_size: ``m`` residual key samples per (batch, head), with replacement.
        lsh_bits: ``r`` hyperplanes (``2**r`` buckets). min_seq_len: exact attention for
            ``max(Nq, Nk) <= min_seq_len`` and base of the causal recursion.
        causal: causal self-attention (``Nq == Nk``).
        scale: logit scale, default ``D ** -0.5``.
        generator: source of the LSH directions and samples (deterministic when seeded).
        return_lse: also return the estimated log-sum-exp.
        backend: ``"fused"`` (no autograd), ``"matmul"``, ``"reference"`` or None (the first that
            can run). A forced backend that cannot run raises ValueError with the reason.

    Returns:
        ``(B, Nq, Hq, Dv)`` in q's dtype; with ``return_lse`` also the estimated lse ``(B, Nq, Hq)``
        in float32 (float64 for float64 inputs).

    Example:
        >>> q = k = v = torch.randn(1, 8192, 4, 64)
        >>> out = hyper_attention(q, k, v, generator=torch.Generator().manual_seed(0))
    """
    call = make_call(q, k, v, block_size=block_size, sample_size=sample_size, lsh_bits=lsh_bits,
                     min_seq_len=min_seq_len, causal=causal, scale=scale, generator=generator,
                     return_lse=return_lse)
    return DISPATCHER.run(call, backend)
