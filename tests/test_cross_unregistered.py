"""The cross-family pooling modules (filip, greenplm_pool, cambrian_sva) and NOT_REGISTERED."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.mechanisms.cross_unregistered import (
    NOT_REGISTERED,
    FILIPLateInteraction,
    SpatialVisionAggregator,
    ZeroParamPooling,
)
from attnkit.reference.naive_cross import naive_filip_module, naive_sva_module
from tolerances import assert_close, nudged_double

F64 = torch.float64


def test_not_registered_names_are_not_registry_entries():
    registered = {s.name for s in ak.list_mechanisms()}
    assert not registered & set(NOT_REGISTERED)
    assert all(reason for reason in NOT_REGISTERED.values())


def test_filip_module_matches_twin_and_its_loss_is_symmetric_infonce():
    m = nudged_double(FILIPLateInteraction(6, 5, proj_dim=8))
    img = torch.randn(3, 4, 6, dtype=F64, requires_grad=True)
    txt = torch.randn(3, 5, 5, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    a, b = m(img, txt, mask)
    ra, rb = naive_filip_module(m, img, txt, mask)
    assert_close(a, ra, F64, "s_i2t")
    assert_close(b, rb, F64, "s_t2i")
    loss = m.loss(a, b)
    loss.backward()
    assert torch.isfinite(loss) and img.grad.abs().sum() > 0
    # the text-to-image term reads s_t2i column-wise: text j's logits over the images
    t = m.log_temperature.exp()
    by_text = torch.nn.functional.cross_entropy(b.T / t, torch.arange(3))
    by_image = torch.nn.functional.cross_entropy(a / t, torch.arange(3))
    assert_close(m.loss(a, b), 0.5 * (by_image + by_text), F64, "symmetric InfoNCE")


def test_zero_param_pooling_has_no_parameters():
    m = ZeroParamPooling()
    assert not list(m.parameters())
    x = torch.randn(2, 9, 8)
    assert m(x).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="ZeroParamPooling: queries"):
        ZeroParamPooling(queries=("median",))


def test_sva_matches_twin_gradients_and_stays_in_its_cell():
    m = nudged_double(SpatialVisionAggregator(8, 2, grid=2, encoder_dims=(6, 4)))
    maps = [torch.randn(2, 4, 4, 6, dtype=F64, requires_grad=True),
            torch.randn(2, 2, 2, 4, dtype=F64, requires_grad=True)]
    y = m(maps)
    assert y.shape == (2, 4, 8)
    ref = naive_sva_module(m, maps)
    assert_close(y, ref, F64, "out")
    g = torch.randn_like(y)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(y, maps, g), torch.autograd.grad(ref, maps, g))):
        assert_close(a, b, F64, f"dmaps[{i}]", grad=True)
    (gm,) = torch.autograd.grad(m(maps)[:, 3].sum(), maps[0])                       # query (1, 1): rows/cols 2-3
    assert gm[:, :2].abs().max() == 0 and gm[:, :, :2].abs().max() == 0 and gm[:, 2:, 2:].abs().max() > 0
    hidden = torch.randn(2, 4, 8, dtype=F64)
    assert_close(m(maps, hidden), naive_sva_module(m, maps, hidden), F64, "LLM hidden states as queries")


def test_cambrian_sva_registered_one_key_cells_give_the_projected_value():
    """C14: one encoder with m = 1 (the map is L x L): each query's cell is one pixel, so the softmax is 1 and
    output - queries = out_proj(v_proj(pixel)); the registry builds the module and pools (B, mL, mL, C) maps."""
    spec = ak.info("cambrian_sva")
    assert spec.pooling and spec.patterns == ("noncausal-self",)
    m = nudged_double(ak.get("cambrian_sva", dim=8, num_heads=2, grid=3, encoder_dims=(5,)))
    f = torch.randn(2, 3, 3, 5, dtype=F64)
    y = m(f)
    q0 = m.queries.expand(2, -1, -1)
    want = m.out_proj(m.v_proj[0](f.reshape(2, 9, 5)))                               # (B, L*L, C)
    assert_close(y - q0, want, F64, "m = 1: the projected value")
    assert_close(m(f), m([f]), F64, "a tensor is the one-encoder list")
    with pytest.raises(ValueError, match=r"SpatialVisionAggregator: x must be square .* grid = 3"):
        m(torch.randn(2, 4, 4, 5, dtype=F64))
