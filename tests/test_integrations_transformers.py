"""attn_implementation="attnkit" in Hugging Face transformers: masks, models, variants, errors, real weights.

The masks transformers would build are compared with the ``ak.masks`` patterns read back from its
mask compositions (none of them dense); tiny random-weight Llama, Mistral (sliding window) and
Qwen2 models compare logits, every parameter gradient and greedy ``generate`` with ``sdpa``; the
real all-MiniLM-L6-v2 weights compare sentence embeddings.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from peers import skip_if_no_minilm, skip_if_no_transformers
from tolerances import assert_close

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = skip_if_no_transformers()

from transformers import (  # noqa: E402
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers import masking_utils as mu  # noqa: E402

from attnkit.integrations import transformers as akt  # noqa: E402
from attnkit.integrations._hf_masks import HFMask  # noqa: E402

akt.register()
V = 97  # vocabulary of the tiny models


def _tiny(kind: str, **extra):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, **extra)).eval()
    if kind == "mistral":
        window = extra.pop("sliding_window", 8)
        return MistralForCausalLM(MistralConfig(**common, sliding_window=window, **extra)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                        **extra)).eval()


def _pair(model, impl="attnkit", **options):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("sdpa")
    return ref, akt.use(copy.deepcopy(model), impl, **options)


# ---- masks: what transformers builds == the patterns read back (never dense) ------------------------
def _expected(builder, cfg, **kw):
    cfg._attn_implementation = "eager"   # eager always materialises: 0 = attend, finfo.min = masked
    m = builder(cfg, **kw)
    return None if m is None else (m == 0)


def _got(builder, cfg, **kw) -> HFMask:
    cfg._attn_implementation = "attnkit"
    m = builder(cfg, **kw)
    assert isinstance(m, HFMask) and m.patterns is not None, f"dense fallback: {getattr(m, 'reason', m)}"
    return m


def _cache(cfg, past: int):
    cache = DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        kv = torch.randn(2, cfg.num_key_value_heads, past, 16)
        cache.update(kv, kv, layer)
    return cache


def _padding(b, n, kind):
    am = torch.ones(b, n, dtype=torch.long)
    if kind == "left":
        am[1, :5] = 0
    elif kind == "right":
        am[0, -3:] = 0
    elif kind == "holes":
        am[1, 2:4] = 0
        am[1, 7] = 0
    return am


@pytest.mark.parametrize("padding", ["none", "left", "right", "holes"])
@pytest.mark.parametrize("builder", ["causal", "sliding", "bidirectional", "bidirectional_sliding"])
def test_masks_match_transformers(builder, padding):
    cfg = MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                        sliding_window=4)
    fn = {"causal": mu.create_causal_mask, "sliding": mu.create_sliding_window_causal_mask,
          "bidirectional": mu.create_bidirectional_mask,
          "bidirectional_sliding": mu.create_bidirectional_sliding_window_mask}[builder]
    n = 12
    am = None if padding == "none" else _padding(2, n, padding)
    kw = dict(inputs_embeds=torch.zeros(2, n, 64), attention_mask=am)
    if builder in ("causal", "sliding"):
        kw["cache"] = None
    want = _expected(fn, cfg, **kw)
    got = _got(fn, cfg, **kw)
    want = torch.ones(2, 1, n, n, dtype=torch.bool) if want is None else want.expand(2, 1, n, n)
    assert torch.equal(got.to_dense(), want), got.describe()


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("builder", ["causal", "sliding"])
def test_masks_with_cache_offsets(builder, q_len):
    cfg = MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                        sliding_window=4)
    fn = mu.create_causal_mask if builder == "causal" else mu.create_sliding_window_causal_mask
    past = 10
    am = _padding(2, past + q_len, "left")
    kw = dict(inputs_embeds=torch.zeros(2, q_len, 64), attention_mask=am)
    want = _expected(fn, cfg, cache=_cache(cfg, past), **kw)
    got = _got(fn, cfg, cache=_cache(cfg, past), **kw)
    assert torch.equal(got.to_dense(), want.expand(got.shape)), got.describe()


@pytest.mark.parametrize("builder", ["causal", "sliding"])
def test_packed_sequences_become_documents(builder):
    cfg = MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                        sliding_window=4)
    fn = mu.create_causal_mask if builder == "causal" else mu.create_sliding_window_causal_mask
    pos = torch.cat([torch.arange(5), torch.arange(2), torch.arange(7)])[None].expand(2, -1)
    kw = dict(inputs_embeds=torch.zeros(2, 14, 64), attention_mask=None, cache=None, position_ids=pos)
    want = _expected(fn, cfg, **kw)
    got = _got(fn, cfg, **kw)
    assert "document([5, 2, 7])" in got.describe()
    assert torch.equal(got.to_dense(), want.expand(got.shape))


def test_unknown_composition_is_built_densely_and_reported():
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)

    def first_token_everywhere(b, h, q, kv):  # a model's own or_mask_function
        return kv == 0

    kw = dict(inputs_embeds=torch.zeros(1, 6, 64), attention_mask=None, cache=None,
              or_mask_function=first_token_everywhere)
    want = _expected(mu.create_causal_mask, cfg, **kw)
    cfg._attn_implementation = "attnkit"
    got = mu.create_causal_mask(cfg, **kw)
    assert got.patterns is None and "not translated" in got.describe()
    assert torch.equal(got.to_dense(), want)


# ---- models: logits, gradients, generate == sdpa ------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_logits_and_gradients_match_sdpa(kind):
    ref, ak_model = _pair(_tiny(kind))
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    am = _padding(2, 24, "left")
    valid = am.bool()
    outs = []
    for m in (ref, ak_model):
        logits = m(ids, attention_mask=am).logits                       # (B, N, V)
        logits[valid].square().mean().backward()
        outs.append(logits[valid].detach())
    assert_close(outs[1], outs[0], torch.float32, "logits")
    for (name, p), (_, q) in zip(ref.named_parameters(), ak_model.named_parameters(), strict=True):
        assert_close(q.grad, p.grad, torch.float32, f"d{name}", grad=True)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_greedy_generate_matches_sdpa(kind):
    ref, ak_model = _pair(_tiny(kind))
    ids = torch.randint(1, V, (2, 14), generator=torch.Generator().manual_seed(2))
    am = _padding(2, 14, "left")
    kw = dict(attention_mask=am, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ak_model.generate(ids, **kw), ref.generate(ids, **kw))


def test_sliding_window_runs_blocked_and_matches_sdpa():
    """At N=256 with a window of 16 the blocked backend skips the tiles outside the band (forced here: at
    this size ak.attention's automatic choice is one dense-mask SDPA call)."""
    ref, ak_model = _pair(_tiny("mistral", sliding_window=16), backend="blocked")
    ids = torch.randint(0, V, (1, 256), generator=torch.Generator().manual_seed(3))
    text = akt.explain(ak_model, input_ids=ids, use_cache=False)
    assert "sliding_window(15, 0) -> blocked" in text, text
    want, got = ref(ids).logits, ak_model(ids).logits
    assert_close(got, want, torch.float32, "logits")
    got.square().mean().backward()
    want.square().mean().backward()
    for (name, p), (_, q) in zip(ref.named_parameters(), ak_model.named_parameters(), strict=True):
        assert_close(q.grad, p.grad, torch.float32, f"d{name}", grad=True)


def test_packed_position_ids_match_sdpa():
    ref, ak_model = _pair(_tiny("llama"))
    ids = torch.randint(0, V, (1, 30), generator=torch.Generator().manual_seed(4))
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    assert "document([12, 18])" in akt.explain(ak_model, input_ids=ids, position_ids=pos, use_cache=False)
    want = ref(ids, position_ids=pos, use_cache=False).logits
    assert_close(ak_model(ids, position_ids=pos, use_cache=False).logits, want, torch.float32, "logits")


# ---- variants -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl, options", [
    ("attnkit:moba", dict(block_size=8, topk=8)),                 # every block selected: exact attention
    ("attnkit:neighborhood_1d", dict(kernel_size=64)),           # causal window covering the prompt
    ("attnkit:hyper_attention", dict(min_seq_len=4096)),         # below min_seq_len: exact attention
    ("attnkit:s2_attention", dict(block_size=4, local_blocks=8, vert_stride=1)),   # all blocks local
])
def test_variants_reduce_to_exact_attention(impl, options):
    ref, ak_model = _pair(_tiny("llama"), impl, **options)
    ids = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(5))
    assert_close(ak_model(ids, use_cache=False).logits, ref(ids, use_cache=False).logits, torch.float32, impl)


