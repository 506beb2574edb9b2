"""The routed ops as dispatched ops: explain lists every backend with a reason, every forced backend
agrees with ``backend="reference"`` (forward, and gradients where the path has a backward), the
no-grad backends refuse inputs that require grad, and HyperAttention's lse is float32 in bf16."""

from __future__ import annotations

import re

import pytest
import torch

import attnkit.ops.routed as routed
from attnkit.ops.base import explain, explainable_ops
from attnkit.ops.routed.psa import PSAConfig, psa_importance, psa_level_map
from attnkit.ops.routed.vmoba import VMoBAConfig
from tolerances import assert_close


def _seq(B, N, Hq, Hkv, D, Nk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Nk = Nk or N
    return (torch.randn(B, N, Hq, D, generator=g, dtype=torch.float64),
            torch.randn(B, Nk, Hkv, D, generator=g, dtype=torch.float64),
            torch.randn(B, Nk, Hkv, D, generator=g, dtype=torch.float64))


def _grid(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 8, 8, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))


def _level_map():
    q, k, _ = _seq(1, 32, 2, 1, 8)
    s = psa_importance(q, k, 8, 4, causal=True)
    return psa_level_map(s, (0.3, 0.3, 0.2), causal=True, block_q=8, block_kv=4)  # factors 1, 2, 4


def _hyper_kw(causal):
    return lambda: {"block_size": 8, "sample_size": 6, "lsh_bits": 3, "min_seq_len": 8, "causal": causal,
                    "generator": torch.Generator().manual_seed(5)}


# id: (op name, public function, inputs, kwargs factory (fresh generators per call), backends that can run
# the case, those of them with a backward)
CASES = {
    "moba-token": ("moba_attention", routed.moba_attention, _seq(1, 32, 4, 2, 8),
                   lambda: {"block_size": 8, "topk": 2, "routing": "token"}, {"dispatch"}, {"dispatch"}),
    "moba-block": ("moba_attention", routed.moba_attention, _seq(1, 32, 4, 2, 8),
                   lambda: {"block_size": 8, "topk": 2, "routing": "block"}, {"fused", "gather"}, {"gather"}),
    "moba-cross": ("moba_attention", routed.moba_attention, _seq(1, 20, 2, 2, 8, Nk=36),
                   lambda: {"block_size": 8, "topk": 2, "causal": False}, {"dispatch"}, {"dispatch"}),
    "vmoba": ("vmoba_attention", routed.vmoba_attention, _seq(1, 32, 2, 1, 8),
              lambda: {"grid_shape": (2, 4, 4), "mode": "3d", "config": VMoBAConfig(block_3d=(1, 2, 2)),
                       "threshold": 0.3}, {"dispatch", "gather"}, {"dispatch", "gather"}),
    "pyramid": ("pyramid_sparse_attention", routed.pyramid_sparse_attention, _seq(1, 32, 2, 1, 8),
                lambda: {"level_map": _level_map(), "block_q": 8, "block_kv": 4, "causal": True},
                {"fused", "gather"}, {"gather"}),
    "psa": ("psa_attention", routed.psa_attention, _seq(1, 32, 2, 1, 8),
            lambda: {"config": PSAConfig(block_q=8, block_kv=4, levels=3, mask_ratios=(0.3, 0.3, 0.2), causal=True)},
            {"fused", "gather"}, {"gather"}),
    "hyper": ("hyper_attention", routed.hyper_attention, _seq(1, 24, 2, 1, 8, Nk=32), _hyper_kw(False),
              {"fused", "matmul"}, {"matmul"}),
    "hyper-causal": ("hyper_attention", routed.hyper_attention, _seq(1, 32, 2, 1, 8), _hyper_kw(True),
                     {"fused", "matmul"}, {"matmul"}),
    "biformer": ("bi_level_routing_attention", routed.bi_level_routing_attention, _grid(),
                 lambda: {"n_win": 2, "topk": 2}, {"gather"}, {"gather"}),
}
PAIRS = [(cid, b) for cid, case in CASES.items() for b in sorted(case[4])]


def _supports(op, ins, kw, backend):
    make_call, disp = explainable_ops()[op]
    return disp.get(backend).supports(make_call(*ins, **kw))


@pytest.mark.parametrize("cid", list(CASES))
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_explain_lists_every_backend_with_a_reason(cid, grad):
    op, _, ins, kw, *_ = CASES[cid]
    ins = tuple(t.float().requires_grad_(grad) for t in ins)
    text = explain(op, *ins, **kw())
    names = explainable_ops()[op][1].names
    for name in names:
        line = next(ln for ln in text.splitlines() if re.match(rf"\s+(->)?\s+{name}\s", ln))
        status = line.split(name, 1)[1].strip()
        assert re.fullmatch(r"cannot run: .+|can run \(.+\)|can run, not chosen automatically: .+", status), line
    assert "chosen: " in text and "path: " in text, text
    assert ("inputs need grad" if grad else "no grad needed") in text.splitlines()[0]


