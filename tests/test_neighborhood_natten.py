"""Peer check: ak.neighborhood_attention against NATTEN (>= 0.20, forward on CPU), when installed."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.ops.neighborhood.natten import natten_module


def skip_if_no_natten():
    """Skip the calling test unless a NATTEN with heads-last na1d/na2d/na3d imports."""
    nat = natten_module()
    if nat is None or not all(hasattr(nat, f"na{r}d") for r in (1, 2, 3)):
        pytest.skip("natten (>= 0.20) is not installed")
    return nat


@pytest.mark.parametrize("shape,kw", [
    ((33,), dict(kernel_size=7)),
    ((33,), dict(kernel_size=6, dilation=2, is_causal=True)),
    ((12, 14), dict(kernel_size=(5, 3), dilation=(2, 1))),
    ((12, 14), dict(kernel_size=4, stride=2)),
    ((6, 8, 9), dict(kernel_size=3, is_causal=(True, False, False))),
])
def test_matches_natten(shape, kw):
    nat = skip_if_no_natten()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, *shape, 4, 16, generator=g) for _ in range(3))
    r = len(shape)

    def tup(x):
        return x if isinstance(x, tuple) else (x,) * r

    theirs = getattr(nat, f"na{r}d")(q, k, v, kernel_size=tup(kw["kernel_size"]), stride=tup(kw.get("stride", 1)),
                                    dilation=tup(kw.get("dilation", 1)), is_causal=tup(kw.get("is_causal", False)))
    torch.testing.assert_close(ak.neighborhood_attention(q, k, v, **kw), theirs, atol=2e-5, rtol=1e-4)


def test_natten_backend_reason_when_absent():
    q = torch.randn(1, 9, 2, 8)
    text = ak.explain("neighborhood_attention", q, q, q, kernel_size=3)
    if natten_module() is None:
        assert "natten is not installed" in text
        with pytest.raises(ValueError, match="natten is not installed"):
            ak.neighborhood_attention(q, q, q, 3, backend="natten")
