"""Channel-family ops on CNN maps ``(B, C, H, W)``: ECA's channel gate, ELA's strip gates, VAN's large-kernel
attention. Importing this package registers each op for ``ak.explain``."""

from attnkit.ops.channel._common import check_channels_first, check_channels_last
from attnkit.ops.channel.eca import eca_attention, eca_kernel_size
from attnkit.ops.channel.ela import ela_attention
from attnkit.ops.channel.lka import large_kernel_attention

__all__ = ["check_channels_first", "check_channels_last", "eca_attention", "eca_kernel_size", "ela_attention",
           "large_kernel_attention"]
