"""The functional API, one folder per op family: validate -> choose a backend -> run.

Importing this package imports every op module, which registers each op for ``ak.explain``.
"""

from attnkit.ops import (  # noqa: F401
    channel,
    cross,
    decode,
    dense,
    linear,
    local,
    memory,
    neighborhood,
    per_head,
    routed,
    sampling,
    sequence,
    vision,
)
from attnkit.ops.dense import gaussian, relative, softplus  # noqa: F401
from attnkit.ops.linear import agent  # noqa: F401
