"""attnkit inside timm's ViT family: :func:`swap_attention`.

timm's ViTs (``vit_*``, DeiT, BEiT-style blocks built on ``timm.layers.attention.Attention``) compute
``qkv -> (q_norm, k_norm) -> softmax attention -> (norm, gate) -> proj``. :func:`swap_attention`
replaces that attention in every such block:

* **op swap** (``"mha"`` and the variants of :data:`attnkit.integrations._variants.VARIANTS`:
  MoBA, S2, HyperAttention, PSA, 1-D neighborhood, softplus, linear): the block keeps every timm
  submodule and weight under the same names (``state_dict`` keys do not change, so pretrained
  checkpoints still load) and only the softmax step becomes the mechanism's op on the block's own
  ``q, k, v`` (heads-last ``(B, N, H, D)``, non-causal). ``"mha"`` runs ``ak.attention``: the
  original model.
* **module swap** (any other registered sequence mechanism with a non-causal self pattern): the
  block becomes the mechanism's module built for the block's width and heads; timm's ``qkv`` /
  ``proj`` weights are copied into it where names and shapes allow (``qkv``, ``q_proj`` / ``kv_proj``
  / ``wq`` / ``wk`` / ``wv``, ``proj`` / ``out_proj`` / ``out``); the wrapper's ``kept`` lists which.

timm is never imported by this module until :func:`swap_attention` runs (on a model that already
imported it).

Example:
    >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    >>> swap_attention(model, "moba", block_size=16, topk=4)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import attnkit as ak
from attnkit.integrations._variants import VARIANTS, options_for

__all__ = ["AttnkitModuleAttention", "AttnkitOpAttention", "swap_attention"]


def _run_op(name: str, options: dict[str, Any], q, k, v, scale: float, mask) -> torch.Tensor:
    """``(B, N, H, D)`` in and out: ``ak.attention`` for ``mha`` (with timm's optional bool mask), else the variant."""
    if name == "mha":
        return ak.attention(q, k, v, mask, scale=scale)
    if mask is not None:
        raise ValueError(f"swap_attention({name!r}): the {name} op takes no attention mask; got attn_mask")
    return VARIANTS[name].run(q, k, v, False, scale, options)


class AttnkitOpAttention(nn.Module):
    """timm's ``Attention`` with its softmax step replaced by an attnkit op; every submodule is timm's own.

    Shapes: ``x (B, N, C)`` -> ``(B, N, C)``.
    """

    def __init__(self, src: nn.Module, name: str, options: dict[str, Any]):
        super().__init__()
        self.mechanism, self.options = name, dict(options)
        self.num_heads, self.head_dim, self.attn_dim, self.scale = src.num_heads, src.head_dim, src.attn_dim, src.scale
        # the same submodules under the same names: state_dict keys are unchanged
        for sub in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(self, sub, getattr(src, sub))
        self.gate = getattr(src, "gate", None)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if is_causal:
            raise ValueError(f"{type(self).__name__}: is_causal=True is not supported by the swapped ViT attention")
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            raise ValueError(f"{type(self).__name__}: a float attn_mask (additive bias) has no attnkit form; "
                             "pass a bool mask (True = attend)")
        if self.training and self.attn_drop.p > 0:
            raise ValueError(f"{type(self).__name__}: attention dropout {self.attn_drop.p} has no attnkit form "
                             "(build the model with attn_drop_rate=0)")
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, D) each
        q, k = self.q_norm(q), self.k_norm(k)                                          # over D, as timm's
        out = _run_op(self.mechanism, self.options, q, k, v, self.scale, attn_mask)     # (B, N, H, D)
        out = self.norm(out.reshape(b, n, self.attn_dim))                               # (B, N, H*D)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"mechanism={self.mechanism!r}, heads={self.num_heads}, head_dim={self.head_dim}, options={self.options}"


# target parameter name -> (timm source, which thirds of qkv's rows): None = the whole tensor
_QKV_SLICES = {"qkv": (0, 3), "q_proj": (0, 1), "q": (0, 1), "wq": (0, 1), "kv_proj": (1, 3), "kv": (1, 3),
               "wk": (1, 2), "k_proj": (1, 2), "wv": (2, 3), "v_proj": (2, 3)}
_PROJ_NAMES = ("proj", "out_proj", "out", "o_proj")


