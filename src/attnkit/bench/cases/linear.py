"""Cases for ``ak.linear_attention``: chunked causal linear attention vs causal SDPA and fla.

Groups and implementations (``Case.impl``):

* ``causal_decay/N=...``: ``chunk`` = ``ak.linear_attention(q, k, v, decay=lambda (H,), backend="chunk")``
  (Lightning-style, per-head TNL decay) and ``sdpa_causal`` = ``F.scaled_dot_product_attention(...,
  is_causal=True)`` on heads-first tensors, the baseline — their timings give the crossover length;
* ``chunk_torchops`` (both groups): the same chunk algorithm forced onto its torch-ops path
  (``chunk_linear_attention(..., native=False)``), beside ``chunk``, which runs the compiled
  kernel where it is built: the kernel's gain, measured in the same run;
* ``causal/N=...``: ``chunk`` without decay and ``fla_naive`` = fla's ``naive_chunk_linear_attn``
  (same math; ``requires="fla"``, loaded by file path), the baseline of that group; in the
  ``linear`` suite also ``chunk_decay`` (``chunk`` with the per-head decay) beside them.

Shapes: B=1, H=8, D=Dv=64, fp32, heads-last. FLOPs (forward) of linear attention are the useful
work of the chunk algorithm at C=64: ``H (N C (D + Dv) + 4 N D Dv)`` (causal half of each tile,
state update and state read); SDPA counts ``4 * area * H * D`` over the causal area. The chunk
algorithm as executed computes full C x C tiles: ``H (2 N C (D + Dv) + 4 N D Dv)``, recorded as the
``executed_flops`` parameter (4/3 of the useful figure at C=64, D=64). Each case checks the first 256
output rows against the fp64 oracle (causality makes a prefix exact). :func:`acceptance` is the
``linear`` suite.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attnkit.bench.case import Case, Runner, merge_cases, pass_fn
from attnkit.bench.flops import attention_flops

B, H, D, CHUNK = 1, 8, 64, 64
CHECK_ROWS = 256


def linear_flops(n: int, h: int = H, d: int = D, dv: int = D, chunk: int = CHUNK, batch: int = B) -> float:
    """Useful forward FLOPs of causal chunked linear attention (see module docstring)."""
    return float(batch * h * (n * min(chunk, n) * (d + dv) + 4 * n * d * dv))


def executed_flops(n: int, h: int = H, d: int = D, dv: int = D, chunk: int = CHUNK, batch: int = B) -> float:
    """Forward FLOPs of the chunk algorithm as executed (full C x C intra tiles)."""
    return float(batch * h * (2 * n * min(chunk, n) * (d + dv) + 4 * n * d * dv))


def _decay() -> torch.Tensor:
    from attnkit.ops.linear.decay import tnl_decay

    return tnl_decay(H, 0, 24)


def _fla_naive():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("fla")
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / "linear_attn" / "naive.py"
    s = importlib.util.spec_from_file_location("_fla_naive_linear_attn", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod.naive_chunk_linear_attn


def _check(out: torch.Tensor, q, k, v, decay, heads_first: bool) -> tuple[float, float]:
    from attnkit.reference.naive_linear import naive_linear_attention

    with torch.no_grad():
        if heads_first:
            out, q, k, v = (t.transpose(1, 2) for t in (out, q, k, v))  # (B, N, H, D)
        r = min(CHECK_ROWS, q.shape[1])
        ref = naive_linear_attention(*(t[:, :r].double() for t in (q, k, v)),
                                     decay=None if decay is None else decay.double())
        got = out[:, :r].double()
        err = (got - ref).abs().max().item()
        rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()
    return err, rel


def _sdpa_check(out, q, k, v) -> tuple[float, float]:
    with torch.no_grad():
        r = min(CHECK_ROWS, q.shape[2])
        qs, ks, vs = (t[:, :, :r].double() for t in (q, k, v))  # (B, H, r, D)
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        got = out[:, :, :r].double()
        err = (got - ref).abs().max().item()
        rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    return err, rel


def _setup(impl: str, n: int, decay: bool, pass_: str) -> Callable[[], Runner]:
    def setup() -> Runner:
        import attnkit as ak

        g = torch.Generator().manual_seed(0)
        heads_first = impl == "sdpa_causal"
        shape = (B, H, n, D) if heads_first else (B, n, H, D)
        q, k, v, do = (torch.randn(shape, generator=g) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(pass_ == "fwd+bwd")
        lam = _decay() if decay else None
        if impl in ("chunk", "chunk_decay"):
            def fn() -> torch.Tensor:
                return ak.linear_attention(q, k, v, decay=lam, backend="chunk")
        elif impl == "chunk_torchops":
            from attnkit.ops.linear.chunk import chunk_linear_attention

            g_log = None if lam is None else torch.log(lam)

            def fn() -> torch.Tensor:
                return chunk_linear_attention(q, k, v, g_log, scale=D ** -0.5, native=False)[0]
        elif impl == "sdpa_causal":
            def fn() -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif impl == "fla_naive":
            naive = _fla_naive()

            def fn() -> torch.Tensor:
                return naive(q, k, v)
        else:
            raise ValueError(f"unknown impl {impl!r}")

        def check() -> tuple[float, float]:
            with torch.no_grad():
                out = fn()
            if heads_first:
                return _sdpa_check(out, q, k, v)
            return _check(out, q, k, v, lam, False)

        run = pass_fn(fn, pass_, (q, k, v), do)
        return Runner(run=run, check=check)

    return setup


def _cases(group: str, impls: list[str], ns: list[int], passes: tuple[str, ...], suites: set[str]) -> list[Case]:
    out = []
    for n in ns:
        for pass_ in passes:
            for impl in impls:
                decay = group == "causal_decay" or impl == "chunk_decay"
                params = (("N", n), ("B", B), ("H", H), ("D", D), ("dtype", "float32"),
                          ("decay", "per-head (TNL released, layer 0/24)" if decay else "none"), ("chunk", CHUNK))
                if impl.startswith("chunk"):
                    params += (("executed_flops", executed_flops(n)),)
                fl = attention_flops(n * (n + 1) // 2, H, D, batch=B) if impl == "sdpa_causal" else linear_flops(n)
                out.append(Case(op="linear_attention", impl=impl, group=f"{group}/N={n}", pass_=pass_,
                                suites=frozenset(suites), params=params, flops=fl,
                                setup=_setup(impl, n, decay, pass_),
                                baseline=impl in ("sdpa_causal", "fla_naive"),
                                requires="fla" if impl == "fla_naive" else None))
    return out


FWD, BOTH = ("fwd",), ("fwd", "fwd+bwd")


def cases() -> list[Case]:
    """Every linear-attention case, suites attached (see module docstring)."""
    pow2 = [1024 * 2**i for i in range(7)]  # 1024 .. 65536
    return merge_cases([
        _cases("causal_decay", ["chunk", "sdpa_causal"], [256], BOTH, {"quick"}),
        # default: cheap — linear up to 16384, SDPA only where it is fast
        _cases("causal_decay", ["chunk"], [1024, 4096], BOTH, {"default", "full"}),
        _cases("causal_decay", ["chunk", "chunk_torchops"], [16384], FWD, {"default", "full"}),
        _cases("causal_decay", ["chunk", "chunk_torchops"], [16384], ("fwd+bwd",), {"full"}),
        _cases("causal_decay", ["sdpa_causal"], [1024, 4096], FWD, {"default", "full"}),
        _cases("causal", ["chunk", "fla_naive"], [16384], FWD, {"full"}),
        # scaling: N doubling up to 65536 (SDPA stops by itself past 2 s) -> crossover and time ratios
        _cases("causal_decay", ["chunk", "sdpa_causal"], pow2, FWD, {"scaling", "full"}),
        _cases("causal_decay", ["chunk"], pow2, ("fwd+bwd",), {"scaling", "full"}),
        _cases("causal", ["chunk", "fla_naive"], [1024, 4096, 16384, 65536], FWD, {"scaling", "full"}),
        _cases("causal_decay", ["sdpa_causal"], [8192, 16384], ("fwd+bwd",), {"full"}),
        acceptance(),
    ])


def acceptance(n: int = 16384, n_long: int = 65536, n_cross: tuple[int, ...] = tuple(64 * 2**i for i in range(8)),
               suites: tuple[str, ...] = ("linear",)) -> list[Case]:
    """The ``linear`` suite (sizes are arguments so a test can run it small).

    * ``chunk`` with decay, fwd at ``n`` and ``n_long``: the report's scaling table gives the time
      ratio (linear: ``n_long / n``), the case table GFLOP/s and % of the matmul roof (useful FLOPs;
      ``executed_flops`` in the params for the algorithm's figure); fwd+bwd at both (time, and
      peak memory in a fresh process); ``chunk_torchops`` beside ``chunk`` at ``n``, fwd;
    * ``causal/N=n``, fwd: ``chunk`` (no decay) and ``chunk_decay`` vs fla's ``fla_naive``;
    * ``n_cross``: ``chunk`` vs ``sdpa_causal`` fwd, whose efficiency-length row is the crossover.
    """
    s = set(suites)
    return merge_cases([
        _cases("causal_decay", ["chunk", "chunk_torchops"], [n], FWD, s),
        _cases("causal_decay", ["chunk"], [n_long], FWD, s),
        _cases("causal_decay", ["chunk"], [n, n_long], ("fwd+bwd",), s),
        _cases("causal", ["chunk", "chunk_decay", "fla_naive"], [n], FWD, s),
        _cases("causal_decay", ["chunk", "sdpa_causal"], list(n_cross), FWD, s),
    ])
