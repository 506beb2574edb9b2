"""SDLSKA with comprehensive kernel selection: BEVANet's large-kernel attention as a CNN block.

"BEVANet: Bilateral Efficient Visual Attention Network for Real-Time Semantic Segmentation", arXiv 2508.07300
(ICIP 2025), Sec. 3. A nominal K x K depthwise field sparsely decomposed into a small square kernel and two
parallel dilated strips; the three branch outputs are fused with per-branch channel and spatial gates (CKS), then
a 1 x 1 conv gives the multiplicative attention map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.channel._common import check_channels_first, work_dtype
from attnkit.ops.channel.sdlska import SDLSKA_KERNELS, sdlska_attention
from attnkit.reference.naive_vision_a import naive_sdlska_module
from attnkit.registry import Family, InputKind, Paper, choice_option, int_option, register


def _norm(bn: nn.BatchNorm2d, z: torch.Tensor, batch: bool) -> torch.Tensor:
    """``bn(z)`` in ``z``'s dtype, with batch statistics only if ``batch`` (else the running ones)."""
    if batch and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    rm, rv = bn.running_mean, bn.running_var
    same = rm is None or rm.dtype == z.dtype
    rm_w, rv_w = (rm, rv) if same else (rm.to(z.dtype), rv.to(z.dtype))  # half buffers: update a float32 copy
    out = F.batch_norm(z, rm_w, rv_w, bn.weight.to(z.dtype), bn.bias.to(z.dtype), batch, bn.momentum or 0.0,
                       bn.eps)
    if batch and not same:
        with torch.no_grad():
            rm.copy_(rm_w)
            rv.copy_(rv_w)
    return out


def _conv(conv: nn.Conv2d, z: torch.Tensor) -> torch.Tensor:
    """``conv(z)`` in ``z``'s dtype (the weights cast: the gate path runs in float32 for half inputs)."""
    return F.conv2d(z, conv.weight.to(z.dtype), conv.bias.to(z.dtype), padding=conv.padding, groups=conv.groups)


