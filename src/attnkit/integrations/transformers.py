"""attnkit inside Hugging Face transformers: ``attn_implementation="attnkit"``.

:func:`register` adds ``"attnkit"`` (and ``"attnkit:<mechanism>"``) to transformers'
``AttentionInterface`` and ``AttentionMaskInterface``. With it every attention layer of a model
that uses the interface (Llama, Mistral, Qwen2, BERT, ...) runs through ``ak.attention``:

* the mask interface does not build transformers' ``(B, 1, Nq, Nk)`` boolean mask; it reads the
  mask composition back as ``ak.masks`` patterns per batch element -- causal, sliding window
  (``config.sliding_window``, causal or bidirectional), packed documents (``position_ids`` that
  restart), key padding (``attention_mask``), with cache offsets -- so the blocked backend skips
  empty tiles (``attnkit.integrations._hf_masks``). A composition it does not know (a model's own
  ``or_mask_function``, chunked attention) is built densely the way ``sdpa`` builds it; exact, and
  ``explain`` says so.
* an arbitrary float bias (``position_bias``, a float mask with values other than 0 / -inf) and
  attention dropout have no ``ak.attention`` form: they raise ``ValueError`` naming the reason,
  unless ``config.attnkit_options = {"fallback": "sdpa"}``, which runs that call on torch's SDPA
  with the dense float mask (what ``attn_implementation="sdpa"`` computes); ``explain`` reports it.

``config.attnkit_options`` (a dict on the model config, read by every layer at each call; set it
after loading, ``model.config.attnkit_options = {...}``, or with :func:`use`) holds ``backend``
(force an ``ak.attention`` backend), ``fallback`` (``"error"`` or ``"sdpa"``) and, for a named
variant, that variant's options (:data:`VARIANTS`).

Example:
    >>> from attnkit.integrations import transformers as akt
    >>> akt.register()
    >>> model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attnkit")
    >>> print(akt.explain(model, input_ids=ids))
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit._validate import check_qkv, resolve_scale
from attnkit.integrations._hf_masks import HFMask, Untranslatable, translate
from attnkit.integrations._variants import VARIANTS, Variant, options_for, refusal
from attnkit.masks import causal
from attnkit.masks.causal import Causal
from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_dense import naive_attention

PREFIX = "attnkit"
_FALLBACKS = ("error", "sdpa")
_BASE_OPTIONS = ("backend", "fallback")

__all__ = ["PREFIX", "VARIANTS", "HFMask", "check", "explain", "implementations", "register", "use"]


# ---- the op: one transformers attention call, explainable -----------------------------------------
@dataclass(frozen=True, eq=False)
class HFAttentionCall:
    """One attention layer's call, heads-last: ``q (B, Nq, Hq, D)``, ``k, v (B, Nk, Hkv, D|Dv)``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: HFMask | torch.Tensor | None   # bool tensor: True = attend
    scale: float
    is_causal: bool
    dropout: float
    bias: torch.Tensor | None            # an additive float bias broadcastable to (B, Hq, Nq, Nk)
    variant: str | None
    options: dict[str, Any] = field(default_factory=dict)
    unsupported: str = ""

    @property
    def nq(self) -> int:
        return self.q.shape[1]

    @property
    def nk(self) -> int:
        return self.k.shape[1]

    def describe(self) -> str:
        if isinstance(self.mask, HFMask):
            mask = self.mask.describe()
        elif isinstance(self.mask, torch.Tensor):
            mask = f"bool tensor {tuple(self.mask.shape)} (given by the model)"
        else:
            mask = "causal (is_causal, no mask)" if self.is_causal and self.nq > 1 else "none"
        extra = "".join([f" bias {tuple(self.bias.shape)}" if self.bias is not None else "",
                         f" dropout {self.dropout}" if self.dropout else "",
                         f" variant {self.variant}" if self.variant else ""])
        return (f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} {self.q.dtype} mask={mask}{extra}")


