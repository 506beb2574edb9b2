"""Layer-spec hybrid stacks built from registered mechanisms.

"Hydra: A 1.6B-Parameter State-Space Language Model with Sparse Attention, Mixture-of-Experts, and Memory"
(arXiv 2508.15099) and "MiniCPM-SALA: Hybridizing Sparse and Linear Attention for Efficient Long-Context
Modeling" (arXiv 2602.11761). Both modules are a :class:`~attnkit.ops.sequence.hybrid_spec.HybridSpec` (which
registered mechanism every layer runs) built with ``ak.get`` and run by
:func:`~attnkit.ops.sequence.hybrid_spec.hybrid_stack`; nothing of the blocks is re-implemented here.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from attnkit.ops.sequence.hybrid_spec import HybridSpec, hybrid_stack, hydra_spec, sala_spec
from attnkit.reference.naive_sequence5 import naive_hybrid_stack
from attnkit.registry import Family, Paper, check_input, choice_option, divisible, get, info, register

_FILLED = ("dim", "num_heads", "causal", "layer_idx", "num_layers")


def _keywords(cls: type) -> set[str]:
    return {p.name for p in inspect.signature(cls).parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


class _HybridStack(nn.Module):
    """A stack of registered mechanisms given by a layer spec; ``x (B, N, C)`` -> ``(B, N, C)``.

    Args:
        dim: ``C``; num_heads: heads of every block that takes ``num_heads`` (unless its options set them).
        spec: a :class:`HybridSpec`, its string or its dict; None = the paper's default (see the subclass).
        causal: passed to every block that takes ``causal`` (blocks without it, such as the lightning, S6 and
            Titans layers, are causal whatever this says).
        residual: ``x <- x + sum of the layer's paths`` (default) or ``x <- sum of the paths``.
        norm: ``"rms"`` (default): every layer's paths read ``RMSNorm(x)``, the pre-norm of both papers' blocks
            (without it, a stack of residual S6 / linear layers grows its activations layer after layer: the
            quality suite's MQAR training of a 4-layer Hydra stack reached NaN after 49 steps); ``"none"``: they
            read ``x``.

    Blocks that take ``layer_idx`` and ``num_layers`` (the lightning decay schedules) get their index in the
    whole stack, since such schedules count every layer of a hybrid.
    """

    default_spec: str = ""

    def __init__(self, dim: int, num_heads: int = 4, *, spec: HybridSpec | str | dict | None = None,
                 causal: bool = False, residual: bool = True, norm: str = "rms"):
        super().__init__()
        divisible(self, dim, num_heads)
        choice_option(self, "causal", causal, (True, False))
        choice_option(self, "residual", residual, (True, False))
        choice_option(self, "norm", norm, ("rms", "none"))
        who = type(self).__name__
        try:
            parsed = HybridSpec.parse(self.default_spec if spec is None else spec)
        except (TypeError, ValueError, KeyError) as e:
            raise type(e)(f"{who}: spec: {e}") from None
        self.dim, self.num_heads, self.causal, self.residual = dim, num_heads, bool(causal), bool(residual)
        self.spec = parsed
        self.layers = nn.ModuleList()
        refs = []
        for idx, kinds in enumerate(parsed.layers):
            paths, layer_refs = nn.ModuleList(), []
            for kind in kinds:
                name, opts = parsed.block(kind)
                try:
                    spec_of = info(name)
                except KeyError as e:
                    raise ValueError(f"{who}: spec kind {kind!r} names an unknown mechanism: {e}") from None
                accepted = _keywords(spec_of.module)
                bad = sorted(set(opts) & set(_FILLED) - {"num_heads"})
                if bad:
                    raise ValueError(f"{who}: spec kind {kind!r} sets {bad}, which the stack fills in")
                kw = {"dim": dim, **opts}
                if "num_heads" in accepted:
                    kw.setdefault("num_heads", num_heads)
                if "causal" in accepted:
                    kw["causal"] = self.causal
                if {"layer_idx", "num_layers"} <= accepted:
                    kw.update(layer_idx=idx, num_layers=parsed.num_layers)
                try:
                    paths.append(get(name, **kw))
                except (TypeError, ValueError) as e:
                    raise type(e)(f"{who}: layer {idx} kind {kind!r} ({name}): {e}") from None
                layer_refs.append(spec_of.reference)
            self.layers.append(paths)
            refs.append(tuple(layer_refs))
        # each block's own registered naive twin, for the module twin (reference/ cannot read the registry)
        self.block_references = tuple(refs)
        self.norm = norm
        self.norms = nn.ModuleList(nn.RMSNorm(dim, eps=1e-6) for _ in self.layers) if norm == "rms" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x, "(B, N, C)", channels=self.dim, meta="its blocks' ops have no common meta path")
        return hybrid_stack(x, self.layers, residual=self.residual, norms=self.norms)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, causal={self.causal}, residual={self.residual}, norm={self.norm!r}, "
                f"spec={self.spec.to_string()!r}")


def _flops_of(spec_str: str, cfg: dict) -> float:
    spec = HybridSpec.parse(cfg.get("spec") or spec_str)
    total = 0.0
    for kinds in spec.layers:
        for kind in kinds:
            name, opts = spec.block(kind)
            s = info(name)
            sub = {**s.default_input, **s.default_config, **opts, "dim": cfg["dim"],
                   "num_heads": cfg["num_heads"], "batch": cfg.get("batch", 1), "seq_len": cfg["seq_len"]}
            total += s.flops(sub)
    return total


def _options(c: dict) -> dict:
    return {"dim": c["dim"], "num_heads": c["num_heads"], "causal": c.get("causal", False),
            "residual": c.get("residual", True), "norm": c.get("norm", "rms"),
            **({"spec": c["spec"]} if c.get("spec") is not None else {})}


# registry configs: the blueprints at test sizes (blocks of 8 tokens instead of 64)
_SALA_SMALL = sala_spec(("moba", {"block_size": 8, "topk": 3}), ("lightning_attention", {"chunk_size": 16})).to_string()
_SALA_TINY = sala_spec(("moba", {"block_size": 4, "topk": 2}), ("lightning_attention", {"chunk_size": 16})).to_string()
_HYDRA_SMALL = hydra_spec(("dsf_equivalence", {"form": "s6", "state": 8}),
                          ("s2_attention", {"block_size": 8, "local_blocks": 2, "vert_stride": 4})).to_string()
_HYDRA_TINY = hydra_spec(("dsf_equivalence", {"form": "s6", "state": 3}),
                         ("s2_attention", {"block_size": 4, "local_blocks": 2, "vert_stride": 2})).to_string()


@register(
    name="sala_hybrid", family=Family.LINEAR,
    paper=Paper("MiniCPM-SALA: Hybridizing Sparse and Linear Attention for Efficient Long-Context Modeling",
                "2602.11761", 2026),
    patterns=("causal-self", "noncausal-self"), complexity="(1/4) sparse + (3/4) O(N H D^2) per layer",
    flops=lambda c: _flops_of(_SALA_SMALL, c), options=_options, reference=naive_hybrid_stack,
    functional=hybrid_stack, default_config={"dim": 32, "num_heads": 4, "spec": _SALA_SMALL},
    tiny_config={"dim": 8, "num_heads": 2, "spec": _SALA_TINY},
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 20},
    notes="Whole layers, 1 sparse : 3 linear, sparse first ('A|L|L|L'; the released 32-layer config is read as "
          "sparse at layers 0, 9, 16, 17, 22, 29, 30, 31 [unverified], same ratio). Sparse = the registered "
          "moba (block top-k routing; InfLLM-V2's own kernel, its sliding window, initial block, key compression "
          "and dense attention below 8192 tokens are not reproduced); linear = the registered "
          "lightning_attention (TNL style: its norms, gate and decay schedule by the layer's index in the whole "
          "stack, not SALA's own RMSNorm/ALiBi-decay layer). No HyPE (no RoPE anywhere), no FFN, no muP scalings; "
          "x <- x + block(RMSNorm(x)) per layer (pre-norm; norm='none' drops it). Any other spec is accepted "
          "(string or dict form). The "
          "lightning layers are causal whatever causal says.",
)
class SalaHybrid(_HybridStack):
    """MiniCPM-SALA-style stack (arXiv 2602.11761): 1 sparse layer per 3 linear ones.

    Default spec (module): ``"A|L|L|L; A=moba(block_size=64, topk=4); L=lightning_attention(chunk_size=64)"``.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = SalaHybrid(64, 4, causal=True)(torch.randn(1, 256, 64))
    """

    default_spec = sala_spec().to_string()


@register(
    name="hydra_hybrid", family=Family.LINEAR,
    paper=Paper("Hydra: A 1.6B-Parameter State-Space Language Model with Sparse Attention, Mixture-of-Experts, "
                "and Memory", "2508.15099", 2025),
    patterns=("causal-self", "noncausal-self"), complexity="O(N C n) SSM + (1/4) O(N (l + N/s) b C) sparse",
    flops=lambda c: _flops_of(_HYDRA_SMALL, c), options=_options, reference=naive_hybrid_stack,
    functional=hybrid_stack, default_config={"dim": 32, "num_heads": 4, "spec": _HYDRA_SMALL},
    tiny_config={"dim": 8, "num_heads": 2, "spec": _HYDRA_TINY},
    default_input={"batch": 2, "seq_len": 64}, tiny_input={"batch": 1, "seq_len": 16},
    notes="Blueprint 'S|S|S|S+A': an SSM path in every layer, a sparse global attention path added in every "
          "fourth (Hydra's blocks sum parallel SSM / attention / MoE paths into the residual stream; every fourth "
          "layer is attnkit's reading of 'intermittent' [inferred]). SSM = the registered dsf_equivalence with "
          "form='s6' (selective S6 scan, Euler B_bar, no gate); sparse global attention = the registered "
          "s2_attention (local blocks + strided global blocks) in place of the window + 16 global tokens "
          "suggested in the notes [inferred]. Not built: the chunk-level MoE FFN and the workspace / PKM memories "
          "(no attnkit mechanism; titans_memory can be named in a spec as a memory path) and the LayerScale gains; "
          "every layer's paths read RMSNorm(x) (pre-norm; norm='none' drops it). The S6 layers are causal "
          "whatever causal says.",
)
class HydraHybrid(_HybridStack):
    """Hydra-style stack (arXiv 2508.15099): SSM backbone with an intermittent sparse-attention path.

    Default spec (module): ``"S|S|S|S+A; A=s2_attention(block_size=64, local_blocks=4, vert_stride=8);
    S=dsf_equivalence(form='s6', state=16)"``.

    Shapes:
        ``x (B, N, C)`` -> ``(B, N, C)``.

    Example:
        >>> y = HydraHybrid(64, 4, causal=True)(torch.randn(1, 256, 64))
    """

    default_spec = hydra_spec().to_string()