class ComprehensiveKernelSelection(nn.Module):
    """BEVANet's CKS: ``f = sum_i b_i * c_i * p_i`` over the branches ``b = (s, h, v)`` ``(B, C, H, W)``.

    Channel gates ``c_i (B, C, 1, 1)`` from the pooled sum ``t = s + h + v`` through a shared reduction
    (1x1 conv to ``d = max(C // 16, 32)``, 3x3 depthwise, BatchNorm, ReLU) and one expansion per branch (1x1 conv
    to ``C``, 3x3 depthwise, BatchNorm, ReLU, sigmoid: values in ``[0.5, 1)``); spatial gates ``p_i (B, 1, H, W)``
    from a 7x7 conv of ``[mean_c t, max_c t]`` to 3 maps and a sigmoid. The 3x3 depthwise convs act on ``1 x 1``
    maps, so only their centre weight matters; they are kept literally so the authors' weights load.

    Args:
        channels: ``C``.
        hidden: ``d``; None: ``max(C // 16, 32)``.
    """

    def __init__(self, channels: int, hidden: int | None = None):
        super().__init__()
        C = int_option(self, "channels", channels, 1)
        d = max(C // 16, 32) if hidden is None else int_option(self, "hidden", hidden, 1)
        self.reduce_pw = nn.Conv2d(C, d, 1)
        self.reduce_dw = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.reduce_norm = nn.BatchNorm2d(d)
        self.expand_pw = nn.ModuleList([nn.Conv2d(d, C, 1) for _ in range(3)])
        self.expand_dw = nn.ModuleList([nn.Conv2d(C, C, 3, padding=1, groups=C) for _ in range(3)])
        self.expand_norm = nn.ModuleList([nn.BatchNorm2d(C) for _ in range(3)])
        self.spatial = nn.Conv2d(2, 3, 7, padding=3)

    def forward(self, s: torch.Tensor, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``s, h, v (B, C, H, W)`` -> ``(B, C, H, W)``."""
        t = s + h + v
        # batch statistics of a (1, d, 1, 1) tensor are degenerate (torch refuses them): one sample in training
        # normalises the channel path with the running statistics instead
        batch = self.training and t.shape[0] > 1
        # the gates are computed in float32 for half inputs: batch statistics of a few pooled values and the
        # channel mean lose most of their bits in bfloat16 (the branches themselves stay in the input dtype)
        wt = work_dtype(t)
        g = t.mean((2, 3), keepdim=True, dtype=wt)  # (B, C, 1, 1)
        z = F.relu(_norm(self.reduce_norm, _conv(self.reduce_dw, _conv(self.reduce_pw, g)), batch))  # (B, d, 1, 1)
        gates = [torch.sigmoid(F.relu(_norm(nrm, _conv(dw, _conv(pw, z)), batch))).to(t.dtype)  # (B, C, 1, 1)
                 for pw, dw, nrm in zip(self.expand_pw, self.expand_dw, self.expand_norm, strict=True)]
        m = torch.cat([t.mean(1, keepdim=True, dtype=wt), t.amax(1, keepdim=True).to(wt)], 1)  # (B, 2, H, W)
        p = torch.sigmoid(_conv(self.spatial, m)).to(t.dtype)  # (B, 3, H, W)
        out = s * (gates[0] * p[:, 0:1])
        out = torch.addcmul(out, h, gates[1] * p[:, 1:2])
        return torch.addcmul(out, v, gates[2] * p[:, 2:3])


class SparseDilatedLKA(nn.Module):
    """SDLSKA (+ CKS) on ``(B, C, H, W)`` maps: ``x * PW(CKS(s, h, v))``.

    Args:
        channels: ``C``.
        kernel_size: the nominal kernel ``K``, one of 7, 11, 23, 35 (BEVANet's block uses 35): sets the small
            kernel ``k0``, the strip length ``k1`` and the dilation ``r`` as the authors' table.
        selection: ``"cks"`` (BEVANet) or ``"sum"`` (the three branches added, no selection: an ablation).
    """

    def __init__(self, channels: int, kernel_size: int = 35, selection: str = "cks"):
        super().__init__()
        C = self.channels = int_option(self, "channels", channels, 1)
        if kernel_size not in SDLSKA_KERNELS or isinstance(kernel_size, bool):
            raise ValueError(f"{type(self).__name__}: kernel_size must be one of {tuple(SDLSKA_KERNELS)} (the "
                             f"decompositions BEVANet defines), got {kernel_size!r}")
        self.kernel_size = kernel_size
        k0, k1, self.dilation = SDLSKA_KERNELS[kernel_size]
        self.selection = choice_option(self, "selection", selection, ("cks", "sum"))
        p = self.dilation * (k1 - 1) // 2
        self.conv0 = nn.Conv2d(C, C, k0, padding=k0 // 2, groups=C)
        self.conv_h = nn.Conv2d(C, C, (1, k1), padding=(0, p), dilation=self.dilation, groups=C)
        self.conv_v = nn.Conv2d(C, C, (k1, 1), padding=(p, 0), dilation=self.dilation, groups=C)
        self.conv1 = nn.Conv2d(C, C, 1)
        self.cks = ComprehensiveKernelSelection(C) if selection == "cks" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``(B, C, H, W)``."""
        check_channels_first(self, x, self.channels)
        return sdlska_attention(x, self.conv0.weight, self.conv0.bias, self.conv_h.weight, self.conv_h.bias,
                                self.conv_v.weight, self.conv_v.bias, self.conv1.weight, self.conv1.bias,
                                self.dilation, self.cks)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, selection={self.selection!r}"


def _flops(cfg: dict) -> float:
    B, C = cfg["batch"], cfg["channels"]
    Y, X = cfg["input_size"]
    k0, k1, _ = SDLSKA_KERNELS[cfg.get("kernel_size", 35)]
    convs = 2 * C * (k0 * k0 + 2 * k1) + 2 * C * C + C  # the three depthwise convs, the PW, the gate
    cks = 2 * C + 2 * C + 2 * 2 * 3 * 49 + 3 * 4 + 5 * C if cfg.get("selection", "cks") == "cks" else 2 * C
    return float(B * Y * X * (convs + cks))


def _options(c: dict) -> dict:
    return {k: c[k] for k in ("channels", "kernel_size", "selection")}


register(name="sdlska", family=Family.CHANNEL,
         paper=Paper("BEVANet: Bilateral Efficient Visual Attention Network for Real-Time Semantic Segmentation",
                     "2508.07300", 2025),
         patterns=("noncausal-self",), complexity="O(H W C (k0^2 + 2 k1 + C))", flops=_flops, options=_options,
         reference=naive_sdlska_module, functional=sdlska_attention,
         default_config={"channels": 64, "kernel_size": 35, "selection": "cks"},
         tiny_config={"channels": 4, "kernel_size": 7},
         # tiny batch 3, not 2: CKS normalises a (B, d, 1, 1) tensor with batch statistics, and two samples
         # normalise to exactly +-1 per channel, so its gradient is near-degenerate and amplifies bf16 rounding
         # (8.2% rel-RMSE at B=2 against the 8% bf16 tolerance; eval mode stays under 1%)
         default_input={"batch": 2, "input_size": (14, 14)}, tiny_input={"batch": 3, "input_size": (5, 6)},
         shape=lambda c: (c["batch"], c["channels"], *c["input_size"]), input_kind=InputKind.CNN,
         notes="The attention module of BEVANet's EVAN block only (the surrounding BN, PW -> GELU -> SDLSKA -> PW, "
               "layer scale and MLP belong to the block). Kernel table as the authors' code: K = 7 (3, 1x3 d2), "
               "11 (3, 1x5 d2), 23 (5, 1x7 d3), 35 (5, 1x11 d3); other K raise. Both strips read the small conv's "
               "output (parallel, a plus-shaped field), not cascaded as in LSKA. Every conv has a bias and zero "
               "'same' padding, as the authors' code, so any H, W is accepted (a map smaller than the kernel is "
               "zero padded; no error is raised because the code defines this padding). CKS hidden width "
               "max(C // 16, 32); its BatchNorms see (B, d, 1, 1) in the channel path, so training mode needs "
               "B >= 2: with one sample in training this module normalises that path with the running statistics "
               "(torch's BatchNorm would raise). The gates are computed in float32 for half inputs. The selection "
               "weights are not normalised across branches. "
               "selection='sum' is the no-selection ablation (s + h + v). No peer in timm.")(SparseDilatedLKA)
