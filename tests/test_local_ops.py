"""Local ops (HaloNet, MaxViT block / grid, CCNet criss-cross) and the dense / agent variants (RCMHA,
LSSA, GAAM, agent attention) as dispatchable ops: explain lists every path with a reason, and every
forced path agrees with ``backend="reference"`` (the naive twin) on the output and every gradient."""

import pytest
import torch

from attnkit.ops.base import explain
from attnkit.ops.dense.gaussian import gaussian_adaptive
from attnkit.ops.dense.relative import relative_position_attention
from attnkit.ops.dense.softplus import softplus_attention
from attnkit.ops.linear.agent import agent_attention
from attnkit.ops.local import block_attention, criss_cross_attention, grid_attention, halo_attention
from attnkit.ops.local.multi_axis import relative_bias
from tolerances import compare_fn

DTYPES = [torch.float64, torch.float32]


def _r(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _img(B=1, Y=4, X=4, H=2, D=4):
    return {"q": _r(B, Y, X, H, D), "k": _r(B, Y, X, H, D, seed=1), "v": _r(B, Y, X, H, D, seed=2)}


def _seq(B=1, N=12, H=2, D=4, Hkv=None):
    return {"q": _r(B, N, H, D), "k": _r(B, N, Hkv or H, D, seed=1), "v": _r(B, N, Hkv or H, D, seed=2)}


# name -> (fast backend, op(inputs..., backend), float64 inputs, explain args (positional tensors, kwargs))
def _cases():
    halo_rel = dict(rel_h=_r(5, 4, seed=3), rel_w=_r(5, 4, seed=4))
    bias = relative_bias(_r(9, 2, seed=5), 2)  # (H, 4, 4)
    u, rk, rb = _r(2, 4, seed=3), _r(32, 2, 4, seed=4, scale=0.3), _r(32, 2, seed=5)
    gaam = {"x": _r(2, 6, 8), "offsets": _r(2, 2, seed=1, scale=0.2), "widths": 1.0 + _r(2, 2, seed=2).abs(),
            "mix": _r(2, 2, seed=3)}
    agent = {**_seq(N=10), "a": _r(1, 3, 2, 4, seed=3), "b1": _r(2, 3, 10, seed=4, scale=0.3),
             "b2": _r(2, 10, 3, seed=5, scale=0.3)}
    return {
        "halo": ("unfold", lambda q, k, v, rel_h, rel_w, backend: halo_attention(
            q, k, v, 2, 1, rel_h=rel_h, rel_w=rel_w, backend=backend), {**_img(), **halo_rel},
            dict(block_size=2, halo_size=1, **halo_rel)),
        "halo_zero_pad": ("unfold", lambda q, k, v, backend: halo_attention(
            q, k, v, 2, 1, mask_padding=False, backend=backend), _img(), dict(block_size=2, halo_size=1)),
        "block": ("sdpa", lambda q, k, v, bias, backend: block_attention(q, k, v, 2, bias=bias, backend=backend),
                  {**_img(), "bias": bias}, dict(block_size=2, bias=bias)),
        "grid": ("sdpa", lambda q, k, v, bias, backend: grid_attention(q, k, v, 2, bias=bias, backend=backend),
                 {**_img(), "bias": bias}, dict(grid_size=2, bias=bias)),
        "criss_cross": ("einsum", lambda q, k, v, backend: criss_cross_attention(q, k, v, backend=backend),
                        _img(Y=3, X=4), {}),
        "relative": ("dense", lambda q, k, v, u, rk, rb, backend: relative_position_attention(
            q, k, v, u, rk, rb, backend=backend), {**_seq(), "u": u, "rk": rk, "rb": rb},
            dict(u=u, rel_k=rk, rel_b=rb)),
        "relative_scale_bidir": ("dense", lambda q, k, v, u, rk, rb, backend: relative_position_attention(
            q, k, v, u, rk, rb, causal=False, scale=0.7, backend=backend), {**_seq(), "u": u, "rk": rk, "rb": rb},
            dict(u=u, rel_k=rk, rel_b=rb, causal=False, scale=0.7)),
        "lssa": ("chunked", lambda q, k, v, backend: softplus_attention(q, k, v, backend=backend),
                 _seq(H=4, Hkv=2), {}),
        "lssar": ("chunked", lambda q, k, v, backend: softplus_attention(q, k, v, p=3.0, backend=backend),
                  _seq(), dict(p=3.0)),
        "gaam": ("vectorized", lambda x, offsets, widths, mix, backend: gaussian_adaptive(
            x, offsets, widths, mix, backend=backend), gaam, dict(mix_logits=gaam["mix"])),
        "gaam_features": ("vectorized", lambda x, offsets, widths, mix, backend: gaussian_adaptive(
            x, offsets, widths, axis=-1, normalize=True, backend=backend), gaam, dict(axis=-1, normalize=True)),
        "agent": ("two_pass", lambda q, k, v, a, b1, b2, backend: agent_attention(
            q, k, v, a, bias1=b1, bias2=b2, backend=backend), agent,
            dict(agents=agent["a"], bias1=agent["b1"], bias2=agent["b2"])),
        "agent_unbiased": ("two_pass", lambda q, k, v, a, b1, b2, backend: agent_attention(
            q, k, v, a, backend=backend), agent, dict(agents=agent["a"])),
    }


CASES = _cases()
OP = {"halo": "halo_attention", "halo_zero_pad": "halo_attention", "block": "block_attention",
      "grid": "grid_attention", "criss_cross": "criss_cross_attention", "relative": "relative_position_attention",
      "relative_scale_bidir": "relative_position_attention", "lssa": "softplus_attention",
      "lssar": "softplus_attention", "gaam": "gaussian_adaptive", "gaam_features": "gaussian_adaptive",
      "agent": "agent_attention", "agent_unbiased": "agent_attention"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_fast_path_matches_reference(name, dtype):
    fast, op, ins, _ = CASES[name]
    compare_fn(lambda **t: op(**t, backend=fast), lambda **t: op(**t, backend="reference"), ins, dtype)
    compare_fn(lambda **t: op(**t, backend=None), lambda **t: op(**t, backend="reference"), ins, dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_explain_lists_every_path_with_a_reason(name):
    fast, _, ins, kw = CASES[name]
    tensors = [t for t in ins.values()][:3]
    for forced, chosen in ((None, fast), ("reference", "reference")):
        text = explain(OP[name], *tensors, backend=forced, **kw)
        lines = text.splitlines()
        (f,) = [ln for ln in lines if ln[5:].startswith(f"{fast} ")]
        (r,) = [ln for ln in lines if ln[5:].startswith("reference ")]
        assert "can run (the fast path)" in f, text
        assert "can run, not chosen automatically: naive" in r, text  # the reason names the naive twin
        assert f"chosen: {chosen}" in text
        assert next(ln for ln in lines if ln.startswith("  -> "))[5:].startswith(chosen)


def test_explain_shows_the_internal_switches():
    q = _r(1, 4, 4, 2, 4).half()
    assert "fp32 scores for half inputs" in explain("criss_cross_attention", q, q, q)
    assert "fp32 scores for half inputs" in explain("halo_attention", q, q, q, block_size=2, halo_size=1)
    a = _seq(N=10)
    text = explain("agent_attention", *a.values(), agents=a["q"][:, :3], bias1=torch.zeros(2, 3, 10))
    assert "agents <- keys: SDPA with an additive float bias; queries <- agents: ak.attention" in text
    assert "query chunk(s)" in explain("softplus_attention", *a.values())


def test_int_args_and_shapes_are_checked():
    x = _img()
    with pytest.raises(TypeError, match="block_size"):
        halo_attention(*x.values(), 2.0, 1)
    with pytest.raises(ValueError, match="halo_size"):
        halo_attention(*x.values(), 2, -1)
    with pytest.raises(ValueError, match="grid_size"):
        grid_attention(*x.values(), 0)
    with pytest.raises(ValueError, match="bias"):
        block_attention(*x.values(), 2, bias=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="unknown backend"):
        criss_cross_attention(*x.values(), backend="sdpa")
    s = _seq()
    with pytest.raises(ValueError, match="relative range"):
        relative_position_attention(*s.values(), torch.zeros(2, 4), torch.zeros(8, 2, 4), torch.zeros(8, 2))
    with pytest.raises(ValueError, match="agents"):
        agent_attention(*s.values(), torch.zeros(1, 3, 2, 5))