def _copy_weights(src: nn.Module, dst: nn.Module) -> list[str]:
    """Copy timm's qkv / proj into ``dst`` where names and shapes allow; returns what was copied."""
    kept = []
    c = src.attn_dim
    with torch.no_grad():
        for pname, p in dst.named_parameters():
            owner, _, kind = pname.rpartition(".")
            if "." in owner or kind not in ("weight", "bias"):
                continue
            if owner in _QKV_SLICES:
                lo, hi = _QKV_SLICES[owner]
                t = getattr(src.qkv, kind)
                t = None if t is None else t[lo * c:hi * c]
            elif owner in _PROJ_NAMES:
                t = getattr(src.proj, kind)
            else:
                continue
            if t is not None and t.shape == p.shape:
                p.copy_(t)
                kept.append(pname)
    return kept


class AttnkitModuleAttention(nn.Module):
    """A registered attnkit sequence module in place of timm's ``Attention``; ``kept`` lists the copied weights.

    Shapes: ``x (B, N, C)`` -> ``(B, N, C)``.
    """

    def __init__(self, src: nn.Module, name: str, options: dict[str, Any]):
        super().__init__()
        spec = ak.info(name)
        cfg = {**spec.default_config, "dim": src.qkv.in_features, "num_heads": src.num_heads, **options}
        if "causal" in cfg:
            cfg["causal"] = False
        self.mechanism = name
        self.inner = spec.module(**spec.options(cfg))
        self.kept = _copy_weights(src, self.inner)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(f"{type(self).__name__}({self.mechanism}): takes no attn_mask / is_causal")
        return self.inner(x)

    def extra_repr(self) -> str:
        return f"mechanism={self.mechanism!r}, kept={self.kept}"


def _qualifies(name: str) -> str:
    """``"op"`` or ``"module"``; raises ValueError/KeyError for mechanisms that cannot take a ViT's tokens."""
    if name == "mha" or name in VARIANTS:
        return "op"
    spec = ak.info(name)  # KeyError listing the registered names
    if spec.input_kind != "sequence" or "noncausal-self" not in spec.patterns:
        ops = ", ".join(["mha", *sorted(VARIANTS)])
        raise ValueError(f"swap_attention: {name!r} does not take a ViT block's input: a ViT attention block takes "
                         f"tokens (B, N, C) (class token included) and attends non-causally; {name} takes "
                         f"{spec.input_kind} inputs with patterns {list(spec.patterns)}. Op swaps: {ops}; module "
                         f"swaps: registered sequence mechanisms with the noncausal-self pattern")
    return "module"


def swap_attention(model: nn.Module, name: str, **options: Any) -> nn.Module:
    """Replace the attention of every timm ``Attention`` block of ``model`` with the attnkit mechanism ``name``.

    Args:
        model: a timm model (ViT family: blocks built on ``timm.layers.attention.Attention``); changed in place.
        name: ``"mha"`` (exact), a variant of ``attnkit.integrations._variants.VARIANTS`` (op swap,
            every timm weight kept), or another registered sequence mechanism (module swap, qkv/proj
            weights copied where shapes allow).
        **options: the variant's options (op swap) or the mechanism's config keys (module swap).

    Returns:
        ``model``, with each ``Attention`` replaced (``AttnkitOpAttention`` / ``AttnkitModuleAttention``).

    Example:
        >>> swap_attention(timm.create_model("vit_tiny_patch16_224"), "mha")
    """
    from timm.layers.attention import Attention  # timm is already imported: the model came from it

    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_attention: model must be an nn.Module, got {type(model).__name__}")
    mode = _qualifies(name)
    if mode == "op" and name != "mha":
        options = options_for(VARIANTS[name], options)
    elif mode == "op" and options:
        raise ValueError(f"swap_attention('mha'): takes no options, got {sorted(options)}")
    targets = [(n, m) for n, m in model.named_modules() if type(m) is Attention]
    if not targets:
        raise ValueError(f"swap_attention: {type(model).__name__} has no timm.layers.attention.Attention block "
                         "(ViT family) to replace")
    for path, m in targets:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        new = AttnkitOpAttention(m, name, options) if mode == "op" else AttnkitModuleAttention(m, name, options)
        setattr(parent, child, new)
    return model
