"""Checks and wording shared by the routed ops' backends (MoBA, VMoBA, PSA, HyperAttention, BiFormer).

A routed op computes its routes (which key blocks each query sees) and then attends; the backends
differ in the attention. The fused CPU op has no backward here, so every "fused" backend is
no-grad only, and its ``supports`` says so instead of a hidden ``torch.is_grad_enabled()`` switch.
"""

from __future__ import annotations

import torch

from attnkit.kernels.dispatch import dispatch_kernel_reason
from attnkit.kernels.fused import fused_check


def no_grad_fused_check(q: torch.Tensor, v: torch.Tensor, needs_grad: bool) -> tuple[bool, str]:
    """Whether a no-grad path on torch's fused CPU op may run: ``(ok, reason)``.

    Refuses inputs that need a gradient (no backward), float64 (the fused kernel's exp is
    approximate, ~1e-9 relative, so fp64 keeps the exact matmul path), then ``fused_check``.
    """
    if needs_grad:
        return False, "inputs require grad (the fused op has no backward)"
    if q.dtype == torch.float64:
        return False, "float64: the fused kernel's exp is approximate (~1e-9 relative); fp64 stays on matmuls"
    return fused_check(q, v)


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The naive twins run in float32 for half inputs (their output is cast back), else the input dtype."""
    return torch.promote_types(dtype, torch.float32)


def cpu_only(call) -> tuple[bool, str]:
    """``supports`` of a reference backend: the naive twins build their masks on the CPU (``call.q``)."""
    if call.q.device.type != "cpu":
        return False, f"the naive reference builds its masks on the CPU, got {call.q.device.type} tensors"
    return True, ""


def grad_words(needs_grad: bool) -> str:
    """``describe()`` wording of the autograd state that the backends' checks read."""
    return "inputs need grad" if needs_grad else "no grad needed"


def upcast_words(dtype: torch.dtype) -> str:
    """``Backend.detail`` suffix for half inputs: the routed paths compute in float32."""
    return f"; {str(dtype).removeprefix('torch.')} inputs computed in float32" if dtype in (
        torch.float16, torch.bfloat16) else ""


def gather_detail(call, block: int | None = None, causal: bool = False) -> str:
    """``Backend.detail`` of a path on the block-gather engine: the tile kernel when it takes ``block``-token
    blocks (and the causal element mask), else which buffers the gather uses, and the compute dtype."""
    if block is not None:
        from attnkit.kernels.tiles import gather_kernel_reason
        from attnkit.masks.causal import causal as causal_mask

        why = gather_kernel_reason(call.q, (block, block), causal_mask() if causal else None, 1, 1, 1)
        if why is None:
            return ("block-gather engine on the compiled tile kernel (selected blocks only; its backward)"
                    + upcast_words(call.q.dtype))
        return f"tile kernel not used ({why}); " + gather_detail(call)
    if call.needs_grad:
        how = "block-gather engine, fresh gather buffers per chunk (autograd records each chunk)"
    else:
        how = "block-gather engine, gather buffers reused across chunks (no input needs a gradient)"
    return how + upcast_words(call.q.dtype)


def dispatch_engine(q: torch.Tensor, block: int, nk: int, fused: tuple[bool, str]) -> bool | None:
    """The key-major dispatch engine's ``fused=`` argument: None (the engine's own choice: the tile kernel) when
    the kernel takes the call, else whether the fused CPU op may run (``fused``: its ``(ok, reason)``)."""
    return None if dispatch_kernel_reason(q, block, nk) is None else fused[0]


def dispatch_detail(q: torch.Tensor, block: int, nk: int, fused: tuple[bool, str]) -> str:
    """``explain``'s path line for a key-major dispatch call (MoBA token routing, VMoBA)."""
    why_not = dispatch_kernel_reason(q, block, nk)
    if why_not is None:
        return ("key-major dispatch on the compiled tile kernel (gathered query tiles x their key block, own block "
                "as a block-diagonal tile list; kernel backward)" + upcast_words(q.dtype))
    ok, why = fused
    if ok:
        return (f"tile kernel not used ({why_not}); key-major dispatch, every part on the fused CPU op "
                "(no input needs a gradient)" + upcast_words(q.dtype))
    return f"tile kernel not used ({why_not}); key-major dispatch, differentiable matmul softmax: {why}" + upcast_words(
        q.dtype)

