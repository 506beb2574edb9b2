"""The registry itself: specs, enums, registration rules and examples.

Numerical behaviour of every registered module (reference, gradients, patterns, round trips)
is in ``test_registry_generic.py``; the mechanisms' import rule in ``test_architecture.py``.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import attnkit as ak
from attnkit import registry
from attnkit.registry import PATTERNS, Family, InputKind

SPECS = ak.list_mechanisms()

# the families of today's mechanisms (a mechanism added later only needs a valid Family)
FAMILIES = {
    Family.DENSE: {"mha", "rcmha", "softplus_attention", "gaussian_adaptive"},
    Family.ROUTED: {"moba", "vmoba", "pyramid_sparse", "hyper_attention", "biformer"},
    Family.HEAD: {"moh", "moa", "s2_attention"},
    Family.VISION: {"single_head"},
    Family.LOCAL: {"neighborhood_1d", "neighborhood_2d", "neighborhood_3d", "dilated_neighborhood", "halonet",
                   "maxvit_attention", "criss_cross"},
    Family.LINEAR: {"linear_attention", "lightning_attention", "minimax_lightning", "hybrid_attention", "l2vit_lga",
                    "care_attention", "agent_attention", "agent_attention_1d"},
}


def test_registry_is_populated_and_sorted():
    names = [s.name for s in SPECS]
    assert "mha" in names and len(names) >= 28
    assert names == sorted(names) and len(set(names)) == len(names)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_spec_metadata(spec):
    assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.name)
    assert spec.paper.title and re.fullmatch(r"\d{4}\.\d{4,5}", spec.paper.arxiv), spec.paper
    assert 2014 <= spec.paper.year <= 2026
    assert type(spec.family) is Family and type(spec.input_kind) is InputKind
    assert spec.patterns and set(spec.patterns) <= set(PATTERNS)
    assert "O(" in spec.complexity
    assert issubclass(spec.module, nn.Module)
    assert spec.module.__doc__, f"{spec.module.__name__} has no docstring"
    assert callable(spec.reference) and callable(spec.options)
    fns = spec.functional if isinstance(spec.functional, tuple) else (spec.functional,)
    assert all(callable(f) for f in fns if f is not None)
    flops = spec.flops(spec.default_config)
    assert isinstance(flops, (int, float)) and flops > 0
    assert not re.search(r"papers/|DESIGN|\bissue \d|\bsession \d|§", spec.notes), "notes cite files outside the repo"
    assert ak.info(spec.name) is spec


def test_families_of_the_registered_mechanisms():
    for family, names in FAMILIES.items():
        got = {s.name for s in ak.list_mechanisms(family=family)}
        assert names <= got, (family, names - got)
        assert {s.name for s in ak.list_mechanisms(family=family.value)} == got


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_default_example_runs(spec):
    """The default config (the one the benchmark runs) builds and keeps the input's shape (a pooling spec:
    its ``output_shape``)."""
    torch.manual_seed(0)
    module, inputs = spec.example()
    assert len(inputs) == 1 and inputs[0].dtype == torch.float32
    with torch.no_grad():
        y = module(*inputs)
    assert y.shape == spec.out_shape(spec.config()) and torch.isfinite(y).all()
    assert spec.pooling or y.shape == inputs[0].shape


def test_enums_are_strings():
    assert Family.DENSE == "dense" and str(Family.ROUTED) == "routed" and f"{Family.HEAD}" == "head"
    assert InputKind.CNN == "cnn" and f"{InputKind.IMAGE:>6}" == " image"
    assert {Family.LOCAL: 1}["local"] == 1  # hashed as its string
    assert [f.value for f in Family] == ["dense", "local", "linear", "routed", "head", "vision", "channel", "cross",
                                         "decode"]
    assert [k.value for k in InputKind] == ["sequence", "image", "video", "cnn"]
    assert Family.parse("linear") is Family.LINEAR and Family.parse(Family.LINEAR) is Family.LINEAR
    with pytest.raises(ValueError, match="expected one of: dense, local"):
        Family.parse("sparse")


def _kw(**over):
    kw = dict(name="registry_test_dummy", family="dense", paper=ak.Paper("t", "2101.00001", 2021),
              patterns=("noncausal-self",), complexity="O(N)", flops=lambda c: 1.0,
              options=lambda c: {}, reference=lambda m, x: x)
    kw.update(over)
    return kw


def test_register_stores_enums_and_rejects_bad_specs(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    ak.register(**_kw(family="linear", input_kind="image"))(nn.Identity)
    spec = registry._REGISTRY["registry_test_dummy"]
    assert spec.family is Family.LINEAR and spec.input_kind is InputKind.IMAGE
    ak.register(**_kw(name="registry_test_dummy2", family=Family.HEAD, input_kind=InputKind.CNN))(nn.Identity)
    assert registry._REGISTRY["registry_test_dummy2"].family is Family.HEAD
    with pytest.raises(ValueError, match="patterns"):
        ak.register(**_kw(name="bad_one", patterns=("sideways",)))(nn.Identity)
    with pytest.raises(ValueError, match="Family 'sparse'"):
        ak.register(**_kw(name="bad_one", family="sparse"))
    with pytest.raises(ValueError, match="InputKind 'graph'"):
        ak.register(**_kw(name="bad_one", input_kind="graph"))
    with pytest.raises(TypeError, match="reference"):
        ak.register(**{k: v for k, v in _kw(name="bad_one").items() if k != "reference"})
    with pytest.raises(TypeError, match="reference must be callable"):
        ak.register(**_kw(name="bad_one", reference=None))(nn.Identity)
    with pytest.raises(TypeError, match="functional"):
        ak.register(**_kw(name="bad_one", functional=3))(nn.Identity)
    with pytest.raises(ValueError, match="already registered"):
        ak.register(**_kw(name="mha"))(nn.Identity)
    assert "bad_one" not in registry._REGISTRY


def test_output_shape_marks_a_pooling_spec(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Pool(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.dim = dim

        def forward(self, x):
            return x.mean(1)

    ak.register(**_kw(name="registry_test_pool", options=lambda c: {"dim": c["dim"]}, default_config={"dim": 4},
                      default_input={"batch": 3, "seq_len": 5}, output_shape=lambda c: (c["batch"], c["dim"])))(Pool)
    spec = registry._REGISTRY["registry_test_pool"]
    assert spec.pooling and spec.out_shape(spec.config()) == (3, 4) and spec.input_shape(spec.config()) == (3, 5, 4)
    assert not ak.info("mha").pooling and ak.info("mha").out_shape({"seq_len": 7, "dim": 8}) == (1, 7, 8)
    m, (x,) = spec.example()
    assert m(x).shape == spec.out_shape(spec.config())
    with pytest.raises(ValueError, match=r"pooling module .* cannot claim \['causal-self'\]"):
        ak.register(**_kw(name="bad_pool", patterns=("noncausal-self", "causal-self"),
                          output_shape=lambda c: (1,)))(Pool)
    with pytest.raises(TypeError, match="output_shape must be callable"):
        ak.register(**_kw(name="bad_pool", output_shape=(1, 2)))(Pool)
    assert "bad_pool" not in registry._REGISTRY


def test_list_filters():
    assert [s.name for s in ak.list_mechanisms("mh*")] == ["mha"]
    dense = ak.list_mechanisms(family="dense")
    assert dense and all(s.family is Family.DENSE for s in dense)
    assert ak.list_mechanisms(family=Family.DENSE) == dense
    with pytest.raises(ValueError, match="Family 'sparse'"):
        ak.list_mechanisms(family="sparse")


def test_example_patterns():
    spec = ak.info("mha")
    m, (x, ctx) = spec.example(spec.tiny_config, pattern="causal-cross")
    assert m.causal and ctx.shape[1] == x.shape[1] + 5 and ctx.shape[::2] == x.shape[::2]
    m, (x,) = spec.example({"seq_len": 9}, pattern="noncausal-self")
    assert not m.causal and x.shape[1] == 9
    with pytest.raises(ValueError, match="does not support pattern 'causal-cross'"):
        ak.info("moba").example(pattern="causal-cross")
    g = torch.Generator().manual_seed(0)
    a = spec.example(generator=g)[1][0]
    assert torch.equal(a, spec.example(generator=torch.Generator().manual_seed(0))[1][0])


def test_info_unknown_lists_valid():
    with pytest.raises(KeyError, match="mha"):
        ak.info("no_such_mechanism")


def test_get_builds_module():
    m = ak.get("mha", dim=32, num_heads=4, num_kv_heads=1, causal=True)
    x = torch.randn(2, 10, 32)
    assert m(x).shape == x.shape and m.num_kv_heads == 1


def test_mha_cross_attention_and_bad_heads():
    m = ak.get("mha", dim=32, num_heads=4)
    assert m(torch.randn(1, 5, 32), context=torch.randn(1, 9, 32)).shape == (1, 5, 32)
    with pytest.raises(ValueError, match="multiple"):
        ak.get("mha", dim=32, num_heads=4, num_kv_heads=3)


def test_default_config_holds_options_and_default_input_holds_sizes():
    spec = ak.info("moba")
    assert "seq_len" not in spec.default_config and "batch" not in spec.default_config
    assert spec.default_input == {"batch": 2, "seq_len": 64}
    assert ak.get("moba", **spec.default_config).topk == spec.default_config["topk"]
    cfg = spec.config(tiny=True)
    assert cfg["seq_len"] == spec.tiny_input["seq_len"] and cfg["dim"] == spec.tiny_config["dim"]
    m, (x,) = spec.example(tiny=True)
    assert x.shape == (1, 12, 8) and m.dim == 8
    assert spec.flops(spec.default_config) == spec.flops(spec.config()) > 0  # flops fills input sizes in


def test_register_moves_input_sizes_out_of_default_config(monkeypatch):
    """A registration written the old way (sizes among the options) still gives options-only default_config."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Mixer(nn.Module):
        def __init__(self, dim: int, scale: float = 1.0):
            super().__init__()
            self.lin = nn.Linear(dim, dim)

    ak.register(**_kw(name="registry_test_mixer", default_config={"batch": 2, "seq_len": 5, "dim": 4},
                      tiny_config={"seq_len": 3, "dim": 2}, flops=lambda c: c["batch"] * c["seq_len"] * c["dim"],
                      options=lambda c: {"dim": c["dim"]}))(Mixer)
    spec = registry._REGISTRY["registry_test_mixer"]
    assert spec.default_config == {"dim": 4} and spec.default_input == {"batch": 2, "seq_len": 5}
    assert spec.tiny_config == {"dim": 2} and spec.tiny_input == {"seq_len": 3}
    assert spec.flops({}) == 40 and spec.flops({"dim": 1}) == 10
    assert spec.example(tiny=True)[1][0].shape == (2, 3, 2)
    assert isinstance(ak.get("registry_test_mixer", **spec.default_config), Mixer)


def test_option_helpers_name_the_module():
    with pytest.raises(ValueError, match=r"Mixer: topk must be >= 1, got 0"):
        registry.int_option("Mixer", "topk", 0, 1)
    with pytest.raises(TypeError, match=r"Mixer: topk must be an int, got bool"):
        registry.int_option("Mixer", "topk", True, 1)
    with pytest.raises(ValueError, match=r"Mixer: mode must be one of \('a', 'b'\), got 'c'"):
        registry.choice_option("Mixer", "mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match=r"Mixer: p must be > 0"):
        registry.float_option("Mixer", "p", 0.0, minimum=0.0, exclusive=True)
    with pytest.raises(ValueError, match=r"Mixer: x must be \(B, N, C=4\), got shape \(2, 3\)"):
        registry.check_input("Mixer", torch.zeros(2, 3), "(B, N, C)", channels=4)
    with pytest.raises(NotImplementedError, match="Mixer cannot run on meta tensors: routing"):
        registry.check_input("Mixer", torch.zeros(1, 2, 4, device="meta"), "(B, N, C)", channels=4, meta="routing")
