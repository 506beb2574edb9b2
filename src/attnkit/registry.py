"""The mechanism registry: data that drives tests, the CLI and the benchmark.

A mechanism registers a :class:`MechanismSpec` with ``@register(...)`` on its
module class. Tests and the benchmark iterate over :func:`list_mechanisms`, so a
mechanism is tested and benchmarked the moment it is registered: the generic tests
compare every module with its registered ``reference``, check the claimed
``patterns`` and build the module from ``options`` (see ``docs/architecture.md``).

A spec keeps two dicts apart: ``default_config`` holds module options only (so
``ak.get(name, **spec.default_config)`` builds the benchmarked module) and ``default_input`` the
input sizes (``batch``, ``seq_len`` / ``input_size`` / ...). :meth:`MechanismSpec.config` merges them.

The module contract shared by every mechanism, with the helpers that implement it:

* bad input raises ``ValueError`` / ``TypeError`` naming the module, the expected layout and the shape
  received (:func:`check_input`);
* options are validated when the module is built, not at its first forward (:func:`int_option`,
  :func:`choice_option`, :func:`float_option`);
* an empty input (``B == 0`` or no tokens) raises ``ValueError`` naming the module: every op refuses
  empty tensors (``check_qkv``), so modules refuse them up front with their own name;
* on the ``meta`` device a module either runs (shape inference) or raises ``NotImplementedError``
  naming the module and why (value-dependent routing, or an op without a meta path);
* a module deep-copies and pickles after a forward (no autograd graph is kept on the module).

Pooling modules (an output without per-token positions: SPP's fixed-length vector, K slots, a few pooled
tokens, a similarity matrix) register ``output_shape(config)``; the generic tests then check the output
against that shape instead of the input's. Such a module may claim only ``noncausal-*`` patterns
(``causal-*`` needs an output position per input token and is refused at registration); for it the
pattern test checks that changing the second half of the tokens (and of the context) changes the output,
i.e. the pooled output reads the whole input, instead of the per-position check.
"""

from __future__ import annotations

import contextlib
import enum
import fnmatch
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnkit._validate import int_arg

PATTERNS = ("noncausal-self", "causal-self", "noncausal-cross", "causal-cross")


# ------------------------------------------------------------------------------ module contract


def _who(module: object) -> str:
    return module if isinstance(module, str) else type(module).__name__


