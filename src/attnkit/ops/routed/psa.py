"""PSA: Pyramid Sparse Attention for Efficient Video Understanding and Generation (arXiv 2512.04025).

Instead of a keep/drop choice per (query block, KV block), every KV block exists as a small
pyramid of mean-pooled copies (pool factors 1, 2, 4, 8). Per query block, the most important
KV blocks are attended at full resolution, less important ones through a pooled copy, the
rest are skipped. A pooled key stands for the ``r`` tokens it replaces through a ``+ln r``
logit bias, exact when those tokens are equal. One softmax runs over all visible tokens of
all levels: per level the selected pooled blocks are gathered as in the block-gather engine,
concatenated along the key axis and attended with ``attend_gathered`` (bias = ``ln r``).

Two ops: ``pyramid_sparse_attention`` (a given level map) and ``psa_attention`` (sampled
importance -> level map -> pyramid attention). Backends of both (``ak.explain`` shows the choice):

* ``fused`` -- without autograd, torch's fused CPU op with per-row masks (``psa_fused``);
  causal needs ``block_q % block_kv == 0`` and the diagonal KV blocks at factor 1;
* ``gather`` -- every level's selected pooled blocks gathered per query block, one masked
  softmax (SDPA on a float mask without autograd, ``attend_gathered`` with it);
* ``reference`` -- the naive twins of ``attnkit.reference.naive_routed`` (never automatic).
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit._validate import check_qkv, int_arg, resolve_scale
from attnkit.kernels import alloc
from attnkit.kernels.gather import _blocks, attend_gathered, check_layout, compute_dtype, layout_indices, needs_grad
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.ops.routed._common import cpu_only, grad_words, no_grad_fused_check, reference_dtype, upcast_words
from attnkit.ops.routed.psa_fused import causal_diag_ok, pyramid_fused
from attnkit.reference.naive_routed import naive_psa_importance, naive_psa_levels, naive_pyramid_attention

DEFAULT_RATIOS = (0.10, 0.05, 0.0, 0.20)  # repository default: ~85% of blocks skipped



@dataclass(frozen=True)
class PSAConfig:
    """Block sizes, pyramid depth (pool factors ``2**l``, ``l < levels``) and rank bands per level."""

    block_q: int = 128
    block_kv: int = 64
    levels: int = 4
    mask_ratios: tuple[float, ...] = DEFAULT_RATIOS
    causal: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_kv", "levels"):
            int_arg(name, getattr(self, name), 1)
        if self.block_kv % 2 ** (self.levels - 1):
            raise ValueError(f"block_kv ({self.block_kv}) must be divisible by the largest pool factor "
                             f"2**(levels-1) = {2 ** (self.levels - 1)} (pooling happens inside KV blocks)")
        r = tuple(self.mask_ratios)
        if len(r) != self.levels or any(x < 0 for x in r) or sum(r) > 1 + 1e-9:
            raise ValueError(f"mask_ratios must be {self.levels} non-negative fractions (one per level) "
                             f"summing to <= 1, got {self.mask_ratios!r}")



def band_ends(n: int, ratios: tuple[float, ...], forced: int = 0) -> list[int]:
    """Rank boundaries of the levels for a row with ``n`` candidate blocks (``forced`` of them
    pinned at full resolution): level ``l`` takes ranks ``[ends[l-1], ends[l])``. Cumulative
    round-half-up, so the counts add up; the top block is always kept at full resolution."""
    ends, acc, prev = [], 0.0, 0
    for i, x in enumerate(ratios):
        acc += x
        e = math.floor(n * acc + 0.5)
        if i == 0:
            e = max(e, forced, min(n, 1))
        prev = min(n, max(prev, e))
        ends.append(prev)
    return ends



def sample_offsets(b: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The ``max(1, b // 4)`` sampled offsets inside a block of ``b`` tokens, shared by all blocks:
    strided ``0, s, 2s, ...`` (``s = b // m``) without ``generator``, else a sorted random subset."""
    m = max(1, b // 4)
    if generator is None:
        return torch.arange(m) * (b // m)
    return torch.randperm(b, generator=generator)[:m].sort().values


def psa_importance(q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int, *, causal: bool = False,
                   scale: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """PSA's sampled block-importance estimate ``S (B, Hq, nqb, nkb)``.

    ``block_q // 4`` queries per query block and ``block_kv // 4`` keys per KV block (one offset
    subset shared by all blocks: strided ``0, 4, 8, ...`` without ``generator``, else random)
    attend with softmax over all sampled keys (causal: sampled keys after the sampled query are
    masked); ``S_ij`` is the largest probability inside tile ``(i, j)``. No gradient.
    """
    B, Nq, hq, D = q.shape
    Nk, hkv = k.shape[1], k.shape[2]
    nqb, nkb = math.ceil(Nq / block_q), Nk // block_kv
    cdt = compute_dtype(q.dtype)

    oq = sample_offsets(block_q, generator)  # drawn first: the query offsets, then the key offsets
    ok = sample_offsets(block_kv, generator)
    qpos = (torch.arange(nqb).view(-1, 1) * block_q + oq).clamp_max(Nq - 1).to(q.device)  # (nqb, mq)
    kpos = (torch.arange(nkb).view(-1, 1) * block_kv + ok).to(q.device)  # (nkb, mk)
    mq, mk = qpos.shape[1], kpos.shape[1]
    qs = (q.detach().to(cdt)[:, qpos.flatten()] * resolve_scale(scale, D)).transpose(1, 2)  # (B, Hq, nqb*mq, D)
    ks = k.detach().to(cdt)[:, kpos.flatten()].repeat_interleave(hq // hkv, dim=2).transpose(1, 2)  # (B, Hq, K, D)
    kflat = kpos.flatten()
    out = qs.new_zeros(B, hq, nqb, nkb)
    # chunks of query blocks keep the (rows, keys) scores in cache; causal chunks stop at the last key
    # any of their sampled queries can see (later tiles are all masked: probability 0)
    step = max(1, 2**23 // max(1, B * hq * mq * nkb * mk))
    for i0 in range(0, nqb, step):
        i1 = min(nqb, i0 + step)
        qp = qpos[i0:i1].flatten()  # (R,)
        kb_end = nkb
        if causal:
            kb_end = min(nkb, int(torch.searchsorted(kflat, qp.max(), right=True)) // mk + 1)
        s = torch.matmul(qs[:, :, i0 * mq:i1 * mq], ks[:, :, :kb_end * mk].transpose(-1, -2))  # (B, Hq, R, K')
        if causal:
            s.masked_fill_(kflat[None, :kb_end * mk] > qp[:, None], float("-inf"))
        # the largest probability of a tile is exp(largest logit - row lse): no full softmax needed
        smax = s.view(B, hq, s.shape[2], kb_end, mk).amax(-1)  # (B, Hq, R, kb_end)
        m = smax.amax(-1, keepdim=True)  # (B, Hq, R, 1), finite: every sampled query sees a key
        lse = m + torch.log(s.sub_(m).exp_().sum(-1, keepdim=True))
        p = torch.exp(smax - lse).view(B, hq, i1 - i0, mq, kb_end)  # (B, Hq, c, mq, kb_end)
        out[:, :, i0:i1, :kb_end] = p.amax(3)
    return out  # (B, Hq, nqb, nkb)



def psa_level_map(scores: torch.Tensor, mask_ratios: tuple[float, ...], *, causal: bool = False,
                  block_q: int = 1, block_kv: int = 1) -> torch.Tensor:
    """Per query-block row, levels from rank quantiles of ``scores (..., nqb, nkb)``.

    Returns int64 pool factors ``M (..., nqb, nkb)`` in ``{0, 1, 2, 4, ...}`` (0 = skip). Causal:
    KV blocks starting after the query block's last token are never candidates and the blocks
    overlapping its diagonal are pinned at factor 1 (every query sees itself). Ties go to the
    lower block index.
    """
    nqb, nkb = scores.shape[-2:]
    dev = scores.device
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores.clone()
    n_cand = torch.full((nqb,), nkb, dtype=torch.long)
    forced = torch.zeros(nqb, dtype=torch.long)
    if causal:
        last = torch.minimum((torch.arange(nqb) + 1) * block_q - 1, torch.tensor(nkb * block_kv - 1))
        first = torch.arange(nqb) * block_q
        n_cand = last // block_kv + 1  # blocks starting at or before the last query
        forced = n_cand - torch.div(first, block_kv, rounding_mode="floor")  # blocks touching the diagonal
        j = torch.arange(nkb)
        s = s.masked_fill((j[None] >= n_cand[:, None]).to(dev), float("-inf"))
        s = s.masked_fill(((j[None] < n_cand[:, None]) & (j[None] >= n_cand[:, None] - forced[:, None])).to(dev),
                          float("inf"))
    ends = torch.tensor([band_ends(int(n), mask_ratios, int(f)) for n, f in zip(n_cand, forced, strict=True)],
                        device=dev)  # (nqb, levels)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nkb, device=dev).expand_as(order))
    lvl = (rank.unsqueeze(-1) >= ends.unsqueeze(-2)).sum(-1)  # (..., nqb, nkb): band index, levels = skip
    factor = torch.tensor([2 ** i for i in range(len(mask_ratios))] + [0], device=dev)
    return factor[lvl]



@dataclass(frozen=True)
class PyramidCall:
    """A validated ``pyramid_sparse_attention`` call (what backends and ``explain`` see)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    level_map: torch.Tensor  # (B, Hq, nqb, nkb) pool factors, 0 = skip
    factors: tuple[int, ...]  # the non-zero pool factors present, ascending
    block_q: int
    block_kv: int
    causal: bool
    scale: float
    needs_grad: bool  # autograd will record the attention (read once, when the call is built)

    def describe(self) -> str:
        mode = "causal" if self.causal else "non-causal"
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, "
                f"{mode}, block_q={self.block_q}, block_kv={self.block_kv}, pool factors {list(self.factors)}, "
                f"scale={self.scale:.4g}, {grad_words(self.needs_grad)}")


def make_pyramid_call(q, k, v, level_map, block_q, block_kv, *, causal=False, scale=None) -> PyramidCall:
    """Validate a ``pyramid_sparse_attention`` call; errors name the argument."""
    hq, _ = check_qkv(q, k, v)
    int_arg("block_q", block_q, 1)
    int_arg("block_kv", block_kv, 1)
    B, Nq, _, D = q.shape
    Nk = k.shape[1]
    if Nk % block_kv:
        raise ValueError(f"Nk ({Nk}) must be divisible by block_kv ({block_kv}): pooled levels live inside KV blocks")
    if causal and Nq != Nk:
        raise ValueError(f"causal PSA needs self-attention (Nq == Nk), got Nq={Nq}, Nk={Nk}")
    if not isinstance(level_map, torch.Tensor) or level_map.dtype.is_floating_point or level_map.dtype == torch.bool:
        raise TypeError("level_map must be an integer tensor of pool factors (0 = skip)")
    nqb, nkb = math.ceil(Nq / block_q), Nk // block_kv
    lm = check_layout(level_map != 0, B, hq, nqb, nkb).to(q.device)  # validates the shape
    lm = level_map.to(q.device).reshape(lm.shape).expand(B, hq, nqb, nkb)  # (B, Hq, nqb, nkb)
    factors = tuple(sorted(int(f) for f in torch.unique(lm) if f != 0))
    bad = [f for f in factors if f & (f - 1) or block_kv % f]
    if bad or bool((lm < 0).any()):
        raise ValueError(f"level_map values must be 0 or powers of two dividing block_kv ({block_kv}), got {bad}")
    return PyramidCall(q, k, v, lm, factors, block_q, block_kv, bool(causal), resolve_scale(scale, D),
                       needs_grad(q, k, v))


def _empty(call: PyramidCall) -> torch.Tensor:
    """Nothing visible anywhere (no non-zero factor): zeros ``(B, Nq, Hq, Dv)``."""
    return call.q.new_zeros(*call.q.shape[:3], call.v.shape[-1])


def _fused_supports(call: PyramidCall) -> tuple[bool, str]:
    ok, why = no_grad_fused_check(call.q, call.v, call.needs_grad)
    if not ok:
        return ok, why
    if call.causal and not causal_diag_ok(call.level_map, call.block_q, call.block_kv, call.q.shape[1]):
        return False, ("causal split needs block_q % block_kv == 0 and every query block's own KV blocks "
                       "at factor 1")
    return True, ""


def _run_fused(call: PyramidCall) -> torch.Tensor:
    if not call.factors:
        return _empty(call)
    # inference: fused op, per-row masks only, causal split into own span + unmasked past
    cdt = compute_dtype(call.q.dtype)
    out = pyramid_fused(call.q.to(cdt), call.k.to(cdt), call.v.to(cdt), call.level_map, list(call.factors),
                        call.block_q, call.block_kv, call.causal, call.scale)
    return out.to(call.q.dtype)


def _gather_detail(call: PyramidCall) -> str:
    if call.needs_grad:
        how = "gathered pooled blocks, explicit softmax (attend_gathered; autograd records it)"
    else:
        how = "gathered pooled blocks, SDPA on a float mask (ln r where visible, -inf elsewhere; no grad needed)"
    return how + upcast_words(call.q.dtype)


def _run_gather(call: PyramidCall) -> torch.Tensor:
    if not call.factors:
        return _empty(call)
    q, k, v, lm, factors = call.q, call.k, call.v, call.level_map, call.factors
    block_q, block_kv, causal, scale = call.block_q, call.block_kv, call.causal, call.scale
    B, Nq, hq, D = q.shape
    Nk, hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    nqb, nkb = lm.shape[-2:]
    cdt = compute_dtype(q.dtype)
    dev = q.device
    b_ar = torch.arange(B, device=dev).view(B, 1, 1, 1)
    kvh = (torch.arange(hq, device=dev) // (hq // hkv)).view(1, hq, 1, 1)
    # one bank of every level's pooled tokens in granules of g tokens (g = the smallest pooled block),
    # so that a single index_select gathers a row's blocks of all levels without a concatenation
    g = block_kv // factors[-1]
    kbank, vbank, ids, oks, lasts, biases, off = [], [], [], [], [], [], 0
    for r in factors:
        per = block_kv // r // g  # granules per pooled block
        kr = k.to(cdt).view(B, Nk // r // g, g, r, hkv, D).mean(3)  # (B, Nk/r/g, g, Hkv, D)
        vr = v.to(cdt).view(B, Nk // r // g, g, r, hkv, Dv).mean(3)  # (B, Nk/r/g, g, Hkv, Dv)
        kbank.append(kr.permute(0, 3, 1, 2, 4))  # (B, Hkv, Nk/r/g, g, D)
        vbank.append(vr.permute(0, 3, 1, 2, 4))  # (B, Hkv, Nk/r/g, g, Dv)
        idx, valid = layout_indices(lm == r)  # (B, Hq, nqb, kmax)
        ids.append((off + idx.unsqueeze(-1) * per + torch.arange(per, device=dev)).flatten(-2))  # granule ids
        n_tok = idx.shape[-1] * per * g
        oks.append(valid.unsqueeze(-1).expand(*valid.shape, per * g).flatten(-2))  # (B, Hq, nqb, kmax*per*g)
        # last original token covered by each pooled slot (causal visibility is about the last member)
        lasts.append((idx.unsqueeze(-1) * block_kv + (torch.arange(per * g, device=dev) + 1) * r - 1).flatten(-2))
        biases.append(torch.full((n_tok,), math.log(r), dtype=cdt, device=dev))
        off += nkb * per
    kb = torch.cat(kbank, 2).reshape(-1, g, D)  # (B*Hkv*off, g, D)
    vb = torch.cat(vbank, 2).reshape(-1, g, Dv)  # (B*Hkv*off, g, Dv)
    flat = (b_ar * hkv + kvh) * off + torch.cat(ids, -1)  # (B, Hq, nqb, L/g)
    ok_all = torch.cat(oks, -1)  # (B, Hq, nqb, L)
    last_all = torch.cat(lasts, -1)  # (B, Hq, nqb, L)
    bias = torch.cat(biases)  # (L,)
    L = bias.numel()
    qb = _blocks(q.to(cdt), nqb, block_q)  # (B, Hq, nqb, bq, D)
    per_block = B * hq * L * (block_q + D + Dv) * torch.finfo(cdt).bits // 8
    chunk = max(1, min(nqb, alloc.CHUNK_BYTES // max(per_block, 1)))
    # without autograd the fused SDPA kernel runs on a float mask (ln r where visible, -inf elsewhere);
    # with autograd the explicit softmax of attend_gathered (exact zeros and finite grads on empty rows)
    fused = not call.needs_grad
    outs = []
    for i0 in range(0, nqb, chunk):
        i1 = min(nqb, i0 + chunk)
        c = i1 - i0
        fl = flat[:, :, i0:i1].reshape(-1)
        kg = kb.index_select(0, fl).view(B * hq, c, L, D)  # (B*Hq, c, L, D)
        vg = vb.index_select(0, fl).view(B * hq, c, L, Dv)  # (B*Hq, c, L, Dv)
        allowed = ok_all[:, :, i0:i1].unsqueeze(-2)  # (B, Hq, c, 1, L)
        if causal:
            q_idx = torch.arange(i0 * block_q, i1 * block_q, device=dev).view(c, block_q, 1)
            allowed = allowed & (last_all[:, :, i0:i1].unsqueeze(-2) <= q_idx)  # (B, Hq, c, bq, L)
        allowed = allowed.reshape(B * hq, c, -1, L)
        qc = qb[:, :, i0:i1].reshape(B * hq, c, block_q, D)  # (B*Hq, c, bq, D)
        if fused:
            fmask = torch.where(allowed, bias, float("-inf"))  # (B*Hq, c, bq or 1, L)
            o = F.scaled_dot_product_attention(qc, kg, vg, attn_mask=fmask, scale=scale).nan_to_num_(0.0)
        else:
            o, _ = attend_gathered(qc, kg, vg, allowed, scale, bias)
        outs.append(o.view(B, hq, c, block_q, Dv))
    out = torch.cat(outs, 2).flatten(2, 3)[:, :, :Nq]  # (B, Hq, Nq, Dv)
    return out.permute(0, 2, 1, 3).to(q.dtype)  # (B, Nq, Hq, Dv)


def _run_reference(call: PyramidCall) -> torch.Tensor:
    """The naive pyramid (every pooled key materialised, float32 for half inputs)."""
    dt = reference_dtype(call.q.dtype)
    q, k, v = (t.to(dt) for t in (call.q, call.k, call.v))
    out = naive_pyramid_attention(q, k, v, call.level_map.cpu(), call.block_q, call.block_kv, call.causal,
                                  call.scale)
    return out.to(call.q.dtype)


PYRAMID_DISPATCHER = Dispatcher("pyramid_sparse_attention", [
    Backend("fused", _run_fused, _fused_supports, lambda call: (True, "no autograd: per-row masks only"),
            note="fused CPU op without autograd (psa_fused)",
            detail=lambda call: "fused CPU op, per-row masks" + (", causal own span split off and merged by "
                                                                  "log-sum-exp" if call.causal else "")
            + upcast_words(call.q.dtype)),
    Backend("gather", _run_gather, suits=lambda call: (True, "any level map, differentiable"),
            detail=_gather_detail, note="gathered pooled blocks, one masked softmax"),
    Backend("reference", _run_reference, cpu_only, auto=False, note="naive pyramid (the oracle)"),
])

register_op("pyramid_sparse_attention", make_pyramid_call, PYRAMID_DISPATCHER)


def pyramid_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, level_map: torch.Tensor,
                             block_q: int, block_kv: int, *, causal: bool = False,
                             scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention over a pyramid of pooled KV blocks chosen per (batch, head, query block).

    Args:
        q: ``(B, Nq, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)``; GQA by ``Hq % Hkv``.
            ``Nk % block_kv == 0`` (pooling stays inside blocks); ``Nq`` may be ragged.
        level_map: int ``(B or 1, Hq or 1, nqb, nkb)`` pool factors (0 = skip, else a power of two
            dividing ``block_kv``), ``nqb = ceil(Nq / block_q)``, ``nkb = Nk / block_kv``.
        causal: a pooled key covering tokens ``[p r, (p+1) r)`` is visible to query ``t`` only if
            ``(p+1) r - 1 <= t`` (self-attention, ``Nq == Nk``).
        scale: logit scale, default ``D ** -0.5``; each pooled logit gets ``+ ln r``.
        backend: ``"fused"`` (no autograd), ``"gather"``, ``"reference"`` or None (the first that can
            run). A forced backend that cannot run raises ValueError with the reason.

    Returns:
        ``(B, Nq, Hq, Dv)``; rows that see no key are zeros.

    Example:
        >>> q = k = v = torch.randn(1, 512, 4, 32)
        >>> M = torch.ones(4, 8, dtype=torch.long)         # every block at full resolution: dense
        >>> out = pyramid_sparse_attention(q, k, v, M, 128, 64)
    """
    call = make_pyramid_call(q, k, v, level_map, block_q, block_kv, causal=causal, scale=scale)
    return PYRAMID_DISPATCHER.run(call, backend)


@dataclass(frozen=True)
class PSACall:
    """A validated ``psa_attention`` call (what backends and ``explain`` see)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    config: PSAConfig
    scale: float
    generator: torch.Generator | None
    return_levels: bool
    needs_grad: bool  # autograd will record the attention (read once, when the call is built)

    def describe(self) -> str:
        c = self.config
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.q.dtype}, "
                f"{'causal' if c.causal else 'non-causal'}, block_q={c.block_q}, block_kv={c.block_kv}, "
                f"levels={c.levels}, mask_ratios={tuple(c.mask_ratios)}, "
                f"offsets={'strided' if self.generator is None else 'random'}, scale={self.scale:.4g}, "
                f"{grad_words(self.needs_grad)}")


def make_psa_call(q, k, v, config=PSAConfig(), *, scale=None, generator=None, return_levels=False) -> PSACall:
    """Validate a ``psa_attention`` call; errors name the argument."""
    if not isinstance(config, PSAConfig):
        raise TypeError(f"config must be a PSAConfig, got {type(config).__name__}")
    check_qkv(q, k, v)
    if k.shape[1] % config.block_kv:
        raise ValueError(f"Nk ({k.shape[1]}) must be divisible by block_kv ({config.block_kv})")
    if config.causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal PSA needs self-attention (Nq == Nk), got Nq={q.shape[1]}, Nk={k.shape[1]}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return PSACall(q, k, v, config, resolve_scale(scale, q.shape[-1]), generator, bool(return_levels),
                   needs_grad(q, k, v))


def _levels(call: PSACall) -> torch.Tensor:
    """Sampled importance -> rank-band level map ``(B, Hq, nqb, nkb)`` (no gradient)."""
    c = call.config
    s = psa_importance(call.q, call.k, c.block_q, c.block_kv, causal=c.causal, scale=call.scale,
                       generator=call.generator)
    return psa_level_map(s, c.mask_ratios, causal=c.causal, block_q=c.block_q, block_kv=c.block_kv)


def _psa_run(name: str):
    """``psa_attention`` on pyramid backend ``name``: the level map, then that backend (forced, so a
    level map it cannot take raises ValueError with the reason)."""
    def run(call: PSACall):
        c = call.config
        lm = _levels(call)
        pcall = make_pyramid_call(call.q, call.k, call.v, lm, c.block_q, c.block_kv, causal=c.causal,
                                  scale=call.scale)
        out = PYRAMID_DISPATCHER.run(pcall, name)
        return (out, lm) if call.return_levels else out
    return run


def _psa_fused_supports(call: PSACall) -> tuple[bool, str]:
    ok, why = no_grad_fused_check(call.q, call.v, call.needs_grad)
    if not ok:
        return ok, why
    c = call.config
    if c.causal and c.block_q % c.block_kv:
        # psa_level_map pins the diagonal KV blocks at factor 1, so the split needs only whole KV blocks
        return False, f"causal split needs block_q % block_kv == 0, got {c.block_q} % {c.block_kv}"
    return True, ""


def _psa_run_reference(call: PSACall):
    """The naive importance (same sampled offsets), naive rank bands, naive pyramid (float32 for halves)."""
    c = call.config
    dt = reference_dtype(call.q.dtype)
    q, k, v = (t.to(dt) for t in (call.q, call.k, call.v))
    oq = sample_offsets(c.block_q, call.generator).tolist()  # drawn in psa_importance's order
    ok = sample_offsets(c.block_kv, call.generator).tolist()
    S = naive_psa_importance(q.detach(), k.detach(), c.block_q, c.block_kv, c.causal, oq, ok, call.scale)
    lm = naive_psa_levels(S, c.mask_ratios, c.causal, c.block_q, c.block_kv)  # (B, Hq, nqb, nkb)
    out = naive_pyramid_attention(q, k, v, lm, c.block_q, c.block_kv, c.causal, call.scale).to(call.q.dtype)
    return (out, lm) if call.return_levels else out


PSA_DISPATCHER = Dispatcher("psa_attention", [
    Backend("fused", _psa_run("fused"), _psa_fused_supports, lambda call: (True, "no autograd: per-row masks"),
            note="level map, then the fused pyramid path",
            detail=lambda call: "sampled importance -> level map -> fused CPU op, per-row masks"
            + upcast_words(call.q.dtype)),
    Backend("gather", _psa_run("gather"), suits=lambda call: (True, "differentiable"),
            detail=lambda call: "sampled importance -> level map -> " + (
                "gathered pooled blocks, explicit softmax (autograd records it)" if call.needs_grad
                else "gathered pooled blocks, SDPA on a float mask (no grad needed)") + upcast_words(call.q.dtype),
            note="level map, then the gathered pyramid"),
    Backend("reference", _psa_run_reference, cpu_only, auto=False,
            note="naive importance, bands and pyramid (the oracle)"),
])

register_op("psa_attention", make_psa_call, PSA_DISPATCHER)


def psa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PSAConfig = PSAConfig(), *,
                  scale: float | None = None, generator: torch.Generator | None = None,
                  return_levels: bool = False, backend: str | None = None):
    """PSA end to end: sampled importance -> rank-band level map -> pyramid attention.

    Args:
        q, k, v: heads-last as in :func:`pyramid_sparse_attention`. config: :class:`PSAConfig`.
        scale: logit scale (importance and attention), default ``D ** -0.5``.
        generator: random sampled offsets for the importance estimate (default strided).
        return_levels: also return the level map.
        backend: ``"fused"`` (no autograd), ``"gather"``, ``"reference"`` or None (the first that
            can run). A forced backend that cannot run raises ValueError with the reason.

    Returns:
        ``(B, Nq, Hq, Dv)``; with ``return_levels`` also the level map ``(B, Hq, nqb, nkb)``.

    Example:
        >>> q = k = v = torch.randn(1, 1024, 4, 64)
        >>> out = psa_attention(q, k, v, PSAConfig(block_q=128, block_kv=64))
    """
    call = make_psa_call(q, k, v, config, scale=scale, generator=generator, return_levels=return_levels)
    return PSA_DISPATCHER.run(call, backend)
