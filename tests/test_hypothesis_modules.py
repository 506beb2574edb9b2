"""Hypothesis sweep of every registered module, driven by the registry.

Per spec, examples draw the batch, a scale of the tiny input's extents (x1 or x2, so windows and blocks
still divide), the dtype (float32 / bfloat16 / float64), the memory layout (contiguous, a strided
non-contiguous view, channels-last storage) and the grad mode (enabled, ``no_grad``, ``inference_mode``).
Checked: the output keeps the input's shape (a pooling spec's: ``spec.out_shape`` of the drawn sizes) and
dtype and is finite on finite input. A second sweep draws
bad inputs (wrong rank, wrong channel count, integer dtype, empty batch, no tokens) and checks for a
``ValueError`` / ``TypeError`` that names the module.

Bounded for CI: ``derandomize=True`` (the same cases every run), a few examples per spec, no deadline.
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.registry import InputKind

SPECS = ak.list_mechanisms()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
LAYOUTS = ("contiguous", "strided", "channels_last")
MODES = ("grad", "no_grad", "inference_mode")
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

_MODULES: dict[tuple[str, str], torch.nn.Module] = {}
# options a x2 input needs beyond the tiny config (rcmha refuses lengths past its relative range, by design)
OVERRIDES = {"rcmha": {"max_rel": 16}}
# The sweep found that the tiled neighborhood backend reused a work buffer first allocated under inference_mode
# (an inference tensor) outside it; its pool now keeps inference buffers apart, and
# test_neighborhood_after_inference_mode pins it in a fresh process.
INFERENCE_MODE_BUG: set[str] = set()


def _module(spec, dtype: str) -> torch.nn.Module:
    """The spec's tiny module in ``dtype`` (built once per spec and dtype; parameters nudged off their init)."""
    key = (spec.name, dtype)
    if key not in _MODULES:
        torch.manual_seed(0)
        m = spec.module(**spec.options(spec.config(OVERRIDES.get(spec.name), pattern=spec.patterns[0], tiny=True)))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        _MODULES[key] = copy.deepcopy(m).to(DTYPES[dtype])
    return _MODULES[key]


def _shape(spec, batch: int, scale: int) -> tuple[int, ...]:
    cfg = spec.config(pattern=spec.patterns[0], tiny=True)
    shape = list(spec.input_shape(cfg))
    spatial = range(2, len(shape)) if spec.input_kind == InputKind.CNN else range(1, len(shape) - 1)
    for i in spatial:
        shape[i] *= scale
    shape[0] = batch
    return tuple(shape)


def _out_shape(spec, batch: int, scale: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The expected output shape: the input's, or a pooling spec's ``out_shape`` of the drawn sizes."""
    if not spec.pooling:
        return shape
    cfg = spec.config(OVERRIDES.get(spec.name), pattern=spec.patterns[0], tiny=True)
    cfg["batch"] = batch
    if "seq_len" in cfg:
        cfg["seq_len"] *= scale
    if "input_size" in cfg:
        cfg["input_size"] = tuple(s * scale for s in cfg["input_size"])
    assert spec.input_shape(cfg) == shape, "a pooling spec's sizes must be batch / seq_len / input_size"
    return spec.out_shape(cfg)


def _layout(x: torch.Tensor, layout: str, spec) -> torch.Tensor:
    if layout == "strided":  # every other element of a tensor twice as wide: a non-contiguous view
        wide = torch.repeat_interleave(x, 2, dim=-1)
        out = wide[..., ::2]
        assert not out.is_contiguous() and torch.equal(out, x)
        return out
    if layout == "channels_last":
        if spec.input_kind == InputKind.CNN:
            return x.contiguous(memory_format=torch.channels_last)
        # channels-first storage of a channels-last logical layout: C is the slowest axis after B
        perm = (0, x.dim() - 1, *range(1, x.dim() - 1))
        inv = (0, *range(2, x.dim()), 1)
        return x.permute(perm).contiguous().permute(inv)
    return x


def _mode(mode: str):
    if mode == "no_grad":
        return torch.no_grad()
    if mode == "inference_mode":
        return torch.inference_mode()
    return contextlib.nullcontext()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@SETTINGS
@given(batch=st.integers(1, 2), scale=st.sampled_from([1, 2]), dtype=st.sampled_from(list(DTYPES)),
       layout=st.sampled_from(LAYOUTS), mode=st.sampled_from(MODES), seed=st.integers(0, 2**16))
def test_module_sweep(spec, batch, scale, dtype, layout, mode, seed):
    assume(not (mode == "inference_mode" and spec.name in INFERENCE_MODE_BUG))
    assume(scale == 1 or not spec.fixed_size)  # its parameters fix the extents (another size raises)
    module = _module(spec, dtype)
    shape = _shape(spec, batch, scale)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DTYPES[dtype])
    x = _layout(x, layout, spec)
    if mode == "grad":
        x.requires_grad_()
    with _mode(mode):
        y = module(x)
    assert y.shape == _out_shape(spec, batch, scale, shape), (tuple(y.shape), tuple(x.shape))
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all(), f"non-finite output on finite input ({dtype}, {layout}, {mode})"
    if mode == "grad":
        (g,) = torch.autograd.grad(y.float().sum(), x)
        assert g.shape == x.shape and torch.isfinite(g).all()


BAD = ("rank_low", "rank_high", "channels", "integer", "empty_batch", "empty_tokens")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(bad=st.sampled_from(BAD), dtype=st.sampled_from(["float32", "float64"]), mode=st.sampled_from(MODES))
def test_bad_input_is_a_clear_error(spec, bad, dtype, mode):
    module = _module(spec, dtype)
    x = torch.randn(_shape(spec, 2, 1), dtype=DTYPES[dtype])
    cd = 1 if spec.input_kind == InputKind.CNN else x.dim() - 1
    td = 2 if spec.input_kind == InputKind.CNN else 1
    bad_x = {"rank_low": lambda: x[0], "rank_high": lambda: x[None],
             "channels": lambda: x.narrow(cd, 0, x.shape[cd] - 1),
             "integer": lambda: x.round().to(torch.int64),
             "empty_batch": lambda: x[:0], "empty_tokens": lambda: x.narrow(td, 0, 0)}[bad]()
    with pytest.raises((ValueError, TypeError)) as err, _mode(mode):
        module(bad_x)
    assert spec.module.__name__ in str(err.value), str(err.value)


_INFERENCE_REPRO = """
import torch, attnkit as ak
m = ak.get("neighborhood_2d", dim=8, num_heads=2, kernel_size=3).to(torch.bfloat16)
x = torch.randn(2, 4, 5, 8, dtype=torch.bfloat16)
with torch.inference_mode():
    m(x)
with torch.no_grad():
    assert m(x).shape == x.shape
"""


def test_neighborhood_after_inference_mode():
    """A fresh process: the buffer pool must be empty for the inference-mode call to allocate the buffer."""
    r = subprocess.run([sys.executable, "-c", _INFERENCE_REPRO], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
