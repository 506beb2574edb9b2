import os

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

import pytest  # noqa: E402


def requires_native_kernel() -> None:
    """Skip (naming why) when attnkit's compiled CPU kernels cannot be built or loaded here."""
    from attnkit.kernels import native as _native

    if not _native.available():
        pytest.skip(f"native kernel unavailable: {_native.status()}")


@pytest.fixture(params=["native", "torch-ops"])
def chunk_kernel(request, monkeypatch):
    """Run a test on both chunk forwards: the compiled kernel (kernels/native/) and its torch-ops twin."""
    if request.param == "torch-ops":
        monkeypatch.setenv("ATTNKIT_NATIVE", "0")
    else:
        requires_native_kernel()
    return request.param
