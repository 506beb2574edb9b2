"""LASP-2 / LASP-2H (arXiv 2502.07563) on P gloo processes == the single-process ops.

LP1 output, final state and every gradient equal ``ak.linear_attention`` over the whole sequence
(P = 1, 2, 4; causal and not; normalized; GQA); LP2 the pieces' states sum to K^T V; LP3 per-head
and per-token decay (value and gradient); LP4 LASP-2H equals ``ak.attention`` (output, LSE, grads).
All cases of one world size run in ONE ``run_local`` call (spawning costs seconds).
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.distributed import zigzag
from attnkit.distributed._lasp_selftest import run_specs
from attnkit.distributed.lasp2 import lasp2_comm_elements, lasp2_linear_attention
from attnkit.distributed.lasp2h import lasp2h_attention, lasp2h_comm_elements
from attnkit.distributed.launch import run_local
from tolerances import assert_close

B, N, H, HKV, D, DV = 2, 96, 4, 2, 8, 6
WORLDS = (1, 2, 4)
RAGGED = {2: [56, 40], 4: [16, 40, 8, 32]}


def _inputs(seed: int, nq: int = N, decay: str | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = {"q": torch.randn(B, nq, H, D, generator=g, dtype=torch.float64),
         "k": torch.randn(B, N, HKV, D, generator=g, dtype=torch.float64),
         "v": torch.randn(B, N, HKV, DV, generator=g, dtype=torch.float64),
         "do": torch.randn(B, nq, H, DV, generator=g, dtype=torch.float64),
         "dS": torch.randn(B, H, D, DV, generator=g, dtype=torch.float64)}
    if decay == "per-head":
        x["decay"] = torch.tensor([0.9, 0.97, 0.8, 0.995], dtype=torch.float64)
    elif decay == "per-token":
        x["decay"] = 0.7 + 0.3 * torch.rand(B, N, H, generator=g, dtype=torch.float64)
    return x


def _lasp2_cases(world: int) -> dict[str, dict]:
    base = [  # (name, kwargs, decay kind)
        ("causal", {}, None),
        ("noncausal", {"causal": False}, None),
        ("causal-head-decay", {}, "per-head"),
        ("causal-token-decay", {}, "per-token"),
        ("causal-norm-token-decay", {"normalize": True, "feature_map": "elu+1"}, "per-token"),
        ("noncausal-norm", {"causal": False, "normalize": True, "feature_map": "elu+1"}, None),
    ]
    cases = {}
    for i, (name, kw, dk) in enumerate(base):
        for dt in (torch.float64, torch.float32):
            cases[f"{name}-{str(dt)[6:]}"] = {"op": "lasp2", "dtype": dt, "inputs": _inputs(i, decay=dk),
                                              "kwargs": {"chunk_size": 16, **kw}}
    if world > 1:
        cases["ragged-causal-token-decay-float64"] = {
            "op": "lasp2", "dtype": torch.float64, "inputs": _inputs(10, decay="per-token"),
            "kwargs": {"chunk_size": 16}, "lengths": RAGGED[world]}
        cases["ragged-causal-head-decay-float64"] = {
            "op": "lasp2", "dtype": torch.float64, "inputs": _inputs(11, decay="per-head"),
            "kwargs": {"chunk_size": 16}, "lengths": RAGGED[world]}
    if world > 1:  # only q trainable: every rank must still join the backward exchange (no hang)
        cases["causal-token-decay-q-grad-only-float64"] = {
            "op": "lasp2", "dtype": torch.float64, "inputs": _inputs(14, decay="per-token"),
            "kwargs": {"chunk_size": 16}, "grads": ("q",)}
    if world == 2:  # low precision: states and the exchange stay in float32
        cases["causal-token-decay-bfloat16"] = {"op": "lasp2", "dtype": torch.bfloat16,
                                                "inputs": _inputs(13, decay="per-token"), "kwargs": {"chunk_size": 16}}
    cases["cross-noncausal-float64"] = {  # non-causal: q pieces need not match k pieces
        "op": "lasp2", "dtype": torch.float64, "inputs": _inputs(12, nq=40 * world),
        "kwargs": {"causal": False}, "q_lengths": [40] * world}
    return cases


def _lasp2h_cases(world: int) -> dict[str, dict]:
    cases = {}
    for i, causal in enumerate((True, False)):
        for dt in (torch.float64, torch.float32):
            cases[f"h-{'causal' if causal else 'noncausal'}-{str(dt)[6:]}"] = {
                "op": "lasp2h", "dtype": dt, "inputs": _inputs(20 + i), "kwargs": {"causal": causal}}
    if world > 1:
        cases["h-ragged-causal-float64"] = {"op": "lasp2h", "dtype": torch.float64, "inputs": _inputs(22),
                                            "kwargs": {"causal": True}, "lengths": RAGGED[world]}
        for dt in (torch.float64, torch.float32):  # balanced causal pieces (chunks r and 2P-1-r)
            cases[f"h-zigzag-causal-{str(dt)[6:]}"] = {"op": "lasp2h", "dtype": dt, "inputs": _inputs(23),
                                                       "kwargs": {"causal": True, "layout": "zigzag"}}
    return cases


def _all_cases(world: int) -> dict[str, dict]:
    cases = {**_lasp2_cases(world), **_lasp2h_cases(world)}
    cases["lp2-local-states"] = {"op": "local_state", "dtype": torch.float64, "inputs": _inputs(30)}
    for dk in ("per-head", "per-token"):
        cases[f"lp2-local-states-{dk}"] = {"op": "local_state", "dtype": torch.float64,
                                           "inputs": _inputs(32, decay=dk)}
    if world > 1:
        cases["error-lasp2"] = {"op": "error_lasp2", "inputs": _inputs(31)}
        cases["error-lasp2h"] = {"op": "error_lasp2h", "inputs": _inputs(31)}
    return cases


_RESULTS: dict[int, dict[str, list]] = {}


def _results(world: int) -> dict[str, list]:
    """Every case of this world size from one run_local call: {case: [rank results]}."""
    if world not in _RESULTS:
        cases = _all_cases(world)
        per_rank = run_local(run_specs, world, list(cases.values()))
        _RESULTS[world] = {name: [r[i] for r in per_rank] for i, name in enumerate(cases)}
    return _RESULTS[world]


def _cat(ranks: list[dict], key: str, layout: str = "contiguous") -> torch.Tensor:
    return zigzag.unshard([r[key] for r in ranks], layout, dim=1)


def _check_grads(ranks, ref_leaves, dt, name, has_decay_per_head=False, layout="contiguous"):
    for n, t in ref_leaves.items():
        if not t.requires_grad:
            assert all("d" + n not in r for r in ranks), f"{name}: d{n} of a frozen input"
            continue
        if n == "decay" and has_decay_per_head:  # replicated parameter: the ranks' shares sum to the gradient
            got = sum(r["ddecay"] for r in ranks)
        else:
            got = _cat(ranks, "d" + n, layout)
        assert_close(got, t.grad, dt, f"{name} d{n}", grad=True)


def _case_ids(kind: str):
    return [(w, n) for w in WORLDS for n, s in _all_cases(w).items() if s["op"] == kind]


@pytest.mark.slow
@pytest.mark.parametrize("world,name", _case_ids("lasp2"))
def test_lp1_lp3_lasp2_equals_single_process(world, name):
    spec, ranks = _all_cases(world)[name], _results(world)[name]
    dt, inp, kw = spec["dtype"], spec["inputs"], spec["kwargs"]
    grads = spec.get("grads", ("q", "k", "v", "decay"))
    leaves = {n: inp[n].clone().requires_grad_(n in grads) for n in ("q", "k", "v", "decay") if n in inp}
    o, S = ak.linear_attention(leaves["q"], leaves["k"], leaves["v"], decay=leaves.get("decay"),
                               return_state=True, **kw)
    S = S[0] if isinstance(S, tuple) else S
    ((o * inp["do"]).sum() + (S * inp["dS"]).sum()).backward()
    assert_close(_cat(ranks, "o"), o.detach(), dt, f"{name} o")
    assert_close(ranks[-1]["state"], S.detach(), dt, f"{name} final state")
    _check_grads(ranks, leaves, dt, name, has_decay_per_head="decay" in inp and inp["decay"].dim() == 1)


@pytest.mark.slow
@pytest.mark.parametrize("world,name", _case_ids("lasp2h"))
def test_lp4_lasp2h_equals_softmax_oracle(world, name):
    spec, ranks = _all_cases(world)[name], _results(world)[name]
    dt, inp = spec["dtype"], spec["inputs"]
    leaves = {n: inp[n].clone().requires_grad_() for n in ("q", "k", "v")}
    mask = ak.masks.causal() if spec["kwargs"]["causal"] else None
    o, lse = ak.attention(leaves["q"], leaves["k"], leaves["v"], mask, backend="reference", return_lse=True)
    (o * inp["do"]).sum().backward()
    layout = spec["kwargs"].get("layout", "contiguous")
    assert_close(_cat(ranks, "o", layout), o.detach(), dt, f"{name} o")
    assert_close(_cat(ranks, "lse", layout), lse.detach(), dt, f"{name} lse")
    _check_grads(ranks, leaves, dt, name, layout=layout)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_lp2_states_sum_to_kt_v(world):
    ranks, inp = _results(world)["lp2-local-states"], _all_cases(world)["lp2-local-states"]["inputs"]
    full = torch.einsum("bnhd,bnhe->bhde", inp["k"], inp["v"])  # (B, Hkv, D, Dv)
    assert_close(sum(r["M"] for r in ranks), full, torch.float64, "sum_t M_t")


@pytest.mark.slow
@pytest.mark.parametrize("world", (2, 4))
@pytest.mark.parametrize("decay", ["per-head", "per-token"])
def test_lp3_decayed_local_state(world, decay):
    """§8.4: M_t = sum_j prod(decay after j) k_j v_j^T is the kernel's final state from zero, and the
    decayed sum over pieces, sum_t exp(G_{t+1} + ... + G_P) M_t, is the whole sequence's final state."""
    ranks = _results(world)[f"lp2-local-states-{decay}"]
    inp = _all_cases(world)[f"lp2-local-states-{decay}"]["inputs"]
    rep = H // HKV
    for t, r in enumerate(ranks):
        assert_close(r["M"], r["S"], torch.float64, f"rank {t} M_t")
    total = torch.zeros_like(ranks[0]["M"])
    for r in ranks:
        total = r["G"].exp()[..., None, None] * total + r["M"]
    k, v = (x.repeat_interleave(rep, dim=2) for x in (inp["k"], inp["v"]))  # (B, N, H, D)
    _, S = ak.linear_attention(inp["q"], k, v, decay=inp["decay"], return_state=True)
    assert_close(total, S, torch.float64, "folded states")


@pytest.mark.slow
def test_shapes_differing_across_ranks_raise_on_every_rank():
    res = _results(2)
    for op in ("lasp2", "lasp2h"):
        msgs = res[f"error-{op}"]
        assert all("Dv differs across ranks: [6, 5]" in m for m in msgs), msgs


# ---- single process: argument errors raise before any collective

def _qkv(n=8):
    return torch.randn(1, n, 2, 4), torch.randn(1, n, 2, 4), torch.randn(1, n, 2, 4)


def test_bad_arguments_name_the_argument():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="decay must have shape"):
        lasp2_linear_attention(q, k, v, decay=torch.full((3,), 0.9))
    with pytest.raises(ValueError, match="decay requires causal=True"):
        lasp2_linear_attention(q, k, v, causal=False, decay=torch.full((2,), 0.9))
    with pytest.raises(TypeError, match="check_shapes"):
        lasp2_linear_attention(q, k, v, check_shapes=1)
    with pytest.raises(ValueError, match="causal needs this rank's q and k/v pieces equally long, got 8 and 6"):
        lasp2h_attention(q, k[:, :6], v[:, :6], causal=True)
    with pytest.raises(TypeError, match="causal must be a bool"):
        lasp2h_attention(q, k, v, causal=1)


def test_without_process_group_raises():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="not initialised"):
        lasp2_linear_attention(q, k, v)
    with pytest.raises(RuntimeError, match="not initialised"):
        lasp2h_attention(q, k, v)


def test_comm_volume_formulas():
    # §8.6: LASP-2 receives (P-1) B H D Dv per direction, independent of N; LASP-2H (P-1) B N/P Hkv (D+Dv)
    assert lasp2_comm_elements(1, 8, 8, 64, 64, 4) == 3 * 8 * 64 * 64
    assert lasp2_comm_elements(1, 8, 2, 64, 64, 4) == 3 * 2 * 64 * 64  # no decay: per KV head (GQA)
    assert lasp2_comm_elements(1, 8, 8, 64, 64, 4, decay=True, normalize=True) == 3 * (8 * 64 * 65 + 8)
    assert lasp2h_comm_elements(1, 1024, 8, 64, 64, 4) == 3 * 1024 * 8 * 128


def test_lasp2h_rejects_an_unknown_layout():
    q = torch.randn(1, 7, 2, 4)
    with pytest.raises(ValueError, match="layout must be one of"):
        lasp2h_attention(q, q, q, causal=True, layout="spiral")
