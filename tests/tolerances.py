"""The one tolerance table, and the one comparison helper every test uses.

Errors are measured two ways, as flash-linear-attention and NATTEN do: max-abs error and
relative RMSE (``rms(a - b) / rms(b)``). A comparison passes when either is within its bound
(max-abs catches gross local errors on small outputs, relative RMSE is scale-free for
large ones), and failures name the tensor ('dk') and both figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    atol: float
    rrmse: float


# keyed by the dtype of the computation under test; the reference runs in float64.
TOL = {
    torch.float64: Tol(atol=1e-9, rrmse=1e-9),
    torch.float32: Tol(atol=2e-4, rrmse=1e-4),
    torch.bfloat16: Tol(atol=6e-2, rrmse=2e-2),
    torch.float16: Tol(atol=8e-3, rrmse=4e-3),
}
# gradients pass through one more matmul and softmax-derivative: a factor looser.
GRAD_FACTOR = 4.0

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    a, e = actual.detach().double(), expected.detach().double()
    diff = a - e
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    denom = e.pow(2).mean().sqrt().item() if e.numel() else 0.0
    rrmse = diff.pow(2).mean().sqrt().item() / denom if denom > 0 else max_abs
    return max_abs, rrmse


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str, *, grad: bool = False,
    factor: float = 1.0,
) -> None:
    """Assert ``actual`` matches ``expected`` within the table entry for ``dtype``."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    tol = TOL[dtype]
    f = factor * (GRAD_FACTOR if grad else 1.0)
    max_abs, rrmse = errors(actual, expected)
    assert max_abs <= tol.atol * f or rrmse <= tol.rrmse * f, (
        f"{name} ({dtype}): max-abs {max_abs:.3e} (tol {tol.atol * f:.1e}), "
        f"rel-RMSE {rrmse:.3e} (tol {tol.rrmse * f:.1e})"
    )


def compare_fn(fast, ref, inputs: dict[str, torch.Tensor], dtype: torch.dtype, *, factor: float = 1.0,
               grad_names: tuple[str, ...] | None = None, seed: int = 0, lse_at: tuple[int, ...] = ()) -> None:
    """Run ``fast(**inputs_in_dtype)`` and ``ref(**inputs_in_float64)``; compare output and every gradient.

    ``inputs`` are float64 leaf tensors (others pass through); ``fast`` sees them cast to
    ``dtype``. Outputs may be a tensor or a tuple of tensors (all compared; the first gets
    the upstream gradient, the rest a smaller random one). This is the tinygrad
    ``helper_test_op`` idea: one helper checks forward, gradients, shapes and dtypes. Outputs at
    the indices ``lse_at`` are log-sum-exps: float32 (float64 for float64), whatever ``dtype``.
    """
    names = grad_names if grad_names is not None else tuple(
        n for n, t in inputs.items() if isinstance(t, torch.Tensor) and t.is_floating_point())
    fast_in = {n: (t.detach().to(dtype).requires_grad_(n in names) if n in names else t) for n, t in inputs.items()}
    ref_in = {n: (t.detach().double().requires_grad_(n in names) if n in names else t) for n, t in inputs.items()}
    out_f, out_r = fast(**fast_in), ref(**ref_in)
    out_f = out_f if isinstance(out_f, tuple) else (out_f,)
    out_r = out_r if isinstance(out_r, tuple) else (out_r,)
    gen = torch.Generator().manual_seed(seed)
    loss_f, loss_r = 0, 0
    for i, (a, b) in enumerate(zip(out_f, out_r, strict=True)):
        if a.dtype.is_floating_point:
            # outputs keep the input dtype; a log-sum-exp is float32 (float64 for float64 inputs)
            want = (torch.float64 if dtype == torch.float64 else torch.float32) if i in lse_at else dtype
            assert a.dtype == want, f"output {i}: dtype {a.dtype}, expected {want}"
        finite = torch.isfinite(b)
        a_fin, b_fin = torch.where(finite, a.double(), 0.0), torch.where(finite, b, 0.0)
        assert_close(a_fin, b_fin, dtype, f"out[{i}]", factor=factor)
        assert torch.equal(torch.isfinite(a), finite), f"out[{i}]: infinities differ from the reference"
        if a.requires_grad and b.requires_grad:
            g = torch.randn(b.shape, generator=gen, dtype=torch.float64) * (1.0 if i == 0 else 0.1)
            g = torch.where(finite, g, 0.0)
            loss_f = loss_f + (torch.where(finite, a.double(), 0.0) * g).sum()
            loss_r = loss_r + (torch.where(finite, b, 0.0) * g).sum()
    if not names or not isinstance(loss_f, torch.Tensor):
        return
    gf = torch.autograd.grad(loss_f, [fast_in[n] for n in names], allow_unused=True)
    gr = torch.autograd.grad(loss_r, [ref_in[n] for n in names], allow_unused=True)
    for n, a, b in zip(names, gf, gr, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0, f"d{n}: reference has no gradient but fast path does"
            continue
        assert a is not None, f"d{n}: missing gradient"
        assert a.dtype == dtype, f"d{n}: dtype {a.dtype}, expected {dtype}"
        assert_close(a, b, dtype, f"d{n}", grad=True, factor=factor)


def nudged_double(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``module`` in float64 with every parameter moved off its initial value (zero-initialised gates and
    tables would otherwise hide a wrong formula), deterministically for ``seed``."""
    torch.manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module

