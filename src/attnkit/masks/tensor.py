"""A boolean tensor used as a mask (True = attend), broadcastable to ``(B, H, Nq, Nk)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.masks.base import EMPTY, FULL, PARTIAL, Mask, _ceil_div


@dataclass(frozen=True, eq=False)
class TensorMask(Mask):
    """Wraps a bool tensor of shape ``(Nq, Nk)``, ``(H, Nq, Nk)`` or ``(B, H, Nq, Nk)``, dims may be 1.

    The tensor is indexed by the call's own query rows and keys, whatever the offset of masks it is
    combined with (``offset`` is None).
    """

    tensor: torch.Tensor
    _coarse_is_exact = True
    # rows and columns of the call itself: no query position, so it combines with masks at any offset
    # (a key-padding mask ``(B, 1, 1, Nk)`` with ``causal(Nk - Nq)``) and ``with_offset`` keeps it as is
    offset = None

    def __post_init__(self):
        t = self.tensor
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
            raise TypeError(f"mask tensor must be a bool tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if not 2 <= t.dim() <= 4:
            raise ValueError(f"mask tensor must have 2 to 4 dims (broadcast to (B, H, Nq, Nk)), got {tuple(t.shape)}")

    def __repr__(self) -> str:
        return f"tensor_mask{tuple(self.tensor.shape)}"

    @property
    def head_dependent(self) -> bool:  # type: ignore[override]
        return any(s > 1 for s in self.tensor.shape[:-2])

    @property
    def lead_shape(self) -> tuple[int, int]:  # type: ignore[override]
        return tuple(self.t4.shape[:2])

    @property
    def t4(self) -> torch.Tensor:
        t = self.tensor
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))        # (B|1, H|1, Nq|1, Nk|1)

    def validate(self, nq, nk):
        sq, sk = self.tensor.shape[-2:]
        if sq not in (1, nq) or sk not in (1, nk):
            raise ValueError(f"mask of shape {tuple(self.tensor.shape)} does not broadcast to (..., Nq={nq}, Nk={nk})")

    def _full(self, nq, nk) -> torch.Tensor:
        t = self.t4.expand(-1, -1, nq, nk)                              # (B|1, H|1, Nq, Nk)
        return t if self.head_dependent else t[0, 0]

    def mask_mod(self, b, h, q_idx, kv_idx):
        t = self.t4
        return t[b % t.shape[0], h % t.shape[1], q_idx % t.shape[2], kv_idx % t.shape[3]]

    def _evaluate(self, q_idx, kv_idx, nq, nk):
        t = self.t4
        qi, ki = q_idx % t.shape[2], kv_idx % t.shape[3]
        return t[:, :, qi, ki] if self.head_dependent else t[0, 0][qi, ki]

    def to_dense(self, nq, nk, device=None):
        self.validate(nq, nk)
        out = self._full(nq, nk).contiguous()
        return out.to(device) if device is not None else out

    def tile(self, q0, q1, kv_idx, nq, nk):
        t = self._full(nq, nk)[..., q0:q1, :]
        return t.index_select(-1, kv_idx.to(t.device))

    def _coarse_blocks(self, nq, nk, bq, bk):
        t = self._full(nq, nk).to("cpu")
        if t.dim() == 4:
            t_any, t_all = t.flatten(0, 1).any(0), t.flatten(0, 1).all(0)
        else:
            t_any = t_all = t
        nqb, nkb = _ceil_div(nq, bq), _ceil_div(nk, bk)
        pad = (0, nkb * bk - nk, 0, nqb * bq - nq)
        anyv = torch.nn.functional.pad(t_any, pad, value=False).view(nqb, bq, nkb, bk).any(3).any(1)
        allv = torch.nn.functional.pad(t_all, pad, value=True).view(nqb, bq, nkb, bk).all(3).all(1)
        return torch.where(allv, FULL, torch.where(anyv, PARTIAL, EMPTY)).to(torch.int8)

    def count(self, nq, nk):
        self.validate(nq, nk)
        t = self.t4.expand(-1, -1, nq, nk)
        return t.sum().item() / (t.shape[0] * t.shape[1])
