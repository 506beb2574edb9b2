"""Split-KV decoding: Lean Attention (arXiv 2405.10480, §3-4) / flash-decoding.

A decode step has 1..16 queries, so the parallel work must come from the cache length: the keys
are cut into splits, each split yields a normalised partial ``(o_s, lse_s)``, and the partials are
merged exactly by log-sum-exp (``o = sum_s exp(lse_s - LSE) o_s``, ``LSE = logsumexp_s lse_s``;
§3.2, the associativity of online softmax). GQA: the ``Hq / Hkv`` query heads of a group share one
pass over their K/V head, so the cache is read once, not ``Hq / Hkv`` times as SDPA's per-head
kernel does.

Two paths. The compiled kernel (``kernels/native/decode_cpu.cpp``; inference, float32 / bfloat16 /
float16, masks given as per-row key intervals such as ``decode_window`` or ``causal``) cuts the key
work of all (batch, KV head) pairs into one contiguous part per thread (Lean Attention's stream-K,
§4), reads every key and value row once for the whole query group and never reads keys no query
sees. The torch-ops twin (gradients, float64, any other mask, or no compiler) does one batched
matmul per K/V head and split, reading each head's keys without a copy when they are contiguous per
head (the layout :class:`attnkit.ops.decode.KVCache` stores); splits the mask leaves empty are
skipped, splits it fills are computed without a mask, only the splits it cuts evaluate it.
"""

from __future__ import annotations

import torch

from attnkit.kernels import native
from attnkit.masks.base import EMPTY, FULL, IntervalMask
from attnkit.ops.base import Backend

#: most queries per call treated as a decode shape (flash-decoding's regime)
MAX_DECODE_QUERIES = 16
#: shortest cache for which the automatic choice prefers split-KV over SDPA (the compiled kernel measured
#: faster than SDPA from 128 keys on, 1 query, H=32, Hkv=8, D=128; below this one call's overheads dominate)
MIN_AUTO_KEYS = 256
#: keys per split: large enough that each matmul amortises its call overhead, small enough that the
#: split's scores (Hq x split fp32) stay in cache
DEFAULT_SPLIT = 8192


def split_size(nk: int, split: int | None = None) -> int:
    """Keys per split for a cache of ``nk`` keys (``split`` overrides)."""
    return max(1, min(nk, split if split is not None else DEFAULT_SPLIT))


_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def native_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> str | None:
    """None when the compiled decode kernel can run this call, else why not (pure, no build)."""
    if native.decode_status() not in ("loaded", native.NOT_BUILT):
        return f"the compiled decode kernel is unavailable ({native.decode_status()})"
    if q.device.type != "cpu":
        return f"the compiled decode kernel runs on CPU tensors, not {q.device.type}"
    if q.dtype not in _NATIVE_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"the compiled decode kernel takes float32 / bfloat16 / float16, not {q.dtype}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "gradients need the torch-ops path (the kernel is forward-only)"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "the kernel needs a contiguous feature dim"
    if mask is not None and (not isinstance(mask, IntervalMask) or mask.lead_shape != (1, 1)):
        return f"the kernel takes masks given as key intervals per query row, not {type(mask).__name__}"
    return None


