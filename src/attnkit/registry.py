"""The mechanism registry: data that drives tests, the CLI and the benchmark.

A mechanism registers a :class:`MechanismSpec` with ``@register(...)`` on its
module class. Tests and the benchmark iterate over :func:`list_mechanisms`, so a
mechanism is tested and benchmarked the moment it is registered: the generic tests
compare every module with its registered ``reference``, check the claimed
``patterns`` and build the module from ``options`` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import enum
import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

PATTERNS = ("noncausal-self", "causal-self", "noncausal-cross", "causal-cross")


class _StrEnum(str, enum.Enum):
    """A str-valued enum: ``Family.DENSE == "dense"``, ``str()``/f-strings give the value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    __hash__ = str.__hash__  # equal to its value as a string, so hashed like it too

    @classmethod
    def parse(cls, value: object) -> Any:
        """The member for ``value`` (a member or its string); ValueError listing the valid ones."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown {cls.__name__} {value!r}; expected one of: {valid}") from None


class Family(_StrEnum):
    """What kind of token mixing a mechanism does."""

    DENSE = "dense"  # every query may see every key (softmax or a re-weighting of it)
    LOCAL = "local"  # fixed spatial neighbourhoods, windows, rows/columns
    LINEAR = "linear"  # kernelised / linear-state attention, agents
    ROUTED = "routed"  # content-routed block or token selection
    HEAD = "head"  # per-head patterns or per-token head selection
    VISION = "vision"  # vision token mixers outside the groups above
    CHANNEL = "channel"  # attention over channels
    CROSS = "cross"  # cross-attention modules
    DECODE = "decode"  # decoding-time (KV cache) mechanisms


class InputKind(_StrEnum):
    """The layout of a mechanism's first input."""

    SEQUENCE = "sequence"  # (B, N, C)
    IMAGE = "image"  # (B, Y, X, C) channels-last
    VIDEO = "video"  # (B, T, Y, X, C) channels-last
    CNN = "cnn"  # (B, C, Y, X)


@dataclass(frozen=True)
class Paper:
    """A paper a mechanism implements."""

    title: str
    arxiv: str
    year: int

    def __str__(self) -> str:
        return f"{self.title} (arXiv {self.arxiv}, {self.year})"


def default_input_shape(kind: InputKind, cfg: dict[str, Any]) -> tuple[int, ...]:
    """The first input's shape for a config with the standard keys.

    ``batch`` (default 1), ``dim``, and ``seq_len`` (sequence) or ``input_size`` (a tuple of spatial
    extents: image, video, cnn). A spec whose config uses other keys passes ``shape=`` instead.
    """
    b = cfg.get("batch", 1)
    if kind == InputKind.SEQUENCE:
        return (b, cfg["seq_len"], cfg["dim"])
    if kind == InputKind.CNN:
        return (b, cfg["dim"], *cfg["input_size"])
    return (b, *cfg["input_size"], cfg["dim"])


