"""The per-head op shared by S2-Attention and MoA: explain lists every path, every forced path agrees
with ``backend="reference"`` (output and grads), and s2 / moa equal their naive element masks."""

import pytest
import torch

import attnkit.masks as M
from attnkit.ops.base import explain
from attnkit.ops.per_head import moa_attention, per_head_attention, s2_attention
from attnkit.ops.per_head.moa import moa_spans
from attnkit.reference.naive_dense import causal_dense, naive_masked_attention
from attnkit.reference.naive_per_head import naive_moa_mask, naive_s2_mask
from tolerances import compare_fn

PATHS = ("masked", "sdpa", "blocked", "flex", "gather", "reference")
FORCED = ("masked", "sdpa", "blocked", "gather")  # flex has no CPU backward; gather only where a layout exists


def _ins(B=2, N=30, Hq=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(B, N, Hq, D, generator=g, dtype=torch.float64),
            "k": torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64),
            "v": torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64)}


S2_CASES = {
    "causal": dict(causal=True),
    "bidir": dict(causal=False),
    "dense_head": dict(causal=True, num_dense_heads=1),
    "offset": dict(causal=True, head_offset=3),
    "homo": dict(causal=True, homo_head=True),
}
AL, BE = torch.tensor([5.0, 9.0, 5.0, 12.0]), torch.zeros(4)


def _s2(kw, backend):
    return lambda q, k, v: s2_attention(q, k, v, 4, 2, 4, backend=backend, **kw)


def _moa(backend, al=AL, be=BE):
    return lambda q, k, v: moa_attention(q, k, v, al, be, sink=3, block_size=4, backend=backend)


