"""GAAM (arXiv 2401.11143): the released code's choices as options of gaussian_adaptive, against naive_gaam."""

from __future__ import annotations

import pytest
import torch

from attnkit.ops.dense.gaussian import gaussian_adaptive
from attnkit.reference.naive_dense import naive_gaam
from tolerances import assert_close, compare_fn


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("combine", ["mixture", "product"])
@pytest.mark.parametrize("axis", [1, -1])
def test_options_match_naive(unbiased, combine, axis):
    g = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(2, 7, 8, generator=g, dtype=torch.float64),
              "offsets": 0.3 * torch.randn(2, 3, generator=g, dtype=torch.float64),
              "widths": 1.5 + torch.rand(2, 3, generator=g, dtype=torch.float64)}
    kw = dict(axis=axis, normalize=True, unbiased=unbiased, combine=combine)
    compare_fn(lambda **a: gaussian_adaptive(**a, **kw), lambda **a: naive_gaam(**a, **kw), inputs, torch.float64)
    compare_fn(lambda **a: gaussian_adaptive(**a, **kw), lambda **a: naive_gaam(**a, **kw), inputs, torch.float32)


def test_unbiased_variance_and_product_identities():
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    off, c = torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), 2.0, dtype=torch.float64)
    mu, var = x.mean(1, keepdim=True), x.var(1, keepdim=True, unbiased=True)
    want = x * torch.exp(-((x - mu) ** 2) / (var + 1e-8) / (2 * 4.0))
    assert_close(gaussian_adaptive(x, off, c, unbiased=True), want, torch.float64, "unbiased")
    # three equal Gaussians multiplied = one Gaussian with width c / sqrt(3)
    prod = gaussian_adaptive(x, off.repeat(1, 3), c.repeat(1, 3), combine="product")
    assert_close(prod, gaussian_adaptive(x, off, c / 3 ** 0.5), torch.float64, "product")
    with pytest.raises(ValueError, match="combine"):
        gaussian_adaptive(x, off, c, combine="sum")
