"""PoolFormer's pooling token mixer as a module.

"MetaFormer Is Actually What You Need for Vision", arXiv 2111.11418 (CVPR 2022), §3.2.

``y = AvgPool_{k x k}(x) - x`` on a channels-last image, the average over pixels inside the image only.
:meth:`PoolMixer.from_timm` takes timm's ``metaformer.Pooling`` (which runs on ``(B, C, Y, X)``).
"""

from __future__ import annotations

import torch
from torch import nn

from attnkit.ops.vision.common import channels_last_hint
from attnkit.ops.vision.pool import pool_mixer
from attnkit.reference.naive_vision import naive_pool_mixer_module
from attnkit.registry import Family, InputKind, Paper, check_input, int_option, register


def _flops(cfg: dict) -> float:
    y, x = cfg["input_size"]
    return float(cfg.get("batch", 1) * y * x * cfg["dim"] * (cfg["pool_size"] ** 2 + 1))


def _options(cfg: dict) -> dict:
    return {"dim": cfg["dim"], "pool_size": cfg["pool_size"]}


@register(
    name="pool_mixer", family=Family.VISION,
    paper=Paper("MetaFormer Is Actually What You Need for Vision", "2111.11418", 2021),
    patterns=("noncausal-self",), complexity="O(N k^2 C)", flops=_flops, options=_options,
    reference=naive_pool_mixer_module, functional=pool_mixer,
    default_config={"dim": 96, "pool_size": 3}, tiny_config={"dim": 4},
    default_input={"batch": 1, "input_size": (56, 56)}, tiny_input={"batch": 1, "input_size": (4, 5)},
    input_kind=InputKind.IMAGE,
    notes="avg_pool2d(k, stride 1, padding k//2, count_include_pad=False) minus x, as the paper and timm "
          "(metaformer.Pooling); no parameters. timm runs it on (B, C, Y, X); this module is channels-last "
          "(B, Y, X, C) and pools the channels-last view without a copy. dim is only used to check the input. "
          "Odd pool_size only (a 'same' window).",
)
class PoolMixer(nn.Module):
    """PoolFormer token mixer on ``x (B, Y, X, C)`` -> ``(B, Y, X, C)``: the window mean minus ``x``.

    Args:
        dim: ``C`` (checked against the input).
        pool_size: odd window side (3 in the paper).

    Example:
        >>> y = PoolMixer(64)(torch.randn(2, 56, 56, 64))
    """

    def __init__(self, dim: int, pool_size: int = 3):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        self.pool_size = int_option(self, "pool_size", pool_size, 1)
        if self.pool_size % 2 == 0:
            raise ValueError(f"{type(self).__name__}: pool_size must be odd, got {pool_size}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last_hint(type(self).__name__, x, self.dim)
        check_input(self, x, "(B, Y, X, C)", channels=self.dim)
        return pool_mixer(x, self.pool_size)

    @classmethod
    def from_timm(cls, module, dim: int) -> PoolMixer:
        """The mixer of timm's ``metaformer.Pooling`` for ``dim`` channels: ``m(x) == module(x.permute(0, 3, 1, 2))``
        permuted back."""
        pool = getattr(module, "pool", None)
        if type(module).__name__ != "Pooling" or not isinstance(pool, nn.AvgPool2d):
            raise TypeError(f"{cls.__name__}.from_timm: expected timm.models.metaformer.Pooling, "
                            f"got {type(module).__name__}")
        k = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
        if pool.count_include_pad or pool.stride not in (1, (1, 1)) or pool.padding not in (k // 2, (k // 2,) * 2):
            raise ValueError(f"{cls.__name__}.from_timm: only stride 1, padding k//2, count_include_pad=False")
        return cls(dim, k)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, pool_size={self.pool_size}"
