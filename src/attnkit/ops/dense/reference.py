"""The reference backend: materialised scores, any dtype; the oracle and the tiny-input path."""

from __future__ import annotations

from attnkit.kernels.nonfinite import finite_part, masked_correction
from attnkit.ops.base import Backend
from attnkit.reference.naive_dense import naive_attention

# above this many score entries per (batch, head) the reference is refused in auto mode
_AUTO_LIMIT = 64 * 64


def _run(call):
    allowed = call.mask_tensor()
    if allowed is None:  # every query sees every value: NaN reaches exactly the right rows already
        return naive_attention(call.q, call.k, call.v, None, scale=call.scale, return_lse=call.return_lse)
    # masked probabilities are exactly 0, but 0 * NaN = NaN: multiply the finite part of V and carry
    # its non-finite entries to the queries allowed to see them (the NaN policy, docs/design.md)
    res = naive_attention(call.q, call.k, finite_part(call.v), allowed, scale=call.scale,
                          return_lse=call.return_lse)
    out = res[0] if call.return_lse else res
    v = call.v.repeat_interleave(call.hq // call.hkv, dim=2).transpose(1, 2)  # (B, Hq, Nk, Dv)
    fix = masked_correction(allowed, v, out.dtype).transpose(1, 2)            # (B, Nq, Hq, Dv)
    out = out + fix
    return (out, res[1]) if call.return_lse else out


def _suits(call):
    if call.nq * call.nk <= _AUTO_LIMIT:
        return True, "tiny input: no tiling overhead"
    return False, f"materialises {call.nq}x{call.nk} scores; kept for tiny inputs and as the oracle"


BACKEND = Backend(name="reference", run=_run, suits=_suits, note="materialises scores")
