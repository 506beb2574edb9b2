"""Neighborhood attention on ``torch.compile(flex_attention)`` with an exact NA BlockMask (forward only).

FlexAttention evaluates :meth:`NeighborhoodMask.mask_mod` inside partial tiles and skips
empty ones; the BlockMask is built from :meth:`NeighborhoodMask.blocks` (tile classification
without an N x N mask). Compilation happens once per shape and is a one-off cost; this
backend is never chosen automatically. Papers: arXiv 2403.04690 / 2504.16922 (NATTEN's Flex
backend uses the same mask form).
"""

from __future__ import annotations

import functools

import torch

from attnkit.masks.neighborhood import NeighborhoodMask
from attnkit.ops.dense.flex import compiled_flex

FLEX_BLOCK = 128  # flex's default tile on CPU and GPU
_FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _flex():
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError:
        return None, None
    return flex_attention, BlockMask


@functools.lru_cache(maxsize=32)
def na_block_mask(mask: NeighborhoodMask, device: str = "cpu", block: int = FLEX_BLOCK):
    """A flex ``BlockMask`` for ``mask``: full tiles skip ``mask_mod``, partial tiles evaluate it."""
    _, BlockMask = _flex()
    n = mask.n
    cls = mask.blocks(n, n, block, block)  # (nqb, nkb) int8: 0 empty, 1 partial, 2 full

    def to_idx(sel: torch.Tensor):
        num = sel.sum(-1).to(torch.int32)
        # stable order: selected kv blocks first, ascending
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num[None, None].to(device), idx[None, None].to(device)

    kv_num, kv_idx = to_idx(cls == 1)
    full_num, full_idx = to_idx(cls == 2)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=mask.mask_mod, seq_lengths=(n, n))


def flex_supports(call) -> tuple[bool, str]:
    flex_attention, _ = _flex()
    if flex_attention is None:
        return False, "torch.nn.attention.flex_attention is not available in this torch"
    if call.requires_grad:
        return False, "forward only here (use backend='tiled' for gradients)"
    if call.q.device.type == "cpu" and call.n < FLEX_BLOCK:
        # torch 2.13's compiled CPU flex kernel returns NaN when the sequence is shorter than one block
        return False, f"compiled flex on CPU needs at least {FLEX_BLOCK} tokens, got {call.n}"
    if call.return_lse and call.q.device.type == "cpu":
        return False, "compiled flex on CPU cannot return the LSE"
    if call.q.dtype not in _FLEX_DTYPES:
        return False, f"flex on this build runs float32/bfloat16/float16, got {call.q.dtype}"
    return True, ""


def run_flex(call):
    q, k, v = call.q, call.k, call.v
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    Hkv, Dv = k.shape[-2], v.shape[-1]
    n = call.n
    bm = na_block_mask(call.mask, str(q.device))
    qf = q.reshape(B, n, H, D).transpose(1, 2)  # (B, H, N, D)
    kf = k.reshape(B, n, Hkv, D).transpose(1, 2)  # (B, Hkv, N, D)
    vf = v.reshape(B, n, Hkv, Dv).transpose(1, 2)  # (B, Hkv, N, Dv)
    res = compiled_flex()(qf, kf, vf, block_mask=bm, scale=call.scale, enable_gqa=H != Hkv,
                          return_lse=call.return_lse)
    out, lse = res if call.return_lse else (res, None)
    out = out.transpose(1, 2).reshape(B, *call.spatial, H, Dv)  # (B, *S, H, Dv)
    if call.return_lse:
        return out, lse.transpose(1, 2).reshape(B, *call.spatial, H).float()  # (B, *S, H), float32
    return out
