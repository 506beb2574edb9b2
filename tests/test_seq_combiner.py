"""Combiner-Fixed (arXiv 2107.05768): the op against its naive twin and the paper's identities."""

from __future__ import annotations

import pytest
import torch

from attnkit.mechanisms.seq_combiner import CombinerAttention
from attnkit.ops.sequence.combiner import combiner_attention, combiner_density
from attnkit.reference.naive_dense import naive_masked_attention
from attnkit.reference.naive_sequence2 import naive_combiner
from tolerances import assert_close, compare_fn


def _qkv(B=2, N=10, H=2, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, N, H, D, generator=g, dtype=torch.float64) for n in "qkv"}


@pytest.mark.parametrize("N,s", [(12, 4), (10, 4), (9, 3), (5, 8)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_matches_naive(N, s, causal, dtype):
    kw = dict(segment=s, causal=causal)
    compare_fn(lambda **a: combiner_attention(**a, **kw), lambda **a: naive_combiner(**a, **kw),
               _qkv(N=N), dtype)


@pytest.mark.parametrize("N,s", [(12, 4), (64, 8), (40, 1), (6, 6), (5, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_merged_backend_matches_naive(N, s, causal):
    # the fused inference path (direct part + summary part merged by log-sum-exp, causal summaries in chunks)
    t = {n: x.float() for n, x in _qkv(B=2, N=N, H=3, D=8, seed=1).items()}
    with torch.no_grad():
        out = combiner_attention(t["q"], t["k"], t["v"], segment=s, causal=causal, backend="merged")
        auto = combiner_attention(t["q"], t["k"], t["v"], segment=s, causal=causal)
    ref = naive_combiner(*(x.double() for x in t.values()), segment=s, causal=causal)
    assert_close(out, ref.float(), torch.float32, "merged")
    assert torch.equal(auto, out)  # inference picks it


def test_merged_backend_declines_what_it_cannot_do():
    from attnkit.ops.base import explain

    t = {n: x.float() for n, x in _qkv(N=10).items()}
    q = t["q"].clone().requires_grad_()
    assert explain("combiner_attention", q, t["k"], t["v"], segment=4).splitlines()[-1].endswith("segmented")
    with torch.no_grad():  # a ragged last segment
        assert "multiple of the segment" in explain("combiner_attention", *(t[n] for n in "qkv"), segment=4)
    with pytest.raises(ValueError, match="merged"):
        combiner_attention(q, t["k"], t["v"], segment=4, backend="merged")


def _full(q, k, v, causal):
    N = q.shape[1]
    allowed = torch.ones(N, N, dtype=torch.bool).tril() if causal else torch.ones(N, N, dtype=torch.bool)
    return naive_masked_attention(q, k, v, allowed)[0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [1, 11])
def test_one_span_or_one_token_segments_equal_full_attention(causal, s):
    t = _qkv(N=11)
    for backend in ("merged", "segmented", "reference"):
        if backend == "merged":  # float32 inference only
            with torch.no_grad():
                out = combiner_attention(*(t[n].float() for n in "qkv"), segment=s, causal=causal, backend=backend)
            assert_close(out, _full(t["q"], t["k"], t["v"], causal).float(), torch.float32, f"merged s={s}")
            continue
        out = combiner_attention(t["q"], t["k"], t["v"], segment=s, causal=causal, backend=backend)
        assert_close(out, _full(t["q"], t["k"], t["v"], causal), torch.float64, f"{backend} s={s}")


def test_segments_change_the_output_and_the_first_segment_is_exact():
    t = _qkv(N=12)
    out = combiner_attention(t["q"], t["k"], t["v"], segment=4, causal=True)
    full = _full(t["q"], t["k"], t["v"], True)
    assert_close(out[:, :4], full[:, :4], torch.float64, "first segment")
    assert (out[:, 4:] - full[:, 4:]).abs().max() > 1e-3  # summaries approximate the far span


def test_causal_output_ignores_the_future():
    t = _qkv(N=12)
    out = combiner_attention(t["q"], t["k"], t["v"], segment=4, causal=True)
    for name in "kv":
        t2 = dict(t)
        t2[name] = t[name].clone()
        t2[name][:, 7:] += 10
        out2 = combiner_attention(t2["q"], t2["k"], t2["v"], segment=4, causal=True)
        assert torch.equal(out[:, :7], out2[:, :7])


def test_every_key_gets_weight_through_summaries():
    # the gradient of one query's output reaches every key's value (full receptive field in one layer)
    t = _qkv(N=16)
    v = t["v"].clone().requires_grad_()
    combiner_attention(t["q"], t["k"], v, segment=4)[:, 0].sum().backward()
    assert (v.grad.abs().sum((0, 2, 3)) > 0).all()


def test_density_and_module():
    assert combiner_density(16384, 128) == pytest.approx((128 + 127 + 1) / 16384)
    m = CombinerAttention(16, 2, segment=4).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    assert m(x).shape == (1, 9, 16)
    with pytest.raises(ValueError, match="CombinerAttention"):
        CombinerAttention(16, 3)
    with pytest.raises(ValueError, match="combiner_attention: segment"):
        combiner_attention(x.view(1, 9, 2, 8), x.view(1, 9, 2, 8), x.view(1, 9, 2, 8), segment=0)


def test_check_finite_raises_on_the_merged_path():
    from attnkit._validate import check_finite

    t = {n: x.float() for n, x in _qkv(N=12).items()}
    t["k"][0, 3, 0, 1] = float("nan")
    with torch.no_grad(), check_finite(True), pytest.raises(ValueError, match="combiner_attention"):
        combiner_attention(t["q"], t["k"], t["v"], segment=4, backend="merged")
    with torch.no_grad():  # without the switch NaN propagates to the queries that depend on key 3
        out = combiner_attention(t["q"], t["k"], t["v"], segment=4, backend="merged")
    ref = naive_combiner(*(x.double() for x in t.values()), segment=4)
    assert torch.equal(out.isnan(), ref.isnan())
