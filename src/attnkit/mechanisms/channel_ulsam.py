"""ULSAM: subspace attention as a CNN block.

"ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks", arXiv 2006.15102
(WACV 2020). ``g`` channel subspaces, each with one spatial softmax map from a depthwise 1 x 1 conv, a 3 x 3 max
pool and a pointwise conv to one channel; each subspace is re-weighted residually by its map.
"""

from __future__ import annotations

from torch import nn

from attnkit.ops.channel._common import check_channels_first
from attnkit.ops.channel.ulsam import ulsam_attention
from attnkit.reference.naive_vision_a import naive_ulsam_module
from attnkit.registry import Family, InputKind, Paper, choice_option, float_option, int_option, register


class SubspaceAttention(nn.Module):
    """ULSAM on ``(B, C, H, W)`` maps.

    Args:
        channels: ``C``.
        groups: ``g``, the number of subspaces (must divide ``C``; the paper sweeps 1 ... 32).
        form: ``"code"`` (the authors' code: BatchNorm + ReLU after the depthwise and after the pointwise conv,
            ``5 C + 3 g`` parameters) or ``"paper"`` (Eq. 1-3 as printed: no norm, no ReLU, ``3 C + g``).
        momentum, eps: the batch norms' (PyTorch convention; the authors' code used 0.9).

    Parameters are stored for all subspaces at once: ``dw`` (``C`` channels, 1 x 1, groups ``C``), ``pw``
    (``C -> g``, groups ``g``), ``dw_norm`` (``C``) and ``pw_norm`` (``g``): subspace ``n`` is slice ``n``.
    """

    def __init__(self, channels: int, groups: int = 4, form: str = "code", momentum: float = 0.1,
                 eps: float = 1e-5):
        super().__init__()
        C = self.channels = int_option(self, "channels", channels, 1)
        g = self.groups = int_option(self, "groups", groups, 1)
        if C % g:
            raise ValueError(f"{type(self).__name__}: groups ({g}) must divide channels ({C})")
        self.form = choice_option(self, "form", form, ("code", "paper"))
        momentum = float_option(self, "momentum", momentum, minimum=0.0)
        eps = float_option(self, "eps", eps, minimum=0.0, exclusive=True)
        self.dw = nn.Conv2d(C, C, 1, groups=C)
        self.pw = nn.Conv2d(C, g, 1, groups=g)
        code = form == "code"
        self.dw_norm = nn.BatchNorm2d(C, eps=eps, momentum=momentum) if code else None
        self.pw_norm = nn.BatchNorm2d(g, eps=eps, momentum=momentum) if code else None

    @staticmethod
    def _norm(bn):
        return None if bn is None else (bn.running_mean, bn.running_var, bn.weight, bn.bias)

    def forward(self, x):
        """``x (B, C, H, W)`` -> ``(B, C, H, W)``."""
        check_channels_first(self, x, self.channels)
        bn = self.dw_norm
        if bn is not None and self.training and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            self.pw_norm.num_batches_tracked.add_(1)
        return ulsam_attention(x, self.dw.weight.view(-1), self.dw.bias, self.pw.weight.view(self.groups, -1),
                               self.pw.bias, self.groups, dw_norm=self._norm(bn), pw_norm=self._norm(self.pw_norm),
                               relu=bn is not None, training=self.training,
                               momentum=0.1 if bn is None else bn.momentum, eps=1e-5 if bn is None else bn.eps)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, form={self.form!r}"


def _flops(cfg: dict) -> float:
    B, C, g = cfg["batch"], cfg["channels"], cfg.get("groups", 4)
    Y, X = cfg["input_size"]
    # DW scale+shift, norm, ReLU, 9-way max, the PW (2 per channel), the softmax (~5 per map entry), x + x A
    return float(B * Y * X * (C * (2 + 2 + 1 + 8 + 2 + 2) + 5 * g))


def _options(c: dict) -> dict:
    return {k: c[k] for k in ("channels", "groups", "form")}


register(name="ulsam", family=Family.CHANNEL,
         paper=Paper("ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks",
                     "2006.15102", 2020),
         patterns=("noncausal-self",), complexity="O(C H W)", flops=_flops, options=_options,
         reference=naive_ulsam_module, functional=ulsam_attention,
         default_config={"channels": 64, "groups": 4, "form": "code"},
         tiny_config={"channels": 6, "groups": 3},
         default_input={"batch": 2, "input_size": (14, 14)}, tiny_input={"batch": 2, "input_size": (3, 4)},
         shape=lambda c: (c["batch"], c["channels"], *c["input_size"]), input_kind=InputKind.CNN,
         notes="Default form='code' follows the authors' released code (BatchNorm + ReLU after the depthwise 1x1 "
               "and after the pointwise conv, 5C + 3g parameters); form='paper' is Eq. 1-3 as printed (no norm, no "
               "ReLU, 3C + g). The authors' BatchNorm momentum 0.9 is a TensorFlow-convention carry-over: PyTorch's "
               "0.1 is the default here (pass momentum=0.9 to reproduce their running statistics). The 3x3 max "
               "pool pads with -inf (stride 1). Because each map sums to 1 over H W the module is close to the "
               "identity at init (by design). Subspaces are stored as one grouped conv / one BatchNorm of all "
               "channels (identical to the per-subspace modules). Batch statistics in training mode: outputs "
               "depend on the whole batch, as any BatchNorm block. No peer in timm.")(SubspaceAttention)
