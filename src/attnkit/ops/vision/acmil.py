"""ACMIL's multi-branch attention pooling with stochastic top-K instance masking (STKIM).

"Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification", arXiv 2311.07125
(ECCV 2024), Sec. 3: M attention branches score every instance of a bag; in training, each branch's top-K
instances are found and a random subset of them (a fraction ``p`` of the K, drawn uniformly) is masked out
before the softmax, so the branch must spread its attention beyond the few most salient instances. Each
branch pools the bag with its own softmax weights; in eval nothing is masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.ops.base import Backend, Dispatcher, register_op
from attnkit.reference.naive_vision_c import naive_acmil_pool


@dataclass(frozen=True, eq=False)
class AcmilCall:
    """A validated ``acmil_pool`` call."""

    logits: torch.Tensor
    x: torch.Tensor
    num_masked: int
    mask_drop: float
    generator: torch.Generator | None
    return_weights: bool

    def describe(self) -> str:
        return (f"logits {tuple(self.logits.shape)}, x {tuple(self.x.shape)} {self.x.dtype}, "
                f"top-{self.num_masked} masking p={self.mask_drop}")


def make_acmil_call(logits, x, num_masked=0, mask_drop=0.6, generator=None, return_weights=False) -> AcmilCall:
    op = "acmil_pool"
    for name, t, layout in (("logits", logits, "(B, M, N)"), ("x", x, "(B, N, C)")):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor {layout}, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 3 or t.numel() == 0:
            raise ValueError(f"{op}: {name} must be a non-empty {layout}, got shape {tuple(t.shape)}")
    if logits.shape[0] != x.shape[0] or logits.shape[2] != x.shape[1]:
        raise ValueError(f"{op}: logits must be (B, M, N) for x (B, N, C) = {tuple(x.shape)}, "
                         f"got {tuple(logits.shape)}")
    if isinstance(num_masked, bool) or not isinstance(num_masked, int) or num_masked < 0:
        raise ValueError(f"{op}: num_masked must be an int >= 0, got {num_masked!r}")
    if isinstance(mask_drop, bool) or not isinstance(mask_drop, (int, float)) or not 0.0 <= mask_drop <= 1.0:
        raise ValueError(f"{op}: mask_drop must be a number in [0, 1], got {mask_drop!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return AcmilCall(logits, x, num_masked, float(mask_drop), generator, bool(return_weights))


def stkim_mask(logits: torch.Tensor, num_masked: int, mask_drop: float,
               generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The STKIM keep-mask ``(B, M, N)`` (False = masked), or None when nothing is masked.

    Per branch: the top ``K = min(num_masked, N)`` instances by logit, of which ``floor(K * mask_drop)``
    chosen uniformly at random (the ranks of ``torch.rand((B, M, K), generator)``, drawn in float32) are masked.
    """
    B, M, N = logits.shape
    k = min(num_masked, N)
    drop = int(k * mask_drop)
    if drop == 0:
        return None
    top = torch.topk(logits.detach(), k, dim=-1).indices  # (B, M, K): no gradient through the selection
    u = torch.rand((B, M, k), generator=generator, device=logits.device, dtype=torch.float32)
    chosen = torch.gather(top, -1, u.argsort(-1)[..., :drop])  # (B, M, drop) instance indices
    keep = torch.ones(B, M, N, dtype=torch.bool, device=logits.device)
    return keep.scatter(-1, chosen, False)


def _masked_softmax(c: AcmilCall) -> torch.Tensor:
    keep = stkim_mask(c.logits, c.num_masked, c.mask_drop, c.generator)
    work = c.logits.float() if c.logits.dtype in (torch.float16, torch.bfloat16) else c.logits
    if keep is not None:
        # the most negative finite value, not -inf: a branch with every instance masked stays uniform, not NaN
        work = work.masked_fill(~keep, torch.finfo(work.dtype).min)
    return work.softmax(-1)  # (B, M, N)


def _matmul(c: AcmilCall):
    w = _masked_softmax(c)
    out = torch.matmul(w.to(c.x.dtype), c.x)  # (B, M, C)
    return (out, w.to(c.x.dtype)) if c.return_weights else out


def _reference(c: AcmilCall):
    return naive_acmil_pool(c.logits, c.x, c.num_masked, c.mask_drop, c.generator, c.return_weights)


ACMIL_DISPATCHER = Dispatcher("acmil_pool", [
    Backend("matmul", _matmul, suits=lambda c: (True, "the fast path"),
            note="top-k + one random draw for the mask, softmax over instances, one batched matmul"),
    Backend("reference", _reference, auto=False, note="naive_acmil_pool: branch by branch"),
])
register_op("acmil_pool", make_acmil_call, ACMIL_DISPATCHER)


def acmil_pool(logits: torch.Tensor, x: torch.Tensor, num_masked: int = 0, mask_drop: float = 0.6, *,
               generator: torch.Generator | None = None, return_weights: bool = False,
               backend: str | None = None):
    """Multi-branch attention pooling with stochastic top-K instance masking (ACMIL, arXiv 2311.07125 Sec. 3).

    Args:
        logits: branch scores ``(B, M, N)`` (one row of instance logits per branch).
        x: the bag ``(B, N, C)``.
        num_masked: ``K``, how many top instances per branch are candidates for masking; 0 masks nothing
            (pass 0 in eval: the paper masks in training only).
        mask_drop: ``p``, the fraction of the K candidates masked (``floor(K p)`` of them, chosen uniformly).
        generator: draws the random choice (None: the global generator), for reproducible masks.
        return_weights: also return the weights.
        backend: None / ``"matmul"`` or ``"reference"``.

    Returns:
        ``(B, M, C)``: ``z_m = sum_n A[m, n] x_n`` with ``A = softmax_n(masked logits)``; with
        ``return_weights``, ``(z, A)`` where ``A`` is ``(B, M, N)`` (masked entries exactly 0, rows sum to 1).
        The bag embedding of the paper's slide classifier is ``z.mean(1)`` (the mean of the branch weights).

    Example:
        >>> acmil_pool(torch.randn(2, 5, 100), torch.randn(2, 100, 64), 10, 0.6).shape
        torch.Size([2, 5, 64])
    """
    return ACMIL_DISPATCHER.run(make_acmil_call(logits, x, num_masked, mask_drop, generator, return_weights), backend)
