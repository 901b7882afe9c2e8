"""Importing TensorRT, its one logger, and the ``libtensorrt_rtx.so`` loader workaround.

TensorRT is imported lazily: ``tensorrt``, then ``tensorrt_rtx``. Measured with
TensorRT-RTX 1.7 (DESIGN.md §4): the ONNX parser dlopens ``libtensorrt_rtx.so`` as soon as a
registered plugin matches a node, the wheel ships only ``libtensorrt_rtx.so.1``, and a
failed dlopen aborts the process ("terminate called without an active exception"). Only
the first logger created in a process is honoured, so there is one, here.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

NOT_FOUND = "TensorRT not found: pip install tensorrt-rtx (or NVIDIA's TensorRT on Jetson)"

_state: dict = {}  # module, logger, loader: one of each per process


class TensorRTError(RuntimeError):
    """A known TensorRT problem; the message is one line naming the fix."""



def import_trt():
    """The TensorRT module (``tensorrt``, else ``tensorrt_rtx``), imported once."""
    if "trt" in _state:
        return _state["trt"]
    for name in ("tensorrt", "tensorrt_rtx"):
        if importlib.util.find_spec(name) is None:
            continue
        if name == "tensorrt_rtx":
            _state["loader"] = _prepare_rtx_loader()
        try:
            _state["trt"] = importlib.import_module(name)
            return _state["trt"]
        except (ImportError, OSError, RuntimeError):  # e.g. a placeholder or broken wheel
            continue
    raise TensorRTError(NOT_FOUND)


def logger():
    """The one TensorRT logger of this process (TensorRT-RTX honours only the first)."""
    trt = import_trt()
    if "logger" not in _state:
        _state["logger"] = trt.Logger(trt.Logger.WARNING)
    return _state["logger"]


# --------------------------------------------------------------------------- loader workaround


def _cache_dir(libdir: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = hashlib.sha1(str(libdir).encode()).hexdigest()[:12]
    return base / "onnxquant" / f"tensorrt_rtx-{tag}"


def _symlink(target: Path, link: Path) -> None:
    """Point ``link`` at ``target`` atomically (replacing a stale link)."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _prepare_rtx_loader() -> str:
    """Make ``dlopen("libtensorrt_rtx.so")`` from the ONNX parser succeed; says how.

    The parser's RPATH is ``$ORIGIN`` and glibc takes ``$ORIGIN`` from the path a library
    was loaded by, without resolving symlinks. Before the bindings load, we load both
    libraries through a user cache dir of symlinks that also holds ``libtensorrt_rtx.so``:
    the parser then finds it beside itself, and the wheel's own ``ctypes.CDLL`` of the same
    files later returns the already loaded copies. After the bindings loaded, the only
    in-process fix is a symlink beside the wheel's libraries (LD_LIBRARY_PATH is read at
    process start).
    """
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or spec.origin is None:
        return "no tensorrt_rtx_libs package: using the system loader path"
    libdir = Path(spec.origin).resolve().parent
    real, parser = libdir / "libtensorrt_rtx.so.1", libdir / "libtensorrt_onnxparser_rtx.so.1"
    if (libdir / "libtensorrt_rtx.so").exists():
        return f"libtensorrt_rtx.so present in {libdir}"
    if not real.exists():
        return f"no {real.name} in {libdir}: using the system loader path"
    if "tensorrt_rtx_libs" not in sys.modules:
        try:
            cache = _cache_dir(libdir)
            cache.mkdir(parents=True, exist_ok=True)
            for name, target in ((real.name, real), ("libtensorrt_rtx.so", real),
                                 (parser.name, parser)):
                _symlink(target, cache / name)
            ctypes.CDLL(str(cache / parser.name), mode=ctypes.RTLD_GLOBAL)
            return f"preloaded TensorRT-RTX through {cache}"
        except OSError:
            pass
    try:
        _symlink(real, libdir / "libtensorrt_rtx.so")
        return f"created {libdir / 'libtensorrt_rtx.so'}"
    except OSError:
        _state["loader_error"] = (
            f"TensorRT-RTX was imported before onnxquant could fix its loader and "
            f"{libdir} is read-only: run 'ln -s {real} DIR/libtensorrt_rtx.so' and start "
            f"Python with LD_LIBRARY_PATH=DIR (or call onnxquant.tensorrt.import_trt() "
            f"before importing tensorrt_rtx)")
        return _state["loader_error"]


def check_loader() -> None:
    """Raise the one-line fix if the parser would abort on a plugin node in this process."""
    import_trt()
    if "loader_error" in _state:
        raise TensorRTError(_state["loader_error"])


def loader_status() -> str:
    """How the ``libtensorrt_rtx.so`` lookup was handled in this process (one line)."""
    import_trt()
    return _state.get("loader", "not TensorRT-RTX: nothing to do")

