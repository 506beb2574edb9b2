"""KVCache: static and dynamic, GQA, beam reorder, errors, and transformers' generate with it."""

from __future__ import annotations

import os

import pytest
import torch

from attnkit.ops.decode import decode_attention
from attnkit.ops.decode.cache import KVCache
from attnkit.reference.naive_decode import naive_decode_attention
from peers import skip_if_no_transformers


def _kv(n, b=2, h=2, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, h, d, generator=g, dtype=dtype), torch.randn(b, n, h, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("max_length", [None, 600], ids=["dynamic", "static"])
def test_append_views_and_decode(max_length):
    cache = KVCache(max_length)
    ks, vs = [], []
    for step, n in enumerate([100, 1, 1, 300, 1]):
        k, v = _kv(n, seed=step)
        ks.append(k), vs.append(v)
        kc, vc = cache.append(1, k, v)
    assert torch.equal(kc, torch.cat(ks, 1)) and torch.equal(vc, torch.cat(vs, 1))
    assert cache.get_seq_length(1) == 403 and cache.get_seq_length(0) == 0
    q = torch.randn(2, 1, 8, 8)
    assert torch.allclose(decode_attention(q, kc, vc), naive_decode_attention(q, torch.cat(ks, 1), torch.cat(vs, 1)),
                          atol=1e-5)
    assert cache.used_bytes() == 403 * 2 * 2 * 16 * 4 and cache.memory_bytes() >= cache.used_bytes()
    cache.crop(400)
    assert cache.keys(1).shape == (2, 400, 2, 8)
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(cache.keys(1)[0], torch.cat(ks, 1)[1, :400])


def test_errors():
    cache = KVCache(max_length=10)
    k, v = _kv(8)
    cache.append(0, k, v)
    with pytest.raises(ValueError, match="max_length=10"):
        cache.append(0, *_kv(3))
    with pytest.raises(ValueError, match="length=9 queried past"):
        cache.keys(0, length=9)
    with pytest.raises(ValueError, match="layer_idx 3 was never written"):
        cache.values(3)
    with pytest.raises(ValueError, match="head count"):
        cache.append(0, *_kv(1, h=4))
    with pytest.raises(TypeError, match="float64"):
        cache.append(0, *_kv(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        KVCache(0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_matches_dynamic_cache(attn):
    skip_if_no_transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, attn_implementation=attn)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 97, (2, 7))
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        want = model.generate(ids, past_key_values=DynamicCache(), **kw)
        dyn = KVCache()
        got = model.generate(ids, past_key_values=dyn, **kw)
        static = model.generate(ids, past_key_values=KVCache(max_length=32), **kw)
        beams_want = model.generate(ids, past_key_values=DynamicCache(), num_beams=2, **kw)
        beams_got = model.generate(ids, past_key_values=KVCache(), num_beams=2, **kw)
    assert torch.equal(got, want) and torch.equal(static, want) and torch.equal(beams_got, beams_want)
    assert dyn.get_seq_length() == 7 + 11   # the cache was used: prompt + all but the last new token
