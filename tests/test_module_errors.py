"""Modules fail clearly: every registered module (driven by the registry) and a few named repros.

Generic, per spec: a wrong input rank or channel count raises ``ValueError`` naming the module, the
expected layout and the shape received; a negative int option or an unknown string option is refused
when the module is built; the output has ``spec.out_shape`` (the input's shape unless the spec is a pooling
one with ``output_shape``); ``B == 0`` and zero tokens raise one clear ``ValueError``; a module deep-copies
and pickles after a training forward; on ``meta`` it runs (shape inference) or raises
``NotImplementedError`` naming itself; ``ak.get(name, **spec.default_config)`` builds the benchmark's module.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import re

import pytest
import torch

import attnkit as ak
from attnkit.registry import InputKind

SPECS = ak.list_mechanisms()


def _tiny(spec, seed: int = 0):
    torch.manual_seed(seed)
    cfg = spec.config(pattern=spec.patterns[0], tiny=True)
    module, inputs = spec.example(cfg, pattern=spec.patterns[0], generator=torch.Generator().manual_seed(seed))
    return module, inputs[0], cfg


def _channel_dim(spec) -> int:
    return 1 if spec.input_kind == InputKind.CNN else -1


def _token_dim(spec) -> int:
    return 2 if spec.input_kind == InputKind.CNN else 1


def _names_module(spec, message: str) -> bool:
    return spec.module.__name__ in message


# ------------------------------------------------------------------------------------ input shapes


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_wrong_rank_names_module_layout_and_shape(spec):
    module, x, _ = _tiny(spec)
    for bad in (x[0], x.unsqueeze(0)):
        with pytest.raises(ValueError) as err:
            module(bad)
        msg = str(err.value)
        assert _names_module(spec, msg), msg
        assert str(tuple(bad.shape)) in msg, msg
        assert re.search(r"\(B, [A-Z]", msg), f"no expected layout in: {msg}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_wrong_channel_count_names_module_layout_and_shape(spec):
    module, x, _ = _tiny(spec)
    cd = _channel_dim(spec)
    c = x.shape[cd]
    bad = torch.cat([x, x.narrow(cd, 0, 1)], cd)  # C + 1 channels
    with pytest.raises(ValueError) as err:
        module(bad)
    msg = str(err.value)
    assert _names_module(spec, msg) and str(tuple(bad.shape)) in msg and f"C={c}" in msg, msg


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_non_tensor_and_integer_inputs_are_type_errors(spec):
    module, x, _ = _tiny(spec)
    for bad in (x.tolist(), x.round().long()):
        with pytest.raises(TypeError, match=spec.module.__name__):
            module(bad)


@pytest.mark.parametrize("what", ["batch", "tokens"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_empty_input_is_one_clear_error(spec, what):
    """The documented behaviour for B == 0 or no tokens: ValueError naming the module (as every op refuses)."""
    module, x, _ = _tiny(spec)
    empty = x[:0] if what == "batch" else x.narrow(_token_dim(spec), 0, 0)
    with pytest.raises(ValueError, match=rf"{spec.module.__name__}: x has an empty dimension"):
        module(empty)


# ----------------------------------------------------------------------------------------- options


def _int_options(spec, cfg: dict) -> dict:
    opts = spec.options(cfg)
    return {k: v for k, v in opts.items() if isinstance(v, int) and not isinstance(v, bool)}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_negative_int_options_are_refused_at_construction(spec):
    _, _, cfg = _tiny(spec)
    ints = _int_options(spec, cfg)
    assert ints or spec.name in {"care_attention"}, "no int option to check"
    for name in ints:
        opts = {**spec.options(cfg), name: -1}
        with pytest.raises((ValueError, TypeError)) as err:
            spec.module(**opts)
        msg = str(err.value)
        assert _names_module(spec, msg) and name.split("_")[0] in msg, f"{name}=-1: {msg}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_unknown_string_options_are_refused_at_construction(spec):
    _, _, cfg = _tiny(spec)
    for name, value in spec.options(cfg).items():
        if isinstance(value, str):
            with pytest.raises(ValueError, match=rf"{spec.module.__name__}: {name}"):
                spec.module(**{**spec.options(cfg), name: "no_such_choice"})


# ------------------------------------------------------------------------------ copies, meta, get


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_deepcopy_and_pickle_after_a_training_forward(spec):
    module, x, _ = _tiny(spec)
    module.train()
    y = module(x.requires_grad_())
    y.sum().backward()  # a forward with a graph, as in training
    twin = copy.deepcopy(module)
    pickled = pickle.loads(pickle.dumps(module))
    with torch.no_grad():
        ref = module(x)
        assert torch.equal(twin(x), ref) and torch.equal(pickled(x), ref)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_meta_runs_for_shapes_or_refuses_clearly(spec):
    _, x, cfg = _tiny(spec)
    with torch.device("meta"):
        module = spec.module(**spec.options(cfg))
    try:
        y = module(x.to("meta"))
    except NotImplementedError as e:
        assert str(e).startswith(f"{spec.module.__name__} cannot run on meta tensors: "), str(e)
        return
    assert y.is_meta and y.shape == spec.out_shape(cfg) and y.dtype == x.dtype


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_get_with_default_config_builds_the_benchmark_module(spec):
    module = ak.get(spec.name, **spec.default_config)
    torch.manual_seed(0)
    bench, (x,) = spec.example()
    assert type(module) is spec.module
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in bench.state_dict().items()}
    assert not set(spec.default_config) & set(spec.default_input), "an input size among the module options"
    with torch.no_grad():
        assert module(x).shape == spec.out_shape(spec.config())  # the input's shape unless a pooling spec
    assert spec.flops(spec.default_config) == spec.flops(spec.config()) > 0


# ------------------------------------------------------------------------------------ named repros


@pytest.mark.parametrize(("name", "options", "match"), [
    ("moba", {"topk": 0}, r"MoBA: topk must be >= 1, got 0"),
    ("moba", {"routing": "x"}, r"MoBA: routing must be one of \('token', 'block'\), got 'x'"),
    ("moba", {"block_size": 0}, r"MoBA: block_size must be >= 1"),
    ("softplus_attention", {"p": -1}, r"SoftplusAttention: p must be > 0.0, got -1"),
    ("softplus_attention", {"p": float("nan")}, r"SoftplusAttention: p must be finite"),
    ("biformer", {"n_win": 0}, r"BiLevelRoutingAttention: n_win must be >= 1, got 0"),
    ("biformer", {"topk": 17}, r"BiLevelRoutingAttention: topk must be in \[1, n_win\^2 = 4\]"),
    ("maxvit_attention", {"block_size": 0}, r"MultiAxisAttention: block_size must be >= 1, got 0"),
    ("maxvit_attention", {"num_heads": 0}, r"MultiAxisAttention: num_heads must be >= 1, got 0"),
    ("halonet", {"block_size": 0}, r"HaloAttention: block_size must be >= 1"),
    ("hyper_attention", {"lsh_bits": 31}, r"HyperAttention: lsh_bits must be <= 30"),
    ("vmoba", {"threshold": 1.5}, r"VMoBAAttention: threshold must be in \(0, 1\]"),
    ("vmoba", {"block_2d": (2, 0)}, r"VMoBAAttention: block_2d must be >= 1"),
    ("pyramid_sparse", {"mask_ratios": (0.5,)}, r"PyramidSparseAttention: mask_ratios"),
    ("neighborhood_2d", {"kernel_size": 0}, r"NeighborhoodAttention2D: kernel_size must be >= 1"),
    ("linear_attention", {"feature_map": "x"}, r"LinearAttention: "),
    ("lightning_attention", {"layer_idx": 4}, r"LightningAttention: layer_idx must be in \[0, num_layers=4\)"),
    ("gaussian_adaptive", {"init_c": 0.0}, r"GaussianAdaptiveAttention: init_c must be > 0.0"),
])
def test_named_options_fail_at_construction(name, options, match):
    spec = ak.info(name)
    cfg = spec.config(tiny=True)
    with pytest.raises(ValueError, match=match):
        spec.module(**{**spec.options(cfg), **options})


def test_mha_context_is_checked_too():
    m = ak.get("mha", dim=8, num_heads=2)
    with pytest.raises(ValueError, match=r"MultiHeadAttention: context must be \(B, M, C=8\), got shape \(1, 4, 7\)"):
        m(torch.randn(1, 3, 8), context=torch.randn(1, 4, 7))


def test_moh_deepcopy_after_forward_keeps_aux_loss_value():
    m = ak.get("moh", dim=8, num_heads=4, shared_heads=1, topk=2)
    m(torch.randn(2, 5, 8)).sum().backward()
    assert m.aux_loss.grad_fn is not None  # the module keeps the loss for the training step
    twin = copy.deepcopy(m)
    assert twin.aux_loss.grad_fn is None and torch.equal(twin.aux_loss, m.aux_loss.detach())
    assert m.aux_loss.grad_fn is not None  # copying did not strip the original


# ------------------------------------------------------------------- causal defaults, pure mixers


SEQUENCE_CAUSAL = [s for s in SPECS if "causal" in inspect.signature(s.module).parameters]


@pytest.mark.parametrize("spec", SEQUENCE_CAUSAL, ids=lambda s: s.name)
def test_causal_defaults_to_false_everywhere(spec):
    """One meaning for every module: causal=False unless asked (torch's SDPA / nn.MultiheadAttention default)."""
    assert inspect.signature(spec.module).parameters["causal"].default is False


def test_maxvit_is_a_pure_mixer():
    m = ak.get("maxvit_attention", dim=8, num_heads=2, block_size=2, grid_size=2)
    assert not [n for n, c in m.named_modules() if isinstance(c, torch.nn.LayerNorm)]
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        assert torch.allclose(m(x), m.grid(m.block(x)))  # no residual, no norm


# ---------------------------------------------------------------- image sizes the window misses


def test_biformer_pads_15x17_like_its_reference_code():
    from attnkit.reference.naive_modules import naive_biformer_module

    torch.manual_seed(0)
    m = ak.get("biformer", dim=8, num_heads=2, n_win=4, topk=3).double()
    x = torch.randn(2, 15, 17, 8, dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, naive_biformer_module(m, x))
    # explicitly zero-padded to 16 x 20 and cropped: the same numbers
    xp = torch.nn.functional.pad(x, (0, 0, 0, 3, 0, 1))
    torch.testing.assert_close(y, m(xp)[:, :15, :17])
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "options", "match"), [
    ("halonet", {"dim": 8, "num_heads": 2, "block_size": 4, "halo_size": 1},
     r"HaloAttention: the map \(Y, X\) = \(15, 17\) must be a multiple of block_size \(4\)"),
    ("maxvit_attention", {"dim": 8, "num_heads": 2, "block_size": 4, "grid_size": 2},
     r"MultiAxisAttention: the map \(Y, X\) = \(15, 17\) must be a multiple of block_size \(4\)"),
])
def test_windowed_mixers_refuse_15x17_clearly(name, options, match):
    """HaloNet's and MaxViT's reference code (timm) assert divisibility; so do these, naming the rule."""
    with pytest.raises(ValueError, match=match):
        ak.get(name, **options)(torch.randn(1, 15, 17, 8))


