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
    """uint8 codes ``(..., C)`` (values < 2**bits) -> packed uint8 ``(..., C * bits / 8)``, low bits first."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per)                                # (..., C/per, per)
    out = c[..., 0].clone()
    for i in range(1, per):
        out |= c[..., i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(..., C * bits / 8)`` -> uint8 ``(..., C)``."""
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per)]
    return torch.stack(parts, -1).flatten(-2)                                    # (..., C)


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
    """

    def __init__(self, bits: int = 4, group: int = 32, residual: int = 128, param_dtype=torch.float16):
        self.bits = _check_bits("bits", bits)
        self.group = int_arg("group", group, 1)
        self.residual = int_arg("residual", residual, 1)
        if self.residual % self.group:
            raise ValueError(f"KIVICache: residual={residual} must be a multiple of group={group}")
        self.param_dtype = param_dtype
        self.kq: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []   # per block: packed, step, zero
        self.vq: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.k_res = self.v_res = None                                         # (B, H, n, D) full precision
        self.n_quant = 0

    @property
    def length(self) -> int:
        return self.n_quant + (0 if self.k_res is None else self.k_res.shape[2])

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
        d, dv = kh.shape[-1], vh.shape[-1]
        cg = min(self.group, dv)
        if dv % cg or d % (8 // self.bits) or dv % (8 // self.bits):
            raise ValueError(f"KIVICache.append: head dims D={d}, Dv={dv} must be divisible by the value group "
                             f"{cg} and by {8 // self.bits} codes per byte")
        full = (kh.shape[2] // self.residual) * self.residual
        for t0 in range(0, full, self.residual):
            kb, vb = kh[:, :, t0:t0 + self.residual], vh[:, :, t0:t0 + self.residual]
            b, h, n, _ = kb.shape
            kc, ks, kz = quantize(kb.reshape(b, h, n // self.group, self.group, d), self.bits, 3, self.param_dtype)
            self.kq.append((pack(kc.reshape(b, h, n, d), self.bits), ks, kz))   # ks: (B, H, n/g, 1, D)
            vc, vs, vz = quantize(vb.reshape(b, h, n, dv // cg, cg), self.bits, 4, self.param_dtype)
            self.vq.append((pack(vc.reshape(b, h, n, dv), self.bits), vs, vz))   # vs: (B, H, n, Dv/cg, 1)
        self.n_quant += full
        self.k_res, self.v_res = kh[:, :, full:].contiguous(), vh[:, :, full:].contiguous()

    def _block(self, i: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i`` dequantized into a block-sized buffer: heads-first ``(B, H, residual, D|Dv)``."""
        (kp, ks, kz), (vp, vs, vz) = self.kq[i], self.vq[i]
        b, h, n, _ = kp.shape
        d = ks.shape[-1]
        k = unpack(kp, self.bits).to(dtype).view(b, h, n // self.group, self.group, d)
        k = (k * ks.to(dtype) + kz.to(dtype)).view(b, h, n, d)
        dv = vp.shape[-1] * 8 // self.bits
        v = unpack(vp, self.bits).to(dtype).view(b, h, n, vs.shape[3], -1)
        v = (v * vs.to(dtype) + vz.to(dtype)).view(b, h, n, dv)
        return k, v

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache as attention sees it, heads-last ``(B, N, H, D)`` (for tests and error reports)."""
        dt = self.k_res.dtype
        blocks = [self._block(i, dt) for i in range(len(self.kq))]
        k = torch.cat([b[0] for b in blocks] + [self.k_res], 2)
        v = torch.cat([b[1] for b in blocks] + [self.v_res], 2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
        """Attention of ``q (B, Nq, Hq, D)`` (the last ``Nq`` cached tokens, causal) over the cache,
        block by block; returns ``(B, Nq, Hq, Dv)``."""
        if self.k_res is None:
            raise ValueError("KIVICache.attend: the cache is empty; append keys and values first")
        n, nq = self.length, q.shape[1]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        outs, lses = [], []
        per = max(1, CHUNK // self.residual)
        for i0 in range(0, len(self.kq), per):
            blocks = [self._block(i, work) for i in range(i0, min(len(self.kq), i0 + per))]
            k = torch.cat([b[0] for b in blocks], 2) if len(blocks) > 1 else blocks[0][0]
            v = torch.cat([b[1] for b in blocks], 2) if len(blocks) > 1 else blocks[0][1]
            a = i0 * self.residual
            o, lse = split_kv_attention(q, k.transpose(1, 2), v.transpose(1, 2), causal(n - nq - a), scale=scale,
                                        split=k.shape[2])
            outs.append(o.to(work)), lses.append(lse)
        if self.k_res.shape[2]:
            o, lse = split_kv_attention(q, self.k_res.transpose(1, 2), self.v_res.transpose(1, 2),
                                        causal(n - nq - self.n_quant), scale=scale)
            outs.append(o.to(work)), lses.append(lse)
        return merge_splits(torch.stack(outs), torch.stack(lses))[0].to(q.dtype)

    def memory_bytes(self) -> int:
        """Bytes held: packed codes, parameters and the full-precision residual."""
        parts = [t for blk in self.kq + self.vq for t in blk]
        parts += [t for t in (self.k_res, self.v_res) if t is not None]
        return sum(t.numel() * t.element_size() for t in parts)

    def output_error_bound(self, q: torch.Tensor, *, scale: float | None = None) -> float:
        """A guaranteed bound on ``max |attend(q) - full-precision attention|`` (module docstring)."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if not self.kq:
            return 0.0
        b, hq = q.shape[0], q.shape[2]
        h = self.k_res.shape[1]
        ks = torch.cat([blk[1].float().flatten(2, 3) for blk in self.kq], 2)   # (B, H, blocks*n/g, D)
        qa = q.abs().float().view(b, q.shape[1], h, hq // h, -1)               # (B, Nq, H, G, D)
        rounding = 2.0 ** -10                                                  # one float16 parameter rounding
        eps = scale * torch.einsum("bnhgd,bhtd->bnhgt", qa, ks / 2).amax().item() * (1 + rounding)
        vstep = max(blk[1].float().amax().item() for blk in self.vq)
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


class ZipCache:
    """A ZipCache-quantized cache of one layer, built at prefill from ``k, v (B, N, H, D)`` and the probe
    attention probabilities that rank the tokens.

    Args:
        high_bits / low_bits: bit widths of salient / other tokens (paper: 4 / 2).
        low_fraction: fraction of tokens stored at ``low_bits`` (paper: 0.4 for its reported setting).
    """

    def __init__(self, k, v, probs, *, high_bits: int = 4, low_bits: int = 2, low_fraction: float = 0.4):
        self.high_bits, self.low_bits = _check_bits("high_bits", high_bits), _check_bits("low_bits", low_bits)
        if not 0.0 <= low_fraction <= 1.0:
            raise ValueError(f"ZipCache: low_fraction must be in [0, 1], got {low_fraction}")
        b, n, h, d = k.shape
        sal = normalized_saliency(probs)                                        # (B, N)
        n_high = n - math.floor(low_fraction * n)
        order = torch.sort(sal, dim=-1, descending=True, stable=True).indices
        self.salient = torch.zeros(b, n, dtype=torch.bool)
        self.salient.scatter_(1, order[:, :n_high], True)
        self.shape, self.dtype = (b, n, h, d, v.shape[-1]), k.dtype
        self.parts = {}
        for name, x in (("k", k), ("v", v)):
            self.parts[name] = [self._quant(x, self.salient, self.high_bits), self._quant(x, ~self.salient,
                                                                                          self.low_bits)]

    @staticmethod
    def _quant(x, sel, bits):
        _b, _n, _h, _d = x.shape
        rows = sel.nonzero()                                                    # (M, 2) (batch, token)
        xs = x[rows[:, 0], rows[:, 1]].unsqueeze(0)                             # (1, M, H, D)
        if xs.shape[1] == 0:
            return rows, None, bits
        codes, step, zero, c = zipcache_quantize(xs, bits)
        return rows, (pack(codes, bits), step, zero, c), bits

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Both tensors as attention sees them, ``(B, N, H, D)``."""
        b, n, h, d, dv = self.shape
        out = []
        for name, width in (("k", d), ("v", dv)):
            x = torch.zeros(b, n, h, width, dtype=self.dtype)
            for rows, q, bits in self.parts[name]:
                if q is None:
                    continue
                packed, step, zero, c = q
                vals = (unpack(packed, bits).float() * step + zero) * c           # (1, M, C)
                x[rows[:, 0], rows[:, 1]] = vals[0].view(-1, h, width).to(self.dtype)
            out.append(x)
        return out[0], out[1]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for name in self.parts for _, q, _ in self.parts[name]
                   if q is not None for t in q)
