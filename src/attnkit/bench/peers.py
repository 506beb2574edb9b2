"""Importing peer libraries for comparisons: timm beside a CPU torch build.

timm imports torchvision at package import, and PyPI's torchvision wheels do not load beside the CPU
build of torch. timm's attention layers and token mixers are pure PyTorch, so :func:`import_timm` puts an
inert stand-in for torchvision in place when the real one is missing or broken: any torchvision object a
caller actually uses raises. The benchmark cases and the tests (``tests/peers.py``) share this one loader.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _Inert(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Inert(f"{self.__name__}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__}: torchvision is an inert stand-in here (its wheel does not load)")

    def __mro_entries__(self, bases):
        return (object,)


class _InertFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Inert(spec.name)

    def exec_module(self, module):
        module.__path__ = []
        module.__version__ = "0.0.0+inert"


def _torchvision_loads() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # a broken wheel raises RuntimeError or OSError, a missing one ImportError
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def timm_installed() -> bool:
    return importlib.util.find_spec("timm") is not None


def import_timm():
    """``timm``, with an inert torchvision when the real one does not import; ImportError without timm."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if not timm_installed():
        raise ImportError("timm is not installed (pip install --no-deps timm huggingface_hub safetensors)")
    if not _torchvision_loads() and not any(isinstance(f, _InertFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _InertFinder())
    return importlib.import_module("timm")
