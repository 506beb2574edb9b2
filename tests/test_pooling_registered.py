"""The registered pooling specs (``output_shape`` given): spp, slot_attention, filip, greenplm_pool.

The generic tests cover reference, gradients and plumbing; here: each spec's registered output shape for other
sizes, the papers' identities through the registered modules, and the bf16 output of slot attention (its bf16
gradients are a listed SKIP of the generic tests).
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from tolerances import assert_close

POOLING = ("spp", "slot_attention", "filip", "greenplm_pool")
F64 = torch.float64


def test_the_four_are_registered_as_pooling_specs():
    for name in POOLING:
        spec = ak.info(name)
        assert spec.pooling and spec.patterns and all(p.startswith("noncausal") for p in spec.patterns)
    assert {ak.info(n).family.value for n in POOLING} == {"channel", "vision", "cross"}
    from attnkit.mechanisms.cross_unregistered import NOT_REGISTERED
    assert not set(POOLING) & set(NOT_REGISTERED)


@pytest.mark.parametrize(("name", "over"), [
    ("spp", {"input_size": (9, 7), "levels": (3, 1), "batch": 3}),
    ("slot_attention", {"seq_len": 11, "num_slots": 5, "batch": 1}),
    ("greenplm_pool", {"seq_len": 9, "queries": ("mean",), "cls": False}),
    ("filip", {"batch": 4, "seq_len": 3}),
])
def test_output_shape_follows_the_config(name, over):
    spec = ak.info(name)
    torch.manual_seed(0)
    cfg = spec.config(over, tiny=True)
    m, inputs = spec.example(cfg)
    with torch.no_grad():
        assert m(*inputs).shape == spec.out_shape(cfg)


def test_spp_length_is_fixed_for_any_map_and_level_one_is_global_max():
    m = ak.get("spp", channels=3, levels=(2, 1))
    for size in [(4, 4), (5, 9), (2, 2)]:
        x = torch.randn(2, 3, *size)
        y = m(x)
        assert y.shape == (2, 15)
        torch.testing.assert_close(y[:, -3:], x.amax((2, 3)))


def test_slot_attention_learned_init_is_deterministic_and_slots_differ():
    torch.manual_seed(0)
    m = ak.get("slot_attention", dim=6, num_slots=3, iterations=2, init="learned").train()
    x = torch.randn(2, 7, 6)
    y = m(x)
    assert torch.equal(y, m(x))  # no noise in training either
    assert (y[:, 0] - y[:, 1]).abs().max() > 1e-4  # distinct learned starts: the slots do not collapse
    g = ak.get("slot_attention", dim=6, num_slots=3, iterations=2, init="gaussian").train()
    assert not torch.equal(g(x), g(x))  # the 2020 paper's sampled start, random in training
    g.eval()
    assert torch.equal(g(x), g(x))


def test_slot_attention_one_slot_one_round_reads_the_mean():
    torch.manual_seed(0)
    m = ak.get("slot_attention", dim=6, num_slots=1, iterations=1, init="learned").double()
    x = torch.randn(2, 5, 6, dtype=F64)
    s0 = m.slots_mu.expand(2, 1, 6)
    s = m.gru(m.to_v(m.norm_input(x)).mean(1), s0[:, 0])  # softmax over one slot is 1: the plain mean
    assert_close(m(x)[:, 0], s + m.mlp(m.norm_mlp(s)), F64, "one slot, one round")


def test_slot_attention_bf16_output_matches_the_reference():
    spec = ak.info("slot_attention")
    torch.manual_seed(0)
    m, (x,) = spec.example(tiny=True, generator=torch.Generator().manual_seed(1))
    ref = spec.reference(m.to(torch.bfloat16).float(), x.to(torch.bfloat16).float())
    with torch.no_grad():
        assert_close(m.to(torch.bfloat16)(x.to(torch.bfloat16)), ref, torch.bfloat16, "out")


def test_filip_one_token_per_side_is_cosine_similarity_and_unpacks():
    torch.manual_seed(0)
    m = ak.get("filip", image_dim=6, text_dim=4, proj_dim=5).double()
    img, txt = torch.randn(3, 1, 6, dtype=F64), torch.randn(2, 1, 4, dtype=F64)
    s_i2t, s_t2i = m(img, txt)
    cos = torch.nn.functional.cosine_similarity(m.image_proj(img)[:, None, 0], m.text_proj(txt)[None, :, 0], dim=-1)
    assert_close(s_i2t, cos, F64, "s_i2t")
    assert_close(s_t2i, cos, F64, "s_t2i")
    assert torch.isfinite(m.loss(*m(img[:2], txt)))
    with pytest.raises(ValueError, match=r"FILIPLateInteraction: context must be \(B, M, C=4\)"):
        m(img)  # x against itself needs image_dim == text_dim


def test_greenplm_identical_tokens_give_that_token_and_order_does_not_matter():
    m = ak.get("greenplm_pool", dim=4)
    t = torch.randn(2, 1, 4)
    y = m(t.expand(2, 6, 4))
    torch.testing.assert_close(y, t.expand(2, 3, 4))
    x = torch.randn(2, 7, 4)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(6)])  # class token stays first
    torch.testing.assert_close(m(x[:, perm]), m(x))
    assert not list(m.parameters())
    with pytest.raises(ValueError, match=r"ZeroParamPooling: x must be \(B, N, C=4\)"):
        m(torch.randn(1, 3, 5))
