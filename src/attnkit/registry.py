"""The mechanism registry: data that drives tests, the CLI and the benchmark.

A mechanism registers a :class:`MechanismSpec` with ``@register(...)`` on its
module class. Tests and the benchmark iterate over :func:`list_mechanisms`, so a
mechanism is tested and benchmarked the moment it is registered.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

PATTERNS = ("noncausal-self", "causal-self", "noncausal-cross", "causal-cross")


@dataclass(frozen=True)
class Paper:
    """A paper a mechanism implements."""

    title: str
    arxiv: str
    year: int

    def __str__(self) -> str:
        return f"{self.title} (arXiv {self.arxiv}, {self.year})"


@dataclass(frozen=True)
class MechanismSpec:
    """Everything the library knows about one mechanism (DESIGN.md §6).

    Attributes:
        name: snake_case id, e.g. ``"mha"``, ``"neighborhood_2d"``.
        family: ``"dense"``, ``"local"``, ``"linear"``, ``"sparse"``, ``"vision"``, ...
        paper: the paper it implements.
        module: the ``nn.Module`` class.
        patterns: which of CAB's four attention patterns it supports.
        complexity: asymptotic cost, e.g. ``"O(N^2 d)"``.
        flops: ``flops(config) -> float``, useful forward FLOPs for a config dict
            (same keys as :attr:`default_config`).
        example: ``example(config=None) -> (module, inputs)``; ``module(*inputs)`` runs.
        default_config: the config ``example()`` uses when given none.
        notes: choices made where the paper leaves a detail open.
        input_kind: ``"sequence"`` ``(B, N, C)``, ``"image"`` ``(B, H, W, C)``,
            ``"video"`` ``(B, T, H, W, C)`` or ``"cnn"`` ``(B, C, H, W)``.
    """

    name: str
    family: str
    paper: Paper
    module: type[nn.Module]
    patterns: tuple[str, ...]
    complexity: str
    flops: Callable[[dict[str, Any]], float]
    example: Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]]
    default_config: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    input_kind: str = "sequence"

    def __post_init__(self) -> None:
        bad = [p for p in self.patterns if p not in PATTERNS]
        if bad:
            raise ValueError(f"MechanismSpec {self.name!r}: unknown patterns {bad}; expected a subset of {PATTERNS}")
        if not self.name.isidentifier() or self.name.lower() != self.name:
            raise ValueError(f"MechanismSpec name must be snake_case, got {self.name!r}")


_REGISTRY: dict[str, MechanismSpec] = {}


def register(
    *,
    name: str,
    family: str,
    paper: Paper,
    patterns: tuple[str, ...],
    complexity: str,
    flops: Callable[[dict[str, Any]], float],
    example: Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]],
    default_config: dict[str, Any] | None = None,
    notes: str = "",
    input_kind: str = "sequence",
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a module as a mechanism. See :class:`MechanismSpec`."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].module is not cls:
            raise ValueError(f"mechanism {name!r} is already registered by {_REGISTRY[name].module.__name__}")
        _REGISTRY[name] = MechanismSpec(
            name=name, family=family, paper=paper, module=cls, patterns=tuple(patterns),
            complexity=complexity, flops=flops, example=example,
            default_config=dict(default_config or {}), notes=notes, input_kind=input_kind,
        )
        return cls

    return wrap


def _ensure_loaded() -> None:
    from attnkit import mechanisms  # noqa: F401  (importing registers every mechanism)


def list_mechanisms(pattern: str = "*", *, family: str | None = None) -> list[MechanismSpec]:
    """Registered mechanisms whose name matches a glob, optionally of one family, sorted by name."""
    _ensure_loaded()
    return [
        s for n, s in sorted(_REGISTRY.items())
        if fnmatch.fnmatch(n, pattern) and (family is None or s.family == family)
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