def test_variant_changes_the_model_and_refuses_padding():
    ref, ak_model = _pair(_tiny("llama"), "attnkit:moba", block_size=4, topk=1)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(6))
    got = ak_model(ids, use_cache=False).logits
    assert (got - ref(ids, use_cache=False).logits).abs().max() > 1e-3      # MoBA really ran
    assert "attnkit:moba: ak.moba_attention" in akt.explain(ak_model, input_ids=ids, use_cache=False)
    with pytest.raises(ValueError, match="takes causal or full attention only"):
        ak_model(ids, attention_mask=_padding(2, 24, "left"), use_cache=False)


def test_names_and_options_fail_clearly():
    with pytest.raises(KeyError, match="attnkit:moba"):
        akt.check("attnkit:mobaa")                                          # lists the valid names
    with pytest.raises(ValueError, match="takes image inputs"):
        akt.check("attnkit:neighborhood_2d")
    with pytest.raises(ValueError, match="unknown option"):
        akt.use(_tiny("llama"), "attnkit:moba", block=8)
    model = _tiny("llama")
    model.set_attn_implementation("attnkit:agent_attention")                # registered, refuses at forward
    with pytest.raises(ValueError, match="cannot run: it takes image inputs"):
        model(torch.zeros(1, 4, dtype=torch.long))


