"""torch's fused CPU flash-attention op, and the one check that says when a kernel may call it.

The op (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward) returns the
log-sum-exp, takes GQA natively and an additive mask, and is ~1.7x faster here than a multi-pass
softmax. It is private, so it is looked up at run time; every caller keeps a matmul path beside it.
"""

from __future__ import annotations

import torch


def fused_ops():
    """``(forward, backward)`` of torch's fused CPU flash attention, or ``(None, None)``."""
    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    return (fwd, bwd) if fwd is not None and bwd is not None else (None, None)


def fused_check(q: torch.Tensor, v: torch.Tensor) -> tuple[bool, str]:
    """Whether the fused op can take ``q (.., D)`` with values ``v (.., Dv)``: ``(ok, reason)``."""
    if q.device.type != "cpu":
        return False, f"fused CPU op needs CPU tensors, got {q.device.type}"
    if q.shape[-1] != v.shape[-1]:
        return False, f"fused CPU op needs Dv == D, got D={q.shape[-1]}, Dv={v.shape[-1]}"
    if fused_ops()[0] is None:
        return False, "this torch build has no fused CPU flash-attention op"
    return True, ""


def can_fuse(q: torch.Tensor, v: torch.Tensor) -> bool:
    """``fused_check(q, v)[0]``."""
    return fused_check(q, v)[0]
