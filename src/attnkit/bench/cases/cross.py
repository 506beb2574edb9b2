"""Cases of the ``cross`` suite: packed variable-length cross-attention, CAB's two cross patterns, and every
registered cross mechanism on its cross pattern.

Groups and implementations (``Case.impl``):

* ``varlen/S=8/Tq=16384/Tk=16384`` (8 sequences of mixed lengths, 16K queries and 16K keys in all, H=4,
  D=64, fp32, fwd and fwd+bwd): ``per_sequence`` = ``varlen_cross_attention(backend="per_sequence")``,
  ``masked`` = ``ak.attention(mask=varlen_cross(...))`` (the blocked tile walk), and the baseline
  ``sdpa_padded`` = pad every sequence to the longest, one dense SDPA over the batch with a key-padding
  mask, unpad (the pad and unpad copies are timed, as a caller would pay them). The issue's figure is
  ``t(sdpa_padded) / t(per_sequence)`` on fwd+bwd.
* ``cab/noncausal-cross/Nq=4096,Nk=6144`` and ``cab/causal-cross/Nq=4096,Nk=6144`` (H=4, D=64):
  ``ak.attention`` (auto) against ``F.scaled_dot_product_attention`` (no mask; a dense bool mask for the
  causal pattern, query ``i`` seeing keys ``j <= i * Nk / Nq`` via ``causal_cross``).
* ``module/<name>/<pattern>``: every registered ``cross``-family mechanism (and ``mha``) on each of its
  ``*-cross`` patterns, the spec's default example.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, pass_with_random_grad
from attnkit.bench.flops import attention_flops
from attnkit.bench.suites import Suite, register_suite

CROSS = register_suite(Suite(
    "cross", "cross-attention: packed varlen (8 mixed sequences, 16K q / 16K k) vs padded dense SDPA fwd and "
             "fwd+bwd; CAB's noncausal-cross and causal-cross patterns vs SDPA; every cross mechanism (~3 min)",
    repeat=3, min_repeat=2, warmup_s=0.0, unit_budget_s=30.0, case_timeout_s=300.0, memory=False))

Q_LENGTHS = (4096, 3072, 2560, 2048, 1792, 1280, 1024, 512)
K_LENGTHS = (1024, 4096, 512, 2560, 2048, 3072, 1280, 1792)
H, D = 4, 64
CAB_NQ, CAB_NK = 4096, 6144


def varlen_inputs(q_lengths, k_lengths, heads: int = H, dim: int = D, dtype=torch.float32):
    """Packed ``q (1, Tq, H, D)``, ``k, v (1, Tk, H, D)`` and the two ``cu_seqlens`` lists."""
    cq, ck = [0, *itertools.accumulate(q_lengths)], [0, *itertools.accumulate(k_lengths)]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, cq[-1], heads, dim, generator=g, dtype=dtype)
    k = torch.randn(1, ck[-1], heads, dim, generator=g, dtype=dtype)
    v = torch.randn(1, ck[-1], heads, dim, generator=g, dtype=dtype)
    return q, k, v, cq, ck


def padded_sdpa(q, k, v, cq, ck) -> torch.Tensor:
    """The baseline: pad each sequence to the longest, dense SDPA with a key-padding mask, unpad. ``(1, Tq, H, D)``."""
    s = len(cq) - 1
    lq = torch.tensor([b - a for a, b in itertools.pairwise(cq)])
    lk = torch.tensor([b - a for a, b in itertools.pairwise(ck)])
    mq, mk = int(lq.max()), int(lk.max())
    seq_q = torch.repeat_interleave(torch.arange(s), lq)
    pos_q = torch.arange(cq[-1]) - torch.tensor(cq[:-1])[seq_q]
    seq_k = torch.repeat_interleave(torch.arange(s), lk)
    pos_k = torch.arange(ck[-1]) - torch.tensor(ck[:-1])[seq_k]
    qp = q.new_zeros(s, mq, *q.shape[2:]).index_put((seq_q, pos_q), q[0])       # (S, Lq_max, H, D)
    kp = k.new_zeros(s, mk, *k.shape[2:]).index_put((seq_k, pos_k), k[0])       # (S, Lk_max, H, D)
    vp = v.new_zeros(s, mk, *v.shape[2:]).index_put((seq_k, pos_k), v[0])
    keep = (torch.arange(mk)[None, :] < lk[:, None])[:, None, None, :]          # (S, 1, 1, Lk_max)
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=keep)
    return o.transpose(1, 2)[seq_q, pos_q][None]                                # (1, Tq, H, D)


def _check(out: torch.Tensor, q, k, v, cq, ck) -> tuple[float, float]:
    from attnkit.reference.naive_cross import naive_varlen_cross_attention

    # the two shortest query sequences against the fp64 oracle (a slice of the same call)
    s = sorted(range(len(cq) - 1), key=lambda i: cq[i + 1] - cq[i])[:2]
    errs, num, den = [], 0.0, 0.0
    for i in s:
        ref = naive_varlen_cross_attention(q[:, cq[i]:cq[i + 1]].double(), k[:, ck[i]:ck[i + 1]].double(),
                                           v[:, ck[i]:ck[i + 1]].double(), [0, cq[i + 1] - cq[i]],
                                           [0, ck[i + 1] - ck[i]])
        got = out[:, cq[i]:cq[i + 1]].double()
        errs.append((got - ref).abs().max().item())
        num, den = num + (got - ref).pow(2).sum().item(), den + ref.pow(2).sum().item()
    return max(errs), (num / den) ** 0.5


def varlen_setup(impl: str, pass_: str, q_lengths=Q_LENGTHS, k_lengths=K_LENGTHS) -> Callable[[], Runner]:
    def setup() -> Runner:
        import time

        import attnkit as ak
        from attnkit.masks.cross import varlen_cross
        from attnkit.ops.cross.varlen import varlen_cross_attention

        q, k, v, cq, ck = varlen_inputs(q_lengths, k_lengths)
        inputs = (q, k, v) if pass_ == "fwd" else tuple(t.requires_grad_() for t in (q, k, v))
        oneoff = {}
        if impl == "per_sequence":
            def fn():
                return varlen_cross_attention(q, k, v, cq, ck, backend="per_sequence")
        elif impl == "masked":
            mask = varlen_cross(cu_seqlens_q=cq, cu_seqlens_k=ck)
            t0 = time.perf_counter()
            mask.blocks(cq[-1], ck[-1], 128, 128)
            oneoff["mask_build_s"] = time.perf_counter() - t0

            def fn():
                return ak.attention(q, k, v, mask=mask, backend="blocked")
        else:
            def fn():
                return padded_sdpa(q, k, v, cq, ck)
        run = pass_with_random_grad(fn, pass_, inputs)

        def check():
            with torch.no_grad():
                return _check(fn(), q.detach(), k.detach(), v.detach(), cq, ck)

        area = sum(a * b for a, b in zip(q_lengths, k_lengths))
        pad = len(q_lengths) * max(q_lengths) * max(k_lengths)
        return Runner(run=run, check=check, check_vs="naive_varlen_cross_attention, fp64, two shortest sequences",
                      oneoff=oneoff, params={"area": area, "padded_area": pad})

    return setup


def cab_setup(pattern: str, impl: str, pass_: str, nq: int = CAB_NQ, nk: int = CAB_NK) -> Callable[[], Runner]:
    def setup() -> Runner:
        import attnkit as ak
        from attnkit.masks.cross import causal_cross

        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, nq, H, D, generator=g)
        k, v = torch.randn(1, nk, H, D, generator=g), torch.randn(1, nk, H, D, generator=g)
        inputs = (q, k, v) if pass_ == "fwd" else tuple(t.requires_grad_() for t in (q, k, v))
        mask = None
        if pattern == "causal-cross":  # query i at time i * Nk / Nq: it sees the keys up to its time
            mask = causal_cross(torch.arange(nq, dtype=torch.float64) * nk / nq, torch.arange(nk, dtype=torch.float64))
        if impl == "attnkit":
            def fn():
                return ak.attention(q, k, v, mask=mask)
        else:
            dense = None if mask is None else mask.to_dense(nq, nk)

            def fn():
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_mask=dense)
                return o.transpose(1, 2)
        density = 1.0 if mask is None else mask.density(nq, nk)
        return Runner(run=pass_with_random_grad(fn, pass_, inputs), params={"density": density})

    return setup


def module_setup(name: str, pattern: str, pass_: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        import attnkit as ak
        from attnkit.bench.cases.mechanisms import check_against_reference

        spec = ak.info(name)
        torch.manual_seed(0)
        module, inputs = spec.example(pattern=pattern, generator=torch.Generator().manual_seed(1))
        if pass_ != "fwd":
            inputs = tuple(x.requires_grad_() for x in inputs)
        wrt = tuple(inputs) + tuple(module.parameters())
        g = torch.randn(module(*inputs).shape, generator=torch.Generator().manual_seed(2))

        def run():
            if pass_ == "fwd":
                with torch.no_grad():
                    return module(*inputs)
            return torch.autograd.grad(module(*inputs), wrt, g, allow_unused=True)

        def check():
            return check_against_reference(spec, module, tuple(x.detach() for x in inputs))[:2]

        return Runner(run=run, check=check, check_vs="registered reference (spec.reference), fp64")

    return setup


def cases() -> list[Case]:
    import attnkit as ak

    out = []
    suites = frozenset({"cross"})
    area = sum(a * b for a, b in zip(Q_LENGTHS, K_LENGTHS))
    params = (("S", len(Q_LENGTHS)), ("Tq", sum(Q_LENGTHS)), ("Tk", sum(K_LENGTHS)), ("H", H), ("D", D),
              ("dtype", "float32"))
    for pass_ in ("fwd", "fwd+bwd"):
        for impl in ("per_sequence", "masked", "sdpa_padded"):
            out.append(Case(op="varlen_cross_attention", impl=impl,
                            group=f"varlen/S={len(Q_LENGTHS)}/Tq={sum(Q_LENGTHS)}/Tk={sum(K_LENGTHS)}", pass_=pass_,
                            suites=suites, params=params, flops=attention_flops(area, H, D),
                            setup=varlen_setup(impl, pass_), baseline=impl == "sdpa_padded"))
        for pattern in ("noncausal-cross", "causal-cross"):
            cab_area = CAB_NQ * CAB_NK if pattern == "noncausal-cross" else sum(
                min(CAB_NK, int(i * CAB_NK / CAB_NQ) + 1) for i in range(CAB_NQ))
            for impl in ("attnkit", "sdpa"):
                out.append(Case(op="attention", impl=impl, group=f"cab/{pattern}/Nq={CAB_NQ},Nk={CAB_NK}", pass_=pass_,
                                suites=suites, params=(("Nq", CAB_NQ), ("Nk", CAB_NK), ("H", H), ("D", D),
                                                       ("pattern", pattern), ("dtype", "float32")),
                                flops=attention_flops(cab_area, H, D), setup=cab_setup(pattern, impl, pass_),
                                baseline=impl == "sdpa"))
        for spec in ak.list_mechanisms():
            if spec.family != "cross" and spec.name != "mha":
                continue
            for pattern in (p for p in spec.patterns if p.endswith("-cross")):
                cfg = spec.config(pattern=pattern)
                try:
                    flops = float(spec.flops(cfg))
                except Exception:
                    flops = 0.0
                out.append(Case(op=spec.name, impl="module", group=f"module/{spec.name}/{pattern}", pass_=pass_,
                                suites=suites, params=(("pattern", pattern), ("dtype", "float32")), flops=flops,
                                setup=module_setup(spec.name, pattern, pass_)))
    return out
