"""Quantized caches: KIVI (arXiv 2402.02750) and ZipCache (arXiv 2405.14256) against their naive definitions."""

from __future__ import annotations

import pytest
import torch

from attnkit.ops.decode.quant import KIVICache, ZipCache, normalized_saliency, pack, quantize, unpack
from attnkit.reference.naive_decode import (
    naive_decode_attention,
    naive_fake_quant,
    naive_kivi_dequant,
    naive_normalized_saliency,
    naive_zipcache_fake_quant,
)

# relative RMSE of the attention output on Gaussian data (B=1, H=2, N=1000, D=32): the stated figure per width
REL_ERR = {8: 0.02, 4: 0.2, 2: 1.0}


def _kv(n=1000, h=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, h, d, generator=g), torch.randn(1, n, h, d, generator=g), torch.randn(1, 1, 8, d,
                                                                                                    generator=g)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip_and_element_bound(bits):
    x = torch.randn(3, 64)
    codes, step, zero = quantize(x, bits, -1, torch.float16)
    assert torch.equal(unpack(pack(codes, bits), bits), codes)
    err = (codes.float() * step.float() + zero.float() - x).abs()
    assert (err <= step.float() / 2 * (1 + 1e-3) + 1e-6).all()
    ref = naive_fake_quant(x, bits, -1)   # each within half a step of x, so within one step of each other
    assert (codes.float() * step.float() + zero.float() - ref).abs().max() <= step.float().max() * 1.01 + 1e-3


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kivi_attention_within_bounds(bits):
    k, v, q = _kv()
    cache = KIVICache(bits=bits, group=32, residual=128)
    cache.append(k[:, :600], v[:, :600])
    for t in range(600, 1000, 100):   # decoding appends in pieces; whole residual blocks get quantized
        cache.append(k[:, t:t + 100], v[:, t:t + 100])
    assert cache.length == 1000 and cache.n_quant == 896
    kd, vd = cache.dequantize()
    kn, _vn = naive_kivi_dequant(k, v, bits, 32, 128)
    kstep = (kn - k).abs().max()
    assert (kd - kn).abs().max() <= max(2 * kstep.item(), 1e-2)
    assert torch.equal(kd[:, 896:], k[:, 896:])                   # the residual window is exact
    out = cache.attend(q)
    # attention on the packed cache == attention on its dequantized form (block by block, merged by LSE)
    assert torch.allclose(out, naive_decode_attention(q, kd, vd), atol=1e-5)
    full = naive_decode_attention(q, k, v)
    err = (out - full).abs().max().item()
    assert err <= cache.output_error_bound(q)
    rel = ((out - full).pow(2).mean().sqrt() / full.pow(2).mean().sqrt()).item()
    assert rel <= REL_ERR[bits], rel


def test_kivi_memory_ratio_and_errors():
    k, v, _ = _kv(n=4096, h=2, d=128)
    cache = KIVICache(bits=4, group=128, residual=128)
    cache.append(k.half(), v.half())
    ratio = (k.numel() + v.numel()) * 2 / cache.memory_bytes()
    assert ratio >= 3.5, ratio
    with pytest.raises(ValueError, match="bits must be one of"):
        KIVICache(bits=3)
    with pytest.raises(ValueError, match="head count"):
        cache.append(torch.randn(1, 1, 4, 128).half(), torch.randn(1, 1, 4, 128).half())
    with pytest.raises(ValueError, match="dtype"):
        cache.append(torch.randn(1, 1, 2, 128), torch.randn(1, 1, 2, 128))


