"""The registry drives these tests: every registered mechanism is checked the moment it registers."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import attnkit as ak
from attnkit.registry import PATTERNS

SPECS = ak.list_mechanisms()


def test_registry_is_populated_and_sorted():
    names = [s.name for s in SPECS]
    assert "mha" in names
    assert names == sorted(names) and len(set(names)) == len(names)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_spec_metadata(spec):
    assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.name)
    assert spec.paper.title and re.fullmatch(r"\d{4}\.\d{4,5}", spec.paper.arxiv), spec.paper
    assert 2014 <= spec.paper.year <= 2026
    assert spec.patterns and set(spec.patterns) <= set(PATTERNS)
    assert "O(" in spec.complexity
    assert issubclass(spec.module, nn.Module)
    assert spec.module.__doc__, f"{spec.module.__name__} has no docstring"
    flops = spec.flops(spec.default_config)
    assert isinstance(flops, (int, float)) and flops > 0
    assert ak.info(spec.name) is spec


def _cast(inputs, dtype):
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_example_forward_backward(spec, dtype):
    torch.manual_seed(0)
    module, inputs = spec.example()
    module = module.to(dtype)
    inputs = tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                   for t in _cast(inputs, dtype))
    out = module(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == dtype and torch.isfinite(out).all(), spec.name
    out.square().mean().backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    grads += [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{spec.name}: no gradient flows"
    assert all(g is None or torch.isfinite(g).all() for g in grads), f"{spec.name}: non-finite gradient"


def test_info_unknown_lists_valid():
    with pytest.raises(KeyError, match="mha"):
        ak.info("no_such_mechanism")


def test_get_builds_module():
    m = ak.get("mha", dim=32, num_heads=4, num_kv_heads=1, causal=True)
    x = torch.randn(2, 10, 32)
    y = m(x)
    assert y.shape == x.shape
    # causal: the output on a prefix does not change when later tokens do
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 32)
    torch.testing.assert_close(m(x2)[:, :6], y[:, :6])


def test_mha_cross_attention_and_bad_heads():
    m = ak.get("mha", dim=32, num_heads=4)
    assert m(torch.randn(1, 5, 32), context=torch.randn(1, 9, 32)).shape == (1, 5, 32)
    with pytest.raises(ValueError, match="multiple"):
        ak.get("mha", dim=32, num_heads=4, num_kv_heads=3)


def test_list_filters():
    assert [s.name for s in ak.list_mechanisms("mh*")] == ["mha"]
    assert all(s.family == "dense" for s in ak.list_mechanisms(family="dense"))


def test_register_rejects_bad_specs():
    with pytest.raises(ValueError, match="patterns"):
        ak.register(name="bad_one", family="x", paper=ak.Paper("t", "2101.00001", 2021), patterns=("sideways",),
                    complexity="O(N)", flops=lambda c: 1.0, example=lambda c=None: None)(nn.Identity)
