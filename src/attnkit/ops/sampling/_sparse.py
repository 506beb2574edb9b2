"""Row-sparse gather-sum engine for sampling ops: ``out[r] = sum_j w[r, j] * V[col[r, j]]``.

Bilinear (and depth-weighted trilinear) sampling followed by an attention-weighted sum is a sparse matrix with a
fixed number of entries per row times the value matrix. Running it as a CSR product keeps every intermediate at
the size of the weights (no ``(queries x points x channels)`` tensor): the forward is one ``sparse @ dense``; the
backward is ``A^T @ grad`` for the values and ``torch.sparse.sampled_addmm`` (``<grad_r, V_col>`` at the nonzeros
only) for the weights.
"""

from __future__ import annotations

import warnings

import torch


def _csr(weights: torch.Tensor, cols: torch.Tensor, n_cols: int) -> torch.Tensor:
    R, J = weights.shape
    crow = torch.arange(0, R * J + 1, J, device=weights.device)  # J entries in every row: no sort needed
    with warnings.catch_warnings():  # CSR support is marked beta; the invariants hold by construction
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols.reshape(-1), weights.reshape(-1), (R, n_cols),
                                       check_invariants=False)


class _RowSparseMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, cols, values):
        A = _csr(weights, cols, values.shape[0])
        ctx.save_for_backward(weights, cols, values)
        return A @ values  # (R, D)

    @staticmethod
    def backward(ctx, grad):
        weights, cols, values = ctx.saved_tensors
        grad = grad.contiguous()
        A = _csr(weights, cols, values.shape[0])
        d_weights = d_values = None
        if ctx.needs_input_grad[2]:
            d_values = A.t() @ grad  # (M, D)
        if ctx.needs_input_grad[0]:
            d_weights = torch.sparse.sampled_addmm(A, grad, values.t(), beta=0.0).values().view_as(weights)
        return d_weights, None, d_values


def row_sparse_mm(weights: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_j weights[r, j] * values[cols[r, j]]``.

    Args:
        weights: ``(R, J)`` float32 / float64; cols: ``(R, J)`` int64 in ``[0, M)``; values: ``(M, D)``.

    Returns:
        ``(R, D)``, differentiable in ``weights`` and ``values``.
    """
    return _RowSparseMM.apply(weights.contiguous(), cols.contiguous(), values.contiguous())
