"""What a benchmark case is: the one interface between case providers and the harness.

A provider is a module in ``attnkit.bench.cases`` exposing ``cases() -> list[Case]``;
the harness discovers every such module, filters by suite/glob/backend/dtype/pass,
times ``Runner.run`` and appends one JSON line per case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

PASSES = ("fwd", "fwd+bwd")


@dataclass
class Runner:
    """A prepared case: inputs are built, one-off work done (or deferred to the first call).

    Attributes:
        run: one timed pass (forward, or forward+backward including ``.backward()``).
        first_call_is_oneoff: the first ``run()`` carries a one-off cost (torch.compile);
            the harness times it apart as ``compile_s`` and excludes it from the median.
        check: optional ``check() -> (max_abs, rel_rmse)`` of this implementation's output
            against the fp64/fp32 reference on a slice (called once, untimed).
        check_vs: what ``check`` compares with, for the report (e.g. ``"registered reference, fp64"``).
        oneoff: one-off costs measured during setup, seconds by name (e.g. ``{"mask_build_s": 0.4}``).
        flops: the forward's useful FLOPs when only the built inputs tell them (a data-dependent
            selection, e.g. a routed op's chosen pairs); replaces :attr:`Case.flops` in the record.
        params: parameters measured in setup (e.g. ``{"density": 0.21}``), merged into the record's.
    """

    run: Callable[[], Any]
    first_call_is_oneoff: bool = False
    check: Callable[[], tuple[float, float]] | None = None
    check_vs: str | None = None
    oneoff: dict[str, float] = field(default_factory=dict)
    flops: float | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One benchmark cell: (op or mechanism, implementation, shape, dtype, mask, pass).

    Attributes:
        op: ``"attention"``, ``"neighborhood_attention"``, ``"linear_attention"`` or a mechanism name.
        impl: implementation label: a backend (``"blocked"``, ``"sdpa"``, ``"flex"``) or a peer
            (``"sdpa_dense_mask"``, ``"natten"``, ``"fla_naive"``).
        group: cases that do the same work and are compared with each other (interleaved timing);
            e.g. ``"sliding_window_512/N=16384"``.
        pass_: ``"fwd"`` or ``"fwd+bwd"``.
        suites: which suites include it (names of :data:`attnkit.bench.suites.SUITES`).
        params: readable parameters for tables and plots (``N``, ``B``, ``H``, ``D``, ``dtype``, ``mask``, ...).
        flops: useful FLOPs of the *forward* pass (4 * area * H * D for softmax attention);
            the harness counts fwd+bwd as 3.5x (LongCA-bench: backward = 2.5x forward). A case whose
            work depends on the data sets an estimate here and the exact figure in ``Runner.flops``.
        setup: builds the inputs and returns a :class:`Runner`; timed as ``setup_s``.
        baseline: this case is its group's reference point for speedups (e.g. dense SDPA).
        requires: optional import name of a peer (``"natten"``, ``"fla"``); missing -> "not installed".
    """

    op: str
    impl: str
    group: str
    pass_: str
    suites: frozenset[str]
    params: tuple[tuple[str, Any], ...]
    flops: float
    setup: Callable[[], Runner]
    baseline: bool = False
    requires: str | None = None

    def __post_init__(self) -> None:
        if self.pass_ not in PASSES:
            raise ValueError(f"pass_ must be one of {PASSES}, got {self.pass_!r}")

    @property
    def id(self) -> str:
        return f"{self.op}/{self.group}/{self.impl}/{self.pass_}"

    @property
    def param(self) -> dict[str, Any]:
        return dict(self.params)


def pass_fn(fn: Callable[[], Any], pass_: str, inputs: Sequence[torch.Tensor] = (),
            grad_out: torch.Tensor | None = None) -> Callable[[], Any]:
    """One timed pass of ``fn``: its forward under ``no_grad``, or forward plus the gradients of
    ``inputs`` for the upstream gradient ``grad_out`` (``"fwd+bwd"``)."""
    if pass_ == "fwd":
        def run() -> Any:
            with torch.no_grad():
                return fn()
        return run

    def run_bwd() -> Any:
        return torch.autograd.grad(fn(), tuple(inputs), grad_out)
    return run_bwd


def pass_with_random_grad(fn: Callable[[], torch.Tensor], pass_: str, inputs: Sequence[torch.Tensor],
                          seed: int = 1) -> Callable[[], Any]:
    """:func:`pass_fn` with a fixed random upstream gradient of ``fn()``'s shape (one forward to learn it when
    the pass has a backward)."""
    grad_out = None
    if pass_ != "fwd":
        grad_out = torch.randn(fn().shape, generator=torch.Generator().manual_seed(seed))
    return pass_fn(fn, pass_, inputs, grad_out)


def module_pass(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, pass_: str,
                seed: int = 2) -> Callable[[], Any]:
    """One timed pass of a module on its input ``x``: the backward takes the gradient of ``x``."""
    if pass_ != "fwd":
        x.requires_grad_()
    return pass_with_random_grad(lambda: fn(x), pass_, (x,), seed=seed)


def merge_cases(groups: Sequence[Sequence[Case]]) -> list[Case]:
    """One case per id; a case listed in several groups belongs to the union of their suites."""
    by: dict[str, Case] = {}
    for cs in groups:
        for c in cs:
            by[c.id] = replace(by[c.id], suites=by[c.id].suites | c.suites) if c.id in by else c
    return list(by.values())