def _check_explain(text: str, chosen: str) -> None:
    """Every path has its own line with a status, and the chosen one says which path it takes inside."""
    lines = text.splitlines()
    for name in PATHS:
        (line,) = [ln for ln in lines if ln[5:].startswith(f"{name} ")]
        status = line[5:].split(None, 1)[1]
        assert status.startswith(("can run", "cannot run: ")), line
        if status.startswith("cannot run"):
            assert len(status) > len("cannot run: ") + 5, line  # a reason, not just the verdict
        if line.startswith("  ->"):
            assert name == chosen
    assert f"chosen: {chosen}" in text
    assert "path: " in text


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", FORCED)
@pytest.mark.parametrize("case", list(S2_CASES), ids=str)
def test_s2_every_path_matches_reference(case, backend, dtype):
    compare_fn(_s2(S2_CASES[case], backend), _s2(S2_CASES[case], "reference"), _ins(), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", FORCED)
@pytest.mark.parametrize("alphas", [[5.0, 5.0, 9.0, 9.0], [5.0, 9.0, 5.0, 12.0], [4.0, 4.0, 4.0, 4.0]],
                         ids=["whole_kv_groups", "split_kv_groups", "one_span"])
def test_moa_every_path_matches_reference(alphas, backend, dtype):
    al = torch.tensor(alphas)
    compare_fn(_moa(backend, al), _moa("reference", al), _ins(), dtype)


@pytest.mark.parametrize("case", list(S2_CASES), ids=str)
def test_s2_reference_is_the_naive_mask(case):
    """The reference path (naive_s2_mask, phases picked for GQA / offsets / homogeneous heads) is dkernel's rule:
    block pair allowed by (j + h sigma + o) mod v with sigma = max(1, v // Hq) (Hq = 4 query heads on 2 KV
    heads here), dense heads causal, pattern indexed by KV head."""
    kw = S2_CASES[case]
    q, k, v = _ins().values()
    causal = kw["causal"]
    if causal:
        sigma = 0 if kw.get("homo_head") else max(1, 4 // 4)
        full = naive_s2_mask(4, 30, 4, 2, 4, True)  # head h' has phase h'
        mask = full[:, [(h * sigma + kw.get("head_offset", 0)) % 4 for h in range(2)]].clone()
        if kw.get("num_dense_heads"):
            mask[:, -1] = causal_dense(30, 30)
    else:
        mask = naive_s2_mask(2, 30, 4, 2, 4, False)
    mask = mask.repeat_interleave(2, dim=1)  # (1, Hq, N, N)
    expect = naive_masked_attention(q, k, v, mask)[0]
    torch.testing.assert_close(_s2(kw, "reference")(q, k, v), expect)
    torch.testing.assert_close(_s2(kw, None)(q, k, v), expect)


def test_moa_reference_is_the_naive_mask():
    q, k, v = _ins().values()
    expect = naive_masked_attention(q, k, v, naive_moa_mask(moa_spans(AL, BE, 30), 3, 30))[0]
    for backend in ("reference", None):
        torch.testing.assert_close(_moa(backend)(q, k, v), expect)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_shared_op_gives_s2_and_moa_their_results(grad):
    """per_head_attention with the groups s2 / moa build equals them (and their naive masks), on the
    autograd path (cat + re-order) and the in-place inference path."""
    q, k, v = _ins().values()
    s2_groups = [((0, 1), M.causal()), ((2, 3), M.causal() & M.sliding_window(5, 0))]
    moa_groups = [((0, 2), M.causal() & M.sliding_window(4, 0)), ((1,), M.causal()), ((3,), None)]
    with torch.set_grad_enabled(grad):
        qq = q.clone().requires_grad_(grad)
        for groups in (s2_groups, moa_groups):
            mask = torch.ones(1, 4, 30, 30, dtype=torch.bool)
            for heads, m in groups:
                if m is not None:
                    mask[0, list(heads)] = m.to_dense(30, 30)
            expect = naive_masked_attention(q, k, v, mask)[0]
            for backend in ("masked", "blocked", "reference"):
                torch.testing.assert_close(per_head_attention(qq, k, v, groups, backend=backend).detach(), expect)


def test_explain_lists_every_path_and_the_grad_switch():
    q, k, v = _ins(B=1, N=16).values()
    kw = dict(block_size=4, local_blocks=2, vert_stride=4, num_dense_heads=1)
    text = explain("s2_attention", q, k, v, **kw)
    _check_explain(text, "masked")
    assert "written in place" in text  # no input needs a gradient
    text = explain("s2_attention", q.requires_grad_(), k, v, **kw)
    _check_explain(text, "masked")
    assert "concatenated and put back in head order" in text
    assert "flex       cannot run: " in text  # FlexAttention has no CPU backward
    text = explain("s2_attention", q, k, v, backend="gather", **kw)
    _check_explain(text, "gather")
    assert "backend='gather' was forced" in text and "autograd keeps" in text
    with torch.no_grad():
        text = explain("moa_attention", q, k, v, alphas=AL, betas=BE, sink=3, backend="blocked")
    _check_explain(text, "blocked")
    assert "K/V copied per query head" in text and "'blocked'" in text and "written in place" in text
    text = explain("per_head_attention", q, k, v, groups=[((0, 1, 2, 3), M.causal())])
    _check_explain(text, "masked")
    assert "gather     cannot run: no block layout" in text and "one group" in text


def test_legacy_impl_and_errors():
    q, k, v = _ins(B=1).values()
    ref = _s2({}, "reference")(q, k, v)
    torch.testing.assert_close(s2_attention(q, k, v, 4, 2, 4, impl="gather"), ref)
    torch.testing.assert_close(s2_attention(q, k, v, 4, 2, 4, impl="masked", backend="blocked"), ref)
    with pytest.raises(ValueError, match="impl"):
        s2_attention(q, k, v, 4, 2, 4, impl="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        s2_attention(q, k, v, 4, 2, 4, backend="nope")
    with pytest.raises(TypeError, match="block_size"):
        s2_attention(q, k, v, 4.0, 2, 4)
    with pytest.raises(ValueError, match="local_blocks"):
        s2_attention(q, k, v, 4, 0, 4)
    with pytest.raises(ValueError, match="num_dense_heads"):
        s2_attention(q, k, v, 4, 2, 4, num_dense_heads=3)
    with pytest.raises(ValueError, match="sink"):
        moa_attention(q, k, v, AL, BE, sink=-1)
    with pytest.raises(ValueError, match="split the query heads"):
        per_head_attention(q, k, v, [((0, 1), None), ((1, 2, 3), None)])
    with pytest.raises(ValueError, match="cannot run"):
        per_head_attention(q, k, v, [((0, 1, 2, 3), None)], backend="gather")
