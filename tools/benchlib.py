"""Helpers shared by the benchmark tools: machine/library description, tables, sizes, RSS."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def file_mb(path) -> float:
    path = Path(path)
    extra = Path(f"{path}.data")
    return (path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)) / 2**20


def peak_rss_mb() -> float:
    """Peak RSS of this process image: VmHWM, not ru_maxrss.

    Linux keeps ru_maxrss across fork+exec, so a worker started by a parent holding 677 MB
    (bench_scaling after reading efficientformer_l7) reported 677 MB for mobilevit_xxs;
    VmHWM belongs to the exec'd address space only.
    """
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def median(values):
    return statistics.median(values) if values else float("nan")


def p90(values):
    return float(np.percentile(values, 90)) if values else float("nan")


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f" {f}" in flags]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": ",".join(isa), "ram_gib": round(mem, 1),
            "python": platform.python_version(), "onnx": version("onnx"),
            "onnxruntime": version("onnxruntime"), "numpy": version("numpy"),
            "onnxquant": version("onnxquant"), "library": "?",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def snapshot_library(work: Path) -> str:
    """Copy onnxquant (+ passes, models) into ``work`` and import it from there.

    The working tree changes while a benchmark runs (commits landed mid-run here); every
    worker then gets the same code through PYTHONPATH, which precedes the editable install.
    """
    snap = work / "library"
    shutil.copytree(ROOT / "onnxquant", snap / "onnxquant",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("passes", "models"):
        shutil.copytree(ROOT / sub, snap / "onnxquant" / sub,
                        ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(snap))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(snap),
                                                             os.environ.get("PYTHONPATH")]))
    return library_state(snap)


def library_state(root: Path = ROOT) -> str:
    """git HEAD of the working tree and a digest of the library sources under ``root``."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for pattern in ("onnxquant/**/*.py", "passes/*.py")
                       for p in root.glob(pattern)):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    return f"git {head or '?'}, sources {digest.hexdigest()[:12]}"


def header(info: dict, command: str) -> str:
    return (f"- machine: {info['cpu']}, {info['cores']} cores ({info['isa']}), "
            f"{info['ram_gib']} GiB RAM; shared and noisy (other jobs may run)\n"
            f"- versions: python {info['python']}, onnx {info['onnx']}, onnxruntime "
            f"{info['onnxruntime']}, numpy {info['numpy']}, onnxquant {info['onnxquant']} "
            f"({info['library']})\n"
            f"- date: {info['date']}\n- command: `{command}`\n")


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (title, key, format)."""
    cells = [[("-" if r.get(k) is None else format(r[k], f)) for _, k, f in columns] for r in rows]
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, (t, _, _) in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line([t for t, _, _ in columns]), line(["-" * w for w in widths])]
    return "\n".join(out + [line(c) for c in cells])


NOTES_BEGIN = "<!-- notes: kept when the tool rewrites this file -->"
NOTES_END = "<!-- /notes -->"


def kept_notes(path: Path) -> str:
    """The hand-written block between the notes markers of ``path`` ('' when none)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return ""
    start, end = text.find(NOTES_BEGIN), text.find(NOTES_END)
    if start < 0 or end < start:
        return ""
    return "\n" + text[start:end + len(NOTES_END)] + "\n"
