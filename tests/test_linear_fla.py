"""Optional: the chunk backend against flash-linear-attention's pure-PyTorch naive references.

fla's ``naive.py`` files import only torch and einops, so they are loaded by file path (the package's
Triton kernels are never imported). Skipped by ``skip_if_no_fla()`` when fla-core or einops is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import attnkit as ak
from tolerances import assert_close


def _fla_dir() -> Path | None:
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("einops") is None:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def skip_if_no_fla():
    """Skip the calling test unless fla-core (and einops, which its naive files import) is installed."""
    if _fla_dir() is None:
        pytest.skip("fla-core / einops not installed (pip install --no-deps fla-core einops)")


def load_fla_naive(op: str):
    """Load ``fla/ops/<op>/naive.py`` by file path, without importing the fla package."""
    path = _fla_dir() / "ops" / op / "naive.py"
    spec = importlib.util.spec_from_file_location(f"_fla_naive_{op}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _qkv(N, H=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, N, H, D, generator=g) for _ in range(3)]


@pytest.mark.parametrize("N", [64, 100])
@pytest.mark.parametrize("per_token", [False, True])
def test_chunk_vs_fla_simple_gla(N, per_token):
    skip_if_no_fla()
    naive = load_fla_naive("simple_gla")
    q, k, v = _qkv(N)
    gen = torch.Generator().manual_seed(1)
    g = (-torch.rand(2, N, 4, generator=gen) * 0.3) if per_token else (-torch.tensor([0.9, 0.3, 0.05, 0.001])
                                                                       ).expand(2, N, 4).contiguous()
    S0 = torch.randn(2, 4, 16, 16, generator=gen)
    decay = g.exp() if per_token else g[0, 0].exp()
    o, S = ak.linear_attention(q, k, v, decay=decay, initial_state=S0, return_state=True, backend="chunk")
    fo, fS = naive.naive_chunk_simple_gla(q, k, v, g, initial_state=S0.clone(), output_final_state=True)
    ro, rS = naive.naive_recurrent_simple_gla(q, k, v, g, initial_state=S0.clone())
    assert_close(o, fo, torch.float32, "o vs fla chunk", factor=4)
    assert_close(S, fS, torch.float32, "S vs fla chunk", factor=4)
    assert_close(o, ro, torch.float32, "o vs fla recurrent", factor=4)
    assert_close(S, rS, torch.float32, "S vs fla recurrent", factor=4)


@pytest.mark.parametrize("normalize", [False, True])
def test_chunk_vs_fla_linear_attn(normalize):
    skip_if_no_fla()
    naive = load_fla_naive("linear_attn")
    q, k, v = (t.abs() for t in _qkv(128))  # positive features so the normaliser is well conditioned
    o = ak.linear_attention(q, k, v, normalize=normalize, eps=1e-10, backend="chunk")
    fo = naive.naive_chunk_linear_attn(q, k, v, normalize=normalize)
    ro, _ = naive.naive_recurrent_linear_attn(q, k, v, normalize=normalize)
    assert_close(o, fo, torch.float32, "o vs fla chunk", factor=4)
    assert_close(o, ro, torch.float32, "o vs fla recurrent", factor=4)
