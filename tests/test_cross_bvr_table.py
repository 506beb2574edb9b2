"""RelationNet++ (arXiv 2010.15831) §3.3: the shared location embedding (the geometry MLP evaluated once per
integer offset, then gathered) gives the per-pair geometry term, output and gradients."""

from __future__ import annotations

import pytest
import torch

from attnkit.mechanisms.cross_bvr import BridgingAttention
from attnkit.ops.cross.biased import GEOMETRY, make_geometry_call, relative_geometry
from attnkit.reference.naive_cross import naive_bvr_module
from tolerances import assert_close

F64 = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def test_table_equals_per_pair_output_and_parameter_gradients():
    g = torch.Generator().manual_seed(0)
    qp = torch.stack([torch.randint(0, 5, (2, 9), generator=g), torch.randint(0, 7, (2, 9), generator=g)], -1)
    kp = torch.stack([torch.randint(0, 5, (2, 4), generator=g), torch.randint(0, 7, (2, 4), generator=g)], -1)
    mlp = _mlp()
    call = make_geometry_call(qp, kp, mlp, scale=2.5, extent=(5, 7), dtype=F64)
    assert GEOMETRY.choose(call).name == "reference"             # 9 * 11 = 99 table rows > 72 pairs
    t = relative_geometry(qp, kp, mlp, scale=2.5, extent=(5, 7), dtype=F64, backend="table")
    r = relative_geometry(qp, kp, mlp, scale=2.5, extent=(5, 7), dtype=F64, backend="reference")
    assert t.shape == (2, 9, 4, 3)
    assert_close(t, r, F64, "table vs per pair")
    gt = torch.autograd.grad(t.square().sum(), list(mlp.parameters()))
    gr = torch.autograd.grad(r.square().sum(), list(mlp.parameters()))
    for i, (a, b) in enumerate(zip(gt, gr)):
        assert_close(a, b, F64, f"dparam[{i}]", grad=True)
    # a wrong table index (e.g. the two axes swapped) would break this on a non-square extent
    one = relative_geometry(qp[:, :1], kp[:, :1], lambda d: d, extent=(5, 7), dtype=F64, backend="table")
    assert torch.equal(one[..., 0, 0, :], (kp[:, 0] - qp[:, 0]).double())


def test_table_refuses_float_positions_and_positions_outside_the_extent():
    mlp = _mlp()
    qp, kp = torch.zeros(1, 3, 2, dtype=torch.long), torch.tensor([[[0, 0], [4, 6]]])
    with pytest.raises(ValueError, match="table"):
        GEOMETRY.choose(make_geometry_call(qp.double(), kp, mlp, extent=(5, 7)), "table")
    with pytest.raises(ValueError, match=r"relative_geometry: q_pos and k_pos must lie in \[0, extent\)"):
        relative_geometry(qp, kp, mlp, extent=(4, 7), dtype=F64, backend="table")


def test_bvr_module_uses_the_table_and_matches_per_pair_and_its_twin():
    torch.manual_seed(1)
    m = BridgingAttention(8, 2, topk=5, geo_hidden=4, sincos_dim=8, pos_scale=3.0).double()
    x = torch.randn(2, 12, 8, dtype=F64, requires_grad=True)
    ctx = torch.randn(2, 10, 8, dtype=F64)
    i = torch.arange(12)
    qp = torch.stack([i % 4, i // 4], -1)                                  # a 4 x 3 grid, int64
    kp = torch.stack([torch.arange(10) % 4, torch.arange(10) % 3], -1)
    pos = torch.stack([torch.arange(12), torch.zeros(12, dtype=torch.long)], -1)
    call = make_geometry_call(pos[None], pos[None, :5], m._embed, extent=(12, 1))
    assert GEOMETRY.choose(call).name == "table"                           # default positions: 23 rows <= 60 pairs
    y_table = m(x, ctx, q_pos=qp, k_pos=kp, extent=(4, 3))
    y_pair = m(x, ctx, q_pos=qp.double(), k_pos=kp.double())               # float positions: per pair
    assert_close(y_table, y_pair, F64, "table vs per pair")
    assert_close(y_table, naive_bvr_module(m, x, ctx, qp.double(), kp.double()), F64, "twin")
    (ga,) = torch.autograd.grad(y_table.sum(), x)
    (gb,) = torch.autograd.grad(y_pair.sum(), x)
    assert_close(ga, gb, F64, "dx", grad=True)
    assert_close(m(x, ctx), naive_bvr_module(m, x, ctx), F64, "default positions (table) vs twin")