@dataclass(frozen=True)
class MechanismSpec:
    """Everything the library knows about one mechanism.

    Attributes:
        name: snake_case id, e.g. ``"mha"``, ``"neighborhood_2d"``.
        family: a :class:`Family` (compares equal to its string, ``spec.family == "dense"``).
        paper: the paper it implements.
        module: the ``nn.Module`` class.
        patterns: which of CAB's four attention patterns it supports (:data:`PATTERNS`). A ``*-cross``
            pattern means ``module(x, context)`` takes a context ``(B, M, C)`` with ``M != N`` as its
            second input; ``causal-*`` means output token ``i`` (raster order for grids) depends on
            input tokens ``<= i`` only. The generic tests check both.
        complexity: asymptotic cost, e.g. ``"O(N^2 d)"``.
        flops: ``flops(config) -> float``, useful forward FLOPs for a config dict
            (same keys as :attr:`default_config`).
        options: ``options(config) -> dict``, the module's constructor keywords for a config:
            ``module(**options(config))`` builds it.
        reference: ``reference(module, *inputs) -> output``: the module's forward computed from its
            own parameters with plain tensor code and the naive op twins of ``attnkit.reference``,
            independent of the op and backends the module calls. Required.
        functional: the public op (or ops) the module's forward calls, or None.
        default_config: the config :meth:`example` uses when given none.
        tiny_config: overrides of ``default_config`` giving the smallest instance that still takes
            every path of the module (the generic tests run it in float64 against the reference).
        notes: choices made where the paper leaves a detail open.
        input_kind: an :class:`InputKind`: ``sequence`` ``(B, N, C)``, ``image`` ``(B, Y, X, C)``,
            ``video`` ``(B, T, Y, X, C)`` or ``cnn`` ``(B, C, Y, X)``.
        shape: ``shape(config) -> tuple``, the first input's shape, for configs without the
            standard keys of :func:`default_input_shape`.
    """

    name: str
    family: Family
    paper: Paper
    module: type[nn.Module]
    patterns: tuple[str, ...]
    complexity: str
    flops: Callable[[dict[str, Any]], float]
    options: Callable[[dict[str, Any]], dict[str, Any]]
    reference: Callable[..., Any]
    functional: Callable[..., Any] | tuple[Callable[..., Any], ...] | None = None
    default_config: dict[str, Any] = field(default_factory=dict)
    tiny_config: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    input_kind: InputKind = InputKind.SEQUENCE
    shape: Callable[[dict[str, Any]], tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name.lower() != self.name:
            raise ValueError(f"MechanismSpec name must be snake_case, got {self.name!r}")
        object.__setattr__(self, "family", Family.parse(self.family))
        object.__setattr__(self, "input_kind", InputKind.parse(self.input_kind))
        bad = [p for p in self.patterns if p not in PATTERNS]
        if bad or not self.patterns:
            raise ValueError(f"MechanismSpec {self.name!r}: unknown patterns {bad}; expected a subset of {PATTERNS}")
        for what in ("flops", "options", "reference"):
            if not callable(getattr(self, what)):
                raise TypeError(f"MechanismSpec {self.name!r}: {what} must be callable, "
                                f"got {type(getattr(self, what)).__name__}")
        fns = self.functional if isinstance(self.functional, tuple) else (self.functional,)
        if self.functional is not None and not all(callable(f) for f in fns):
            raise TypeError(f"MechanismSpec {self.name!r}: functional must be a callable, a tuple of them, or None")

    def config(self, config: dict[str, Any] | None = None, *, pattern: str | None = None) -> dict[str, Any]:
        """``default_config`` updated by ``config``; a ``pattern`` sets ``causal`` (and ``context_len`` for cross)."""
        cfg = {**self.default_config, **(config or {})}
        if pattern is None:
            return cfg
        if pattern not in self.patterns:
            raise ValueError(f"mechanism {self.name!r} does not support pattern {pattern!r}; it has {self.patterns}")
        cfg["causal"] = pattern.startswith("causal")
        if pattern.endswith("-cross"):
            cfg.setdefault("context_len", math.prod(self.input_shape(cfg)[1:-1]) + 5)  # M != N
        return cfg

    def input_shape(self, config: dict[str, Any]) -> tuple[int, ...]:
        """The first input's shape for a full config (see :func:`default_input_shape`)."""
        return tuple(self.shape(config)) if self.shape is not None else default_input_shape(self.input_kind, config)

    def example(self, config: dict[str, Any] | None = None, *, pattern: str | None = None,
                generator: torch.Generator | None = None) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """A ready-to-run ``(module, inputs)``: ``module(*inputs)`` runs forward (and backward).

        Args:
            config: overrides of ``default_config``.
            pattern: one of :attr:`patterns`; ``*-cross`` adds a context ``(B, context_len, dim)``
                (``context_len`` defaults to N + 5) as the second input, ``causal-*`` builds the
                causal module. None: the config as it is, self-attention.
            generator: draws the inputs (the module's parameters come from the global RNG).

        Returns:
            ``(module, inputs)`` in float32.
        """
        cfg = self.config(config, pattern=pattern)
        module = self.module(**self.options(cfg))
        shape = self.input_shape(cfg)
        inputs = [torch.randn(shape, generator=generator)]
        if pattern is not None and pattern.endswith("-cross"):
            inputs.append(torch.randn(shape[0], cfg["context_len"], shape[-1], generator=generator))
        return module, tuple(inputs)


_REGISTRY: dict[str, MechanismSpec] = {}


def register(
    *,
    name: str,
    family: Family | str,
    paper: Paper,
    patterns: tuple[str, ...],
    complexity: str,
    flops: Callable[[dict[str, Any]], float],
    options: Callable[[dict[str, Any]], dict[str, Any]],
    reference: Callable[..., Any],
    functional: Callable[..., Any] | tuple[Callable[..., Any], ...] | None = None,
    default_config: dict[str, Any] | None = None,
    tiny_config: dict[str, Any] | None = None,
    notes: str = "",
    input_kind: InputKind | str = InputKind.SEQUENCE,
    shape: Callable[[dict[str, Any]], tuple[int, ...]] | None = None,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a module as a mechanism. See :class:`MechanismSpec`.

    ``family`` and ``input_kind`` take the enum or its string and are stored as the enum; an
    unknown value raises ``ValueError``.
    """
    spec_family, spec_kind = Family.parse(family), InputKind.parse(input_kind)

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].module is not cls:
            raise ValueError(f"mechanism {name!r} is already registered by {_REGISTRY[name].module.__name__}")
        _REGISTRY[name] = MechanismSpec(
            name=name, family=spec_family, paper=paper, module=cls, patterns=tuple(patterns),
            complexity=complexity, flops=flops, options=options, reference=reference, functional=functional,
            default_config=dict(default_config or {}), tiny_config=dict(tiny_config or {}), notes=notes,
            input_kind=spec_kind, shape=shape,
        )
        return cls

    return wrap


def _ensure_loaded() -> None:
    from attnkit import mechanisms  # noqa: F401  (importing registers every mechanism)


def list_mechanisms(pattern: str = "*", *, family: Family | str | None = None) -> list[MechanismSpec]:
    """Registered mechanisms whose name matches a glob, optionally of one family, sorted by name.

    ``family`` is a :class:`Family` or its string; an unknown family raises ``ValueError``.
    """
    _ensure_loaded()
    fam = None if family is None else Family.parse(family)
    return [
        s for n, s in sorted(_REGISTRY.items())
        if fnmatch.fnmatch(n, pattern) and (fam is None or s.family == fam)
    ]


def info(name: str) -> MechanismSpec:
    """The spec of one mechanism; unknown names raise ``KeyError`` listing the valid ones."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown mechanism {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def get(name: str, **config: Any) -> nn.Module:
    """Build the module of a mechanism: ``ak.get("mha", dim=64, num_heads=4)``."""
    return info(name).module(**config)
