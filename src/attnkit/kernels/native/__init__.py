"""Optional compiled CPU kernels (``kernels/native/*.cpp``), built on first use with ``torch.utils.cpp_extension``.

Every kernel here has a torch-ops twin that runs when the kernel is unavailable, so a machine
without a C++ compiler (or with ``ATTNKIT_NATIVE=0``) gets the same results, only slower;
``status()`` says which and why, and ``ak.explain`` repeats it. The build (~1 min, once per
machine and torch version) goes to torch's extension cache (``TORCH_EXTENSIONS_DIR`` moves it)
and registers the ops under ``torch.ops.attnkit_native``.

The decode kernel (``decode_cpu.cpp``: split-KV decoding over dense and KIVI-quantized caches) is a
separate extension, ``torch.ops.attnkit_decode`` (``decode_ops()``, ``decode_status()``): it builds in a
few seconds on its own, and a failed build of one extension leaves the other usable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

_SOURCES = [Path(__file__).parent / name
            for name in ("linear_chunk_cpu.cpp", "flash_tiles_cpu.cpp", "combiner_cpu.cpp")]
_DECODE_SOURCES = [Path(__file__).parent / "decode_cpu.cpp"]
_lock = threading.Lock()
_state: dict[str, object] = {"ops": None, "error": None}
_decode_state: dict[str, object] = {"ops": None, "error": None}
NOT_BUILT = "not built yet (builds on first use)"


def _disabled() -> str | None:
    if os.environ.get("ATTNKIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by ATTNKIT_NATIVE=0"
    return None


def _ninja_on_path() -> None:
    """torch's JIT build runs ``ninja`` from PATH; the ``ninja`` wheel (a dependency) puts it in the venv's
    bin, which is not on PATH when the venv's python is called directly (as ``make test`` does)."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def _cflags() -> list[str]:
    return ["-O3", "-fopenmp", "-march=native"]


