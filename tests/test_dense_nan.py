"""The NaN policy on the dense attention backends (docs/design.md): a NaN or an infinity in q, k or v reaches
exactly the outputs that depend on it, and a masked-out key never multiplies a non-finite value.

Each backend that runs (reference, sdpa, blocked on the compiled tile kernel in float32 / bfloat16, blocked's
torch-ops path in float64) is compared with the float64 oracle (``naive_attention``) element by element:
the same non-finite entries, the same finite values. The oracle itself is checked against the dependency
set read off the dense mask. FlexAttention's compiled CPU kernel is not exact; its explain line says so.
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
import attnkit.masks as M
from attnkit.kernels import native as _native
from attnkit.reference.naive_dense import naive_attention
from tolerances import assert_close

N, T = 64, 20  # tokens, the poisoned token
MASKS = {
    "causal": M.causal(),
    "causal_window": M.causal() & M.sliding_window(8),
    "window": M.sliding_window(8),
    "document": M.document([20, 24, 20]),
    "causal_document": M.causal() & M.document([20, 24, 20]),
}


def _backends():
    out = [("reference", torch.float32), ("sdpa", torch.float32), ("blocked", torch.float64)]
    if _native.available():
        out += [("blocked", torch.float32), ("blocked", torch.bfloat16)]
    return out


def _inputs(where, value, hq, hkv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, N, hq, 8, generator=g)
    k = torch.randn(1, N, hkv, 8, generator=g)
    v = torch.randn(1, N, hkv, 8, generator=g)
    t = {"q": q, "k": k, "v": v}[where]
    t[0, T, :, 3] = value  # one feature of every head of token T
    return [x.to(dtype) for x in (q, k, v)]


def _dependents(allowed, where):
    """(H, Nq) rows whose output depends on token T: T's own row for q, the rows allowed to see T for k, v."""
    if where == "q":
        return (torch.arange(N) == T)[None].expand(allowed.shape[0], N) & allowed.any(-1)
    return allowed[:, :, T]


@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["MHA", "GQA"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_nonfinite_reaches_exactly_its_dependents(mask_name, where, value, heads):
    hq, hkv = heads
    mask = MASKS[mask_name]
    allowed = mask.to_dense(N, N)                                               # (Nq, Nk)
    qd, kd, vd = _inputs(where, value, hq, hkv, torch.float64)
    ref = naive_attention(qd, kd, vd, allowed)                                  # (1, N, Hq, D)
    bad_rows = ~torch.isfinite(ref[0]).all(-1).T                                # (Hq, Nq)
    dep = _dependents(allowed[None].expand(hq, N, N), where)
    if value != value or where == "v":
        # NaN anywhere, or an infinity in v: non-finite exactly on the dependent rows
        assert torch.equal(bad_rows, dep), "the oracle's non-finite rows are not the dependents"
    else:
        # an infinite q or k gives scores of either sign: a subset of the dependents
        assert not (bad_rows & ~dep).any(), "a row that cannot see the poisoned token is not finite"
    if where == "v":  # only the poisoned feature of those rows
        assert torch.isfinite(ref[..., [0, 1, 2, 4, 5, 6, 7]]).all()
    for backend, dtype in _backends():
        q, k, v = (t.to(dtype) for t in (qd, kd, vd))
        out = ak.attention(q, k, v, mask, backend=backend)
        fin = torch.isfinite(out)
        assert torch.equal(fin, torch.isfinite(ref)), f"{backend} {dtype}: non-finite entries differ"
        assert_close(out.where(fin, 0.0), ref.where(fin, 0.0).to(dtype), dtype, f"{backend} {dtype} out")


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_with_plain_causal_and_no_mask(where):
    """SDPA's is_causal and unmasked fast paths, and the kernel's full tiles, on the same footing."""
    qd, kd, vd = _inputs(where, float("nan"), 2, 1, torch.float64)
    for mask in (M.causal(), None):
        allowed = None if mask is None else mask.to_dense(N, N)
        ref = naive_attention(qd, kd, vd, allowed)
        for backend, dtype in _backends():
            q, k, v = (t.to(dtype) for t in (qd, kd, vd))
            out = ak.attention(q, k, v, mask, backend=backend)
            assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), f"{backend} {dtype} {mask}"


def test_kernel_lse_and_value_gradients_stay_exact():
    """The kernel: a NaN in v leaves the lse finite everywhere; a NaN in q gives a NaN lse on its row only;
    with a NaN in v, dq of the rows that cannot see it stays finite and equal to the clean input's."""
    if not _native.available():
        pytest.skip("compiled kernel not available")
    mask = MASKS["causal_window"]
    allowed = mask.to_dense(N, N)
    q, k, v = _inputs("v", float("nan"), 2, 2, torch.float32)
    _, lse = ak.attention(q, k, v, mask, backend="blocked", return_lse=True)
    assert torch.isfinite(lse).all()
    qn, kn, vn = _inputs("q", float("nan"), 2, 2, torch.float32)
    _, lse = ak.attention(qn, kn, vn, mask, backend="blocked", return_lse=True)
    assert torch.equal(~torch.isfinite(lse[0]).any(-1), torch.arange(N) == T)
    grads = []
    for vv in (v, torch.where(torch.isfinite(v), v, 0.0)):
        qs = q.clone().requires_grad_()
        ak.attention(qs, k, vv.requires_grad_(), mask, backend="blocked").sum().backward()
        grads.append(qs.grad)
    free = ~allowed[:, T]                                                       # rows that cannot see T
    assert torch.isfinite(grads[0][0, free]).all()
    assert torch.equal(grads[0][0, free], grads[1][0, free])
    assert not torch.isfinite(grads[0][0, ~free]).all()


def test_flex_documents_its_limitation():
    q = torch.randn(1, 32, 1, 8)
    text = ak.explain("attention", q, q, q, mask=M.causal(), backend="flex")
    assert "not propagated exactly" in text
