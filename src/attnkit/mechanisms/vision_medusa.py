"""MEDUSA: a single self-attention body with one head per backbone scale.

"MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for Medical Image
Analysis", arXiv 2110.06063 (Front. Med. 2022). The op is ``attnkit.ops.vision.medusa.multiscale_gate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.ops.vision.medusa import MODES, multiscale_gate
from attnkit.reference.naive_vision_c import naive_medusa_module
from attnkit.registry import Family, InputKind, Paper, check_input, choice_option, int_option, register


def _flops(c: dict) -> float:
    b, d, (h, w), cb = c["batch"], c["dim"], c["input_size"], c["body_dim"]
    body = 2 * h * w * 9 * cb * (d + cb) + 2 * (h * w / 4) * 9 * cb * cb
    return float(b * (body + 2 * h * w * cb * d + 3 * h * w * d))  # body, one head at full extent, gate


@register(
    name="medusa", family=Family.VISION,
    paper=Paper("MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for Medical "
                "Image Analysis", "2110.06063", 2022),
    patterns=("noncausal-self",), complexity="O(B H W C_b (C + C_b))", flops=_flops,
    options=lambda c: {"dim": c["dim"], "stage_channels": c.get("stage_channels"), "body_dim": c["body_dim"],
                       "mode": c["mode"]},
    reference=naive_medusa_module, functional=multiscale_gate, input_kind=InputKind.CNN,
    default_config={"dim": 64, "stage_channels": None, "body_dim": 32, "mode": "residual"},
    default_input={"batch": 8, "input_size": (56, 56)},
    tiny_config={"dim": 3, "body_dim": 4}, tiny_input={"batch": 2, "input_size": (5, 6)},
    notes="Only the abstract could be read here: one high-capacity self-attention body whose several heads feed "
          "attention to different scales of the backbone. This library's choices: the body is a two-level "
          "encoder-decoder of 3x3 convs with ReLU (average-pool down, nearest up, skip sum) at body_dim "
          "channels, computed once per input; head s average-pools the body map to stage s's extent (stages "
          "no larger than the input) and applies a 1x1 conv to C_s logits; gate x_s * (1 + sigmoid) "
          "(mode='residual', default: where the attention is 0 the backbone's features pass unchanged) or"
          " x_s * sigmoid (mode='multiply'). forward(x) with no stages "
          "gates x itself with head 0 (the registry's single-input case); forward(x, stages) returns every "
          "gated stage. The backbone and classifier are architecture, not part of the op.",
)
class MEDUSAAttention(nn.Module):
    """MEDUSA's attention: body on ``x (B, C, H, W)``, one head per stage ``[(B, C_s, H_s, W_s)]``.

    Args:
        dim: ``C`` of the body's input. stage_channels: ``C_s`` per backbone stage (None: ``(dim,)``, one stage
            with ``x``'s channels). body_dim: the body's width ``C_b``. mode: ``"residual"`` or ``"multiply"``.
    """

    def __init__(self, dim: int, stage_channels: Sequence[int] | None = None, body_dim: int = 32,
                 mode: str = "residual"):
        super().__init__()
        self.dim = int_option(self, "dim", dim, 1)
        stage_channels = (dim,) if stage_channels is None else stage_channels
        if isinstance(stage_channels, int) or not isinstance(stage_channels, Sequence) or not stage_channels:
            raise TypeError(f"{type(self).__name__}: stage_channels must be a non-empty tuple of ints, got "
                            f"{stage_channels!r}")
        self.stage_channels = tuple(int_option(self, "stage_channels", c, 1) for c in stage_channels)
        self.body_dim = int_option(self, "body_dim", body_dim, 1)
        self.mode = choice_option(self, "mode", mode, MODES)
        self.enc1 = nn.Conv2d(dim, body_dim, 3, padding=1)
        self.enc2 = nn.Conv2d(body_dim, body_dim, 3, padding=1)
        self.dec = nn.Conv2d(body_dim, body_dim, 3, padding=1)
        self.heads = nn.ModuleList(nn.Conv2d(body_dim, c, 1) for c in self.stage_channels)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The shared attention body: ``(B, C, H, W)`` -> ``(B, C_b, H, W)``."""
        e1 = F.relu(self.enc1(x))
        e2 = F.relu(self.enc2(F.avg_pool2d(e1, 2, ceil_mode=True)))  # (B, C_b, ceil(H/2), ceil(W/2))
        up = e2.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :x.shape[2], :x.shape[3]]  # nearest x2
        return F.relu(self.dec(e1 + up))

    def forward(self, x: torch.Tensor, stages: Sequence[torch.Tensor] | None = None):
        """``x (B, C, H, W)`` -> gated ``x`` (no ``stages``), or the list of gated ``stages``."""
        who = type(self).__name__
        check_input(self, x, "(B, C, H, W)", channels=self.dim)
        if stages is None:
            if self.stage_channels[0] != self.dim:
                raise ValueError(f"{who}: without stages, x is gated by head 0, which has "
                                 f"{self.stage_channels[0]} channels, not dim={self.dim}; pass stages=")
            maps = [x]
        else:
            maps = list(stages)
            if not 1 <= len(maps) <= len(self.heads):
                raise ValueError(f"{who}: stages must hold 1 to {len(self.heads)} maps, got {len(maps)}")
            for s, m in enumerate(maps):
                check_input(self, m, "(B, C, H, W)", channels=self.stage_channels[s], name=f"stages[{s}]")
        heads = self.heads[:len(maps)]
        out = multiscale_gate(self.body(x), maps, [h.weight[:, :, 0, 0] for h in heads], [h.bias for h in heads],
                              self.mode)
        return out[0] if stages is None else out