@pytest.mark.parametrize("cid,backend", PAIRS)
def test_forced_backend_matches_reference(cid, backend):
    _, fn, ins, kw, _, with_grad = CASES[cid]
    # without autograd in float32 (the fused paths' domain)
    x = tuple(t.float() for t in ins)
    with torch.no_grad():
        got = fn(*x, **kw(), backend=backend)
        ref = fn(*x, **kw(), backend="reference")
    assert got.dtype == torch.float32
    assert_close(got.double(), ref.double(), torch.float32, f"{cid}/{backend} out")
    # with autograd in float64: output and every gradient
    if backend not in with_grad:
        return
    xs = [tuple(t.clone().requires_grad_() for t in ins) for _ in range(2)]
    got, ref = fn(*xs[0], **kw(), backend=backend), fn(*xs[1], **kw(), backend="reference")
    assert_close(got, ref, torch.float64, f"{cid}/{backend} out")
    w = torch.randn_like(got)
    (got * w).sum().backward()
    (ref * w).sum().backward()
    for name, a, b in zip("qkv", xs[0], xs[1], strict=True):
        assert_close(a.grad, b.grad, torch.float64, f"{cid}/{backend} d{name}", grad=True)


@pytest.mark.parametrize("cid", [c for c in CASES if "fused" in CASES[c][4]])
def test_forced_no_grad_backend_refuses_grad(cid):
    op, fn, ins, kw, *_ = CASES[cid]
    x = tuple(t.float().requires_grad_() for t in ins)
    ok, why = _supports(op, x, kw(), "fused")
    assert not ok and "require grad" in why
    with pytest.raises(ValueError, match=r"cannot run this .*require grad"):
        fn(*x, **kw(), backend="fused")
    out = fn(*x, **kw())  # the automatic choice takes the differentiable path
    assert out.requires_grad


def test_auto_choice_and_path_detail():
    q, k, v = (t.float() for t in _seq(1, 32, 4, 2, 8))
    text = explain("moba_attention", q, k, v, block_size=8, topk=2, routing="block")
    assert "-> fused" in text
    q.requires_grad_()
    text = explain("moba_attention", q, k, v, block_size=8, topk=2, routing="block")
    assert "-> gather" in text and "autograd" in text
    text = explain("moba_attention", q, k, v, block_size=8, topk=2)
    assert "-> dispatch" in text and "matmul softmax: inputs require grad" in text
    with pytest.raises(ValueError, match="cannot run this moba_attention call: token routing"):
        routed.moba_attention(q, k, v, 8, 2, backend="gather")
    q2 = q.detach()[:, :30]
    k2, v2 = k[:, :30], v[:, :30]
    with torch.no_grad(), pytest.raises(ValueError, match="partial last block"):
        routed.moba_attention(q2, k2, v2, 8, 2, routing="block", backend="fused")
    with torch.no_grad(), pytest.raises(ValueError, match="float64"):
        routed.moba_attention(q.double(), k.double(), v.double(), 8, 2, routing="block", backend="fused")


def test_vmoba_impl_is_the_former_backend_name():
    q, k, v = _seq(1, 32, 2, 1, 8)
    kw = CASES["vmoba"][3]()
    torch.testing.assert_close(routed.vmoba_attention(q, k, v, **kw, impl="gather"),
                               routed.vmoba_attention(q, k, v, **kw, backend="gather"))
    with pytest.raises(ValueError, match="disagree"):
        routed.vmoba_attention(q, k, v, **kw, impl="gather", backend="dispatch")


def test_layouts_agree_with_reference():
    for routing in ("token", "block"):
        q, k, v = _seq(1, 37, 2, 2, 8)  # ragged last block
        _, sel = routed.moba_attention(q, k, v, 8, 3, routing=routing, return_layout=True)
        _, ref = routed.moba_attention(q, k, v, 8, 3, routing=routing, return_layout=True, backend="reference")
        assert torch.equal(sel, ref)
    q, k, v = _seq(1, 32, 2, 1, 8)
    kw = CASES["vmoba"][3]()
    _, sel = routed.vmoba_attention(q, k, v, **kw, return_layout=True)
    _, ref = routed.vmoba_attention(q, k, v, **kw, return_layout=True, backend="reference")
    assert torch.equal(sel, ref)
    cfg = CASES["psa"][3]()["config"]
    _, lm = routed.psa_attention(q, k, v, cfg, return_levels=True)
    _, ref = routed.psa_attention(q, k, v, cfg, return_levels=True, backend="reference")
    assert torch.equal(lm, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_hyper_lse_dtype(dtype):
    q, k, v = (t.to(dtype) for t in _seq(1, 24, 2, 1, 8, Nk=32))
    for kw in (_hyper_kw(False)(), _hyper_kw(True)() | {"min_seq_len": 64}):
        if kw["causal"]:
            q2, k2, v2 = q[:, :24], k[:, :24], v[:, :24]
        else:
            q2, k2, v2 = q, k, v
        out, lse = routed.hyper_attention(q2, k2, v2, **kw, return_lse=True)
        assert out.dtype == dtype
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    with pytest.raises(ValueError, match="no lse"):
        routed.hyper_attention(q, k, v, **_hyper_kw(False)(), return_lse=True, backend="reference")