def check_input(module: object, x: object, layout: str, *, channels: int | None = None, name: str = "x",
                meta: str | None = None) -> torch.Tensor:
    """Check a module's input against ``layout`` (e.g. ``"(B, N, C)"``) and return it.

    Raises ``TypeError`` for a non-tensor or a non-floating tensor, ``ValueError`` for a wrong rank, a
    channel count (the ``C`` of ``layout``) other than ``channels``, or an empty dimension; every message
    names the module, the expected layout and the shape received. ``meta``: None when the module runs on
    the meta device, else the reason it cannot (raised as ``NotImplementedError``).
    """
    who = _who(module)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: {name} must be a floating-point tensor, got {x.dtype}")
    dims = [d.strip() for d in layout.strip("()").split(",")]
    expected = layout if channels is None else layout.replace("C", f"C={channels}", 1)
    if x.dim() != len(dims) or (channels is not None and x.shape[dims.index("C")] != channels):
        raise ValueError(f"{who}: {name} must be {expected}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        empty = ", ".join(d for d, s in zip(dims, x.shape) if s == 0)
        raise ValueError(f"{who}: {name} has an empty dimension ({empty} = 0) in shape {tuple(x.shape)}; "
                         f"attention modules need at least one example and one token")
    if meta is not None and x.is_meta:
        raise NotImplementedError(f"{who} cannot run on meta tensors: {meta}")
    return x


def int_option(module: object, name: str, value: object, minimum: int) -> int:
    """``value`` as an int ``>= minimum`` (``attnkit._validate.int_arg``), errors prefixed with the module."""
    try:
        return int_arg(name, value, minimum)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{_who(module)}: {e}") from None


def choice_option(module: object, name: str, value: object, choices: tuple) -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming the module and the valid ones."""
    if value not in choices:
        raise ValueError(f"{_who(module)}: {name} must be one of {choices}, got {value!r}")
    return value


def float_option(module: object, name: str, value: object, *, minimum: float | None = None,
                 exclusive: bool = False, optional: bool = False) -> float | None:
    """``value`` as a finite float (``> minimum`` if ``exclusive`` else ``>=``); None allowed if ``optional``."""
    who = _who(module)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}: {name} must be a number{' or None' if optional else ''}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{who}: {name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{who}: {name} must be {'>' if exclusive else '>='} {minimum}, got {value}")
    return float(value)


@contextlib.contextmanager
def named_errors(module: object) -> Iterator[None]:
    """Re-raise a ``TypeError`` / ``ValueError`` of the block with the module's name in front."""
    try:
        yield
    except (TypeError, ValueError) as e:
        who = _who(module)
        if str(e).startswith(f"{who}:"):
            raise
        raise type(e)(f"{who}: {e}") from e


def divisible(module: object, dim: int, num_heads: int, what: str = "dim") -> int:
    """Check ``dim`` and ``num_heads`` (>= 1) and ``dim % num_heads == 0``; returns the head width."""
    int_option(module, what, dim, 1)
    int_option(module, "num_heads", num_heads, 1)
    if dim % num_heads:
        raise ValueError(f"{_who(module)}: {what} ({dim}) must be divisible by num_heads ({num_heads})")
    return dim // num_heads


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
        flops: ``flops(config) -> float``, useful forward FLOPs for a config dict (module options and
            input sizes; keys missing from ``config`` are taken from ``default_input`` and
            ``default_config``, so ``spec.flops(spec.default_config)`` is the default case's count).
        options: ``options(config) -> dict``, the module's constructor keywords for a full config
            (:meth:`config`): ``module(**options(config))`` builds it.
        reference: ``reference(module, *inputs) -> output``: the module's forward computed from its
            own parameters with plain tensor code and the naive op twins of ``attnkit.reference``,
            independent of the op and backends the module calls. Required.
        functional: the public op (or ops) the module's forward calls, or None.
        default_config: module options only, the benchmark's module: ``ak.get(name, **default_config)``
            builds it (a key the constructor does not take is moved to ``default_input`` at registration).
        tiny_config: overrides of ``default_config`` giving the smallest module that still takes every
            path (the generic tests run it in float64 against the reference).
        default_input: the input sizes of the benchmark's example: ``batch``, and ``seq_len``
            (sequence) or ``input_size`` (spatial extents), or whatever keys ``shape`` reads.
        tiny_input: overrides of ``default_input`` for the tiny example.
        notes: choices made where the paper leaves a detail open.
        input_kind: an :class:`InputKind`: ``sequence`` ``(B, N, C)``, ``image`` ``(B, Y, X, C)``,
            ``video`` ``(B, T, Y, X, C)`` or ``cnn`` ``(B, C, Y, X)``.
        shape: ``shape(config) -> tuple``, the first input's shape, for configs without the
            standard keys of :func:`default_input_shape`.
        output_shape: ``output_shape(config) -> tuple``, the output's shape for a full config (with the
            pattern's ``context_len``), for a pooling module whose output has no per-token positions;
            None (default): the output has the first input's shape. A spec with one claims ``noncausal-*``
            patterns only (see :attr:`pooling`).
        fixed_size: the module's parameters fix its input's extents (a token MLP over ``N = Y X``, say), so
            another size raises a ValueError; the generic tests then keep the example's sizes.
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
    default_input: dict[str, Any] = field(default_factory=dict)
    tiny_input: dict[str, Any] = field(default_factory=dict)
    output_shape: Callable[[dict[str, Any]], tuple[int, ...]] | None = None
    fixed_size: bool = False

    def __post_init__(self) -> None:
        # module options and input sizes live apart; a key the constructor does not take is an input size
        accepted = _constructor_keywords(self.module)
        for opts, inp in (("default_config", "default_input"), ("tiny_config", "tiny_input")):
            o, i = dict(getattr(self, opts)), dict(getattr(self, inp))
            if accepted is not None:
                for key in [k for k in o if k not in accepted]:
                    i.setdefault(key, o.pop(key))
            object.__setattr__(self, opts, o)
            object.__setattr__(self, inp, i)
        raw = getattr(self.flops, "__wrapped__", self.flops)
        if callable(raw):
            object.__setattr__(self, "flops", _defaults_filled(raw, self))
        if not self.name.isidentifier() or self.name.lower() != self.name:
            raise ValueError(f"MechanismSpec name must be snake_case, got {self.name!r}")
        object.__setattr__(self, "family", Family.parse(self.family))
        object.__setattr__(self, "input_kind", InputKind.parse(self.input_kind))
        bad = [p for p in self.patterns if p not in PATTERNS]
        if bad or not self.patterns:
            raise ValueError(f"MechanismSpec {self.name!r}: unknown patterns {bad}; expected a subset of {PATTERNS}")
        if self.output_shape is not None:
            if not callable(self.output_shape):
                raise TypeError(f"MechanismSpec {self.name!r}: output_shape must be callable or None, "
                                f"got {type(self.output_shape).__name__}")
            causal = [p for p in self.patterns if p.startswith("causal")]
            if causal:
                raise ValueError(f"MechanismSpec {self.name!r}: a pooling module (output_shape given) has no output "
                                 f"position per input token, so it cannot claim {causal}; use noncausal-* patterns")
        for what in ("flops", "options", "reference"):
            if not callable(getattr(self, what)):
                raise TypeError(f"MechanismSpec {self.name!r}: {what} must be callable, "
                                f"got {type(getattr(self, what)).__name__}")
        fns = self.functional if isinstance(self.functional, tuple) else (self.functional,)
        if self.functional is not None and not all(callable(f) for f in fns):
            raise TypeError(f"MechanismSpec {self.name!r}: functional must be a callable, a tuple of them, or None")

    def config(self, config: dict[str, Any] | None = None, *, pattern: str | None = None,
               tiny: bool = False) -> dict[str, Any]:
        """The full config: ``default_input`` and ``default_config`` (with the tiny overrides if ``tiny``),
        updated by ``config``; a ``pattern`` sets ``causal`` (and ``context_len`` for cross)."""
        cfg = {**self.default_input, **self.default_config}
        if tiny:
            cfg.update({**self.tiny_input, **self.tiny_config})
        cfg.update(config or {})
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

    @property
    def pooling(self) -> bool:
        """True when the output has no per-token positions (``output_shape`` given): a pooling module."""
        return self.output_shape is not None

    def out_shape(self, config: dict[str, Any]) -> tuple[int, ...]:
        """The output's shape for a full config: ``output_shape(config)``, else the first input's shape."""
        if self.output_shape is not None:
            return tuple(self.output_shape(config))
        return self.input_shape(config)

    def example(self, config: dict[str, Any] | None = None, *, pattern: str | None = None,
                generator: torch.Generator | None = None, tiny: bool = False
                ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """A ready-to-run ``(module, inputs)``: ``module(*inputs)`` runs forward (and backward).

        Args:
            config: overrides of ``default_config``.
            pattern: one of :attr:`patterns`; ``*-cross`` adds a context ``(B, context_len, dim)``
                (``context_len`` defaults to N + 5) as the second input, ``causal-*`` builds the
                causal module. None: the config as it is, self-attention.
            generator: draws the inputs (the module's parameters come from the global RNG).
            tiny: start from the tiny config and input instead of the default ones.

        Returns:
            ``(module, inputs)`` in float32.
        """
        cfg = self.config(config, pattern=pattern, tiny=tiny)
        module = self.module(**self.options(cfg))
        shape = self.input_shape(cfg)
        inputs = [torch.randn(shape, generator=generator)]
        if pattern is not None and pattern.endswith("-cross"):
            inputs.append(torch.randn(shape[0], cfg["context_len"], shape[-1], generator=generator))
        return module, tuple(inputs)


def _constructor_keywords(cls: type) -> set[str] | None:
    """The keyword names ``cls(...)`` accepts, or None when it takes ``**kwargs`` (anything goes)."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in named}


def _defaults_filled(flops: Callable[[dict[str, Any]], float], spec: MechanismSpec
                     ) -> Callable[[dict[str, Any]], float]:
    """``flops`` reading missing keys from the spec's defaults (options and input sizes)."""

    @functools.wraps(flops)
    def filled(config: dict[str, Any]) -> float:
        return flops({**spec.default_input, **spec.default_config, **config})

    return filled


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
    default_input: dict[str, Any] | None = None,
    tiny_input: dict[str, Any] | None = None,
    output_shape: Callable[[dict[str, Any]], tuple[int, ...]] | None = None,
    fixed_size: bool = False,
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
            input_kind=spec_kind, shape=shape, default_input=dict(default_input or {}),
            tiny_input=dict(tiny_input or {}), output_shape=output_shape, fixed_size=bool(fixed_size),
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
