"""Spatial pyramid pooling and slot attention: ops vs naive references (output and every gradient), the papers'
identities, the module vs its naive twin, and clear errors."""

from __future__ import annotations

import pytest
import torch

from attnkit.mechanisms.sampling_pooling import SlotAttention, SpatialPyramidPooling
from attnkit.ops.sampling import slot_attention_step, spatial_pyramid_pool
from attnkit.reference.naive_sampling import naive_slot_attention_step, naive_slot_module, naive_spatial_pyramid_pool
from tolerances import compare_fn


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("size", [(7, 7), (6, 9), (3, 2)])
def test_spp_matches_reference(mode, size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    compare_fn(lambda x: spatial_pyramid_pool(x, (4, 2, 1), mode),
               lambda x: naive_spatial_pyramid_pool(x, (4, 2, 1), mode), {"x": x}, torch.float64)


def test_spp_identities():
    x = torch.randn(2, 5, 4, 4)
    out = spatial_pyramid_pool(x, (4, 2, 1))
    assert out.shape == (2, 5 * 21)
    torch.testing.assert_close(out[:, :80], x.reshape(2, 80))  # H = W = n: the level is a reshape of x
    torch.testing.assert_close(out[:, -5:], x.amax((2, 3)))  # level 1: global max
    m = SpatialPyramidPooling(5, (6, 3, 2, 1))
    assert m.out_features == 5 * (36 + 9 + 4 + 1) == 250  # fixed length for any input size
    assert {m(torch.randn(1, 5, h, w)).shape for h, w in [(13, 13), (7, 20), (6, 6)]} == {torch.Size([1, 250])}


def test_spp_errors():
    with pytest.raises(ValueError, match=r"SpatialPyramidPooling: mode must be one of"):
        SpatialPyramidPooling(4, mode="median")
    with pytest.raises(ValueError, match=r"SpatialPyramidPooling: levels must be >= 1"):
        SpatialPyramidPooling(4, (2, 0))
    with pytest.raises(ValueError, match=r"SpatialPyramidPooling: x must be channels-first"):
        SpatialPyramidPooling(4)(torch.randn(1, 5, 6, 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_slot_step_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    inputs = {"q": torch.randn(2, 3, 4, generator=g, dtype=torch.float64),
              "k": torch.randn(2, 7, 4, generator=g, dtype=torch.float64),
              "v": torch.randn(2, 7, 5, generator=g, dtype=torch.float64)}
    compare_fn(lambda q, k, v: slot_attention_step(q, k, v),
               lambda q, k, v: naive_slot_attention_step(q, k, v, 0.5, 1e-8), inputs, dtype)


def test_one_slot_reads_the_mean_and_slots_compete():
    q, k, v = torch.randn(2, 1, 4), torch.randn(2, 9, 4), torch.randn(2, 9, 6)
    torch.testing.assert_close(slot_attention_step(q, k, v), v.mean(1, keepdim=True))
    # two identical slots split every input evenly: each reads the mean as well
    torch.testing.assert_close(slot_attention_step(q.expand(2, 2, 4), k, v), v.mean(1, keepdim=True).expand(2, 2, 6))


def test_slot_module_matches_its_twin_and_is_equivariant():
    torch.manual_seed(0)
    m = SlotAttention(8, num_slots=3, iterations=2).double().eval()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    s0 = torch.randn(2, 3, 8, dtype=torch.float64)
    compare_fn(lambda x, s: m(x, s), lambda x, s: naive_slot_module(m, x, s), {"x": x, "s": s0}, torch.float64)
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(m(x, s0[:, perm]), m(x, s0)[:, perm])  # slot-permutation equivariance
    torch.testing.assert_close(m(x[:, torch.randperm(10)], s0), m(x, s0))  # input-order invariance
    assert torch.equal(m(x), m(x)) and m(x).shape == (2, 3, 8)  # eval: deterministic initial slots


def test_one_iteration_one_slot_is_a_gru_step_on_the_weighted_mean():
    torch.manual_seed(0)
    m = SlotAttention(6, num_slots=1, iterations=1).double().eval()
    x, s0 = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 1, 6, dtype=torch.float64)
    mean_v = m.to_v(m.norm_input(x)).mean(1)  # (B, C): the whole set read by the single slot
    s = m.gru(mean_v, s0[:, 0])
    torch.testing.assert_close(m(x, s0)[:, 0], s + m.mlp(m.norm_mlp(s)))


def test_slot_errors():
    with pytest.raises(ValueError, match=r"SlotAttention: num_slots must be >= 1"):
        SlotAttention(8, num_slots=0)
    with pytest.raises(ValueError, match=r"SlotAttention: slots must be \(B, K, C=8\)"):
        SlotAttention(8)(torch.randn(1, 4, 8), torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match=r"slot_attention_step: q must be \(B, K, D\)"):
        slot_attention_step(torch.randn(1, 2, 4), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
