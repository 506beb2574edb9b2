"""Named variants ``attn_implementation="attnkit:<mechanism>"``: a registered mechanism's op in place of softmax.

A variant qualifies when its op takes the model's own ``(q, k, v)``, heads-last ``(B, N, H, D)``,
plus hyper-parameters only (no learned tensors the pretrained model lacks) and a causal flag, so
that the attention layer's projections, RoPE and cache stay the model's. Each adapter below maps
the layer's causal flag and scale onto the op and takes its hyper-parameters from
``config.attnkit_options`` (defaults listed per variant). Every other registered mechanism is
refused with the reason (:func:`refusal`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import attnkit as ak


@dataclass(frozen=True)
class Variant:
    """One qualifying mechanism.

    Attributes:
        name: the registered mechanism's name (``attnkit:<name>``).
        run: ``run(q, k, v, causal, scale, options) -> out``, heads-last ``(B, N, H, D)`` in and out.
        defaults: every option the variant reads, with its default.
        note: one line: which op runs and how options map onto it.
    """

    name: str
    run: Callable[..., torch.Tensor]
    defaults: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _moba(q, k, v, causal, scale, o):
    blocks = math.ceil(k.shape[1] / o["block_size"])
    # a short prompt has fewer blocks than top-k: then every block is selected (exact attention)
    return ak.moba_attention(q, k, v, o["block_size"], min(o["topk"], blocks), causal=causal,
                             routing=o["routing"], scale=scale)


def _s2(q, k, v, causal, scale, o):
    return ak.s2_attention(q, k, v, o["block_size"], o["local_blocks"], o["vert_stride"], causal=causal,
                           num_dense_heads=o["num_dense_heads"], homo_head=o["homo_head"], scale=scale)


def _hyper(q, k, v, causal, scale, o):
    gen = torch.Generator().manual_seed(o["seed"])   # fixed hashing: one forward equals the next
    return ak.hyper_attention(q, k, v, block_size=o["block_size"], sample_size=o["sample_size"],
                              lsh_bits=o["lsh_bits"], min_seq_len=o["min_seq_len"], causal=causal, scale=scale,
                              generator=gen)


def _psa(q, k, v, causal, scale, o):
    from attnkit.ops.routed.psa import PSAConfig

    cfg = PSAConfig(block_q=o["block_q"], block_kv=o["block_kv"], levels=o["levels"],
                    mask_ratios=tuple(o["mask_ratios"]), causal=causal)
    return ak.psa_attention(q, k, v, cfg, scale=scale, generator=torch.Generator().manual_seed(o["seed"]))


def _neighborhood(q, k, v, causal, scale, o):
    # a window wider than the sequence is the whole sequence (NATTEN's kernel_size <= N)
    size = min(o["kernel_size"], q.shape[1] // o["dilation"])
    return ak.neighborhood_attention(q, k, v, max(1, size), dilation=o["dilation"], is_causal=causal, scale=scale)


def _softplus(q, k, v, causal, scale, o):
    # LSSA sets its own logit scale, ln(d) ln(N_t) after QK-norm (arXiv 2501.13428 section 3): no scale argument
    return ak.softplus_attention(q, k, v, causal=causal, p=o["p"], offset=o["offset"])


def _linear(q, k, v, causal, scale, o):
    return ak.linear_attention(q, k, v, causal=causal, feature_map=o["feature_map"], normalize=o["normalize"],
                               scale=scale)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("moba", _moba, {"block_size": 64, "topk": 3, "routing": "token"},
            "ak.moba_attention(q, k, v, block_size, min(topk, blocks), causal=layer's, routing)"),
    Variant("s2_attention", _s2, {"block_size": 16, "local_blocks": 4, "vert_stride": 4, "num_dense_heads": 0,
                                  "homo_head": False},
            "ak.s2_attention(q, k, v, block_size, local_blocks, vert_stride, causal=layer's, ...)"),
    Variant("hyper_attention", _hyper, {"block_size": 256, "sample_size": 256, "lsh_bits": 7, "min_seq_len": 4096,
                                        "seed": 0},
            "ak.hyper_attention(q, k, v, ..., causal=layer's, generator seeded by seed)"),
    Variant("pyramid_sparse", _psa, {"block_q": 128, "block_kv": 64, "levels": 4,
                                     "mask_ratios": (0.1, 0.05, 0.0, 0.2), "seed": 0},
            "ak.psa_attention(q, k, v, PSAConfig(block_q, block_kv, levels, mask_ratios, causal=layer's))"),
    Variant("neighborhood_1d", _neighborhood, {"kernel_size": 63, "dilation": 1},
            "ak.neighborhood_attention(q, k, v, min(kernel_size, N), dilation, is_causal=layer's)"),
    Variant("softplus_attention", _softplus, {"p": None, "offset": 1.0},
            "ak.softplus_attention(q, k, v, causal=layer's, p, offset) (its own length-dependent scale)"),
    Variant("linear_attention", _linear, {"feature_map": "elu+1", "normalize": True},
            "ak.linear_attention(q, k, v, causal=layer's, feature_map, normalize)"),
)}


def options_for(variant: Variant, given: dict[str, Any]) -> dict[str, Any]:
    """The variant's defaults updated by ``given``; an unknown key raises ValueError listing the valid ones."""
    unknown = sorted(set(given) - set(variant.defaults))
    if unknown:
        raise ValueError(f"config.attnkit_options for attnkit:{variant.name}: unknown option(s) {unknown}; "
                         f"valid: {sorted(variant.defaults)} (and 'fallback')")
    return {**variant.defaults, **given}


def refusal(name: str) -> str:
    """Why the registered mechanism ``name`` cannot replace a transformers model's attention."""
    spec = ak.info(name)
    if spec.input_kind != "sequence":
        return (f"it takes {spec.input_kind} inputs, but a transformers attention layer hands over sequences "
                f"q, k, v of shape (B, N, H, D)")
    fns = spec.functional if isinstance(spec.functional, (tuple, list)) else (spec.functional,)
    fns = [f for f in fns if f is not None]
    if len(fns) != 1:
        names = ", ".join(f.__name__ for f in fns) or "none"
        return f"its module combines several ops ({names}) with parameters of its own, not one (q, k, v) op"
    params = list(inspect.signature(fns[0]).parameters.values())[3:]
    extra = [p.name for p in params if p.default is inspect.Parameter.empty
             and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if extra:
        return (f"its op {fns[0].__name__} needs inputs besides (q, k, v) ({', '.join(extra)}) that a "
                f"pretrained model does not have")
    return f"no adapter maps a layer's causal flag and options onto {fns[0].__name__} yet"
