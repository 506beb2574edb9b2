"""Fifth batch of sequence mechanisms: GAAM's released-code options (arXiv 2401.11143), the layer-spec hybrids
(Hydra arXiv 2508.15099, MiniCPM-SALA arXiv 2602.11761) and Spatial-Mamba's state fusion (arXiv 2410.15091)."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit as ak
from attnkit.ops.dense.gaussian import gaussian_adaptive
from attnkit.ops.sequence.hybrid_spec import HybridSpec, hybrid_stack, hydra_spec, sala_spec
from attnkit.ops.sequence.spatial_mamba import spatial_mamba_fusion
from attnkit.reference.naive_dense import naive_gaam
from attnkit.reference.naive_sequence5 import naive_gaam_axis_split, naive_spatial_mamba_fusion
from tolerances import assert_close, compare_fn

# ------------------------------------------------------------------------------------------------ GAAM


def _gaam_inputs(shape=(2, 7, 6), h=3, g=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(*shape, generator=gen, dtype=torch.float64),
            "offsets": 0.3 * torch.randn(h, g, generator=gen, dtype=torch.float64),
            "widths": 1.5 + torch.rand(h, g, generator=gen, dtype=torch.float64),
            "mix_logits": torch.randn(h, g, generator=gen, dtype=torch.float64)}


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("combine,unbiased,normalize", [("mixture", False, False), ("product", True, True),
                                                        ("mixture", True, True), ("product", False, False)])
def test_gaam_axis_split_matches_naive(axis, combine, unbiased, normalize):
    # 7 tokens / 6 features over 3 heads: chunks of 2 with the remainder in the last head (7 = 2 + 2 + 3)
    inputs = _gaam_inputs()
    kw = dict(axis=axis, normalize=normalize, unbiased=unbiased, combine=combine)
    for dtype in (torch.float64, torch.float32):
        compare_fn(lambda **a: gaussian_adaptive(**a, head_split="axis", **kw),
                   lambda **a: naive_gaam_axis_split(**a, **kw), inputs, dtype)
    x = inputs["x"]
    assert torch.equal(gaussian_adaptive(x, inputs["offsets"], inputs["widths"], head_split="axis", axis=axis,
                                         backend="reference"),
                       naive_gaam_axis_split(x, inputs["offsets"], inputs["widths"], axis=axis))


def test_gaam_axis_split_on_features_equals_feature_heads():
    # with the statistics along the features and C % h == 0, both splits cut the same chunks
    inp = _gaam_inputs(shape=(2, 5, 6))
    for combine in ("mixture", "product"):
        a = gaussian_adaptive(**inp, axis=-1, head_split="axis", combine=combine, normalize=True)
        b = gaussian_adaptive(**inp, axis=-1, head_split="features", combine=combine, normalize=True)
        assert_close(a, b, torch.float64, combine)
    # along tokens they differ: the token split gives every chunk its own statistics
    a = gaussian_adaptive(**inp, axis=1, head_split="axis")
    b = gaussian_adaptive(**inp, axis=1, head_split="features")
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="at least h=3"):
        gaussian_adaptive(torch.randn(1, 2, 6), inp["offsets"].float(), inp["widths"].float(), head_split="axis")
    with pytest.raises(ValueError, match="head_split"):
        gaussian_adaptive(torch.randn(1, 4, 6), inp["offsets"].float(), inp["widths"].float(), head_split="tokens")


def _released_gaam(x, offsets, widths, axis, eps=1e-8):
    """The authors' current released code transcribed by hand (per head chunk of the statistics axis, torch.var,
    product of normalised Gaussian densities, division by their sum along the axis clamped at eps)."""
    h, g = offsets.shape
    n = x.shape[axis]
    size = n // h
    outs = []
    for i in range(h):
        stop = (i + 1) * size if i < h - 1 else n
        chunk = x.narrow(axis, i * size, stop - i * size)
        mean = chunk.mean(dim=axis, keepdim=True)
        var = chunk.var(dim=axis, keepdim=True) + eps
        mix = 1
        for j in range(g):
            y = (chunk - (mean + offsets[i, j])) / torch.sqrt(var)
            mix = mix * torch.exp(-(y ** 2) / (2.0 * widths[i, j] ** 2)) / torch.sqrt(2 * math.pi * widths[i, j] ** 2)
        mix = mix / mix.sum(dim=axis, keepdim=True).clamp(min=eps)
        outs.append(chunk * mix)
    return torch.cat(outs, dim=axis)


@pytest.mark.parametrize("axis", [1, -1])
def test_gaam_module_released_choices_equal_the_released_code(axis):
    torch.manual_seed(0)
    m = ak.get("gaussian_adaptive", dim=12, num_heads=3, num_gaussians=2, axis=axis, normalize=True, unbiased=True,
               combine="product", head_split="axis").double()
    with torch.no_grad():
        m.offsets.normal_(0, 0.3)
        m.widths.uniform_(1.0, 2.5)
    assert m.mix_logits is None  # a product has no mixture weights
    # chunks of >= 4 positions: the released code's clamp(min=eps) of the normalising sum (not reproduced) stays
    # inactive; with 2-position chunks two near-equal values make every density underflow and the clamp bites
    x = torch.randn(2, 13, 12, dtype=torch.float64, requires_grad=True)
    y, want = m(x), _released_gaam(x, m.offsets, m.widths, axis)
    assert_close(y, want, torch.float64, "y")
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, m.offsets, m.widths], gy)
    exp = torch.autograd.grad(want, [x, m.offsets, m.widths], gy)
    for name, a, b in zip(("dx", "doffsets", "dwidths"), got, exp, strict=True):
        assert_close(a, b, torch.float64, name, grad=True)


@pytest.mark.parametrize("opts", [{"unbiased": True}, {"normalize": True}, {"normalize": False},
                                  {"combine": "product"}, {"head_split": "axis"},
                                  {"head_split": "axis", "axis": -1, "combine": "product"}])
def test_gaam_module_each_option_against_naive(opts):
    torch.manual_seed(1)
    m = ak.get("gaussian_adaptive", dim=8, num_heads=2, num_gaussians=2, **opts).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    kw = {"axis": opts.get("axis", 1), "normalize": opts.get("normalize", True), "eps": 1e-8,
          "unbiased": opts.get("unbiased", False), "combine": opts.get("combine", "mixture")}
    mix = m.mix_logits if kw["combine"] == "mixture" else None
    naive = naive_gaam_axis_split if opts.get("head_split") == "axis" else naive_gaam
    assert_close(m(x), naive(x, m.offsets, m.widths, mix, **kw), torch.float64, "y")
    assert_close(m(x), ak.info("gaussian_adaptive").reference(m, x), torch.float64, "twin")


def test_gaam_module_defaults_are_the_paper_formula_and_options_are_checked():
    m = ak.get("gaussian_adaptive", dim=4, num_heads=1).double()
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    mu, var = x.mean(1, keepdim=True), x.var(1, keepdim=True, unbiased=False)
    want = x * torch.exp(-((x - mu) ** 2) / (var + 1e-8) / (2 * 2.0 ** 2))  # one Gaussian, c = 2, no normalisation
    assert_close(m(x), want, torch.float64, "paper")
    assert not m.normalize and not m.unbiased and m.combine == "mixture" and m.head_split == "features"
    with pytest.raises(ValueError, match="GaussianAdaptiveAttention: head_split"):
        ak.get("gaussian_adaptive", dim=4, num_heads=1, head_split="tokens")
    with pytest.raises(ValueError, match="GaussianAdaptiveAttention: combine"):
        ak.get("gaussian_adaptive", dim=4, num_heads=1, combine="sum")
    ak.get("gaussian_adaptive", dim=5, num_heads=2, head_split="axis")  # C % h need not be 0 for the axis split
    with pytest.raises(ValueError, match="GaussianAdaptiveAttention: dim"):
        ak.get("gaussian_adaptive", dim=5, num_heads=2)
    with pytest.raises(ValueError, match="GaussianAdaptiveAttention: head_split='axis' needs at least"):
        ak.get("gaussian_adaptive", dim=4, num_heads=3, head_split="axis")(torch.randn(1, 2, 4))


# -------------------------------------------------------------------------------------- hybrid stacks


@pytest.mark.parametrize("spec", [sala_spec(), hydra_spec(), sala_spec(repeat=2),
                                  HybridSpec.pattern("S(S+A)M", {"S": ("dsf_equivalence", {"form": "s6"}),
                                                                 "A": ("moba", {"block_size": 8, "topk": 2}),
                                                                 "M": ("titans_memory", {})})])
def test_spec_round_trips_through_string_and_dict(spec):
    assert HybridSpec.from_string(spec.to_string()) == spec
    assert HybridSpec.from_dict(spec.to_dict()) == spec
    assert HybridSpec.parse(str(spec)) == spec


def test_default_layer_types_and_ratios():
    assert sala_spec().layer_types() == ["A", "L", "L", "L"] and sala_spec().ratio("A") == 0.25  # 1 sparse : 3 linear
    assert sala_spec().block("A")[0] == "moba" and sala_spec().block("L")[0] == "lightning_attention"
    assert hydra_spec().layer_types() == ["S", "S", "S", "S+A"]
    assert hydra_spec().ratio("S") == 1.0 and hydra_spec().ratio("A") == 0.25
    with pytest.raises(ValueError, match="does not define"):
        HybridSpec((("X",),), (("A", "moba", {}),))
    with pytest.raises(ValueError, match="SalaHybrid: spec kind 'A' names an unknown mechanism"):
        ak.get("sala_hybrid", dim=8, num_heads=2, spec="A; A=not_a_mechanism()")
    with pytest.raises(ValueError, match="SalaHybrid: spec kind 'A' sets"):
        ak.get("sala_hybrid", dim=8, num_heads=2, spec="A; A=moba(causal=True)")


@pytest.mark.parametrize("name,one", [("sala_hybrid", "L; L=lightning_attention(chunk_size=16)"),
                                      ("sala_hybrid", "A; A=moba(block_size=4, topk=2)"),
                                      ("hydra_hybrid", "S; S=dsf_equivalence(form='s6', state=4)"),
                                      ("hydra_hybrid",
                                       "A; A=s2_attention(block_size=4, local_blocks=2, vert_stride=2)")])
def test_one_layer_spec_equals_its_mechanism(name, one):
    torch.manual_seed(0)
    spec = HybridSpec.from_string(one)
    mech, opts = spec.block(spec.layers[0][0])
    x = torch.randn(2, 24, 16, dtype=torch.float64)
    for residual, norm in ((False, "none"), (True, "none"), (True, "rms")):
        hyb = ak.get(name, dim=16, num_heads=2, spec=one, causal=True, residual=residual, norm=norm).double()
        kw = dict(opts, dim=16, num_heads=2)
        if mech in ("moba", "s2_attention"):
            kw["causal"] = True
        if mech == "lightning_attention":
            kw.update(layer_idx=0, num_layers=1)
        ref = ak.get(mech, **kw).double()
        ref.load_state_dict(hyb.layers[0][0].state_dict())  # weights shared
        h = x if norm == "none" else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # RMSNorm, weight 1
        want = ref(h) + (x if residual else 0)
        assert_close(hyb(x), want, torch.float64, f"{name} residual={residual} norm={norm}")


@pytest.mark.parametrize("name", ["sala_hybrid", "hydra_hybrid"])
def test_causal_future_does_not_change_past(name):
    torch.manual_seed(0)
    m, (x,) = ak.info(name).example(pattern="causal-self")
    m = m.double()
    x = x.double()
    t = 37
    x2 = x.clone()
    x2[:, t:] += torch.randn_like(x2[:, t:])
    y, y2 = m(x), m(x2)
    assert_close(y2[:, :t], y[:, :t], torch.float64, "past")
    assert (y2[:, t:] - y[:, t:]).abs().max() > 1e-3


def test_stack_passes_whole_stack_layer_index_and_matches_functional():
    from attnkit.ops.linear.decay import tnl_decay

    m = ak.get("sala_hybrid", dim=16, num_heads=2, causal=True)
    for idx in (1, 2, 3):
        assert torch.allclose(m.layers[idx][0].decay, tnl_decay(2, idx, 4).to(torch.float32))
    x = torch.randn(1, 260, 16)  # moba: topk 4 of 64-token blocks needs >= 4 blocks
    assert torch.equal(m(x), hybrid_stack(x, m.layers, residual=True, norms=m.norms))
    with pytest.raises(ValueError, match="one norm per layer"):
        hybrid_stack(x, m.layers, norms=m.norms[:1])
    with pytest.raises(ValueError, match="hybrid_stack: x must be"):
        hybrid_stack(torch.randn(3, 4), m.layers)


# ------------------------------------------------------------------------------------ Spatial-Mamba SASF


def _sasf_inputs(B=1, Y=3, X=5, C=3, n=2, R=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {"x": r(B, Y, X, C), "dt": 0.1 + 0.5 * torch.rand(B, Y, X, C, generator=g, dtype=torch.float64),
            "A": -0.2 - torch.rand(C, n, generator=g, dtype=torch.float64), "Bm": r(B, Y, X, n),
            "Cm": r(B, Y, X, n), "D": r(C), "weights": 0.3 * r(R, C, 3, 3)}


@pytest.mark.parametrize("chunk", [4, 64])
def test_spatial_mamba_chunked_matches_naive(chunk):
    # 15 tokens: chunks of 4 cross rows and end ragged
    inputs = _sasf_inputs()
    for dtype in (torch.float64, torch.float32):
        compare_fn(lambda **a: spatial_mamba_fusion(**a, dilations=(1, 2), chunk_size=chunk),
                   lambda **a: naive_spatial_mamba_fusion(**a, dilations=(1, 2)), inputs, dtype)


def test_spatial_mamba_delta_fusion_is_the_plain_scan():
    from attnkit.ops.sequence.dsf import dsf_from_s6, run_dsf

    inp = _sasf_inputs(B=2, Y=4, X=3, C=3, n=4, R=3)
    delta = torch.zeros(3, 3, 3, 3, dtype=torch.float64)
    delta[0, :, 1, 1] = 1.0  # centre only, first dilation
    y = spatial_mamba_fusion(inp["x"], inp["dt"], inp["A"], inp["Bm"], inp["Cm"], None, delta, chunk_size=5)
    B, Y, X, C = inp["x"].shape
    flat = lambda t: t.reshape(B, Y * X, -1)  # noqa: E731  (B, L, .) raster order
    # the 1-D selective scan, as attnkit's DSF S6 form computes it (Euler B_bar, y = C h)
    plain = run_dsf(dsf_from_s6(flat(inp["x"]), flat(inp["dt"]), inp["A"], flat(inp["Bm"]), flat(inp["Cm"])))
    assert_close(y.reshape(B, Y * X, C), plain.squeeze(-1), torch.float64, "delta")
    # a non-delta fusion mixes neighbouring states, so it differs
    w = inp["weights"].repeat(2, 1, 1, 1)[:3]  # (3, C, 3, 3)
    y2 = spatial_mamba_fusion(inp["x"], inp["dt"], inp["A"], inp["Bm"], inp["Cm"], None, w)
    assert (y2 - y).abs().max() > 1e-3


def test_spatial_mamba_module_delta_init_and_errors():
    m = ak.get("spatial_mamba_fusion", dim=4, state=2).double()
    assert torch.equal(m.fusion[0, :, 1, 1], torch.ones(4, dtype=torch.float64)) and m.fusion.abs().sum() == 4
    with pytest.raises(ValueError, match="spatial_mamba_fusion: weights must be"):
        spatial_mamba_fusion(torch.randn(1, 2, 2, 3), torch.rand(1, 2, 2, 3), -torch.rand(3, 2),
                             torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), None, torch.randn(1, 3, 3, 3),
                             dilations=(1, 3))
    with pytest.raises(ValueError, match="SpatialMambaMixer: fusion_init"):
        ak.get("spatial_mamba_fusion", dim=4, fusion_init="zeros")
