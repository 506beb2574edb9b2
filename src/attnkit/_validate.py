"""Input checks shared by every op: terse, and each error names the argument and what was expected."""

from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64/float32/bfloat16/float16, got {t.dtype}")
    return t


def check_qkv(
    q: object, k: object, v: object, *, spatial_rank: int = 1, same_extent: bool = False
) -> tuple[int, int]:
    """Validate heads-last ``q (B, *Sq, Hq, D)``, ``k (B, *Sk, Hkv, D)``, ``v (B, *Sk, Hkv, Dv)``.

    Returns ``(Hq, Hkv)``. ``same_extent`` requires ``Sq == Sk`` (self-attention ops).
    """
    q, k, v = check_tensor("q", q), check_tensor("k", k), check_tensor("v", v)
    rank = spatial_rank + 3
    spatial = ", ".join(f"X{i}" for i in range(spatial_rank))
    layout = f"(B, {spatial}, H, D)" if spatial_rank > 1 else "(B, N, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{name} must have rank {rank}, heads-last {layout}; got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree on (B, *spatial, H): k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: q D={q.shape[-1]}, k D={k.shape[-1]}")
    if same_extent and q.shape[1:-2] != k.shape[1:-2]:
        raise ValueError(
            f"q and k must have the same spatial extent, got {tuple(q.shape[1:-2])} and {tuple(k.shape[1:-2])}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"number of query heads ({hq}) must be a multiple of key/value heads ({hkv}) (GQA/MQA)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if any(s == 0 for s in t.shape[:-2]) or t.shape[-1] == 0:
            raise ValueError(f"{name} has an empty dimension: shape {tuple(t.shape)}")
    return hq, hkv


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def per_dim(name: str, value: object, rank: int, *, kind: type = int) -> tuple:
    """Expand an int/bool or a per-dimension tuple to a tuple of length ``rank``."""
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(f"{name} has {len(value)} entries, expected one per spatial dim ({rank})")
        items = tuple(value)
    else:
        items = (value,) * rank
    for it in items:
        if kind is bool:
            if not isinstance(it, bool):
                raise TypeError(f"{name} must be a bool or a tuple of bools, got {value!r}")
        elif isinstance(it, bool) or not isinstance(it, int):
            raise TypeError(f"{name} must be an int or a tuple of ints, got {value!r}")
    return items


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


# The debug switch of the NaN policy (docs/design.md, "Non-finite inputs"): off by default, so the
# hot path has no host sync; ATTNKIT_CHECK_FINITE=1 turns it on for the whole process.
_CHECK_FINITE = [_env_flag("ATTNKIT_CHECK_FINITE")]


class check_finite:  # lower case: used like a function, ``attnkit.check_finite(True)``
    """Turn the non-finite input check of every op on or off; also a context manager.

    Off by default (``ATTNKIT_CHECK_FINITE=1`` in the environment turns it on at import). When off,
    NaN and infinity in inputs propagate to exactly the outputs that depend on them, with no host
    sync. When on, each op first checks its tensor inputs and raises ``ValueError`` naming the op,
    the argument and the first bad index, e.g. ``attention: k contains NaN or infinity at
    (0, 3, 1, 2)``. The check syncs with the host, so it is skipped while ``torch.compile`` traces.

    Example:
        >>> ak.check_finite(True)            # from now on
        >>> with ak.check_finite(True):      # only inside the block
        ...     out = ak.attention(q, k, v)
    """

    def __init__(self, enabled: bool = True):
        if not isinstance(enabled, bool):
            raise TypeError(f"check_finite: enabled must be a bool, got {type(enabled).__name__}")
        self._previous = _CHECK_FINITE[0]
        _CHECK_FINITE[0] = enabled

    def __enter__(self) -> check_finite:
        return self

    def __exit__(self, *exc: object) -> None:
        _CHECK_FINITE[0] = self._previous


def checking_finite() -> bool:
    """Whether the non-finite input check is on (see :class:`check_finite`)."""
    return _CHECK_FINITE[0]


def assert_finite(op: str, **tensors: torch.Tensor | None) -> None:
    """If the debug switch is on, raise ``ValueError`` naming ``op``, the argument and the first bad index.

    A no-op (no host sync) when the switch is off, for ``None`` arguments, on ``meta`` tensors
    and while ``torch.compile`` traces.
    """
    if not _CHECK_FINITE[0] or torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if t is None or t.device.type == "meta":
            continue
        # one aminmax pass: NaN propagates through min/max and infinities show at the ends
        lo, hi = torch.aminmax(t.detach())
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            where = tuple(int(i) for i in (~torch.isfinite(t.detach())).nonzero()[0])
            raise ValueError(f"{op}: {name} contains NaN or infinity at {where} (shape {tuple(t.shape)}); "
                             "the check is on because of attnkit.check_finite(True) or ATTNKIT_CHECK_FINITE=1")


def int_arg(name: str, value: object, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; TypeError for non-ints (bools included), ValueError below it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value

