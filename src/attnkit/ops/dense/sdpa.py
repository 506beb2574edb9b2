"""torch's ``scaled_dot_product_attention``: the fast path for dense and causal attention.

On CPU it runs a fused flash-style kernel with ``is_causal`` skipping the upper triangle; a
general mask must be materialised as an ``Nq x Nk`` boolean, so sparse masks pay full cost.

Non-finite inputs (the NaN policy of ``docs/design.md``): torch's kernel adds the mask as a ``-inf`` bias
and multiplies masked probabilities (exactly 0) by ``V``, so one NaN in ``k`` or ``v`` reaches every
query (0 * NaN = NaN). On CPU a call whose q, k or v holds a NaN or an infinity (one O(N D) scan, no
device sync on a CPU) runs the exact reference instead (materialised scores, masked pairs dropped);
finite inputs keep the fused kernel. On other devices the scan would sync the host, so it is skipped there
and torch's behaviour stands (``ak.check_finite`` catches such inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.kernels.nonfinite import any_nonfinite
from attnkit.masks.causal import Causal
from attnkit.ops.base import Backend
from attnkit.ops.dense import blocked as _blocked
from attnkit.ops.dense import reference as _reference

# the largest dense boolean mask we are willing to build, in elements (256 MiB)
_MAX_MASK_ELEMENTS = 1 << 28
# below this fraction of non-empty tiles, the blocked backend wins on CPU
_DENSE_ENOUGH = 0.8
# the efficiency length, measured (B=1, H=8, D=64, fp32, 2 threads, alternating calls, dense-mask SDPA time /
# tile kernel time): sliding_window(256) fwd 1.11 / 1.51 / 2.72 and fwd+bwd 1.13 / 1.29 / 2.45 at N = 512 / 1024 /
# 2048; block_causal(256) fwd 0.97 / 1.40 / 1.64 and fwd+bwd 1.10 / 1.51 / 1.57. The kernel wins from N=1024 on;
# at N=512 the two tie (within the noise of a shared machine), and one fused dense-mask SDPA call is kept there
# for masks that still leave a quarter of the tiles; sparser masks keep the tile walk
EFFICIENCY_PAIRS = 512 * 512
_EFFICIENT_TILES = 0.25


def _is_plain_causal(call) -> bool:
    return isinstance(call.mask, Causal) and call.mask.offset == 0


def _supports(call):
    if call.return_lse:
        return False, "SDPA does not return the log-sum-exp"
    if call.mask is None or _is_plain_causal(call):
        return True, ""
    elements = call.mask_elements()
    if elements > _MAX_MASK_ELEMENTS:
        return False, f"needs a dense {call.nq}x{call.nk} mask ({elements / 2**30:.1f} GiB of bools)"
    return True, ""


def _suits(call):
    if call.q.device.type != "cpu":
        return True, f"{call.q.device.type} tensors: the blocked tile walk is CPU-only"
    if call.mask is None:
        return True, "dense attention"
    if _is_plain_causal(call):
        return True, "causal via is_causal"
    if call.mask.head_dependent:  # tiles are shared by heads; what counts is each head's own density
        dens = call.mask.density(call.nq, call.nk)
        if dens >= _DENSE_ENOUGH:
            return True, f"{dens:.0%} of pairs are allowed"
        return False, f"only {dens:.0%} of pairs are allowed per head; a dense mask computes all of them"
    frac = call.tile_fraction()
    if frac >= _DENSE_ENOUGH:
        return True, f"{frac:.0%} of tiles are non-empty"
    if call.nq * call.nk <= EFFICIENCY_PAIRS and frac >= _EFFICIENT_TILES:
        return True, (f"{call.nq}x{call.nk} is within the efficiency length (<= {EFFICIENCY_PAIRS} pairs) and "
                      f"{frac:.0%} of tiles are non-empty: one dense-mask SDPA call beats the tile walk here")
    return False, f"only {frac:.0%} of tiles are non-empty; a dense mask computes all of them"


def _nonfinite_on_cpu(call) -> bool:
    """Whether a masked CPU call holds a NaN or an infinity that SDPA would spread (never traced). Without a
    mask every query depends on every key, so SDPA's own propagation is already exact and nothing is checked;
    with ``is_causal`` its kernel overwrites masked scores, so only V (0 * NaN in P @ V) needs the check."""
    if call.mask is None or call.q.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if _is_plain_causal(call):
        return any_nonfinite(call.v)
    return any_nonfinite(call.q, call.k, call.v)


def _run(call):
    if _nonfinite_on_cpu(call):
        # exact propagation: masked pairs never touch a non-finite value (the tile kernel handles them; the
        # reference materialises the scores, so it is the fallback only)
        ok, _ = _blocked.BACKEND.supports(call)
        return (_blocked.BACKEND if ok else _reference.BACKEND).run(call)
    q, k, v = (t.transpose(1, 2) for t in (call.q, call.k, call.v))      # (B, H, N, D)
    gqa = call.hq != call.hkv
    if call.mask is None or _is_plain_causal(call):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=call.mask is not None, scale=call.scale,
                                             enable_gqa=gqa)
        return out.transpose(1, 2)                                       # (B, N, H, Dv)
    allowed = call.mask_tensor()
    empty = ~allowed.any(-1, keepdim=True)                               # (.., Nq, 1)
    has_empty = bool(empty.any())
    if has_empty:
        # let empty rows attend everywhere, then zero them: no NaN in forward or backward
        allowed = allowed | empty
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=call.scale, enable_gqa=gqa)
    if has_empty:
        out = out.masked_fill(empty, 0.0)  # empty (.., Nq, 1) broadcasts over (B, H, Nq, Dv)
    return out.transpose(1, 2)


BACKEND = Backend(name="sdpa", run=_run, supports=_supports, suits=_suits,
                  note="torch.nn.functional.scaled_dot_product_attention")
