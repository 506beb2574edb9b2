"""Hierarchical attention (arXiv 2509.15448): the DP against brute force on small trees, and the identities."""

from __future__ import annotations

import pytest
import torch

from attnkit.ops.sequence.hierarchical import build_hierarchy, hierarchical_attention, uniform_hierarchy
from attnkit.reference.naive_dense import naive_masked_attention
from attnkit.reference.naive_sequence2 import naive_hierarchical_attention
from tolerances import assert_close, compare_fn


def _qkv(B=2, N=9, H=2, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, N, H, D, generator=g, dtype=torch.float64) for n in "qkv"}


def _random_tree(n, seed):
    # ragged random tree: each level groups the nodes into random non-empty contiguous runs
    g = torch.Generator().manual_seed(seed)
    parents, count = [], n
    while count > 1:
        cuts = torch.rand(count - 1, generator=g) < 0.45
        p = torch.cat([torch.zeros(1, dtype=torch.long), cuts.long().cumsum(0)])
        parents.append(p)
        count = int(p.max()) + 1
        if len(parents) > 4:
            break
    return parents


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force_on_small_random_trees(seed):
    t = _qkv(N=10, seed=seed)
    parents = _random_tree(10, seed)
    out = hierarchical_attention(t["q"], t["k"], t["v"], parents)
    assert_close(out, naive_hierarchical_attention(t["q"], t["k"], t["v"], parents), torch.float64, f"tree {seed}")


@pytest.mark.parametrize("n,b", [(9, 2), (13, 3), (16, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gather_matches_reference_with_gradients(n, b, dtype):
    tree = uniform_hierarchy(n, b)
    compare_fn(lambda **a: hierarchical_attention(**a, tree=tree),
               lambda **a: hierarchical_attention(**a, tree=tree, backend="reference"), _qkv(N=n), dtype)


def _softmax(t):
    N = t["q"].shape[1]
    return naive_masked_attention(t["q"], t["k"], t["v"], torch.ones(N, N, dtype=torch.bool))[0]


def test_one_group_tree_is_softmax_attention():
    t = _qkv(N=8)
    out = hierarchical_attention(t["q"], t["k"], t["v"], [torch.zeros(8, dtype=torch.long)])
    assert_close(out, _softmax(t), torch.float64, "one level")


@pytest.mark.parametrize("b", [2, 3])
def test_equal_keys_and_values_inside_every_subtree_give_softmax_attention_for_any_tree(b):
    # the log|S| bonus makes a subtree of |S| identical keys weigh as its |S| leaves
    t = _qkv(N=12)
    tree = uniform_hierarchy(12, b)
    top = tree.parents[0]  # make keys equal inside every level-1 group; values may differ (the mean is exact)
    for p in tree.parents[1:]:
        top = p[top]
    # every subtree a query pools lies inside one top-level node; equal keys per top node suffice
    t["k"] = t["k"][:, [int((top == top[i]).nonzero()[0]) for i in range(12)]].clone()
    out = hierarchical_attention(t["q"], t["k"], t["v"], tree)
    assert_close(out, _softmax(t), torch.float64, "equal keys")
    t2 = _qkv(N=12, seed=3)
    assert (hierarchical_attention(t2["q"], t2["k"], t2["v"], tree) - _softmax(t2)).abs().max() > 1e-3


def test_candidate_count_grows_with_depth_not_n():
    tree = uniform_hierarchy(4096, 16)
    assert tree.idx.shape[1] <= 16 + 15 + 15
    with pytest.raises(ValueError, match="hierarchical_attention: the tree has"):
        t = _qkv(N=9)
        hierarchical_attention(t["q"], t["k"], t["v"], uniform_hierarchy(8, 2))
    with pytest.raises(ValueError, match="parents\\[1\\]"):
        build_hierarchy([torch.tensor([0, 0, 1]), torch.tensor([0])])