# --------------------------------------------------------------------------- hyper_attention


@pytest.mark.parametrize("causal", [False, True])
def test_hyper_attention_does_not_depend_on_the_batch(causal):
    """m(x)[i] == m(x[i:i+1]) in eval mode: the random draws are per example, not per batch."""
    torch.manual_seed(0)
    m = ak.get("hyper_attention", dim=16, num_heads=2, block_size=4, sample_size=4, lsh_bits=2, min_seq_len=8,
               causal=causal).eval()
    x = torch.randn(3, 32, 16)
    with torch.no_grad():
        full = m(x)
        for i in range(3):
            assert torch.equal(full[i:i + 1], m(x[i:i + 1]))
        assert torch.equal(m(x[[2, 0]]), full[[2, 0]])  # order does not matter either
        assert not torch.equal(full, m(x.flip(1)).flip(1))  # the estimate is still a real (sampled) one


# ----------------------------------------------------------------------- empty inputs at op level


def _empty_cases():
    from attnkit.ops.local.criss_cross import criss_cross_attention
    from attnkit.ops.local.halo import halo_attention
    from attnkit.ops.local.multi_axis import block_attention, grid_attention
    from attnkit.ops.per_head.moa import moa_attention
    from attnkit.ops.per_head.s2 import s2_attention
    from attnkit.ops.routed.biformer import bi_level_routing_attention
    from attnkit.ops.routed.hyper import hyper_attention
    from attnkit.ops.routed.moba import moba_attention
    from attnkit.ops.routed.psa import PSAConfig, psa_attention
    from attnkit.ops.routed.vmoba import vmoba_attention

    img, seq = (1, 4, 4, 2, 4), (1, 8, 2, 4)
    two = torch.tensor([1.0, 2.0])
    return [
        ("criss_cross", criss_cross_attention, img), ("halo", lambda q, k, v: halo_attention(q, k, v, 2, 1), img),
        ("block", lambda q, k, v: block_attention(q, k, v, 2), img),
        ("grid", lambda q, k, v: grid_attention(q, k, v, 2), img),
        ("biformer", lambda q, k, v: bi_level_routing_attention(q, k, v, 2, 1), img),
        ("moba", lambda q, k, v: moba_attention(q, k, v, 4, 1), seq), ("hyper", hyper_attention, seq),
        ("s2", lambda q, k, v: s2_attention(q, k, v, 2, 1, 2), seq),
        ("moa", lambda q, k, v: moa_attention(q, k, v, two, 0 * two, sink=1, block_size=4), seq),
        ("psa", lambda q, k, v: psa_attention(q, k, v, PSAConfig(4, 4, 2, (0.5, 0.5), False)), seq),
        ("vmoba", lambda q, k, v: vmoba_attention(q, k, v, (2, 2, 2)), seq),
    ]


@pytest.mark.parametrize("axis", ["batch", "tokens"])
def test_ops_refuse_empty_inputs_with_one_error(axis):
    """Every routed / local / per-head op: B == 0 or no tokens raises ValueError naming q's empty dimension."""
    for name, fn, shape in _empty_cases():
        shape = (0, *shape[1:]) if axis == "batch" else (shape[0], 0, *shape[2:])
        q = torch.randn(shape)
        with pytest.raises(ValueError, match=r"q has an empty dimension"):
            fn(q, q, q)
            pytest.fail(f"{name}: no error on {shape}")