def _register_fakes() -> None:
    """Shape-only twins of the C++ ops, so torch.compile / FakeTensor tracing can pass through them."""

    @torch.library.register_fake("attnkit_native::linear_chunk_fwd")
    def _fwd(q, k, v, g, s0, scale, chunk, seg):
        B, N, H, D = q.shape
        Dv = v.shape[-1]
        nseg = max(1, -(-N // seg))
        return q.new_empty(B, N, H, Dv), q.new_empty(B, H, D, Dv), q.new_empty(nseg, B, H, D, Dv)

    @torch.library.register_fake("attnkit_native::linear_chunk_bwd")
    def _bwd(q, k, v, g, dout, bounds, dS, scale, chunk, seg, need_g):
        B, N, H, D = q.shape
        dgt = q.new_empty(B, N, H) if need_g else q.new_empty(0)
        return (q.new_empty(B, N, H, D), k.new_empty(k.shape), v.new_empty(v.shape), dgt,
                q.new_empty(B, H, D, v.shape[-1]))

    @torch.library.register_fake("attnkit_native::flash_tiles_fwd")
    def _flash_fwd(q, k, v, row_ptr, cols, slots, bits, bq, bk, scale, span, k2=None, v2=None):
        B, Nq, Hq, _ = q.shape
        return q.new_empty(B, Nq, Hq, v.shape[-1]), q.new_empty(B, Nq, Hq, dtype=torch.float32)

    @torch.library.register_fake("attnkit_native::combiner_summaries")
    def _combiner_summaries(q, k, v, segment, scale):
        B, N, H, D = q.shape
        return q.new_empty(B, N // segment, H, D), q.new_empty(B, N // segment, H, v.shape[-1])

    @torch.library.register_fake("attnkit_native::flash_tiles_bwd")
    def _flash_bwd(q, k, v, out, dout, lse, dlse, row_ptr, cols, slots, bits, bq, bk, scale, span, splits,
                   k2=None, v2=None):
        n = k.shape[1] + (0 if k2 is None else k2.shape[1])  # gradients of [k, k2] and [v, v2]
        return (q.new_empty(q.shape), k.new_empty(k.shape[0], n, *k.shape[2:]),
                v.new_empty(v.shape[0], n, *v.shape[2:]))


def _register_decode_fakes() -> None:
    """Shape-only twins of the decode ops (torch.compile / FakeTensor tracing)."""

    @torch.library.register_fake("attnkit_decode::decode_fwd")
    def _decode(q, k, v, lo, hi, scale, parts):
        B, Nq, Hq, _ = q.shape
        return q.new_empty(B, Nq, Hq, v.shape[-1]), q.new_empty(B, Nq, Hq, dtype=torch.float32)

    @torch.library.register_fake("attnkit_decode::kivi_decode_fwd")
    def _kivi(q, kc, kstep, kzero, vc, vstep, vzero, lo, hi, scale, bits, group, vgroup, parts):
        B, Nq, Hq, _ = q.shape
        dv = vc.shape[-1] * (8 // bits)
        return (q.new_empty(B, Nq, Hq, dv, dtype=torch.float32), q.new_empty(B, Nq, Hq, dtype=torch.float32))


def _writable_build_root() -> None:
    """torch builds under ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``; where that cannot be
    written (a read-only home in CI, say) build under the temp dir instead of failing."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return
    from torch.utils.cpp_extension import get_default_build_root

    root = get_default_build_root()
    try:
        os.makedirs(root, exist_ok=True)
        if os.access(root, os.W_OK):
            return
    except OSError:
        pass
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(tempfile.gettempdir(), f"attnkit_torch_extensions_{os.getuid()}")


def _build(state: dict[str, object], name: str, sources: list[Path], namespace: str, fakes) -> object:
    """Build and load one extension once; its ops namespace, or None with the reason in ``state``."""
    if _disabled():
        return None
    if state["ops"] is not None or state["error"] is not None:
        return state["ops"]
    with _lock:
        if state["ops"] is None and state["error"] is None:
            try:
                from torch.utils.cpp_extension import load

                _ninja_on_path()
                _writable_build_root()
                # -fopenmp: at::parallel_for is inline OpenMP; without it the heads would run serially.
                # -march=native: the kernels' 16-float vectors become AVX-512 / AVX2 registers
                # (the build is per machine, in its own cache)
                load(name=name, sources=[str(s) for s in sources], extra_cflags=_cflags(),
                     extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
                fakes()
                state["ops"] = getattr(torch.ops, namespace)
            except Exception as e:  # no compiler, no headers, a failed build: fall back, say why
                lines = str(e).strip().splitlines() or [""]
                first = next((ln for ln in lines if "error" in ln.lower()), lines[-1])
                state["error"] = f"build failed: {type(e).__name__}: {first.strip()[:200]}"
    return state["ops"]


def _status(state: dict[str, object]) -> str:
    off = _disabled()
    if off:
        return off
    if state["ops"] is not None:
        return "loaded"
    return str(state["error"]) if state["error"] is not None else NOT_BUILT


def ops():
    """``torch.ops.attnkit_native`` once built and loaded, else None (the reason is in ``status()``)."""
    return _build(_state, "attnkit_native", _SOURCES, "attnkit_native", _register_fakes)


def status() -> str:
    """One line: ``"loaded"``, ``"not built yet (builds on first use)"``, or why it is unavailable."""
    return _status(_state)


def decode_ops():
    """``torch.ops.attnkit_decode`` (``decode_fwd``, ``kivi_decode_fwd``) once built and loaded, else None
    (the reason is in ``decode_status()``)."""
    return _build(_decode_state, "attnkit_native_decode", _DECODE_SOURCES, "attnkit_decode", _register_decode_fakes)


def decode_status() -> str:
    """``status()`` of the decode kernel."""
    return _status(_decode_state)


def decode_available() -> bool:
    """Build/load the decode kernel if needed; True when it can run."""
    return decode_ops() is not None


def available() -> bool:
    """Build/load the kernels if needed; True when they can run."""
    return ops() is not None