def row_intervals(mask, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` int64 ``(R, Nq)``: the inclusive key intervals each query row sees (all keys for no mask)."""
    if mask is None:
        return torch.zeros(1, nq, dtype=torch.long), torch.full((1, nq), nk - 1, dtype=torch.long)
    lo, hi = mask.clipped_intervals(nq, nk)
    return lo.contiguous(), hi.contiguous()


def live_keys(mask, nq: int, nk: int) -> int:
    """How many keys at least one query row sees (the keys the kernel reads per (batch, KV head))."""
    lo, hi = row_intervals(mask, nq, nk)
    spans = sorted((a, e + 1) for a, e in zip(lo.flatten().tolist(), hi.flatten().tolist()) if a <= e)
    total, end = 0, -1
    for a, e in spans:
        if e > end:
            total += e - max(a, end)
            end = e
    return total


def native_split_kv(q, k, v, mask=None, *, scale: float, parts: int = 0):
    """The compiled kernel: ``(out (B, Nq, Hq, Dv) in q's dtype, lse (B, Nq, Hq) float32)``, or None when it
    cannot run (see :func:`native_reason`; the build happens on first use). ``parts`` = 0: one per thread."""
    if native_reason(q, k, v, mask) is not None:
        return None
    ops = native.decode_ops()
    if ops is None:
        return None
    lo, hi = row_intervals(mask, q.shape[1], k.shape[1])
    return ops.decode_fwd(q, k, v, lo, hi, float(scale), int(parts))


def split_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, *, scale: float,
                       split: int | None = None, native_ok: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of a few queries over a long cache, split along the keys and merged by LSE.

    Args:
        q: ``(B, Nq, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)``; ``Hq % Hkv == 0``. Any strides.
        mask: an ``attnkit.masks`` Mask (e.g. ``decode_window``, ``causal(offset)``) or None.
        scale: the score scale.
        split: keys per split of the torch-ops path (default :data:`DEFAULT_SPLIT`); the kernel cuts the
            work into one part per thread instead.
        native_ok: False forces the torch-ops path.

    Returns:
        ``out (B, Nq, Hq, Dv)`` in q's dtype and ``lse (B, Nq, Hq)`` (float32; float64 for float64);
        a query with no allowed key gets zeros and ``-inf``.
    """
    if native_ok:
        got = native_split_kv(q, k, v, mask, scale=scale)
        if got is not None:
            return got
    b, nq, hq, d = q.shape
    nk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    size = split_size(nk, split)
    nsplit = -(-nk // size)
    # queries of one K/V head side by side: rows ordered (group member, query)
    qg = (q.to(work) * scale).view(b, nq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * nq, d)
    classes = None if mask is None else mask.blocks(nq, nk, nq, size)[0]          # (nsplit,)
    outs, lses = [], []
    for s in range(nsplit):
        cls = FULL if classes is None else int(classes[s])
        if cls == EMPTY:
            continue
        a, e = s * size, min(nk, (s + 1) * size)
        ks = k[:, a:e].to(work).permute(0, 2, 3, 1)                               # (B, Hkv, D, S)
        vs = v[:, a:e].to(work).transpose(1, 2)                                   # (B, Hkv, S, Dv)
        # one bmm per batch row keeps (Hkv, D, S) a view when each head's keys are contiguous
        sc = torch.stack([torch.bmm(qg[i], ks[i]) for i in range(b)])             # (B, Hkv, G*Nq, S)
        if cls != FULL:
            allowed = mask.tile(0, nq, torch.arange(a, e), nq, nk)                # (.., Nq, S)
            allowed = _by_group(allowed, b, hq, hkv, g, nq)                       # (B|1, Hkv|1, G*Nq|Nq, S)
            sc = sc.masked_fill(~allowed, float("-inf"))
        m = sc.amax(-1, keepdim=True)                                             # (B, Hkv, G*Nq, 1)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(sc - m_safe)
        den = p.sum(-1, keepdim=True)
        o = torch.stack([torch.bmm(p[i], vs[i]) for i in range(b)])               # (B, Hkv, G*Nq, Dv)
        outs.append(o / den.clamp_min(torch.finfo(work).tiny))
        lses.append(torch.where(den > 0, m_safe + den.log(), float("-inf")).squeeze(-1))   # (B, Hkv, G*Nq)
    if not outs:
        out = q.new_zeros(b, nq, hq, dv)
        return out, torch.full((b, nq, hq), float("-inf"), dtype=work, device=q.device)
    out, lse = merge_splits(torch.stack(outs), torch.stack(lses))
    out = out.view(b, hkv, g, nq, dv).permute(0, 3, 1, 2, 4).reshape(b, nq, hq, dv)   # (B, Nq, Hq, Dv)
    lse = lse.view(b, hkv, g, nq).permute(0, 3, 1, 2).reshape(b, nq, hq)               # (B, Nq, Hq)
    return out.to(q.dtype), lse


def merge_splits(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LSE merge of ``S`` partials: ``outs (S, ..., Dv)``, ``lses (S, ...)`` -> ``(out (..., Dv), lse (...))``.

    Empty partials (``lse = -inf``) are the identity; all empty gives ``(0, -inf)``.
    """
    top = lses.amax(0)
    top_safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lses - top_safe)                                                # (S, ...)
    den = w.sum(0)
    out = (outs * w.unsqueeze(-1)).sum(0) / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)
    return out, torch.where(den > 0, top_safe + den.log(), float("-inf"))


def _by_group(allowed: torch.Tensor, b: int, hq: int, hkv: int, g: int, nq: int) -> torch.Tensor:
    """A tile mask ``(Nq, S)`` or ``(B|1, Hq|1, Nq, S)`` in the rows of the grouped scores."""
    if allowed.dim() == 2:
        return allowed if g == 1 else allowed.repeat(g, 1)                        # (G*Nq, S)
    lb, lh, _, s = allowed.shape
    if lh == 1:
        return allowed.expand(lb, 1, nq, s).repeat(1, 1, g, 1)                    # (B|1, 1, G*Nq, S)
    return allowed.reshape(lb, hkv, g * nq, s)                                    # (B|1, Hkv, G*Nq, S)


# ---- the backend of ak.attention ----------------------------------------------------------------------

def _supports(call) -> tuple[bool, str]:
    if call.nq > MAX_DECODE_QUERIES:
        return False, f"decode shapes only: Nq = {call.nq} > {MAX_DECODE_QUERIES} queries"
    return True, ""


def _suits(call) -> tuple[bool, str]:
    if call.nk < MIN_AUTO_KEYS:
        return False, f"short cache (Nk = {call.nk} < {MIN_AUTO_KEYS}): one fused kernel call is cheaper"
    why = native_reason(call.q, call.k, call.v, call.mask)
    if why is not None:
        return False, f"only the compiled kernel beats SDPA, and {why}"
    return True, (f"decode shape: {call.nq} queries against {call.nk} keys; the compiled split-KV kernel reads "
                  f"each K/V row once per query group (measured faster than SDPA)")


def path(q, k, v, mask, split: int | None = None) -> str:
    """Which path ``split_kv_attention`` takes for these inputs, and why (for ``explain``)."""
    why = native_reason(q, k, v, mask)
    g = q.shape[2] // k.shape[2]
    if why is None:
        return (f"compiled kernel: the key work cut into one contiguous part per thread ({torch.get_num_threads()}), "
                f"partials merged by LSE, each K/V row read once for {g} query head(s)")
    size = split_size(k.shape[1], split)
    n = -(-k.shape[1] // size)
    return f"torch ops ({why}): {n} split(s) of {size} keys merged by LSE, {g} query head(s) per K/V pass"


def _detail(call) -> str:
    return path(call.q, call.k, call.v, call.mask)


def _run(call):
    out, lse = split_kv_attention(call.q, call.k, call.v, call.mask, scale=call.scale)
    return (out, lse) if call.return_lse else out


#: ``ak.attention``'s split-KV backend (name ``split_kv``); takes calls with at most 16 queries.
BACKEND = Backend(name="split_kv", run=_run, supports=_supports, suits=_suits, detail=_detail,
                  note="Lean Attention / flash-decoding: keys split, partials merged by LSE")
