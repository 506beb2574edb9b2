"""``torch.compile(flex_attention)`` with a BlockMask: opt-in, forward only on CPU.

Compilation costs seconds per new shape (~20 s here) and FlexAttention has no CPU backward,
so it is never chosen automatically; the benchmark times its compile apart.

FlexAttention is called the way its documentation does: contiguous heads-first ``(B, H, N, D)``
tensors and a BlockMask built once per shape (cached). attnkit's heads-last inputs are copied to that
layout here: handing flex ``transpose(1, 2)`` views instead slows its compiled kernel by ~20% on CPU,
more than the copy costs.

Non-finite inputs are not propagated exactly here (a limitation of FlexAttention's compiled CPU kernel,
measured with torch 2.13): its running maximum skips NaN scores, so a NaN in ``q`` gives a finite row and a
NaN in ``k`` is dropped, and masked probabilities (0) multiply ``V``, so a NaN in ``v`` reaches every query
of its tile. Fixing it would need a second pass over the mask on every call. ``ak.check_finite(True)``
(or ``ATTNKIT_CHECK_FINITE=1``) raises on such inputs instead; every other dense backend is exact.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from attnkit.ops.base import Backend

_FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@lru_cache(maxsize=1)
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_mask_for(mask, b: int, h: int, nq: int, nk: int, device):
    """A FlexAttention ``BlockMask`` for ``mask`` (cached per shape); None for full attention."""
    if mask is None:
        return None
    return _block_mask_cached(mask, b if mask.head_dependent else None, h if mask.head_dependent else None,
                              nq, nk, str(device))


@lru_cache(maxsize=32)
def _block_mask_cached(mask, b, h, nq, nk, device):
    from torch.nn.attention.flex_attention import create_block_mask

    mask.validate(nq, nk)
    return create_block_mask(mask.as_mask_mod(), b, h, nq, nk, device=device)


def flex_available() -> tuple[bool, str]:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as e:
        return False, f"flex_attention unavailable: {e}"
    return True, ""


def _supports(call):
    ok, why = flex_available()
    if not ok:
        return False, why
    if call.q.dtype not in _FLEX_DTYPES:
        return False, f"FlexAttention on CPU supports float32/bfloat16/float16, not {call.q.dtype}"
    if call.q.device.type == "cpu":
        if call.needs_grad:
            return False, "FlexAttention has no backward on CPU"
        if call.return_lse:
            return False, "FlexAttention on CPU does not return the log-sum-exp"
    return True, ""


def _run(call):
    q, k, v = (t.transpose(1, 2).contiguous() for t in (call.q, call.k, call.v))  # (B, H, N, D) contiguous
    bm = block_mask_for(call.mask, call.batch, call.hq, call.nq, call.nk, q.device)
    if not call.return_lse:
        out = compiled_flex()(q, k, v, block_mask=bm, scale=call.scale, enable_gqa=call.hq != call.hkv)
        return out.transpose(1, 2)                                       # (B, Nq, H, Dv)
    from torch.nn.attention.flex_attention import AuxRequest

    out, aux = compiled_flex()(q, k, v, block_mask=bm, scale=call.scale, enable_gqa=call.hq != call.hkv,
                               return_aux=AuxRequest(lse=True))
    return out.transpose(1, 2), aux.lse.transpose(1, 2).float()          # (B, Nq, H, Dv), (B, Nq, H)


BACKEND = Backend(name="flex", run=_run, supports=_supports, auto=False,
                  note="compiles per shape (seconds) and has no CPU backward; pass backend='flex'; NaN/inf inputs not "
                       "propagated exactly (use ak.check_finite to catch them)")
