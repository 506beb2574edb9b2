"""The NATTEN library as a peer backend for neighborhood attention (imported lazily, opt-in).

NATTEN >= 0.20 takes heads-last tensors and the same ``kernel_size / stride / dilation /
is_causal`` arguments as attnkit (``docs/design.md`` §3); on CPU it runs forward only.
"""

from __future__ import annotations

import importlib


def natten_module():
    """The ``natten`` module, or None when it is not installed (or fails to import)."""
    try:
        return importlib.import_module("natten")
    except Exception:  # a broken optional install must not break attnkit
        return None


def natten_supports(call) -> tuple[bool, str]:
    nat = natten_module()
    if nat is None:
        return False, "natten is not installed"
    fn = getattr(nat, f"na{len(call.spatial)}d", None)
    if fn is None:
        return False, f"this natten has no na{len(call.spatial)}d (needs natten >= 0.20)"
    if call.return_lse:
        return False, "return_lse is not wired for natten"
    if call.requires_grad and call.q.device.type == "cpu":
        return False, "natten runs forward only on CPU"
    return True, ""


def natten_detail(call) -> str:
    fn = f"natten.na{len(call.spatial)}d"
    return f"{fn} with its backward: an input needs a gradient" if call.requires_grad else \
        f"{fn}, forward: no input needs a gradient"


def run_natten(call):
    fn = getattr(natten_module(), f"na{len(call.spatial)}d")
    return fn(call.q, call.k, call.v, kernel_size=call.kernel_size, stride=call.stride, dilation=call.dilation,
              is_causal=call.is_causal, scale=call.scale)