def _split_float_mask(mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A float additive mask as ``(bool_mask, None)`` when it only holds 0 and "minus infinity"
    (transformers' ``finfo.min``), else ``(None, bias)``: the values then carry information."""
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if bool(((mask == 0) | blocked).all()):
        return ~blocked, None
    return None, mask


def make_call(q, k, v, mask=None, *, scale=None, is_causal=True, dropout=0.0, position_bias=None, softcap=None,
              sinks=None, variant=None, options=None) -> HFAttentionCall:
    """Validate one layer's call (heads-last tensors) into an :class:`HFAttentionCall`."""
    check_qkv(q, k, v)
    options = dict(options or {})
    fallback = options.get("fallback", "error")
    if fallback not in _FALLBACKS:
        raise ValueError(f"config.attnkit_options['fallback'] must be one of {_FALLBACKS}, got {fallback!r}")
    if variant is None:
        unknown = sorted(set(options) - set(_BASE_OPTIONS))
        if unknown:
            raise ValueError(f"config.attnkit_options for attnkit: unknown option(s) {unknown}; "
                             f"valid: {list(_BASE_OPTIONS)}")
    bias = None
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        mask, bias = _split_float_mask(mask)
        # SDPA applies is_causal only without a mask: a float mask is the whole pattern
        is_causal = is_causal and bias is None
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    unsupported = ", ".join(n for n, x in (("softcap", softcap), ("attention sinks (s_aux)", sinks)) if x is not None)
    unsupported = f"{unsupported} has no attnkit form" if unsupported else ""
    return HFAttentionCall(q, k, v, mask, resolve_scale(scale, q.shape[-1]), bool(is_causal), float(dropout or 0.0),
                           bias, variant, options, unsupported)


def _patterns(call: HFAttentionCall):
    """``(patterns per batch element, dense bool mask)``: exactly one of them is set (patterns may hold None)."""
    m = call.mask
    if isinstance(m, HFMask):
        return (m.patterns, None) if m.patterns is not None else (None, m.dense)
    if isinstance(m, torch.Tensor):
        return None, m
    return (causal() if call.is_causal and call.nq > 1 else None,) * call.q.shape[0], None


def _attnkit_supports(call):
    if call.unsupported:
        return False, call.unsupported
    if call.bias is not None:
        return False, ("an arbitrary float bias (position_bias, or a float mask with values other than 0 and "
                       "-inf) has no ak.masks form")
    if call.dropout > 0:
        return False, f"attention dropout {call.dropout} (ak.attention has none; model.eval() or attention_dropout=0)"
    if call.variant is not None:
        return _variant_supports(call)
    return True, ""


def _variant_supports(call):
    patterns, dense = _patterns(call)
    if dense is not None or any(p is not None and p != Causal(0) for p in patterns) or len(set(patterns)) > 1:
        what = call.mask.describe() if isinstance(call.mask, HFMask) else "a dense mask"
        return False, (f"attnkit:{call.variant} takes causal or full attention only, the model asks for {what} "
                       f"(padding, windows and packing need attn_implementation='attnkit')")
    if call.nq != call.nk:
        return False, (f"attnkit:{call.variant} is self-attention over the whole sequence (Nq == Nk); got Nq={call.nq} "
                       f"Nk={call.nk} (a KV cache: generate with use_cache=False)")
    return True, ""


def _run_attnkit(call):
    if call.variant is not None:
        v = VARIANTS[call.variant]
        patterns, _ = _patterns(call)
        return v.run(call.q, call.k, call.v, patterns[0] is not None, call.scale,
                     options_for(v, {n: x for n, x in call.options.items() if n != "fallback"}))
    backend = call.options.get("backend")
    patterns, dense = _patterns(call)
    if dense is not None:
        return ak.attention(call.q, call.k, call.v, dense, scale=call.scale, backend=backend)
    groups: dict[Any, list[int]] = {}
    for b, p in enumerate(patterns):
        groups.setdefault(p, []).append(b)
    if len(groups) == 1:
        return ak.attention(call.q, call.k, call.v, patterns[0], scale=call.scale, backend=backend)
    # batch elements with different padding / packing: one call per distinct pattern
    outs, order = [], []
    for p, idx in groups.items():
        i = torch.tensor(idx, device=call.q.device)
        outs.append(ak.attention(call.q[i], call.k[i], call.v[i], p, scale=call.scale, backend=backend))
        order += idx
    inverse = torch.argsort(torch.tensor(order, device=call.q.device))
    return torch.cat(outs)[inverse]                                           # (B, Nq, Hq, Dv)


def _attnkit_detail(call):
    if call.variant is not None:
        return f"attnkit:{call.variant}: {VARIANTS[call.variant].note}"
    patterns, dense = _patterns(call)
    backend = call.options.get("backend")
    if dense is not None:
        first = dense[:1]
        return f"ak.attention with the dense bool mask; backend {_attention_backend(call, first, backend)}"
    choices = sorted({f"{'full' if p is None else repr(p)} -> {_attention_backend(call, p, backend)}"
                      for p in patterns})
    return "ak.attention: " + "; ".join(choices)


def _attention_backend(call, mask, backend) -> str:
    from attnkit.ops.dense.call import DISPATCHER
    from attnkit.ops.dense.call import make_call as attention_call

    one = attention_call(call.q[:1], call.k[:1], call.v[:1], mask, scale=call.scale)
    return DISPATCHER.choose(one, backend).name


def _sdpa_supports(call):
    if call.unsupported:
        return False, call.unsupported
    if call.variant is not None:
        return False, f"attnkit:{call.variant} never falls back (it is not softmax attention over the mask)"
    if call.options.get("fallback", "error") != "sdpa":
        return False, "the SDPA fallback is off (config.attnkit_options = {'fallback': 'sdpa'} turns it on)"
    return True, ""


def _run_sdpa(call):
    q, k, v = (t.transpose(1, 2) for t in (call.q, call.k, call.v))           # (B, H, N, D)
    patterns, dense = _patterns(call)
    allowed = dense if dense is not None else HFMask(patterns, call.nq, call.nk).to_dense(q.device)
    attn_mask = allowed
    if call.bias is not None:  # as transformers' create_position_bias_mask: the bias where allowed
        low = torch.finfo(q.dtype).min
        attn_mask = torch.where(allowed, call.bias.to(q.dtype), low)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=call.dropout, scale=call.scale,
                                         enable_gqa=call.q.shape[2] != call.k.shape[2])
    return out.transpose(1, 2)                                                # (B, Nq, Hq, Dv)


def _reference_supports(call):
    ok, why = _attnkit_supports(call)
    if not ok or call.variant is not None:
        return False, why or "variants have their own op's reference"
    return True, ""


def _run_reference(call):
    patterns, dense = _patterns(call)
    allowed = dense if dense is not None else HFMask(patterns, call.nq, call.nk).to_dense(call.q.device)
    return naive_attention(call.q, call.k, call.v, allowed, scale=call.scale)


DISPATCHER = Dispatcher("hf_attention", [
    Backend("attnkit", _run_attnkit, _attnkit_supports, note="ak.attention with the mask as ak.masks patterns",
            detail=_attnkit_detail),
    Backend("sdpa", _run_sdpa, _sdpa_supports,
            note="documented fallback: torch SDPA with the dense float mask (config.attnkit_options fallback)"),
    Backend("reference", _run_reference, _reference_supports, auto=False, note="naive attention, dense mask"),
])
register_op("hf_attention", make_call, DISPATCHER)


def hf_attention(q, k, v, mask=None, *, backend=None, **kwargs) -> torch.Tensor:
    """One transformers attention call, heads-last.

    Args:
        q: ``(B, Nq, Hq, D)``; k: ``(B, Nk, Hkv, D)``; v: ``(B, Nk, Hkv, Dv)``.
        mask: an :class:`HFMask`, a bool tensor broadcastable to ``(B, Hq, Nq, Nk)`` (True = attend), a
            float additive mask, or None (then ``is_causal``).
        backend: ``"attnkit"``, ``"sdpa"`` (the fallback) or ``"reference"``; None chooses.
        **kwargs: ``scale``, ``is_causal``, ``dropout``, ``position_bias``, ``softcap``, ``sinks``,
            ``variant``, ``options`` (see :func:`make_call`).

    Returns:
        ``(B, Nq, Hq, Dv)``.
    """
    return DISPATCHER.run(make_call(q, k, v, mask, **kwargs), backend)


# ---- what transformers calls ----------------------------------------------------------------------
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("attnkit_hf_record", default=None)


def _layer_options(module) -> dict[str, Any]:
    opts = getattr(getattr(module, "config", None), "attnkit_options", None) or {}
    if not isinstance(opts, dict):
        raise TypeError(f"config.attnkit_options must be a dict, got {type(opts).__name__}")
    return opts


def _forward_for(name: str):
    """The ``AttentionInterface`` function for ``attnkit`` or ``attnkit:<variant>``."""
    variant = _variant_of(name)

    def attnkit_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  is_causal=None, **kwargs):
        # transformers hands (B, H, N, D); attnkit is heads-last (B, N, H, D)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        causal_flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        call = make_call(q, k, v, attention_mask, scale=scaling, is_causal=causal_flag, dropout=dropout,
                         position_bias=kwargs.get("position_bias"), softcap=kwargs.get("softcap"),
                         sinks=kwargs.get("s_aux"), variant=variant, options=_layer_options(module))
        record = _RECORD.get()
        if record is not None:
            record.append((getattr(module, "layer_idx", len(record)), DISPATCHER.explain(call)))
        out = DISPATCHER.run(call)
        return out.contiguous(), None                                        # (B, Nq, Hq, Dv), no weights

    attnkit_attention_forward.__name__ = f"attnkit_attention_forward_{name.replace(':', '_')}"
    return attnkit_attention_forward


