"""attnkit.analysis: rollout, flow, VL-SAM, cross-attention saliency, CARVE, head metrics, sinks, WAAD/FAI,
FuseMax pass counts, against naive twins and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.analysis import diagnostics as dg
from attnkit.analysis import explain_maps as ex
from attnkit.reference import naive_analysis as na


def _maps(layers=3, b=2, h=3, n=5, seed=0, causal=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        s = torch.randn(b, h, n, n, generator=g, dtype=torch.float64) * 2
        if causal:
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out.append(s.softmax(-1))
    return out


def test_rollout_matches_naive_and_rows_sum_to_one():
    maps = _maps()
    r = ex.rollout(maps)
    torch.testing.assert_close(r, na.naive_rollout(maps), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    torch.testing.assert_close(ex.rollout(maps, add_residual=False), na.naive_rollout(maps, add_residual=False))


def test_rollout_identities():
    eye = torch.eye(6, dtype=torch.float64).expand(1, 4, 6, 6)
    torch.testing.assert_close(ex.rollout([eye] * 5), torch.eye(6, dtype=torch.float64)[None])
    one = _maps(layers=1)
    torch.testing.assert_close(ex.rollout(one), 0.5 * one[0].mean(1) + 0.5 * torch.eye(5, dtype=torch.float64))
    assert ex.rollout(one, head_fusion="max").shape == (2, 5, 5)


@pytest.mark.parametrize("layers,n", [(1, 4), (2, 4), (3, 5)])
def test_flow_exact_solver_matches_networkx_and_naive(layers, n):
    maps = _maps(layers=layers, b=1, n=n, seed=layers)
    mine = ex.flow(maps)
    torch.testing.assert_close(mine, ex.flow(maps, solver="networkx"), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mine, na.naive_flow(maps), rtol=1e-9, atol=1e-9)
    assert (mine >= -1e-12).all() and (mine <= 1 + 1e-12).all()
    if layers == 1:   # one layer: flow(i, j) is the edge capacity itself
        torch.testing.assert_close(mine, 0.5 * maps[0].mean(1) + 0.5 * torch.eye(n, dtype=torch.float64))


def test_flow_refuses_large_inputs_and_bad_solver():
    with pytest.raises(ValueError, match="max_tokens"):
        ex.flow(_maps(layers=1, n=70, b=1))
    with pytest.raises(ValueError, match="solver"):
        ex.flow(_maps(layers=1), solver="nope")
    with pytest.raises(ValueError, match=r"maps\[1\]"):
        ex.rollout([_maps(n=4)[0], _maps(n=5)[0]])


def test_vlsam_head_weights_flow_and_row_propagation():
    maps = _maps(layers=3, causal=True, seed=3)
    a = maps[0]
    w = ex.vlsam_head_weights(a)
    torch.testing.assert_close(w, torch.stack([torch.stack([a[b, h].max(-1).values.mean() for h in range(3)])
                                               for b in range(2)]))
    f = ex.vlsam_flow(maps)
    # the efficient form: propagate one row down the layers
    n = 5
    rho = torch.arange(1, n + 1, dtype=torch.float64) / n
    s = [(ex.vlsam_head_weights(m)[:, :, None, None] * m).mean(1) * rho for m in maps]
    row = s[-1][:, n - 1]
    for m in reversed(s[:-1]):
        row = torch.einsum("bn,bnm->bm", row, m)
    torch.testing.assert_close(f[:, n - 1], row)
    # identical heads: the weighting only scales; without regularization one layer gives S'
    same = maps[0][:, :1].expand(-1, 3, -1, -1)
    one = ex.vlsam_flow([same], regularize=False)
    torch.testing.assert_close(one, ex.vlsam_head_weights(same)[:, :1, None] * same[:, 0])


def test_cross_attention_saliency_and_pearson():
    maps = [torch.rand(2, 4, 3, 7, dtype=torch.float64) for _ in range(3)]
    torch.testing.assert_close(ex.cross_attention_saliency(maps, layers=[1], heads=[2]), maps[1][:, 2])
    torch.testing.assert_close(ex.cross_attention_saliency(maps), torch.stack(maps).mean((0, 2)))
    x = torch.rand(2, 3, 7)
    torch.testing.assert_close(ex.rowwise_pearson(x, x), torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(ex.rowwise_pearson(x, -2 * x + 1), -torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        ex.cross_attention_saliency(maps, layers=[5])
    with pytest.raises(ValueError, match="head 9 does not exist"):
        ex.cross_attention_saliency(maps, heads=[9])


def test_carve_contrast():
    g = torch.rand(2, 10) + 0.1
    c = ex.carve_contrast(g, g, eps=0.0)
    torch.testing.assert_close(c, torch.zeros_like(c))                          # equal attention: no signal
    torch.testing.assert_close(ex.carve_contrast(g, g, eps=0.0, normalize=False), torch.ones_like(c))
    q = torch.rand(2, 10)
    torch.testing.assert_close(ex.carve_contrast(q, g), ex.carve_contrast(3 * q, g))  # scale invariant
    c = ex.carve_contrast(q, g)
    assert c.min() == 0 and c.max() == 1


def test_entropy_and_sinks_uniform_closed_forms():
    n = 8
    u = torch.full((2, 3, n, n), 1.0 / n, dtype=torch.float64)
    torch.testing.assert_close(dg.attention_entropy(u), torch.full((2, 3, n), math.log(n), dtype=torch.float64))
    torch.testing.assert_close(dg.sink_scores(u), torch.full((2, 3, n), 1.0 / n, dtype=torch.float64))
    torch.testing.assert_close(dg.sink_share(u, [0, 7]), torch.full((2, 3), 2.0 / n, dtype=torch.float64))
    one_hot = torch.eye(n, dtype=torch.float64).expand(1, 1, n, n)
    torch.testing.assert_close(dg.attention_entropy(one_hot), torch.zeros(1, 1, n, dtype=torch.float64))
    a = _maps(layers=1)[0]
    torch.testing.assert_close(dg.attention_entropy(a), na.naive_entropy(a))


def test_head_metrics_match_naive_and_closed_forms():
    grid, pre = (3, 4), 1
    n = pre + 12
    a = torch.rand(2, 3, n, n, dtype=torch.float64).softmax(-1)
    torch.testing.assert_close(dg.mean_attention_distance(a, grid, 16, pre),
                               na.naive_mean_attention_distance(a, grid, 16, pre))
    prof, rings = dg.attention_strength(a, grid, pre)
    torch.testing.assert_close(prof, na.naive_attention_strength(a, grid, pre))
    assert rings.shape == (3, 4)
    # uniform over the patches: every offset gets 1/G; the mean distance is the grid's mean pair distance
    g = 12
    u = torch.full((1, 2, g, g), 1.0 / g, dtype=torch.float64)
    prof, rings = dg.attention_strength(u, grid)
    torch.testing.assert_close(prof, torch.full_like(prof, 1.0 / g))
    pos = [(i // 4, i % 4) for i in range(g)]
    mean_pair = sum(math.dist(p, q) for p in pos for q in pos) / g ** 2
    torch.testing.assert_close(dg.mean_attention_distance(u, grid), torch.full((1, 2), mean_pair, dtype=torch.float64))
    # identity attention: ring 0 gets everything, distance 0
    eye = torch.eye(g, dtype=torch.float64).expand(1, 2, g, g)
    prof, rings = dg.attention_strength(eye, grid)
    torch.testing.assert_close(rings[:, 0], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(dg.mean_attention_distance(eye, grid), torch.zeros(1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_prefix"):
        dg.mean_attention_distance(a, (4, 4))


def test_head_importance_ablation_and_gradient():
    w = torch.tensor([[1.0, 2.0], [0.5, -3.0]], dtype=torch.float64)

    def evaluate(gates):   # a metric linear in the gates plus an interaction
        return (w * gates).sum() + gates[0, 0] * gates[1, 1]
    abl = dg.head_importance(evaluate, 2, 2)
    torch.testing.assert_close(abl, torch.tensor([[2.0, 2.0], [0.5, -2.0]], dtype=torch.float64))
    grad = dg.head_importance(evaluate, 2, 2, method="gradient")
    torch.testing.assert_close(grad, torch.tensor([[2.0, 2.0], [0.5, 2.0]], dtype=torch.float64))


def test_waad_fai_match_naive_and_identities():
    a = _maps(layers=1, causal=True, n=7)[0]
    torch.testing.assert_close(dg.waad(a, 3), na.naive_waad(a, 3))
    torch.testing.assert_close(dg.fai(a), na.naive_fai(a), equal_nan=True)
    eye = torch.eye(5, dtype=torch.float64).expand(1, 1, 5, 5)
    torch.testing.assert_close(dg.waad(eye), torch.zeros(1, 1, 5, dtype=torch.float64))
    n = 6   # uniform causal: A[t, s] = 1 / (t + 1); FAI_s = mean_{t > s} 1 / (t + 1)
    u = torch.ones(n, n, dtype=torch.float64).tril()
    u = (u / u.sum(-1, keepdim=True)).expand(1, 1, n, n)
    want = [sum(1 / (t + 1) for t in range(s + 1, n)) / (n - s - 1) for s in range(n - 1)]
    f = dg.fai(u)[0, 0]
    torch.testing.assert_close(f[:-1], torch.tensor(want, dtype=torch.float64))
    assert torch.isnan(f[-1])
    out = dg.preplan_anchor_tokens(_maps(layers=1, b=1, h=4, n=12, causal=True)[0], top_anchors=3)
    assert out["anchors"].numel() == 3 and (out["anchors"].diff() > 0).all()


def test_var_matches_naive_and_identities():
    a = _maps(layers=1, b=1, h=4, n=8, seed=5)[0]
    sink = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    image = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    out = dg.var_redistribute(a, sink, image, p=0.6, min_image_share=0.2)
    torch.testing.assert_close(out, na.naive_var(a, sink, image, 0.6))
    torch.testing.assert_close(out.sum(-1), a.sum(-1))
    assert not torch.equal(out, a)
    torch.testing.assert_close(dg.var_redistribute(a, sink, image, p=1.0), a)                # p = 1: identity
    torch.testing.assert_close(out[..., [1, 7]], a[..., [1, 7]])                   # non-sink text untouched
    no_sink = torch.zeros(8, dtype=torch.bool)
    torch.testing.assert_close(dg.var_redistribute(a, no_sink, image), a)


def test_massive_activation_sinks():
    h = torch.randn(1, 6, 32)
    h[0, 0, 5] = 500.0
    h[0, 3, 9] = -800.0
    assert dg.find_sink_dims(h, token=0, top=1) == [5]
    sinks = dg.massive_activation_sinks(h, [5, 9], tau=4.0)
    assert sinks[0].tolist() == [True, False, False, True, False, False]
    with pytest.raises(ValueError, match="dims"):
        dg.massive_activation_sinks(h, [40])


def test_fusemax_pass_counts():
    assert dg.fusemax_passes(dg.CASCADE_3PASS) == 3
    assert dg.fusemax_passes(dg.CASCADE_2PASS) == 2
    assert dg.fusemax_passes(dg.CASCADE_1PASS, rank=("m1", "m0")) == 1
    assert dg.fusemax_passes(["C[p] = A[p] * B[p]"]) == 0


def test_fusemax_cascades_compute_attention():
    """The three cascades written literally agree with softmax attention (the 1-pass one tiled, M0 not dividing M)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (3, 10, 10))
    ref = (q @ k.T).softmax(-1) @ v                                                  # (P, F)
    qk = q @ k.T
    sn = (qk - qk.amax(-1, keepdim=True)).exp()
    torch.testing.assert_close(sn / sn.sum(-1, keepdim=True) @ v, ref)              # 3-pass
    torch.testing.assert_close((sn @ v) / sn.sum(-1, keepdim=True), ref)            # 2-pass
    rm = torch.full((3, 1), float("-inf"), dtype=torch.float64)
    rd = torch.zeros(3, 1, dtype=torch.float64)
    rnv = torch.zeros(3, 4, dtype=torch.float64)
    for m1 in range(0, 10, 4):                                                       # 1-pass, tiles of 4, 4, 2
        bqk = q @ k[m1:m1 + 4].T
        new = torch.maximum(rm, bqk.amax(-1, keepdim=True))
        sln = (bqk - new).exp()
        prm = (rm - new).exp()
        rd, rnv, rm = sln.sum(-1, keepdim=True) + rd * prm, sln @ v[m1:m1 + 4] + rnv * prm, new
    torch.testing.assert_close(rnv / rd, ref)
