"""Channel-family ops on CNN maps ``(B, C, H, W)``: ECA's channel gate, ELA's strip gates, VAN's large-kernel
attention, ULSAM's subspace maps and BEVANet's SDLSKA. Importing this package registers each op for
``ak.explain``."""

from attnkit.ops.channel._common import check_channels_first, check_channels_last
from attnkit.ops.channel.eca import eca_attention, eca_kernel_size
from attnkit.ops.channel.ela import ela_attention
from attnkit.ops.channel.lka import large_kernel_attention
from attnkit.ops.channel.sdlska import SDLSKA_KERNELS, sdlska_attention
from attnkit.ops.channel.ulsam import ulsam_attention

__all__ = [
    "SDLSKA_KERNELS",
    "check_channels_first",
    "check_channels_last",
    "eca_attention",
    "eca_kernel_size",
    "ela_attention",
    "large_kernel_attention",
    "sdlska_attention",
    "ulsam_attention",
]