def _refusing_forward(name: str, why: str):
    def refused(module, *args, **kwargs):
        raise ValueError(f"attn_implementation={name!r} cannot run: {why}. {_valid_list()}")

    return refused


def attnkit_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, device="cpu", **kwargs) -> HFMask:
    """The ``AttentionMaskInterface`` function: transformers' mask arguments as an :class:`HFMask`."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if isinstance(attention_mask, HFMask):  # a mask built earlier (generate with a static cache)
        return attention_mask
    mask_function = causal_mask_function if mask_function is None else mask_function
    try:
        patterns = translate(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask)
        return HFMask(patterns, q_length, kv_length)
    except Untranslatable as e:
        dense = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                          kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                          allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                          use_vmap=kwargs.get("use_vmap", False), device=device)
        return HFMask(None, q_length, kv_length, dense=dense, reason=f"not translated: {e}")


# ---- names ------------------------------------------------------------------------------------------
def _variant_of(name: str) -> str | None:
    if name == PREFIX or name == f"{PREFIX}:mha":
        return None
    return name.split(":", 1)[1]


def implementations() -> list[str]:
    """The names that run: ``"attnkit"``, ``"attnkit:mha"`` (the same) and ``"attnkit:<variant>"``."""
    return [PREFIX, f"{PREFIX}:mha"] + [f"{PREFIX}:{n}" for n in sorted(VARIANTS)]


def _valid_list() -> str:
    return f"Valid: {', '.join(implementations())}"


def check(name: str) -> Variant | None:
    """Validate an implementation name; returns its :class:`Variant` (None for plain ``"attnkit"``).

    Raises:
        ValueError: a registered mechanism that cannot replace a model's attention, with the reason.
        KeyError: an unknown name; the message lists the valid ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"attn_implementation must be a str, got {type(name).__name__}")
    if name in implementations():
        v = _variant_of(name)
        return None if v is None else VARIANTS[v]
    mech = name.split(":", 1)[1] if name.startswith(f"{PREFIX}:") else None
    if mech is not None and mech in {s.name for s in ak.list_mechanisms()}:
        raise ValueError(f"attn_implementation={name!r}: the mechanism {mech!r} cannot replace a model's attention: "
                         f"{refusal(mech)}. {_valid_list()}")
    raise KeyError(f"unknown attnkit attention implementation {name!r}. {_valid_list()}")


