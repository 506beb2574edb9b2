"""Quantized KV caches, attended chunk by chunk without dequantizing the whole cache.

* KIVI (KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache, arXiv 2402.02750 §3): keys
  per channel over groups of ``group`` tokens, values per token over groups of channels, 2/4/8 bits,
  the most recent tokens (fewer than ``residual``) kept in full precision until a whole residual
  block can be quantized.
* ZipCache (Accurate and Efficient KV Cache Quantization with Salient Token Identification, arXiv
  2405.14256 §4.1-4.2): channel-separable token-wise quantization (channels normalised by
  ``sqrt(max |x|)``, then min/max per token) at two bit widths, the salient tokens (highest
  *normalised* attention score) at the higher one.

Attention runs over the packed codes one chunk at a time: each chunk is unpacked and rescaled into a
chunk-sized buffer, attended (a split of split-KV decoding), and the partials are merged by LSE.

Error bound (per element, stated and tested): a value reconstructed from a ``bits``-bit code is
within half a quantization step of the original, ``|x - x_hat| <= step / 2`` with
``step = (max - min) / (2**bits - 1)`` over its group, plus one rounding of the float16 parameters.
For attention: with ``eps`` the largest score error ``scale * sum_c |q_c| step_k,c / 2``, every output
element is within ``max step_v / 2 + (exp(2 eps) - 1) * max |v|`` of full-precision attention
(:meth:`KIVICache.output_error_bound`).
"""

from __future__ import annotations

import math

import torch

from attnkit._validate import int_arg
from attnkit.masks import causal
from attnkit.ops.decode.split_kv import merge_splits, split_kv_attention

BITS = (2, 4, 8)
#: tokens unpacked at a time while attending
CHUNK = 8192


def _check_bits(name: str, bits: object) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{name} must be one of {BITS}, got {bits!r}")
    return int(bits)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``(..., C)`` (values < 2**bits) -> packed uint8 ``(..., W)``, ``W = C * bits / 8``, planar:
    byte ``t`` holds codes ``t, t + W, t + 2W, ...`` in bits ``0..bits-1, bits..2 bits-1, ...`` (so unpacking a
    row is ``per`` contiguous shift-and-mask sweeps, which the compiled kernel vectorises)."""
    per = 8 // bits
    planes = codes.reshape(*codes.shape[:-1], per, codes.shape[-1] // per)      # (..., per, W)
    out = planes[..., 0, :].clone()
    for i in range(1, per):
        out |= planes[..., i, :] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(..., W)`` -> uint8 ``(..., W * 8 / bits)``."""
    per, mask = 8 // bits, (1 << bits) - 1
    return torch.cat([(packed >> (i * bits)) & mask for i in range(per)], -1)     # (..., C)


def quantize(x: torch.Tensor, bits: int, dim: int, param_dtype: torch.dtype):
    """Asymmetric min/max quantization of ``x`` along ``dim`` -> ``(codes uint8, step, zero)`` with
    ``x ~= codes * step + zero``; the float ``param_dtype`` parameters are rounded so that the codes
    never clip (zero rounded down, step up)."""
    levels = 2 ** bits - 1
    xf = x.float() if x.dtype != torch.float64 else x
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    zero = lo.to(param_dtype)
    zero = torch.where(zero.to(xf.dtype) > lo, torch.nextafter(zero, torch.full_like(zero, -math.inf)), zero)
    step = ((hi - zero.to(xf.dtype)) / levels).to(param_dtype)
    short = step.to(xf.dtype) * levels + zero.to(xf.dtype) < hi
    step = torch.where(short, torch.nextafter(step, torch.full_like(step, math.inf)), step)
    s, z = step.to(xf.dtype), zero.to(xf.dtype)
    codes = torch.round((xf - z) / torch.where(s > 0, s, torch.ones_like(s))).clamp_(0, levels)
    return codes.to(torch.uint8), step, zero


