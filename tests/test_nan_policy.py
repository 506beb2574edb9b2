"""The NaN policy (docs/design.md): non-finite inputs reach exactly the outputs that depend on them.

NP1 the debug switch (``check_finite`` / ``ATTNKIT_CHECK_FINITE``) raises naming op, argument and index;
off by default (no raise). NP2 neighborhood attention: one NaN in q, k or v makes exactly the
queries whose window holds it NaN (1-D/2-D/3-D, causal and not, every backend). NP3 ``ak.attention``'s
reference backend under masks. NP4 ring attention: same NaN positions as one process. NP5 half
inputs around 1e4: gaussian_adaptive and linear attention stay finite and close to float32.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import attnkit as ak
import attnkit.masks as M
from attnkit._validate import check_finite, checking_finite
from attnkit.kernels.nonfinite import causal_correction, masked_correction
from attnkit.ops.linear.call import linear_attention
from attnkit.ops.neighborhood.call import neighborhood_attention
from attnkit.reference.naive_neighborhood import naive_neighborhood_mask

NAN = float("nan")


# ---- NP1: the switch ------------------------------------------------------------------------------

def test_default_lets_nan_through_without_raising():
    assert not checking_finite()
    q = torch.randn(1, 8, 2, 4)
    k = q.clone()
    k[0, 3, 1, 2] = NAN
    out = ak.attention(q, k, q)
    assert out[:, :, 1].isnan().all() and not out[:, :, 0].isnan().any()  # head 1 sees key 3, head 0 does not


@pytest.mark.parametrize("op,call", [
    ("attention", lambda q, k, v: ak.attention(q, k, v)),
    ("neighborhood_attention", lambda q, k, v: neighborhood_attention(q, k, v, 3)),
    ("linear_attention", lambda q, k, v: linear_attention(q, k, v)),
])
def test_switch_raises_naming_op_argument_and_index(op, call):
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    k[0, 3, 1, 2] = float("inf")
    with check_finite(True):
        assert checking_finite()
        with pytest.raises(ValueError, match=rf"{op}: k contains NaN or infinity at \(0, 3, 1, 2\)"):
            call(q, k, v)
    assert not checking_finite()  # the context restores the previous state
    call(q, k, v)  # and off again: no raise


def test_switch_as_function_and_bad_argument():
    try:
        check_finite(True)
        with pytest.raises(ValueError, match="attention: v contains"):
            ak.attention(torch.randn(1, 4, 1, 2), torch.randn(1, 4, 1, 2), torch.full((1, 4, 1, 2), NAN))
    finally:
        check_finite(False)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        check_finite("yes")


def test_env_var_turns_the_check_on():
    code = ("import torch, attnkit as ak\n"
            "try:\n    ak.attention(*(torch.full((1, 4, 1, 2), float('nan')),) * 3)\n"
            "except ValueError as e:\n    print('RAISED', e)\n")
    env = dict(os.environ, ATTNKIT_CHECK_FINITE="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "RAISED attention: q contains NaN or infinity at (0, 0, 0, 0)" in res.stdout, res.stderr


# ---- NP2: neighborhood attention -------------------------------------------------------------------

NA_CASES = [((64,), 5, False), ((64,), 5, True), ((32, 32), 3, False), ((16, 16), (3, 5), (True, False)),
            ((6, 8, 8), 3, False), ((6, 8, 8), 3, True)]


@pytest.mark.parametrize("backend", ["tiled", "window", "reference"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("shape,kernel,causal", NA_CASES, ids=lambda x: str(x).replace(" ", ""))
def test_neighborhood_nan_reaches_exactly_its_window(shape, kernel, causal, which, backend):
    rank = len(shape)

    def tup(x):
        return x if isinstance(x, tuple) else (x,) * rank
    mask = naive_neighborhood_mask(shape, tup(kernel), (1,) * rank, (1,) * rank, tup(causal))  # (N, N)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, *shape, 2, 8, generator=g) for _ in range(3))
    pos = 17
    {"q": q, "k": k, "v": v}[which].view(1, -1, 2, 8)[0, pos, 1, 3] = NAN
    expected = mask[:, pos] if which != "q" else torch.arange(mask.shape[0]) == pos  # (N,) queries seeing it
    out = neighborhood_attention(q, k, v, kernel, is_causal=causal, backend=backend).reshape(-1, 2, 8)
    assert torch.equal(out[:, 1].isnan().any(-1), expected)
    assert not out[:, 0].isnan().any()  # the other head never sees it


def test_neighborhood_2d_issue_repro_nine_queries():
    q, k, v = (torch.randn(1, 32, 32, 2, 16) for _ in range(3))
    for t in (k, v):
        t2 = t.clone()
        t2[0, 10, 10, 0, 0] = NAN
        args = (q, t2, v) if t is k else (q, k, t2)
        out = neighborhood_attention(*args, 3)
        assert int(out.isnan().any(-1).any(-1).sum()) == 9


def test_neighborhood_inf_in_v_stays_inf():
    q, k, v = (torch.randn(1, 32, 2, 4) for _ in range(3))
    v[0, 10, 0, 1] = float("inf")
    for backend in ("tiled", "window", "reference"):
        out = neighborhood_attention(q, k, v, 5, backend=backend)
        assert torch.isposinf(out[0, 8:13, 0, 1]).all() and torch.isfinite(out[0, :8]).all(), backend
        assert torch.isfinite(out[0, 13:]).all() and torch.isfinite(out[0, :, 0, [0, 2, 3]]).all()


# ---- NP3: ak.attention's reference backend ---------------------------------------------------------

MASKS = {"causal": M.causal(), "window": M.causal() & M.sliding_window(8), "none": None}


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_attention_reference_nan_exact(which, mask):
    n = 64
    q, k, v = (torch.randn(1, n, 4, 8) for _ in range(3))
    if which != "q":  # GQA 4:2 for k/v
        k, v = k[:, :, :2].contiguous(), v[:, :, :2].contiguous()
    {"q": q, "k": k, "v": v}[which][0, 20, 1, 3] = NAN
    m = MASKS[mask]
    allowed = torch.ones(n, n, dtype=torch.bool) if m is None else m.to_dense(n, n).reshape(n, n)
    out = ak.attention(q, k, v, mask=m, backend="reference")
    heads = [1] if which == "q" else [2, 3]  # kv head 1 serves query heads 2, 3
    expected = torch.zeros(n, 4, dtype=torch.bool)
    for h in heads:
        expected[:, h] = (torch.arange(n) == 20) if which == "q" else allowed[:, 20]
    assert torch.equal(out.isnan().any(-1)[0], expected)


def test_masked_correction_fully_masked_row_stays_zero():
    allowed = torch.tensor([[True, True], [False, True], [False, False]])
    v = torch.tensor([[1.0, NAN], [float("inf"), float("-inf")]])
    fix = masked_correction(allowed, v)
    assert fix[0, 0] == float("inf") and fix[0, 1].isnan()
    assert fix[1, 0] == float("inf") and fix[1, 1] == float("-inf") and torch.equal(fix[2], torch.zeros(2))
    c = causal_correction(torch.tensor([[1.0], [float("-inf")], [NAN]]))
    assert c[0, 0] == 0 and c[1, 0] == float("-inf") and c[2, 0].isnan()


# ---- NP4: ring attention ---------------------------------------------------------------------------

def _ring_one_process(q, k, v, causal):
    import torch.distributed as dist

    from attnkit.distributed.ring import ring_attention
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/rendezvous", rank=0, world_size=1)
        try:
            return ring_attention(q, k, v, causal=causal)
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("dv", [16, 8], ids=["fused", "matmul"])
def test_ring_nan_positions_match_attention(dv):
    g = torch.Generator().manual_seed(1)
    cases = []
    for causal in (False, True):
        for which, pos in (("q", 3), ("k", 0), ("k", 5), ("v", 5), ("v", 0)):
            q, k = (torch.randn(1, 64, 2, 16, generator=g) for _ in range(2))
            v = torch.randn(1, 64, 2, dv, generator=g)
            {"q": q, "k": k, "v": v}[which][0, pos, 1, 2 if which != "v" else 1] = NAN
            cases.append((causal, q, k, v))
    outs = [(_ring_one_process(q, k, v, c), ak.attention(q, k, v, mask=M.causal() if c else None,
                                                         backend="reference")) for c, q, k, v in cases]
    for ring, single in outs:
        assert torch.equal(ring.isnan(), single.isnan())
        fin = ~single.isnan()
        assert torch.allclose(ring[fin], single[fin], atol=1e-5)


# ---- NP5: half precision around 1e4 ----------------------------------------------------------------

def test_gaussian_adaptive_fp16_large_inputs():
    m, (x,) = ak.info("gaussian_adaptive").example(tiny=True)
    m.eval()
    x = x * 1e4
    with torch.no_grad():
        ref = m(x)
        out = copy.deepcopy(m).half()(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attention_fp16_large_inputs_out_fp32(normalize):
    q, k, v = (torch.randn(1, 40, 2, 8) * 1e4 for _ in range(3))
    fm = "elu+1" if normalize else "identity"
    ref = linear_attention(q, k, v, feature_map=fm, normalize=normalize)
    out = linear_attention(q.half(), k.half(), v.half(), feature_map=fm, normalize=normalize, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()
    with pytest.raises(TypeError, match="out_dtype"):
        linear_attention(q, k, v, out_dtype=torch.int32)


@pytest.mark.parametrize("name", ["lightning_attention", "minimax_lightning", "hybrid_attention", "l2vit_lga"])
def test_linear_modules_fp16_large_inputs(name):
    m, (x,) = ak.info(name).example(tiny=True)
    m.eval()
    x = x * 1e4
    with torch.no_grad():
        ref = m(x)
        out = copy.deepcopy(m).half()(x.half())
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 5e-2 * ref.abs().max()
