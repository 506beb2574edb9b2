"""Benchmark suites as data: which cases run, and how hard each is measured.

A case names the suites it belongs to (``Case.suites``); a :class:`Suite` says how
to measure them (``foundation``, ``neighborhood``, ``linear`` and ``sparse`` are the comparisons
each op family's performance claims rest on; the report's peer-ratio and scaling tables give
their ratios): repeats, warm-up, the time budget of one comparison, whether a
fresh process measures peak memory, and (for ``scaling``) when a series of
growing ``N`` stops.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    """How one suite is measured.

    Attributes:
        name: the suite's name, as cases list it in ``Case.suites``.
        description: one line for ``attnkit bench list-suites``.
        repeat: timed samples per case (each sample may loop a fast call several times).
        min_repeat: fewest samples kept when the unit's budget forces fewer than ``repeat``.
        warmup_s: warm-up time per case after the first call (at least one call).
        min_sample_s: a sample loops a fast call until it lasts this long (timer resolution).
        unit_budget_s: time budget for the timed rounds of one comparison (group, pass).
        case_timeout_s: a single call longer than this kills the worker; the case is
            recorded as ``timeout`` and the run goes on.
        memory: measure each case's peak RSS in a fresh forked process.
        stop_series_over_s: in a series of growing ``N`` (same op, impl, pass and other
            params), skip the larger ``N`` once a case's median exceeds this or fails.
        roof_sizes: sizes of the square matmuls whose best GFLOP/s (over sizes and repeats) is the roof.
        roof_s: seconds spent sampling them per dtype (at least a warm-up and two samples per size;
            a size whose call would take longer than this is skipped).
    """

    name: str
    description: str
    repeat: int = 5
    min_repeat: int = 3
    warmup_s: float = 0.05
    min_sample_s: float = 0.005
    unit_budget_s: float = 8.0
    case_timeout_s: float = 120.0
    memory: bool = True
    stop_series_over_s: float | None = None
    roof_sizes: tuple[int, ...] = (1024, 2048, 3072)
    roof_s: float = 1.5


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("quick", "smoke test of the harness and every provider (< 1 min; used by tests)",
              repeat=3, min_repeat=2, warmup_s=0.0, unit_budget_s=1.0, case_timeout_s=30.0,
              roof_sizes=(512, 1024, 2048), roof_s=0.6),
        Suite("default", "the CPU suite `make bench` runs: dense vs each mask family vs backends, "
                         "fwd and fwd+bwd, a few N (< 5 min on 2 cores)",
              repeat=5, min_repeat=3, warmup_s=0.02, unit_budget_s=4.0, case_timeout_s=60.0),
        Suite("masks", "LongCA-bench's mask zoo x N, every backend that runs it",
              repeat=5, unit_budget_s=10.0, case_timeout_s=120.0),
        Suite("scaling", "N doubling per mechanism until a case takes > 2 s or fails (crossover lengths)",
              repeat=3, min_repeat=2, unit_budget_s=10.0, case_timeout_s=60.0, stop_series_over_s=2.0),
        Suite("full", "everything, including the large masked-attention checks (N=8192/16384/65536) and flex",
              repeat=5, unit_budget_s=30.0, case_timeout_s=600.0),
        # one suite per op family: the comparisons that family's performance claims rest on
        Suite("foundation", "ak.attention: sliding_window(512) N=16384 blocked vs flex; four masks at N=8192 "
                            "(auto, blocked vs SDPA with a dense mask / is_causal), fwd and fwd+bwd; peak memory "
                            "of causal & sliding_window(512) at N=65536 fwd+bwd (~10 min on 2 cores)",
              repeat=5, unit_budget_s=30.0, case_timeout_s=600.0),
        Suite("neighborhood", "neighborhood attention: 64x64 k13 fwd vs flex and fwd+bwd vs SDPA with a dense "
                              "mask; N=16384 k1025 fwd vs flex; 16x32x32 k7 fwd+bwd peak memory (~5 min)",
              repeat=5, unit_budget_s=30.0, case_timeout_s=600.0),
        Suite("linear", "linear attention: chunk fwd N=16384 and 65536 (scaling, % of roof), fwd+bwd and peak "
                        "memory, compiled kernel vs torch ops, vs fla's naive chunk, crossover vs causal SDPA "
                        "from N=64 (~5 min)",
              repeat=7, unit_budget_s=30.0, case_timeout_s=600.0),
        Suite("sparse", "routed / sparse mechanisms at N=16384 fwd (MoBA, BiFormer, S2, MoA, PSA, HyperAttention, "
                        "VMoBA), each vs dense SDPA on the same q, k, v: speedup and fraction of 1/density "
                        "(~10 min)",
              repeat=4, min_repeat=2, unit_budget_s=60.0, case_timeout_s=600.0, memory=False),
    )
}


def register_suite(suite: Suite) -> Suite:
    """Add a suite from a case module (``attnkit.bench.cases.<name>``) at import; a name may be registered once
    (re-registering the identical suite, as a re-import does, is a no-op)."""
    old = SUITES.get(suite.name)
    if old is not None and old != suite:
        raise ValueError(f"suite {suite.name!r} is already registered with other settings")
    SUITES[suite.name] = suite
    return suite


def all_suites() -> dict[str, Suite]:
    """Every suite: the built-in ones above and those the case modules register when imported."""
    import importlib
    import pkgutil

    from attnkit.bench import cases

    for m in pkgutil.iter_modules(cases.__path__):
        if not m.name.startswith("_"):
            try:
                importlib.import_module(f"{cases.__name__}.{m.name}")
            except Exception:  # a provider that fails to import is reported by discover()
                pass
    return SUITES


def get_suite(name: str) -> Suite:
    """The suite called ``name``; unknown names raise ``KeyError`` listing the valid ones."""
    suites = all_suites()
    try:
        return suites[name]
    except KeyError:
        raise KeyError(f"unknown suite {name!r}; suites: {', '.join(suites)}") from None
