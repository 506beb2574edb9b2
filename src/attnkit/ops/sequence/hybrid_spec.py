"""Layer specs for hybrid stacks: "Hydra: A 1.6B-Parameter State-Space Language Model with Sparse Attention,
Mixture-of-Experts, and Memory" (arXiv 2508.15099) and "MiniCPM-SALA: Hybridizing Sparse and Linear Attention
for Efficient Long-Context Modeling" (arXiv 2602.11761).

A :class:`HybridSpec` is data: the kind of every layer and, per kind, which registered attnkit mechanism
builds it with which options. A layer may hold several kinds side by side (``"S+A"``): their outputs are
summed, as Hydra's blocks add an SSM path and a sparse-attention path to the residual stream. The spec
round-trips through a string (``"L|L|L|A; L=lightning_attention(); A=moba(block_size=64)"``) and a dict.

:func:`hybrid_stack` is the functional form: it runs ``x (B, N, C)`` through built layers (any callables),
``x <- x + sum_p path_p(x)`` with ``residual=True``, else ``x <- sum_p path_p(x)``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def _literal(text: str, what: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"HybridSpec: {what} is not a Python literal: {text!r}") from e


@dataclass(frozen=True)
class HybridSpec:
    """Which mechanism every layer of a hybrid stack runs.

    Attributes:
        layers: per layer, the kinds it runs in parallel, e.g. ``(("S",), ("S",), ("S",), ("S", "A"))``.
        blocks: per kind, ``(kind, mechanism name, options)`` with options a sorted tuple of ``(key, value)``
            (the constructor keywords of the registered mechanism, besides ``dim`` / ``num_heads`` / ``causal``
            / ``layer_idx`` / ``num_layers``, which the stack fills in).
    """

    layers: tuple[tuple[str, ...], ...]
    blocks: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...]

    def __post_init__(self) -> None:
        layers = tuple(tuple(str(k) for k in (layer if isinstance(layer, (tuple, list)) else (layer,)))
                       for layer in self.layers)
        blocks = tuple(sorted((str(k), str(name), tuple(sorted(dict(opts).items()))) for k, name, opts in self.blocks))
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "blocks", blocks)
        if not layers or any(not layer for layer in layers):
            raise ValueError("HybridSpec: layers must be a non-empty sequence of non-empty layers")
        kinds = [k for k, _, _ in blocks]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"HybridSpec: a kind is defined twice in blocks: {kinds}")
        for k in kinds:
            if not k.isidentifier():
                raise ValueError(f"HybridSpec: kind names must be identifiers, got {k!r}")
        missing = sorted({k for layer in layers for k in layer} - set(kinds))
        if missing:
            raise ValueError(f"HybridSpec: layers use kinds {missing} that blocks does not define (defined: {kinds})")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def block(self, kind: str) -> tuple[str, dict[str, Any]]:
        """``(mechanism name, options)`` of one kind."""
        for k, name, opts in self.blocks:
            if k == kind:
                return name, dict(opts)
        raise KeyError(f"HybridSpec: unknown kind {kind!r}; defined: {[k for k, _, _ in self.blocks]}")

    def layer_types(self) -> list[str]:
        """Every layer as its kinds joined by ``+`` (``["S", "S", "S", "S+A"]``)."""
        return ["+".join(layer) for layer in self.layers]

    def ratio(self, kind: str) -> float:
        """The share of layers that run ``kind``."""
        return sum(kind in layer for layer in self.layers) / len(self.layers)

    # ------------------------------------------------------------------ string and dict forms

    def to_string(self) -> str:
        """``"S|S|S|S+A; A=s2_attention(block_size=64); S=dsf_equivalence(form='s6')"`` (round-trips)."""
        defs = [f"{k}={name}({', '.join(f'{o}={v!r}' for o, v in opts)})" for k, name, opts in self.blocks]
        return "; ".join(["|".join(self.layer_types()), *defs])

    __str__ = to_string

    @classmethod
    def from_string(cls, text: str) -> HybridSpec:
        """Parse :meth:`to_string`'s form: ``"<layers>; <kind>=<mechanism>(<key>=<literal>, ...); ..."``."""
        if not isinstance(text, str):
            raise TypeError(f"HybridSpec.from_string: expected a str, got {type(text).__name__}")
        parts = [p.strip() for p in text.split(";")]
        layers = tuple(tuple(k.strip() for k in layer.split("+")) for layer in parts[0].split("|"))
        blocks = []
        for part in parts[1:]:
            if not part:
                continue
            kind, _, rest = part.partition("=")
            name, paren, args = rest.strip().partition("(")
            if not paren or not args.endswith(")"):
                raise ValueError(f"HybridSpec.from_string: expected '<kind>=<mechanism>(<options>)', got {part!r}")
            call = ast.parse(f"f({args[:-1]})", mode="eval").body
            if call.args:
                raise ValueError(f"HybridSpec.from_string: options must be key=value, got {part!r}")
            opts = {kw.arg: _literal(ast.unparse(kw.value), f"option {kw.arg}") for kw in call.keywords}
            blocks.append((kind.strip(), name.strip(), opts))
        return cls(layers, tuple(blocks))

    def to_dict(self) -> dict[str, Any]:
        """``{"layers": [["S"], ...], "blocks": {"S": {"mechanism": ..., "options": {...}}}}`` (round-trips)."""
        return {"layers": [list(layer) for layer in self.layers],
                "blocks": {k: {"mechanism": name, "options": dict(opts)} for k, name, opts in self.blocks}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HybridSpec:
        if not isinstance(d, dict) or set(d) != {"layers", "blocks"}:
            raise ValueError(f"HybridSpec.from_dict: expected a dict with keys 'layers' and 'blocks', got {d!r}")
        return cls(tuple(tuple(layer) for layer in d["layers"]),
                   tuple((k, b["mechanism"], b.get("options", {})) for k, b in d["blocks"].items()))

    @classmethod
    def parse(cls, spec: HybridSpec | str | dict[str, Any]) -> HybridSpec:
        """A spec from itself, its string or its dict."""
        if isinstance(spec, HybridSpec):
            return spec
        if isinstance(spec, str):
            return cls.from_string(spec)
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        raise TypeError(f"HybridSpec.parse: expected a HybridSpec, str or dict, got {type(spec).__name__}")

    @classmethod
    def pattern(cls, pattern: str, blocks: dict[str, tuple[str, dict[str, Any]]], repeat: int = 1) -> HybridSpec:
        """From a letter pattern: ``pattern("LLLA", {"L": ("lightning_attention", {}), ...}, repeat=2)``; a layer
        running two kinds is written ``(S+A)`` (``"SSS(S+A)"``)."""
        layers: list[tuple[str, ...]] = []
        i = 0
        while i < len(pattern):
            if pattern[i] == "(":
                j = pattern.index(")", i)
                layers.append(tuple(pattern[i + 1:j].split("+")))
                i = j + 1
            else:
                layers.append((pattern[i],))
                i += 1
        return cls(tuple(layers) * repeat, tuple((k, name, opts) for k, (name, opts) in blocks.items()))


def sala_spec(sparse: tuple[str, dict[str, Any]] = ("moba", {"block_size": 64, "topk": 4}),
              linear: tuple[str, dict[str, Any]] = ("lightning_attention", {"chunk_size": 64}),
              repeat: int = 1) -> HybridSpec:
    """MiniCPM-SALA's layer ratio, 1 sparse : 3 linear (arXiv 2602.11761), sparse first: ``"A|L|L|L"``."""
    return HybridSpec.pattern("ALLL", {"A": sparse, "L": linear}, repeat)


def hydra_spec(ssm: tuple[str, dict[str, Any]] = ("dsf_equivalence", {"form": "s6", "state": 16}),
               sparse: tuple[str, dict[str, Any]] = ("s2_attention", {"block_size": 64, "local_blocks": 4,
                                                                       "vert_stride": 8}),
               repeat: int = 1) -> HybridSpec:
    """Hydra's blueprint (arXiv 2508.15099): an SSM path in every layer and a sparse global attention path added
    in every fourth, ``"S|S|S|S+A"``."""
    return HybridSpec.pattern("SSS(S+A)", {"S": ssm, "A": sparse}, repeat)


def hybrid_stack(x: torch.Tensor, layers: Sequence[Sequence[Callable[[torch.Tensor], torch.Tensor]]], *,
                 residual: bool = True, norms: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None
                 ) -> torch.Tensor:
    """Run ``x (B, N, C)`` through hybrid layers: every layer sums its parallel paths.

    Args:
        x: ``(B, N, C)``.
        layers: per layer, the callables (built modules) it runs side by side, each ``(B, N, C) -> (B, N, C)``.
        residual: ``x <- x + sum_p path_p(h)`` (True) or ``x <- sum_p path_p(h)``.
        norms: one pre-norm per layer, ``h = norm(x)`` (the blocks of both papers are pre-norm), or None:
            ``h = x``.

    Returns:
        ``(B, N, C)``.

    Example:
        >>> y = hybrid_stack(torch.randn(1, 16, 8), [[torch.nn.Identity()], [torch.nn.Identity()]])
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"hybrid_stack: x must be (B, N, C), got shape {tuple(getattr(x, 'shape', ()))}")
    if not layers or any(len(layer) == 0 for layer in layers):
        raise ValueError("hybrid_stack: layers must be a non-empty sequence of non-empty layers")
    if norms is not None and len(norms) != len(layers):
        raise ValueError(f"hybrid_stack: norms must hold one norm per layer ({len(layers)}), got {len(norms)}")
    for i, layer in enumerate(layers):
        h = x if norms is None else norms[i](x)
        out = None
        for path in layer:
            y = path(h)
            out = y if out is None else out + y
        x = x + out if residual else out
    return x
