"""Graph-of-tokens routing (arXiv 2505.00792), BAM's mixture of attention experts (arXiv 2408.08274) and the
deconstructed-attention variants (arXiv 2510.11602): ops against their naive twins and the papers' identities."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.mechanisms.seq_got import GoTMoE
from attnkit.ops.sequence.got import got_route, moe_experts
from attnkit.reference.naive_sequence4 import naive_experts, naive_got_route, naive_token_graph
from tolerances import assert_close, compare_fn

B, N, C, E = 2, 7, 8, 5


def _r(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ------------------------------------------------------------------------------------------ GoT routing


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["attention", "reference"])
def test_got_route_matches_naive(causal, backend):
    inputs = {"logits": _r((B, N, E), 0), "q": _r((B, N, 2, 4), 1), "k": _r((B, N, 2, 4), 2)}

    def fast(logits, q, k):
        r = got_route(logits, q, k, topk=2, causal=causal, backend=backend)
        return r.probs, r.weights

    def ref(logits, q, k):
        p, w, _ = naive_got_route(logits, naive_token_graph(q, k, causal=causal), topk=2)
        return p, w

    compare_fn(fast, ref, inputs, torch.float32)


def test_identity_graph_is_plain_top_k_softmax_routing():
    logits = _r((B, N, E), 0)
    p = torch.softmax(logits, -1)
    w, idx = p.topk(3, -1)
    for r in (got_route(logits, topk=3), got_route(logits, graph=torch.eye(N, dtype=torch.float64).expand(B, N, N),
                                                   topk=3)):
        assert torch.equal(r.indices, idx)
        assert_close(r.probs, p, torch.float64, "probs")
        assert_close(r.weights, w / w.sum(-1, keepdim=True), torch.float64, "weights")
    # the identity graph as attention: every token attends only itself (one-hot keys, huge scale)
    eye = torch.eye(N, dtype=torch.float64).view(1, N, 1, N).expand(B, N, 1, N)
    r = got_route(logits, eye, eye, topk=3, scale=1e4)
    assert torch.equal(r.indices, idx)


@pytest.mark.parametrize("causal", [False, True])
def test_routing_probabilities_sum_to_one_per_token(causal):
    r = got_route(_r((B, N, E), 0), _r((B, N, 2, 4), 1), _r((B, N, 2, 4), 2), topk=2, causal=causal)
    assert_close(r.probs.sum(-1), torch.ones(B, N, dtype=torch.float64), torch.float64, "sum_E P'")
    assert_close(r.weights.sum(-1), torch.ones(B, N, dtype=torch.float64), torch.float64, "sum_k w")
    assert (r.probs >= 0).all()


def test_graph_smoothing_averages_the_neighbours_distributions():
    # hand-computed: a two-token graph that averages both tokens gives both the mean distribution
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0]]], dtype=torch.float64)  # P = [.25 .75; .75 .25]
    r = got_route(logits, graph=torch.full((1, 2, 2), 0.5, dtype=torch.float64), topk=1)
    assert_close(r.probs, torch.full((1, 2, 2), 0.5, dtype=torch.float64), torch.float64, "P'")
    assert torch.equal(r.weights, torch.ones(1, 2, 1, dtype=torch.float64))


def test_causal_routing_never_reads_later_tokens():
    q, k = _r((1, N, 2, 4), 1).requires_grad_(), _r((1, N, 2, 4), 2).requires_grad_()
    logits = _r((1, N, E), 0).requires_grad_()
    r = got_route(logits, q, k, topk=2, causal=True)
    g = torch.autograd.grad(r.probs[0, 2].sum() + r.weights[0, 2].sum(), (logits, q, k))
    for t in g:
        assert t[0, 3:].abs().max() == 0 and t[0, :3].abs().max() > 0


def test_moe_experts_matches_naive():
    r = got_route(_r((B, N, E), 0), topk=2)
    inputs = {"x": _r((B, N, C), 3), "weights": r.weights, "w1": _r((E, C, 6), 4, C ** -0.5),
              "w2": _r((E, 6, C), 5, 6 ** -0.5)}
    compare_fn(lambda **a: moe_experts(indices=r.indices, **a), lambda **a: naive_experts(indices=r.indices, **a),
               inputs, torch.float32)


def test_got_module_causal_prefix_and_aux_loss():
    torch.manual_seed(0)
    for mode in ("attention", "similarity"):
        m = GoTMoE(C, E, topk=2, hidden=8, mode=mode, num_heads=2, sim_dim=4, causal=True).double()
        x = _r((1, N, C), 0)
        y = m(x)
        x2 = x.clone()
        x2[:, 4:] += 1.0
        assert torch.equal(m(x2)[:, :4], y[:, :4])  # routing and mixing never look ahead
        r = m.last_route
        f = torch.stack([(r.indices == e).double().mean() for e in range(E)])  # share of routing slots
        assert m.aux_loss.requires_grad
        assert_close(m.aux_loss.detach(), E * (f * r.probs.mean((0, 1))).sum(), torch.float64, "aux_loss")


def test_got_errors():
    with pytest.raises(ValueError, match="got_route: topk"):
        got_route(_r((B, N, E), 0), topk=E + 1)
    with pytest.raises(ValueError, match="got_route: q and k"):
        got_route(_r((B, N, E), 0), _r((B, N, 2, 4), 1), topk=2)
    with pytest.raises(ValueError, match="got_route: graph"):
        got_route(_r((B, N, E), 0), graph=_r((B, N, N + 1), 1), topk=2)
    with pytest.raises(ValueError, match="GoTMoE: topk"):
        GoTMoE(C, 2, topk=3)
    with pytest.raises(ValueError, match="GoTMoE: mode"):
        GoTMoE(C, 4, mode="hash")


# ------------------------------------------------------------------------------------------------- BAM


def _bam_inputs(E=3, H=4, hkv=2, D=2, shared=False, bias=True, seed=10):
    ekv, s = (1 if shared else E), C ** -0.5
    inputs = {"x": _r((B, N, C), seed), "router_weight": _r((C, E), seed + 1, s), "wq": _r((E, C, H * D), seed + 2, s),
              "wk": _r((ekv, C, hkv * D), seed + 3, s), "wv": _r((ekv, C, hkv * D), seed + 4, s),
              "wo": _r((E, H * D, C), seed + 5, s)}
    if bias:
        inputs.update(router_bias=_r((E,), seed + 6), bq=_r((E, H * D), seed + 7, 0.1),
                      bk=_r((ekv, hkv * D), seed + 8, 0.1), bv=_r((ekv, hkv * D), seed + 9, 0.1),
                      bo=_r((E, C), seed + 10, 0.1))
    return inputs


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_bam_op_matches_naive(shared, causal):
    from attnkit.ops.sequence.bam import bam_attention
    from attnkit.reference.naive_sequence4 import naive_bam

    kw = dict(num_heads=4, num_kv_heads=2, causal=causal)
    compare_fn(lambda **a: bam_attention(**a, **kw), lambda **a: naive_bam(**a, **kw), _bam_inputs(shared=shared),
               torch.float32)


@pytest.mark.parametrize("kv_heads", [None, 1])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_upcycled_bam_equals_the_dense_mha(kv_heads, causal, bias):
    from attnkit.mechanisms.mha import MultiHeadAttention
    from attnkit.mechanisms.seq_bam import BAMAttention

    torch.manual_seed(0)
    dense = MultiHeadAttention(C, 2, num_kv_heads=kv_heads, bias=bias, causal=causal).double()
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_()  # biases off zero too, so a dropped bias would show
    x = _r((B, N, C), 1)
    for shared in (False, True):
        moa = BAMAttention.upcycle(dense, 4, kv_shared=shared)
        with torch.no_grad():
            moa.router_weight.normal_()  # any router: all experts are the same
        assert moa.num_experts == 4 and moa.causal == causal and moa.wq.dtype == torch.float64
        assert_close(moa(x), dense(x), torch.float64, f"upcycled (kv_shared={shared})")
        # the KV-shared layer keeps the dense model's key/value projection (and KV cache) size
        assert moa.wk.shape[0] == (1 if shared else 4)


def test_bam_one_hot_router_selects_one_expert_and_upcycle_of_several_models():
    from attnkit.mechanisms.mha import MultiHeadAttention
    from attnkit.mechanisms.seq_bam import BAMAttention

    torch.manual_seed(0)
    models = [MultiHeadAttention(C, 2).double() for _ in range(3)]
    moa = BAMAttention.upcycle(models)
    x = _r((B, N, C), 1)
    with torch.no_grad():
        moa.router_weight.zero_()
        moa.router_weight[0, 1] = 1e4  # x[..., 0] > 0 picks expert 1, < 0 expert 0 (ties at 0 are measure-zero)
    y = moa(x)
    pos = x[..., 0] > 0
    assert_close(y[pos], models[1](x)[pos], torch.float64, "expert 1")
    mixed = BAMAttention.upcycle(models, kv_shared=True)
    wk = torch.stack([m.kv_proj.weight[:C].T for m in models]).mean(0)
    assert_close(mixed.wk[0], wk, torch.float64, "averaged W_k")
    assert mixed.wk.shape == (1, C, C) and mixed.wq.shape == (3, C, C)


def test_bam_errors():
    from attnkit.mechanisms.mha import MultiHeadAttention
    from attnkit.mechanisms.seq_bam import BAMAttention
    from attnkit.ops.sequence.bam import bam_attention

    a = _bam_inputs(bias=False)
    with pytest.raises(ValueError, match="bam_attention: wo"):
        bam_attention(**{**a, "wo": a["wo"][:2]}, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="bam_attention: num_heads"):
        bam_attention(**a, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="upcycle: n_experts is required"):
        BAMAttention.upcycle(MultiHeadAttention(C, 2))
    with pytest.raises(TypeError, match="upcycle: dense"):
        BAMAttention.upcycle(torch.nn.Linear(C, C), 2)
    with pytest.raises(ValueError, match="upcycle: every dense"):
        BAMAttention.upcycle([MultiHeadAttention(C, 2), MultiHeadAttention(C, 4)])


# --------------------------------------------------------------------------------- deconstructed attention


FORMS = ("softmax", "relu", "sigmoid", "linear", "taylor")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("causal", [False, True])
def test_deconstructed_op_matches_naive(form, causal):
    from attnkit.ops.sequence.deconstructed import deconstructed_attention
    from attnkit.reference.naive_sequence4 import naive_deconstructed

    inputs = {"q": _r((B, N, 2, 4), 0), "k": _r((B, N, 2, 4), 1), "v": _r((B, N, 2, 3), 2)}
    kw = dict(form=form, causal=causal)
    compare_fn(lambda **a: deconstructed_attention(**a, **kw), lambda **a: naive_deconstructed(**a, **kw), inputs,
               torch.float32)


@pytest.mark.parametrize("mixing", ["uniform", "none"])
@pytest.mark.parametrize("causal", [False, True])
def test_deconstructed_fixed_mixing_matches_naive(mixing, causal):
    from attnkit.ops.sequence.deconstructed import deconstructed_attention
    from attnkit.reference.naive_sequence4 import naive_deconstructed

    v = _r((B, N, 2, 3), 2)
    assert_close(deconstructed_attention(None, None, v, mixing=mixing, causal=causal),
                 naive_deconstructed(None, None, v, mixing=mixing, causal=causal), torch.float64, mixing)


@pytest.mark.parametrize("causal", [False, True])
def test_deconstructed_defaults_are_standard_softmax_attention(causal):
    import attnkit as ak
    from attnkit.mechanisms.seq_deconstructed import DeconstructedAttention
    from attnkit.ops.sequence.deconstructed import deconstructed_attention

    q, k, v = _r((B, N, 2, 4), 0), _r((B, N, 2, 4), 1), _r((B, N, 2, 4), 2)
    mask = ak.masks.causal() if causal else None
    want = ak.attention(q, k, v, mask)
    for backend in ("attention", "scores", "reference"):
        assert_close(deconstructed_attention(q, k, v, causal=causal, backend=backend), want, torch.float64, backend)
    torch.manual_seed(0)
    m = DeconstructedAttention(C, 2, causal=causal).double()
    x = _r((B, N, C), 3)
    o = ak.attention((x @ m.wq).view(B, N, 2, 4), (x @ m.wk).view(B, N, 2, 4), (x @ m.wv).view(B, N, 2, 4), mask)
    assert_close(m(x), o.reshape(B, N, C) @ m.wo, torch.float64, "module")


def _hand_case():
    # N = 2, one head of width 1, scale 1: scores s = q k^T = [[1, -1], [2, -2]], values v = [1, 3]
    t = lambda *a: torch.tensor(a, dtype=torch.float64).view(1, -1, 1, 1)  # noqa: E731
    return t(1.0, 2.0), t(1.0, -1.0), t(1.0, 3.0)


def _sig(z):
    return 1 / (1 + math.exp(-z))


E1 = math.e
HAND = {  # (form, causal) -> outputs of both queries, by hand from the formulas
    ("softmax", False): [(E1 + 3 / E1) / (E1 + 1 / E1), (E1 ** 2 + 3 / E1 ** 2) / (E1 ** 2 + 1 / E1 ** 2)],
    ("softmax", True): [1.0, (E1 ** 2 + 3 / E1 ** 2) / (E1 ** 2 + 1 / E1 ** 2)],
    ("relu", False): [0.5, 1.0],  # relu(s) / 2: row 0 [0.5, 0], row 1 [1, 0]
    ("relu", True): [1.0, 1.0],  # row 0 sees one key: relu(1) / 1
    ("sigmoid", False): [_sig(1 - math.log(2)) + 3 * _sig(-1 - math.log(2)),
                         _sig(2 - math.log(2)) + 3 * _sig(-2 - math.log(2))],
    ("linear", False): [0.5 - 1.5, 1.0 - 3.0],  # s / 2 without a normaliser: negative weights stay
    ("taylor", False): [(2.5 + 3 * 0.5) / 3.0, (5.0 + 3 * 1.0) / 6.0],  # t = 1 + s + s^2/2: [2.5, .5], [5, 1]
}


@pytest.mark.parametrize("key", list(HAND))
def test_deconstructed_forms_on_a_hand_computed_case(key):
    from attnkit.ops.sequence.deconstructed import deconstructed_attention

    form, causal = key
    q, k, v = _hand_case()
    for backend in (None, "scores", "reference"):
        y = deconstructed_attention(q, k, v, form=form, causal=causal, scale=1.0, backend=backend)
        assert_close(y.flatten(), torch.tensor(HAND[key], dtype=torch.float64), torch.float64, f"{key} {backend}")


def test_deconstructed_fixed_mixing_on_a_hand_computed_case():
    from attnkit.ops.sequence.deconstructed import deconstructed_attention

    _, _, v = _hand_case()
    expect = {("uniform", False): [2.0, 2.0], ("uniform", True): [1.0, 2.0], ("none", False): [1.0, 3.0],
              ("none", True): [1.0, 3.0]}
    for (mixing, causal), want in expect.items():
        for backend in (None, "reference"):
            y = deconstructed_attention(None, None, v, mixing=mixing, causal=causal, backend=backend)
            assert torch.equal(y.flatten(), torch.tensor(want, dtype=torch.float64)), (mixing, causal, backend)


def test_fixed_seq_qk_weights_are_identical_for_every_input():
    from attnkit.mechanisms.seq_deconstructed import DeconstructedAttention

    torch.manual_seed(0)
    m = DeconstructedAttention(C, 2, qk_source="position", max_len=16).double()
    # with W_V = W_O = I the output is A x: two inputs reveal the same A
    with torch.no_grad():
        m.wv.copy_(torch.eye(C))
        m.wo.copy_(torch.eye(C))
    x1, x2 = _r((1, N, C), 1), _r((1, N, C), 2)
    y1, y2 = m(x1), m(x2)
    # A does not depend on x: mixing x1 + x2 gives y1 + y2 (linear in x), impossible for hidden-state q, k
    assert_close(m(x1 + x2), y1 + y2, torch.float64, "linear in x")
    h = DeconstructedAttention(C, 2).double()
    assert (h(x1 + x2) - h(x1) - h(x2)).abs().max() > 1e-3
    # and the same weights for every element of a batch of different inputs
    assert_close(m(torch.cat([x1, x2])), torch.cat([y1, y2]), torch.float64, "batch")


def test_shared_qk_and_external_source():
    from attnkit.mechanisms.seq_deconstructed import DeconstructedAttention
    from attnkit.reference.naive_sequence4 import naive_deconstructed_module

    torch.manual_seed(0)
    m = DeconstructedAttention(C, 2, qk_source="external", shared_qk=True, form="relu", causal=True).double()
    assert m.wk is None
    x, e = _r((B, N, C), 1), _r((B, N, C), 2)
    assert_close(m(x, e), naive_deconstructed_module(m, x, e), torch.float64, "external, shared")
    with pytest.raises(ValueError, match="DeconstructedAttention: qk_source='external' needs qk_input"):
        m(x)
    # the weights follow qk_input only: changing x's values leaves the mixing (hence A x) linear in x
    assert_close(m(2 * x, e), 2 * m(x, e), torch.float64, "A independent of x")
    with pytest.raises(ValueError, match="DeconstructedAttention: form"):
        DeconstructedAttention(C, 2, form="cosine")
