"""Backend plumbing shared by every op family: a backend is data plus two pure checks.

``supports(call) -> (ok, reason)`` says whether a backend *can* run a call (a forced
backend that cannot raises with the reason). ``suits(call) -> (ok, reason)`` says
whether the automatic choice should take it (e.g. SDPA can run a 6%-dense mask but
the blocked backend is faster). The dispatcher walks backends in preference order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], tuple[bool, str]]


def _always(call: Any) -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class Backend:
    """One way to compute an op.

    Attributes:
        name: what users pass as ``backend=``.
        run: ``run(call) -> output``.
        supports: capability check, pure.
        suits: preference check for ``backend=None``, pure.
        auto: False keeps it out of automatic choice (e.g. compile-heavy backends).
        note: one line for ``explain``.
        detail: ``detail(call) -> str``, pure: which path inside the backend this call takes and
            why (e.g. "inference path: no input needs a gradient"); ``explain`` prints it under
            the chosen backend, so no grad/no-grad or dtype switch inside a backend stays hidden.
    """

    name: str
    run: Callable[[Any], Any]
    supports: Check = _always
    suits: Check = _always
    auto: bool = True
    note: str = ""
    detail: Callable[[Any], str] | None = None


class Dispatcher:
    """Ordered backends of one op; ``choose`` picks, ``explain`` tells why."""

    def __init__(self, op: str, backends: list[Backend]):
        self.op = op
        self.backends = list(backends)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def get(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise ValueError(f"unknown backend {name!r} for {self.op}; valid: {', '.join(self.names)}")

    def choose(self, call: Any, backend: str | None = None) -> Backend:
        if backend is not None:
            if not isinstance(backend, str):
                raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
            b = self.get(backend)
            ok, why = b.supports(call)
            if not ok:
                raise ValueError(f"backend {backend!r} cannot run this {self.op} call: {why}")
            return b
        for b in self.backends:
            if b.auto and b.supports(call)[0] and b.suits(call)[0]:
                return b
        reasons = "; ".join(f"{b.name}: {self._why_not(b, call)}" for b in self.backends)
        raise ValueError(f"no backend can run this {self.op} call ({reasons})")

    @staticmethod
    def _why_not(b: Backend, call: Any) -> str:
        ok, why = b.supports(call)
        if not ok:
            return why
        if not b.auto:
            return f"opt-in only (backend={b.name!r})"
        return b.suits(call)[1]

    def run(self, call: Any, backend: str | None = None) -> Any:
        return self.choose(call, backend).run(call)

    def explain(self, call: Any, backend: str | None = None) -> str:
        try:
            chosen = self.choose(call, backend).name
        except ValueError as e:
            chosen, failure = None, str(e)
        lines = [f"{self.op}: {call.describe()}" if hasattr(call, "describe") else f"{self.op}:"]
        if backend is not None:
            lines.append(f"  backend={backend!r} was forced")
        for b in self.backends:
            ok, why = b.supports(call)
            if not ok:
                status = f"cannot run: {why}"
            elif not b.auto:
                status = f"can run, not chosen automatically: {b.note or 'opt-in only'}"
            else:
                fits, why2 = b.suits(call)
                status = "can run" + (f", passed over: {why2}" if not fits else (f" ({why2})" if why2 else ""))
            mark = "->" if b.name == chosen else "  "
            lines.append(f"  {mark} {b.name:<10} {status}")
            if b.name == chosen and b.detail is not None:
                lines.append(f"       {'':<10} path: {b.detail(call)}")
        lines.append(f"  chosen: {chosen}" if chosen else f"  no backend: {failure}")
        return "\n".join(lines)


_OPS: dict[str, tuple[Callable[..., Any], Dispatcher]] = {}


def register_op(name: str, make_call: Callable[..., Any], dispatcher: Dispatcher) -> None:
    """Make an op explainable: ``make_call(q, k, v, **kwargs)`` validates and builds its call."""
    _OPS[name] = (make_call, dispatcher)


def explainable_ops() -> dict[str, tuple[Callable[..., Any], Dispatcher]]:
    return _OPS


def explain(op_name: str, q: Any, k: Any, v: Any, **kwargs: Any) -> str:
    """A human-readable account of the backend choice for one call.

    Args:
        op_name: an explainable op (``"attention"``, ``"neighborhood_attention"``,
            ``"linear_attention"``, ``"moba_attention"``, ...; see :func:`explainable_ops`).
        q, k, v: the inputs, heads-last as for the op.
        **kwargs: the op's other arguments (``mask=``, ``kernel_size=``, ``backend=`` ...).

    Returns:
        Several lines: the call, each backend with "can run" / "cannot run: reason", the choice.

    Example:
        >>> print(ak.explain("attention", q, k, v, mask=ak.masks.causal()))
    """
    import attnkit.ops  # noqa: F401  (importing the op packages registers them)

    if op_name not in _OPS:
        raise ValueError(f"unknown op {op_name!r}; explainable ops: {', '.join(sorted(_OPS))}")
    make_call, dispatcher = _OPS[op_name]
    backend = kwargs.pop("backend", None)
    call = make_call(q, k, v, **kwargs)
    return dispatcher.explain(call, backend)