def test_zipcache_quantizer_saliency_and_mixed_precision():
    k, v, _q = _kv(n=200)
    for bits in (2, 4, 8):
        from attnkit.ops.decode.quant import zipcache_quantize
        codes, step, zero, c = zipcache_quantize(k, bits)
        got = ((codes.float() * step + zero) * c).view_as(k)
        assert (got - naive_zipcache_fake_quant(k, bits)).abs().max() <= 1e-5 + (step * c.max()).max()
    probs = torch.softmax(torch.randn(1, 8, 200, 200).masked_fill(~torch.ones(200, 200).tril().bool(), -1e9), -1)
    assert torch.allclose(normalized_saliency(probs), naive_normalized_saliency(probs), atol=1e-5)
    # identity attention: p_j = 1 / (N - j), late tokens win (the normalisation removes the early-token bias)
    eye = torch.eye(10)[None, None]
    assert torch.allclose(normalized_saliency(eye)[0], 1.0 / torch.arange(10, 0, -1).float())
    zc = ZipCache(k, v, probs, high_bits=8, low_bits=2, low_fraction=0.4)
    assert zc.salient.sum() == 120
    kd, _vd = zc.dequantize()
    hi, lo = zc.salient[0], ~zc.salient[0]
    assert (kd[0, hi] - k[0, hi]).abs().mean() < (kd[0, lo] - k[0, lo]).abs().mean() / 10
    with pytest.raises(ValueError, match="low_bits must be one of"):
        ZipCache(k, v, probs, low_bits=1)


def test_kivi_packed_kernel_equals_torch_path_and_grows():
    """The compiled kernel on the packed codes == the torch-ops chunk loop; decoding one token at a time grows
    the buffers without changing what was stored."""
    from attnkit.kernels import native

    k, v, q = _kv(n=700, h=2, d=32)
    cache = KIVICache(bits=4, group=32, residual=64)
    cache.append(k[:, :300], v[:, :300])
    kd0, _ = cache.dequantize()
    for t in range(300, 700):
        cache.append(k[:, t:t + 1], v[:, t:t + 1])
    assert cache.n_quant == 640 and cache.capacity >= 640
    kd, vd = cache.dequantize()
    assert torch.equal(kd[:, :256], kd0[:, :256])                   # blocks quantized earlier are kept as they were
    torch_path = cache.attend(q, native_ok=False)
    assert torch.allclose(torch_path, naive_decode_attention(q, kd, vd), atol=1e-5)
    if native.decode_available():
        assert torch.allclose(cache.attend(q), torch_path, atol=1e-5)
        q4 = torch.randn(1, 4, 8, 32)                                # 4 queries, some keys in the residual
        assert torch.allclose(cache.attend(q4), naive_decode_attention(q4, kd, vd), atol=1e-5)


def test_zipcache_attends_block_by_block_and_quantizes_while_decoding(monkeypatch):
    from attnkit.ops.decode import quant

    monkeypatch.setattr(quant, "CHUNK", 37)                          # many blocks, ragged last one
    g = torch.Generator().manual_seed(3)
    b, n, h, d = 2, 120, 2, 16
    k, v = torch.randn(b, n, h, d, generator=g), torch.randn(b, n, h, d, generator=g)
    probs = torch.softmax(torch.randn(b, 4, n, n, generator=g).masked_fill(~torch.ones(n, n).tril().bool(), -1e9), -1)
    zc = ZipCache(k, v, probs, high_bits=4, low_bits=2, low_fraction=0.4, gap=10)
    kd, vd = zc.dequantize()
    q = torch.randn(b, 1, 4, d, generator=g)
    # straight from the codes, block by block == attention over the dequantized cache
    assert torch.allclose(zc.attend(q), naive_decode_attention(q, kd, vd), atol=1e-5)
    big = 30.0 * q[:, 0, :2].mean(1)                                 # a key every later query attends to
    for t in range(25):                                             # decoding: one token per step
        kn = torch.randn(b, 1, h, d, generator=g)
        if t == 3:
            kn[:, 0] = big
        zc.append(kn, torch.randn(b, 1, h, d, generator=g))
        qt = q + 0.01 * torch.randn(b, 1, 4, d, generator=g)
        kd, vd = zc.dequantize()
        assert torch.allclose(zc.attend(qt), naive_decode_attention(qt, kd, vd), atol=1e-5)
    assert zc.n_quant == n + 20 and zc.length == n + 25              # two gaps quantized, 5 still exact
    assert zc.salient.shape == (b, n + 20) and (zc.salient[:, n:n + 10].sum(1) == 6).all()
    assert zc.salient[:, n + 3].all()                                # the attended token kept at high precision
    full = zc.k_rec.numel() * 4 * 2
    assert zc.memory_bytes() < (n + 25) * b * h * d * 4 * 2 / 4 + full
    with pytest.raises(ValueError, match=r"ZipCache\.append"):
        zc.append(torch.randn(b, 1, 3, d), torch.randn(b, 1, 3, d))
