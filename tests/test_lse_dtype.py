"""The lse contract: float32 (float64 for float64 inputs) from every backend that returns one.

Each backend of ``ak.attention`` and ``ak.neighborhood_attention`` is forced in turn; one that
cannot run the call (its ``supports`` says why) is skipped with that reason. The lse values are
also compared with the float64 reference under the tolerance of the input dtype.
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.ops.dense import call as dense_call
from attnkit.ops.neighborhood import call as na_call
from tolerances import DTYPES, assert_close

M = ak.masks


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def _dense_mask(backend: str):
    if backend == "gather":  # the gather backend takes block layouts
        lay = torch.tril(torch.ones(4, 4, dtype=torch.bool))
        return M.block_sparse(lay, 16)
    return M.causal() & M.sliding_window(20)


def _skip_unless_supported(dispatcher, name, call):
    ok, why = dispatcher.get(name).supports(call)
    if not ok:
        pytest.skip(f"{name} cannot run this call: {why}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", dense_call.DISPATCHER.names)
def test_attention_lse_dtype(backend, dtype):
    q, k, v = _inputs((1, 64, 2, 16), dtype)
    mask = _dense_mask(backend)
    _skip_unless_supported(dense_call.DISPATCHER, backend, dense_call.make_call(q, k, v, mask, return_lse=True))
    out, lse = ak.attention(q, k, v, mask, backend=backend, return_lse=True)
    assert out.dtype == dtype
    assert lse.dtype == _lse_dtype(dtype), f"{backend}: lse {lse.dtype} for {dtype} inputs"
    assert lse.shape == (1, 64, 2)
    _, ref = ak.attention(*(t.double() for t in (q, k, v)), mask, backend="reference", return_lse=True)
    assert_close(lse, ref, dtype, f"{backend} lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", na_call.DISPATCHER.names)
def test_neighborhood_lse_dtype(backend, dtype):
    q, k, v = _inputs((1, 6, 7, 2, 8), dtype)
    kw = dict(kernel_size=3, dilation=(1, 2))
    _skip_unless_supported(na_call.DISPATCHER, backend, na_call.make_call(q, k, v, return_lse=True, **kw))
    out, lse = ak.neighborhood_attention(q, k, v, backend=backend, return_lse=True, **kw)
    assert out.dtype == dtype
    assert lse.dtype == _lse_dtype(dtype), f"{backend}: lse {lse.dtype} for {dtype} inputs"
    assert lse.shape == (1, 6, 7, 2)
    _, ref = ak.neighborhood_attention(*(t.double() for t in (q, k, v)), backend="reference", return_lse=True, **kw)
    assert_close(lse, ref, dtype, f"{backend} lse")