class KIVICache:
    """One layer's KIVI cache: ``append(k (B, N, H, D), v (B, N, H, Dv))``, ``attend(q (B, Nq, Hq, D))``.

    Args:
        bits: 2, 4 or 8.
        group: tokens per key group (per-channel key parameters) and channels per value group.
        residual: the full-precision window; a multiple of ``group``. Tokens are quantized a whole
            ``residual`` block at a time, so fewer than ``residual`` recent tokens stay exact.
        param_dtype: dtype of the step/zero parameters (float16 as in KIVI).

    Storage (heads-first, grown by doubling like :class:`KVCache`): packed codes ``(B, H, capacity, D|Dv * bits
    / 8)``, key parameters ``(B, H, capacity / group, D)``, value parameters ``(B, H, capacity, Dv / group)``,
    and the full-precision residual ``(B, H, n, D|Dv)``. ``attend`` runs the compiled decode kernel on the packed
    codes (each block of codes dequantized into a block-sized buffer), or unpacks ``CHUNK`` tokens at a time
    with torch ops where the kernel is unavailable.
    """

    def __init__(self, bits: int = 4, group: int = 32, residual: int = 128, param_dtype=torch.float16):
        self.bits = _check_bits("bits", bits)
        self.group = int_arg("group", group, 1)
        self.residual = int_arg("residual", residual, 1)
        if self.residual % self.group:
            raise ValueError(f"KIVICache: residual={residual} must be a multiple of group={group}")
        self.param_dtype = param_dtype
        self.kc = self.kstep = self.kzero = self.vc = self.vstep = self.vzero = None
        self.k_res = self.v_res = None                                         # (B, H, n, D) full precision
        self.n_quant = 0

    @property
    def length(self) -> int:
        return self.n_quant + (0 if self.k_res is None else self.k_res.shape[2])

    @property
    def capacity(self) -> int:
        return 0 if self.kc is None else self.kc.shape[2]

    def _reserve(self, b: int, h: int, d: int, dv: int, cg: int, need: int) -> None:
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity)
        cap = -(-cap // self.residual) * self.residual
        per, pd, n = 8 // self.bits, self.param_dtype, self.n_quant
        new = (torch.empty(b, h, cap, d // per, dtype=torch.uint8), torch.empty(b, h, cap // self.group, d, dtype=pd),
               torch.empty(b, h, cap // self.group, d, dtype=pd), torch.empty(b, h, cap, dv // per, dtype=torch.uint8),
               torch.empty(b, h, cap, dv // cg, dtype=pd), torch.empty(b, h, cap, dv // cg, dtype=pd))
        if self.kc is not None:
            ng = n // self.group
            for dst, src, used in zip(new, self._buffers(), (n, ng, ng, n, n, n)):
                dst[:, :, :used] = src[:, :, :used]
        self.kc, self.kstep, self.kzero, self.vc, self.vstep, self.vzero = new

    def _buffers(self):
        return self.kc, self.kstep, self.kzero, self.vc, self.vstep, self.vzero

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k (B, N, H, D)``, ``v (B, N, H, Dv)``; whole residual blocks are quantized."""
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)                          # (B, H, N, D)
        if self.k_res is not None:
            ref = self.k_res
            if kh.shape[:2] != ref.shape[:2] or kh.shape[3] != ref.shape[3] or k.dtype != ref.dtype:
                raise ValueError(f"KIVICache.append: k {tuple(k.shape)} {k.dtype} does not match the cache's "
                                 f"(B, H, D) = {(ref.shape[0], ref.shape[1], ref.shape[3])} {ref.dtype} "
                                 f"(mismatched head count or dtype)")
            kh, vh = torch.cat([self.k_res, kh], 2), torch.cat([self.v_res, vh], 2)
        b, h, _, d = kh.shape
        dv = vh.shape[-1]
        cg = min(self.group, dv)
        if dv % cg or d % (8 // self.bits) or dv % (8 // self.bits):
            raise ValueError(f"KIVICache.append: head dims D={d}, Dv={dv} must be divisible by the value group "
                             f"{cg} and by {8 // self.bits} codes per byte")
        full = (kh.shape[2] // self.residual) * self.residual
        if full:
            # groups never straddle residual blocks, so quantizing all whole blocks at once is block by block
            self._reserve(b, h, d, dv, cg, self.n_quant + full)
            t0, g0, g = self.n_quant, self.n_quant // self.group, self.group
            kc, ks, kz = quantize(kh[:, :, :full].reshape(b, h, full // g, g, d), self.bits, 3, self.param_dtype)
            self.kc[:, :, t0:t0 + full] = pack(kc.reshape(b, h, full, d), self.bits)
            self.kstep[:, :, g0:g0 + full // g] = ks.squeeze(3)                # (B, H, full/g, D)
            self.kzero[:, :, g0:g0 + full // g] = kz.squeeze(3)
            vc, vs, vz = quantize(vh[:, :, :full].reshape(b, h, full, dv // cg, cg), self.bits, 4, self.param_dtype)
            self.vc[:, :, t0:t0 + full] = pack(vc.reshape(b, h, full, dv), self.bits)
            self.vstep[:, :, t0:t0 + full] = vs.squeeze(-1)                    # (B, H, full, Dv/cg)
            self.vzero[:, :, t0:t0 + full] = vz.squeeze(-1)
        self.n_quant += full
        self.k_res, self.v_res = kh[:, :, full:].contiguous(), vh[:, :, full:].contiguous()

    def _dequant(self, t0: int, t1: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized tokens ``t0 .. t1 - 1`` (``t0`` a multiple of ``group``) dequantized into a buffer of that
        size: heads-first ``(B, H, t1 - t0, D|Dv)``."""
        b, h, _, _ = self.kc.shape
        n, g = t1 - t0, self.group
        d = self.kstep.shape[-1]
        k = unpack(self.kc[:, :, t0:t1], self.bits).to(dtype).view(b, h, -1, g, d)          # (B, H, n/g, g, D)
        k = (k * self.kstep[:, :, t0 // g: -(-t1 // g), None].to(dtype)
             + self.kzero[:, :, t0 // g: -(-t1 // g), None].to(dtype)).view(b, h, n, d)
        v = unpack(self.vc[:, :, t0:t1], self.bits).to(dtype)
        dv = v.shape[-1]
        v = v.view(b, h, n, self.vstep.shape[-1], -1)                                      # (B, H, n, Dv/cg, cg)
        v = (v * self.vstep[:, :, t0:t1, :, None].to(dtype) + self.vzero[:, :, t0:t1, :, None].to(dtype))
        return k, v.view(b, h, n, dv)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache as attention sees it, heads-last ``(B, N, H, D)`` (for tests and error reports)."""
        dt = self.k_res.dtype
        parts = [self._dequant(0, self.n_quant, dt)] if self.n_quant else []
        k = torch.cat([p[0] for p in parts] + [self.k_res], 2)
        v = torch.cat([p[1] for p in parts] + [self.v_res], 2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, *, scale: float | None = None, native_ok: bool = True) -> torch.Tensor:
        """Attention of ``q (B, Nq, Hq, D)`` (the last ``Nq`` cached tokens, causal) over the cache without
        dequantizing it whole; returns ``(B, Nq, Hq, Dv)``. ``native_ok=False`` forces the torch-ops path."""
        if self.k_res is None:
            raise ValueError("KIVICache.attend: the cache is empty; append keys and values first")
        n, nq = self.length, q.shape[1]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        outs, lses = [], []
        if self.n_quant:
            got = self._attend_native(q, scale) if native_ok else None
            if got is not None:
                outs.append(got[0]), lses.append(got[1])
            else:
                for t0 in range(0, self.n_quant, CHUNK):
                    k, v = self._dequant(t0, min(self.n_quant, t0 + CHUNK), work)     # one chunk's buffer
                    o, lse = split_kv_attention(q, k.transpose(1, 2), v.transpose(1, 2), causal(n - nq - t0),
                                                scale=scale)
                    outs.append(o.to(work)), lses.append(lse.to(work))
        if self.k_res.shape[2]:
            o, lse = split_kv_attention(q, self.k_res.transpose(1, 2), self.v_res.transpose(1, 2),
                                        causal(n - nq - self.n_quant), scale=scale)
            outs.append(o.to(work)), lses.append(lse.to(work))
        if len(outs) == 1:
            return outs[0].to(q.dtype)
        return merge_splits(torch.stack(outs), torch.stack(lses))[0].to(q.dtype)

    def _attend_native(self, q: torch.Tensor, scale: float):
        """The compiled kernel on the packed codes: ``(out float32, lse)``, or None where it cannot run."""
        from attnkit.kernels import native
        from attnkit.ops.decode.split_kv import native_reason, row_intervals

        if native_reason(q, q, q) is not None or native.decode_ops() is None:   # q's dtype, device, grad
            return None
        if self.kc.device.type != "cpu":
            return None
        lo, hi = row_intervals(causal(self.length - q.shape[1]), q.shape[1], self.n_quant)
        return native.decode_ops().kivi_decode_fwd(q, *self._buffers()[:3], *self._buffers()[3:], lo, hi, float(scale),
                                                   self.bits, self.group, min(self.group, self.v_res.shape[-1]), 0)

    def memory_bytes(self) -> int:
        """Bytes held: packed codes and parameters (their buffers' capacity) and the full-precision residual."""
        parts = [t for t in self._buffers() if t is not None]
        parts += [t for t in (self.k_res, self.v_res) if t is not None]
        return sum(t.numel() * t.element_size() for t in parts)

    def output_error_bound(self, q: torch.Tensor, *, scale: float | None = None) -> float:
        """A guaranteed bound on ``max |attend(q) - full-precision attention|`` (module docstring)."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if not self.n_quant:
            return 0.0
        b, hq = q.shape[0], q.shape[2]
        h = self.k_res.shape[1]
        ks = self.kstep[:, :, : self.n_quant // self.group].float()             # (B, H, groups, D)
        qa = q.abs().float().view(b, q.shape[1], h, hq // h, -1)               # (B, Nq, H, G, D)
        rounding = 2.0 ** -10                                                  # one float16 parameter rounding
        eps = scale * torch.einsum("bnhgd,bhtd->bnhgt", qa, ks / 2).amax().item() * (1 + rounding)
        vstep = self.vstep[:, :, : self.n_quant].float().amax().item()
        _k_full, v_full = self.dequantize()
        vmax = v_full.abs().amax().item()
        return vstep / 2 * (1 + rounding) + math.expm1(2 * eps) * (vmax + vstep)


def zipcache_quantize(x: torch.Tensor, bits: int, param_dtype=torch.float32):
    """ZipCache's channel-separable token-wise quantizer of ``x (B, N, H, D)``: returns ``(codes, step, zero, c)``
    with ``x ~= (codes * step + zero) * c``; ``c (H*D,)`` normalises channels, ``step``/``zero`` are per token."""
    b, n, h, d = x.shape
    flat = x.reshape(b, n, h * d).float()                                      # (B, N, C)
    c = flat.abs().amax(dim=(0, 1)).sqrt()
    c = torch.where(c > 0, c, torch.ones_like(c))
    codes, step, zero = quantize(flat / c, bits, -1, param_dtype)
    return codes, step, zero, c


def normalized_saliency(probs: torch.Tensor) -> torch.Tensor:
    """ZipCache's saliency from attention probabilities ``(B, Hq, Nq, Nk)`` of causal queries at positions
    ``Nk - Nq + i``: accumulated attention of each key divided by how many queries can see it, summed over heads:
    ``(B, Nk)``."""
    nq, nk = probs.shape[-2:]
    pos = torch.arange(nq, device=probs.device) + nk - nq
    visible = (torch.arange(nk, device=probs.device)[None, :] <= pos[:, None]).sum(0).clamp_min(1)   # (Nk,)
    return probs.float().sum(dim=(1, 2)) / visible


class _ZipPart:
    """Tokens of one bit width of one tensor: rows ``(M, 2)`` int32 (batch, position), planar-packed codes
    ``(M, C * bits / 8)``, per-token ``step, zero (M, 1)`` and the tensor's channel scale ``c (C,)``."""

    def __init__(self, bits: int, c: torch.Tensor):
        self.bits, self.c = bits, c
        w = c.numel() * bits // 8
        self.rows = torch.zeros(0, 2, dtype=torch.int32)
        self.packed = torch.zeros(0, w, dtype=torch.uint8)
        self.step = self.zero = torch.zeros(0, 1)

    def add(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        """Quantize ``x (M, C)`` (channel-separable, token-wise) with this part's fixed ``c`` and append it."""
        if not rows.shape[0]:
            return
        codes, step, zero = quantize(x.float() / self.c, self.bits, -1, torch.float32)
        self.rows = torch.cat([self.rows, rows.to(torch.int32)])
        self.packed = torch.cat([self.packed, pack(codes, self.bits)])
        self.step, self.zero = torch.cat([self.step, step]), torch.cat([self.zero, zero])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.packed, self.step, self.zero, self.c))


class ZipCache:
    """A ZipCache-quantized cache of one layer (arXiv 2405.14256 §4), built at prefill from ``k, v (B, N, H, D)``
    and the probe attention probabilities that rank the tokens, then extended while decoding.

    Args:
        high_bits / low_bits: bit widths of salient / other tokens (paper: 4 / 2).
        low_fraction: fraction of tokens stored at ``low_bits`` (paper: 0.4 for its reported setting).
        gap: decoding keeps new tokens in full precision and quantizes them ``gap`` at a time (the
            reference's ``streaming_gap``, 100), ranked by the normalised attention they received from the
            decode queries meanwhile (accumulated by :meth:`attend`).

    :meth:`attend` works ``CHUNK`` quantized tokens at a time straight from the codes: with
    ``k = (code * step + zero) * c``, the scores are ``step * ((q * c) . code) + zero * sum(q * c)`` and the
    output ``c * (sum_j p_j step_j code_j + sum_j p_j zero_j)``, so no dequantized cache is ever built.
    """

    def __init__(self, k, v, probs, *, high_bits: int = 4, low_bits: int = 2, low_fraction: float = 0.4,
                 gap: int = 100):
        self.high_bits, self.low_bits = _check_bits("high_bits", high_bits), _check_bits("low_bits", low_bits)
        if not 0.0 <= low_fraction <= 1.0:
            raise ValueError(f"ZipCache: low_fraction must be in [0, 1], got {low_fraction}")
        self.low_fraction, self.gap = low_fraction, int_arg("gap", gap, 1)
        b, n, h, d = k.shape
        dv = v.shape[-1]
        self.shape, self.dtype = (b, h, d, dv), k.dtype
        self.parts = {}
        for name, x in (("k", k), ("v", v)):
            c = x.reshape(b, n, -1).float().abs().amax(dim=(0, 1)).sqrt()     # (C,) over the prefill, then fixed
            c = torch.where(c > 0, c, torch.ones_like(c))
            self.parts[name] = [_ZipPart(self.high_bits, c), _ZipPart(self.low_bits, c)]
        self.salient = torch.zeros(b, 0, dtype=torch.bool)
        self.n_quant = 0
        self.k_rec, self.v_rec = k[:, :0], v[:, :0]                             # (B, R, H, D) full precision
        self.rec_score, self.rec_seen = torch.zeros(b, 0), torch.zeros(0)
        self._quantize(k, v, normalized_saliency(probs))

    @property
    def length(self) -> int:
        return self.n_quant + self.k_rec.shape[1]

    def _quantize(self, k, v, sal) -> None:
        """Quantize ``k, v (B, n, H, D)`` at positions ``n_quant ..``: the top ``1 - low_fraction`` by ``sal (B, n)``
        at the high bit width."""
        b, n = k.shape[:2]
        n_high = n - math.floor(self.low_fraction * n)
        order = torch.sort(sal, dim=-1, descending=True, stable=True).indices
        salient = torch.zeros(b, n, dtype=torch.bool)
        salient.scatter_(1, order[:, :n_high], True)
        for sel, idx in ((salient, 0), (~salient, 1)):
            rows = sel.nonzero()                                                # (M, 2) (batch, token)
            for name, x in (("k", k), ("v", v)):
                self.parts[name][idx].add(x[rows[:, 0], rows[:, 1]].reshape(rows.shape[0], -1),
                                          rows + torch.tensor([0, self.n_quant]))
        self.salient = torch.cat([self.salient, salient], 1)
        self.n_quant += n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Decoding: append ``k (B, n, H, D)``, ``v (B, n, H, Dv)`` in full precision; once ``gap`` older recent
        tokens have been attended by later queries, quantize them by the saliency they gathered."""
        b, h, d, dv = self.shape
        if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (b, h, d) or v.shape[:3] != k.shape[:3] \
                or v.shape[3] != dv or k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"ZipCache.append: k {tuple(k.shape)} / v {tuple(v.shape)} {k.dtype} do not match the "
                             f"cache's (B, H, D, Dv) = {self.shape} {self.dtype}")
        while self.k_rec.shape[1] >= self.gap:
            g = self.gap
            sal = self.rec_score[:, :g] / self.rec_seen[:g].clamp_min(1)       # normalised by the queries that saw it
            self._quantize(self.k_rec[:, :g], self.v_rec[:, :g], sal)
            self.k_rec, self.v_rec = self.k_rec[:, g:], self.v_rec[:, g:]
            self.rec_score, self.rec_seen = self.rec_score[:, g:], self.rec_seen[g:]
        self.k_rec, self.v_rec = torch.cat([self.k_rec, k], 1), torch.cat([self.v_rec, v], 1)
        self.rec_score = torch.cat([self.rec_score, torch.zeros(b, k.shape[1])], 1)
        self.rec_seen = torch.cat([self.rec_seen, torch.zeros(k.shape[1])])

    def attend(self, q: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
        """Attention of ``q (B, Nq, Hq, D)`` (the last ``Nq`` tokens, causal) over the cache, block by block from
        the codes; returns ``(B, Nq, Hq, Dv)`` and adds the recent tokens' attention to their saliency."""
        b, h, d, dv = self.shape
        nq, hq = q.shape[1], q.shape[2]
        g = hq // h
        scale = d ** -0.5 if scale is None else scale
        pos = torch.arange(nq) + self.length - nq                               # (Nq,)
        qf = q.float().view(b, nq, h, g, d) * scale                             # (B, Nq, H, G, D)
        outs, lses = [], []
        for pk, pv in zip(self.parts["k"], self.parts["v"]):
            qc = qf * pk.c.view(h, d)[:, None]                                  # q * c, (B, Nq, H, G, D)
            qsum = qc.sum(-1, keepdim=True)
            for r0 in range(0, pk.rows.shape[0], CHUNK):
                r1 = min(pk.rows.shape[0], r0 + CHUNK)
                rows = pk.rows[r0:r1].long()
                codes = unpack(pk.packed[r0:r1], pk.bits).float().view(-1, h, d)        # (m, H, D) one block
                sc = torch.einsum("bnhgd,mhd->bnhgm", qc, codes) * pk.step[r0:r1, 0] + qsum * pk.zero[r0:r1, 0]
                ok = (rows[:, 0] == torch.arange(b)[:, None])[:, None] & (rows[:, 1] <= pos[:, None])  # (B, Nq, m)
                sc = sc.masked_fill(~ok[:, :, None, None], float("-inf"))
                lse = torch.logsumexp(sc, -1)                                   # (B, Nq, H, G)
                p = torch.exp(sc - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
                vcodes = unpack(pv.packed[r0:r1], pv.bits).float().view(-1, h, dv)       # (m, H, Dv)
                o = torch.einsum("bnhgm,mhd->bnhgd", p * pv.step[r0:r1, 0], vcodes) + (p * pv.zero[r0:r1, 0]).sum(
                    -1, keepdim=True)
                outs.append((o * pv.c.view(h, dv)[:, None]).reshape(b, nq, hq, dv))
                lses.append(lse.reshape(b, nq, hq))
        sr = None
        if self.k_rec.shape[1]:
            rpos = torch.arange(self.k_rec.shape[1]) + self.n_quant
            sr = torch.einsum("bnhgd,bmhd->bnhgm", qf, self.k_rec.float())       # (B, Nq, H, G, R)
            sr = sr.masked_fill(~(rpos[None, :] <= pos[:, None])[None, :, None, None], float("-inf"))
            lse = torch.logsumexp(sr, -1)
            p = torch.exp(sr - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
            outs.append(torch.einsum("bnhgm,bmhd->bnhgd", p, self.v_rec.float()).reshape(b, nq, hq, dv))
            lses.append(lse.reshape(b, nq, hq))
        if not outs:
            raise ValueError("ZipCache.attend: the cache is empty")
        out, lse = merge_splits(torch.stack(outs), torch.stack(lses))
        if sr is not None:   # the recent tokens' share of this step's attention, for their saliency
            p = torch.exp(sr - lse.view(b, nq, h, g)[..., None])
            self.rec_score += p.sum(dim=(1, 2, 3))
            self.rec_seen += (torch.arange(self.k_rec.shape[1]) + self.n_quant <= pos[:, None]).sum(0)
        return out.to(q.dtype)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Both tensors as attention sees them, ``(B, N, H, D)`` (for tests and error reports)."""
        b, h, d, dv = self.shape
        out = []
        for name, width, rec in (("k", d, self.k_rec), ("v", dv, self.v_rec)):
            x = torch.zeros(b, self.n_quant, h, width, dtype=self.dtype)
            for part in self.parts[name]:
                rows = part.rows.long()
                vals = (unpack(part.packed, part.bits).float() * part.step + part.zero) * part.c     # (M, C)
                x[rows[:, 0], rows[:, 1]] = vals.view(-1, h, width).to(self.dtype)
            out.append(torch.cat([x, rec], 1))
        return out[0], out[1]

    def memory_bytes(self) -> int:
        """Bytes held: codes, per-token parameters, positions, channel scales, and the full-precision recent tokens."""
        return (sum(p.nbytes() for name in self.parts for p in self.parts[name])
                + sum(t.numel() * t.element_size() for t in (self.k_rec, self.v_rec)))
