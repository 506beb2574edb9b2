"""The optional compiled CPU kernels (attnkit.kernels.native): built where a compiler exists, equal to
their torch-ops twins (outputs, states and the gradients that use the kernel's segment states), and a
clean fallback, reported by ``explain``, where they are disabled or fail to build."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

import attnkit as ak
from attnkit.kernels import native as _native
from attnkit.ops.linear.chunk import chunk_linear_attention
from conftest import requires_native_kernel
from tolerances import assert_close


def test_kernel_builds_where_a_compiler_exists():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH")
    assert _native.available(), _native.status()
    assert _native.status() == "loaded"


def _run(monkeypatch, native: bool, q, k, v, g, s0, **kw):
    monkeypatch.setenv("ATTNKIT_NATIVE", "1" if native else "0")
    leaves = [t for t in (q, k, v, g, s0) if t is not None]
    for t in leaves:
        t.grad = None
    o, S = chunk_linear_attention(q, k, v, g, s0, **kw)
    gen = torch.Generator().manual_seed(7)
    (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum().backward()
    return [o.detach(), S.detach()] + [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("N,chunk,segment", [(1, 16, 64), (63, 16, 32), (64, 64, 64), (65, 16, 64), (300, 64, 128)])
@pytest.mark.parametrize("state", [False, True])
def test_native_equals_torch_ops(monkeypatch, dtype, decay, N, chunk, segment, state):
    """GQA (4 query heads on 2 kv heads), strided inputs (a fused qkv projection split), ragged chunks,
    several segments: every output and gradient of the two forwards agree (the backward is shared, so
    equal gradients also mean equal segment states)."""
    requires_native_kernel()
    gen = torch.Generator().manual_seed(N)
    B, H, Hkv, D, Dv = 2, 4, 2, 8, 8
    qkv = torch.randn(B, N, H + 2 * Hkv, D, generator=gen, dtype=dtype)  # (B, N, H + 2 Hkv, D)
    q, k, v = qkv.split([H, Hkv, Hkv], dim=2)  # heads-last views, token stride (H + 2 Hkv) * D
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    assert not q.is_contiguous()
    g = None
    if decay == "head":
        g = torch.log(torch.tensor([0.5, 0.8, 0.95, 0.999], dtype=dtype)).requires_grad_()
    elif decay == "token":
        g = torch.log(torch.rand(B, N, H, generator=gen, dtype=dtype) * 0.5 + 0.5).requires_grad_()
    s0 = torch.randn(B, H, D, Dv, generator=gen, dtype=dtype).requires_grad_() if state else None
    kw = dict(scale=0.3, chunk_size=chunk, segment=segment)
    fast = _run(monkeypatch, True, q, k, v, g, s0, **kw)
    ref = _run(monkeypatch, False, q, k, v, g, s0, **kw)
    names = ["o", "S", "dq", "dk", "dv"] + (["dg"] if g is not None else []) + (["ds0"] if state else [])
    for name, a, b in zip(names, fast, ref):
        assert_close(a, b, dtype, name, grad=name.startswith("d"))


def test_disabled_by_env_falls_back_and_says_so(monkeypatch):
    q = torch.randn(1, 100, 2, 16)
    monkeypatch.setenv("ATTNKIT_NATIVE", "0")
    assert not _native.available()
    assert _native.status() == "disabled by ATTNKIT_NATIVE=0"
    assert "torch ops, native kernel disabled by ATTNKIT_NATIVE=0" in ak.explain("linear_attention", q, q, q)
    ref = ak.linear_attention(q.double(), q.double(), q.double(), backend="reference")
    assert_close(ak.linear_attention(q, q, q), ref, torch.float32, "o")


def test_failed_build_falls_back_and_says_so(monkeypatch):
    """A machine whose build failed gets the torch-ops forward, and explain names the failure."""
    monkeypatch.delenv("ATTNKIT_NATIVE", raising=False)
    monkeypatch.setitem(_native._state, "ops", None)
    monkeypatch.setitem(_native._state, "error", "build failed: RuntimeError: no compiler")
    q = torch.randn(1, 100, 2, 16)
    assert not _native.available()
    assert "torch ops, native kernel build failed: RuntimeError: no compiler" in ak.explain("linear_attention", q, q, q)
    ref = ak.linear_attention(q.double(), q.double(), q.double(), backend="reference")
    assert_close(ak.linear_attention(q, q, q), ref, torch.float32, "o")


def test_explain_names_the_compiled_kernel(monkeypatch):
    requires_native_kernel()
    q = torch.randn(1, 100, 2, 16)
    assert "forward: compiled CPU kernel (attnkit.kernels.native: loaded)" in ak.explain("linear_attention", q, q, q)
    # half inputs run the kernel too (upcast to fp32 as a whole); a strided feature dim takes torch ops
    assert "compiled CPU kernel" in ak.explain("linear_attention", q.bfloat16(), q.bfloat16(), q.bfloat16())
    q_nc = torch.randn(1, 100, 16, 2).transpose(2, 3)  # (1, 100, 2, 16), feature stride 2
    assert "torch ops, feature dim not contiguous" in ak.explain("linear_attention", q_nc, q_nc, q_nc)


def test_ops_pass_torch_library_checks():
    """Schema and the fake (shape-only) twins that torch.compile traces with agree with the C++ ops."""
    requires_native_kernel()
    ops = _native.ops()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 70, 4, 8, generator=gen)
    k, v = torch.randn(2, 70, 2, 8, generator=gen), torch.randn(2, 70, 2, 6, generator=gen)
    g, s0, e = -torch.rand(4, generator=gen), torch.randn(2, 4, 8, 6, generator=gen), torch.empty(0)
    o, S, bounds = ops.linear_chunk_fwd(q, k, v, g, s0, 0.3, 16, 32)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.linear_chunk_fwd, (q, k, v, g, s0, 0.3, 16, 32), test_utils=checks)
    torch.library.opcheck(ops.linear_chunk_bwd, (q, k, v, g, torch.randn_like(o), bounds, S, 0.3, 16, 32, True),
                          test_utils=checks)
    torch.library.opcheck(ops.linear_chunk_bwd, (q, k, v, e, torch.randn_like(o), bounds, e, 0.3, 16, 32, False),
                          test_utils=checks)


def test_unwritable_build_root_falls_back_to_the_temp_dir(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as ext

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(ext, "get_default_build_root", lambda: str(blocker / "torch_extensions"))
    _native._writable_build_root()
    assert os.environ["TORCH_EXTENSIONS_DIR"].startswith(tempfile.gettempdir())
