"""Find every case: the built-in providers in ``attnkit.bench.cases`` plus extra ones.

Discovery imports every module of ``attnkit.bench.cases`` and tolerates a provider that
fails to import or to list its cases: the failure is recorded and the others go on.
Extra providers (``--provider``) are ``module:function`` or ``path/to/file.py:function``,
so a user can benchmark their own cases with the same harness.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from attnkit.bench import cases as _cases_pkg
from attnkit.bench.case import Case


def _load_extra(spec: str) -> Callable[[], list[Case]]:
    target, _, func = spec.rpartition(":")
    if not target or not func:
        raise ValueError(f"provider must be 'module:function' or 'file.py:function', got {spec!r}")
    if target.endswith(".py"):
        path = Path(target).resolve()
        name = f"_attnkit_provider_{path.stem}"
        if name not in sys.modules:
            mod_spec = importlib.util.spec_from_file_location(name, path)
            if mod_spec is None or mod_spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
        module = sys.modules[name]
    else:
        module = importlib.import_module(target)
    return getattr(module, func)


def discover(providers: tuple[str, ...] | list[str] = (), builtin: bool = True) -> tuple[list[Case], dict[str, str]]:
    """Every case of every provider, and the providers that failed.

    Args:
        providers: extra providers, ``module:function`` or ``file.py:function``.
        builtin: include the modules of ``attnkit.bench.cases``.

    Returns:
        ``(cases, errors)``: cases in provider order with unique ids (a duplicate id is
        reported as an error and dropped), and ``{provider: "ExcType: message"}``.
    """
    sources: list[tuple[str, Callable[[], Callable[[], list[Case]]]]] = []
    if builtin:
        for m in sorted(pkgutil.iter_modules(_cases_pkg.__path__), key=lambda m: m.name):
            if not m.name.startswith("_"):
                full = f"{_cases_pkg.__name__}.{m.name}"
                sources.append((full, lambda full=full: importlib.import_module(full).cases))
    for spec in providers:
        sources.append((spec, lambda spec=spec: _load_extra(spec)))

    out: list[Case] = []
    seen: set[str] = set()
    errors: dict[str, str] = {}
    for name, load in sources:
        try:
            got = list(load()())
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" ({tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
            errors[name] = f"{type(exc).__name__}: {exc}{where}"
            continue
        dups = [c.id for c in got if c.id in seen]
        if dups:
            errors[name] = f"duplicate case ids dropped: {', '.join(dups[:5])}"
        for c in got:
            if c.id not in seen:
                seen.add(c.id)
                out.append(c)
    return out, errors


def peer_installed(name: str | None) -> bool:
    """Whether an optional peer (``Case.requires``) can be imported; None means no peer."""
    if name is None:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
