"""``ak.explain``: which backend runs a call, and why every other one does not."""

from __future__ import annotations

from typing import Any

from attnkit.backends.base import explainable_ops


def explain(op_name: str, q: Any, k: Any, v: Any, **kwargs: Any) -> str:
    """A human-readable account of the backend choice for one call.

    Args:
        op_name: ``"attention"``, ``"neighborhood_attention"`` or ``"linear_attention"``.
        q, k, v: the inputs, heads-last as for the op.
        **kwargs: the op's other arguments (``mask=``, ``kernel_size=``, ``backend=`` ...).

    Returns:
        Several lines: the call, each backend with "can run" / "cannot run: reason", the choice.

    Example:
        >>> print(ak.explain("attention", q, k, v, mask=ak.masks.causal()))
    """
    import attnkit.ops  # noqa: F401  (registers the ops)

    ops = explainable_ops()
    if op_name not in ops:
        raise ValueError(f"unknown op {op_name!r}; explainable ops: {', '.join(sorted(ops))}")
    make_call, dispatcher = ops[op_name]
    backend = kwargs.pop("backend", None)
    call = make_call(q, k, v, **kwargs)
    return dispatcher.explain(call, backend)