# ---- float bias: error by default, documented SDPA fallback reported by explain ------------------------
def test_float_bias_errors_or_falls_back_to_sdpa():
    import attnkit as ak

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 10, 4, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 4, 10, 10, generator=g)
    with pytest.raises(ValueError, match="arbitrary float bias"):
        akt.hf_attention(q, k, v, bias)
    out = akt.hf_attention(q, k, v, bias, options={"fallback": "sdpa"})
    want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=bias)
    assert_close(out, want.transpose(1, 2), torch.float32, "out")
    text = ak.explain("hf_attention", q, k, v, mask=bias, options={"fallback": "sdpa"})
    assert "-> sdpa" in text and "arbitrary float bias" in text
    # a float mask holding only 0 / finfo.min is a boolean mask in disguise: no fallback needed
    allowed = torch.rand(1, 1, 10, 10, generator=g) > 0.3
    additive = torch.zeros(1, 1, 10, 10).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert_close(akt.hf_attention(q, k, v, additive), akt.hf_attention(q, k, v, allowed), torch.float32, "out")


# ---- real weights ----------------------------------------------------------------------------------------
SENTENCES = ["A man is eating food.", "A man is riding a white horse on an enclosed ground.",
             "The new movie is awesome, I would watch it again and again with friends.", "Paris",
             "Attention is all you need, and sparse attention is what you can afford."]


def minilm_embeddings(impl: str, **options) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised), as sentence-transformers computes them."""
    from transformers import AutoModel, AutoTokenizer

    path = skip_if_no_minilm().get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation=impl).eval()
    model.config.attnkit_options = options
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state                                    # (B, N, C)
    w = enc["attention_mask"][..., None].to(h.dtype)
    return torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)  # (B, C)


@pytest.mark.parametrize("backend", [None, "blocked"])   # auto (SDPA inside ak.attention at N~20), the tile walk
def test_minilm_embeddings_equal_sdpa(backend):
    options = {} if backend is None else {"backend": backend}
    cos = (minilm_embeddings("attnkit", **options) * minilm_embeddings("sdpa")).sum(-1)
    assert cos.min().item() >= 0.99999, cos
