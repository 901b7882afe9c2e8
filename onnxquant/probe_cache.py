"""Remember what the kernel probe chose, per CPU, onnxruntime version and model structure.

A deployment tool must give the same file for the same input and options: timing the model
on every run made ``--target ort`` choose differently under load (3 of 3 runs chose "int8
on nothing" beside a CPU hog). The first run on a machine measures (kernel_probe.py, one
thread, CPU time of the calling thread, so other processes hardly move it) and stores the
choice here; every later run with the same key reuses it. The key holds what kernel speed
depends on: the CPU model and its instruction-set flags, the onnxruntime version, and the
model's structure (op types, attributes, weight shapes; not weight values).

The cache lives in ``$ONNXQUANT_CACHE_DIR`` (default ``~/.cache/onnxquant``), one small JSON
file; delete it to measure again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import onnx
import onnxruntime as ort

FILE = "kernel_probe.json"
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve")


def cache_path() -> Path:
    base = os.environ.get("ONNXQUANT_CACHE_DIR") or Path.home() / ".cache" / "onnxquant"
    return Path(base) / FILE


def cpu_id() -> str:
    """CPU model name and the int8-relevant instruction-set flags, e.g. 'AMD EPYC ... +avx512_vnni'."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            if field.strip() == "model name" and not name:
                name = value.strip()
            elif field.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return name + "".join(f" +{f}" for f in FLAGS if f in flags)


def structure_key(model: onnx.ModelProto, extra: str = "") -> str:
    """sha256 over op types, attributes, input shapes and weight shapes (not values)."""
    h = hashlib.sha256()
    for node in model.graph.node:
        h.update(node.op_type.encode())
        for attr in node.attribute:
            if attr.type != onnx.AttributeProto.TENSOR and attr.type != onnx.AttributeProto.GRAPH:
                h.update(attr.SerializeToString())
    for init in model.graph.initializer:
        h.update(f"{init.data_type}:{list(init.dims)}".encode())
    for inp in model.graph.input:
        h.update(inp.type.SerializeToString())
    h.update(extra.encode())
    return h.hexdigest()


def key(model: onnx.ModelProto, extra: str = "") -> str:
    return f"{cpu_id()}|onnxruntime {ort.__version__}|{structure_key(model, extra)}"


def load(k: str) -> tuple | None:
    try:
        entry = json.loads(cache_path().read_text()).get(k)
    except (OSError, ValueError):
        return None
    return tuple(entry["kinds"]) if isinstance(entry, dict) and "kinds" in entry else None


def store(k: str, kinds: tuple, gains: dict) -> None:
    """Best effort: an unwritable cache only means measuring again next time."""
    path = cache_path()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data[k] = {"kinds": list(kinds), "gains": gains}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass
