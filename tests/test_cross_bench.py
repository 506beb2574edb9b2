"""The ``cross`` bench suite: its groups exist and every implementation of a group computes the same thing."""

from __future__ import annotations

import torch

from attnkit.bench.cases import cross
from attnkit.bench.suites import all_suites
from attnkit.ops.cross.varlen import varlen_cross_attention

QL, KL = (12, 9, 7, 3, 5, 6, 2, 4), (4, 12, 2, 9, 8, 3, 5, 6)


def test_suite_lists_the_varlen_cab_and_module_groups():
    assert "cross" in all_suites()
    groups = {c.group for c in cross.cases()}
    assert "varlen/S=8/Tq=16384/Tk=16384" in groups
    assert {"cab/noncausal-cross/Nq=4096,Nk=6144", "cab/causal-cross/Nq=4096,Nk=6144"} <= groups
    assert {"module/ip_adapter/noncausal-cross", "module/crossvit_cls/noncausal-cross"} <= groups
    base = [c for c in cross.cases() if c.group.startswith("varlen") and c.baseline]
    assert {c.impl for c in base} == {"sdpa_padded"} and {c.pass_ for c in base} == {"fwd", "fwd+bwd"}


def test_padded_baseline_equals_the_packed_op():
    q, k, v, cq, ck = cross.varlen_inputs(QL, KL, heads=2, dim=8, dtype=torch.float64)
    torch.testing.assert_close(cross.padded_sdpa(q, k, v, cq, ck), varlen_cross_attention(q, k, v, cq, ck))


def test_varlen_setups_run_and_check_small():
    for impl in ("per_sequence", "masked", "sdpa_padded"):
        for pass_ in ("fwd", "fwd+bwd"):
            r = cross.varlen_setup(impl, pass_, QL, KL)()
            r.run()
            err, rrmse = r.check()
            assert err < 1e-4 and rrmse < 1e-5, (impl, pass_, err)
    for pattern in ("noncausal-cross", "causal-cross"):
        outs = [cross.cab_setup(pattern, impl, "fwd", 16, 24)().run() for impl in ("attnkit", "sdpa")]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