def register() -> list[str]:
    """Register ``"attnkit"`` and ``"attnkit:<mechanism>"`` with transformers (idempotent).

    Every registered mechanism gets a name: the qualifying ones (:func:`implementations`) run, the
    others raise ``ValueError`` with the reason at the model's first forward (:func:`check` raises
    at once). Returns the names that run.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name in implementations():
        AttentionInterface.register(name, _forward_for(name))
        AttentionMaskInterface.register(name, attnkit_mask)
    for spec in ak.list_mechanisms():
        name = f"{PREFIX}:{spec.name}"
        if name not in implementations():
            AttentionInterface.register(name, _refusing_forward(name, refusal(spec.name)))
            AttentionMaskInterface.register(name, attnkit_mask)
    return implementations()


def use(model, name: str = PREFIX, **options):
    """Switch a loaded model to ``name`` with ``options`` (stored as ``config.attnkit_options``); returns it.

    Unlike passing the name to transformers directly, an unknown or unqualified name fails here,
    listing the valid ones, and options are checked before the first forward.
    """
    variant = check(name)
    if variant is not None:
        options_for(variant, {n: x for n, x in options.items() if n != "fallback"})
    register()
    model.config.attnkit_options = dict(options)
    model.set_attn_implementation(name)
    return model


def explain(model, **inputs) -> str:
    """Run one forward of ``model(**inputs)`` without gradients and say, per attention layer, how its
    mask was translated and which backend ran it (or why not)."""
    record: list = []
    failure = ""
    token = _RECORD.set(record)
    try:
        with torch.no_grad():
            model(**inputs)
    except ValueError as e:  # the layer that could not run is recorded above its error
        failure = f"\nforward failed: {e}"
    finally:
        _RECORD.reset(token)
    if not record:
        return (f"no attention layer ran through attnkit (config._attn_implementation = "
                f"{getattr(model.config, '_attn_implementation', None)!r})")
    return "\n".join(f"layer {i}: {text}" for i, text in record) + failure
