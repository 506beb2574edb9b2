"""The reference backend: materialised scores, any dtype; the oracle and the tiny-input path."""

from __future__ import annotations

from attnkit.ops.base import Backend
from attnkit.reference.naive_dense import naive_attention

# above this many score entries per (batch, head) the reference is refused in auto mode
_AUTO_LIMIT = 64 * 64


def _run(call):
    allowed = call.mask_tensor()
    return naive_attention(call.q, call.k, call.v, allowed, scale=call.scale, return_lse=call.return_lse)


def _suits(call):
    if call.nq * call.nk <= _AUTO_LIMIT:
        return True, "tiny input: no tiling overhead"
    return False, f"materialises {call.nq}x{call.nk} scores; kept for tiny inputs and as the oracle"


BACKEND = Backend(name="reference", run=_run, suits=_suits, note="materialises scores")
