"""Case providers, one module per op family; each exposes ``cases() -> list[Case]``."""

import importlib
import pkgutil


def all_cases():
    """Every case of every provider module in this package."""
    out = []
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            out.extend(importlib.import_module(f"{__name__}.{m.name}").cases())
    return out
