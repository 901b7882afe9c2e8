"""What the tools share: where the assets are, the reference checkpoints, the onnxruntime peer,
evaluation against FP32, report headers (machine, versions, command), tables, sizes, RSS.

Every tool calls these; none re-implements them (onnxquant's own loaders do the work where
the library has one: ``Preprocess.from_json``, ``evaluate_many``, ``take_evenly``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---- assets ----------------------------------------------------------------------------

def assets_dir() -> Path:
    """The shared assets: $ONNXQUANT_ASSETS, else ``shared/assets`` beside this checkout."""
    env = os.environ.get("ONNXQUANT_ASSETS")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[1].parent / "shared" / "assets"


ASSETS = assets_dir()
REFERENCE = ASSETS / "reference"
CALIB = ASSETS / "imagenette" / "train"  # calibration images of every tool (never evaluated)
IMAGE_SETS = {"imagenette/val": ASSETS / "imagenette" / "val",
              "imagenet-val/nette": ASSETS / "imagenet-val" / "nette"}
NUM_CALIB = 32  # the paper's calibration size
CALIB_BATCH = 8  # onnxquant's default batch_size; the peer gets the same batches


def asset_name(path) -> str:
    """``path`` as a report prints it: relative to the assets folder (no machine's path)."""
    try:
        return Path(path).resolve().relative_to(ASSETS.resolve()).as_posix()
    except ValueError:
        return str(path)


# ---- reference checkpoints -------------------------------------------------------------

def reference(name: str) -> dict | None:
    """Reference checkpoint ``name`` (assets/reference/NAME.imagenette.onnx + .json), or None:
    {name, path, pre (Preprocess), class_map (class -> ImageNet index), torch (FP32 top-1
    measured in PyTorch per image set)}."""
    from onnxquant.images import Preprocess

    path = REFERENCE / f"{name}.imagenette.onnx"
    if not path.is_file():
        return None
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return {"name": name, "path": path, "pre": Preprocess.from_json(meta_path),
            "class_map": meta["imagenet_index"], "torch": meta.get("top1_fp32_torch", {})}


def reference_models(names=None) -> list[dict]:
    """Every reference checkpoint (or those in ``names``), sorted by name."""
    found = sorted(p.name.removesuffix(".imagenette.onnx")
                   for p in REFERENCE.glob("*.imagenette.onnx"))
    return [reference(n) for n in found if not names or n in names]


def reference_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options of a tool that runs over the reference checkpoints."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--models", help="comma-separated reference names (default: all)")
    parser.add_argument("--limit", type=int, help="images per set, spread evenly (default: all)")
    parser.add_argument("--out", default=out)
    return parser


def selected_references(args) -> list[dict]:
    refs = reference_models(args.models.split(",") if args.models else None)
    if not refs:
        sys.exit(f"no reference checkpoints in {REFERENCE}")
    return refs


def model_input(path) -> tuple[str, int]:
    """(name, H) of the model's first input, without loading external data."""
    import onnx

    inp = onnx.load(str(path), load_external_data=False).graph.input[0]
    return inp.name, int(inp.type.tensor_type.shape.dim[-1].dim_value)


# ---- onnxruntime: the peer and sessions ------------------------------------------------

@contextlib.contextmanager
def _quiet_in(folder: Path):
    """cwd ``folder`` (onnxruntime leaves temporary models in the working directory) and
    root logging at ERROR (quant_pre_process warns "Axis 1 is out-of-range" per LayerNorm
    constant)."""
    old, root = os.getcwd(), logging.getLogger()
    level = root.level
    os.chdir(folder)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        os.chdir(old)
        root.setLevel(level)


def ort_quantize_static(model, out, pre, calib=CALIB, num_calib: int = NUM_CALIB,
                        batch: int = CALIB_BATCH) -> dict:
    """The peer: onnxruntime ``quant_pre_process``, then ``quantize_static`` (QDQ, per-channel,
    MinMax, its default S8S8), calibrated on the images and batches onnxquant gets
    (``take_evenly`` over ``calib``). Returns {seconds, phases, note}; note says whether
    pre-processing had to skip symbolic shapes (what a user does next when it fails)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from onnxquant import images

    model, out, calib = Path(model).resolve(), Path(out).resolve(), Path(calib).resolve()
    name = model_input(model)[0]

    class Reader(CalibrationDataReader):
        def __init__(self):
            paths = images.take_evenly(images.list_images(calib), num_calib)
            self.batches = images.iter_batches(paths, pre, batch)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}

    pre_path, note = out.with_name(out.name + ".pre.onnx"), None
    start = time.perf_counter()
    with _quiet_in(out.parent):
        try:
            quant_pre_process(str(model), str(pre_path))
        except Exception as exc:  # noqa: BLE001 - retried the way a user would
            note = f"quant_pre_process failed ({exc}); retried with skip_symbolic_shape=True"
            quant_pre_process(str(model), str(pre_path), skip_symbolic_shape=True)
        prepped = time.perf_counter()
        quantize_static(str(pre_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    end = time.perf_counter()
    pre_path.unlink(missing_ok=True)
    return {"seconds": end - start, "note": note,
            "phases": {"pre_process": prepped - start, "quantize_static": end - prepped}}


def ort_session(path, threads: int | None = None, profile_prefix: str | None = None):
    """onnxruntime CPU session, quiet; ``threads``: intra-op threads, one inter-op, spinning
    off (DESIGN.md section 7), as the latency measurements run; ``profile_prefix``: profile
    it (``end_profiling()`` returns the JSON file)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if profile_prefix:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ---- accuracy against FP32 -------------------------------------------------------------

# One sign convention in every table and doc: change = quantized - FP32, negative = loss.
CHANGE = "*change* = quantized top-1 − FP32 top-1 in points (negative = accuracy lost)"


def top1_change(fp32: float, quantized: float) -> float:
    return quantized - fp32


def against_fp32(fp32, models: list, images, ref: dict, limit, label: str):
    """FP32 and ``models`` in one pass over ``images`` (evaluate_many): FP32's {top1, n} and
    one row per model judged against FP32: {top1, n, change, change_se (from the images
    alone, paired), agree, kl}."""
    from onnxquant.evaluate import compare_results, evaluate_many

    start = time.perf_counter()
    results = evaluate_many([str(fp32)] + list(models), str(images), ref["pre"],
                            ref["class_map"], limit=limit, progress=False)
    print(f"{label}: {len(results)} models x {results[0].n} images in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    base, rows = results[0], []
    for res in results[1:]:
        cmp = compare_results(base, res)
        rows.append({"top1": res.top1, "n": res.n, "change": top1_change(base.top1, res.top1),
                     "change_se": cmp.change_se, "agree": cmp.agreement, "kl": cmp.kl})
    return {"top1": base.top1, "n": base.n}, rows


# ---- measurements ----------------------------------------------------------------------

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
    return _status_mb("VmHWM")


def rss_mb() -> float:
    """Resident memory of this process now (VmRSS)."""
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def median(values):
    return statistics.median(values) if values else float("nan")


def p90(values):
    return float(np.percentile(values, 90)) if values else float("nan")


# ---- report headers --------------------------------------------------------------------

def versions(*packages: str) -> dict:
    """Installed version of each package ("absent" when it is not installed)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def command_line(script: str, argv=None) -> str:
    """How a tool was run, as its report prints it: ``python tools/NAME.py ARGS``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"tools/{Path(script).name}", *args])


def measured_line(command: str) -> str:
    """The first sentence of an accuracy report (no final stop)."""
    v = versions("onnxquant", "onnxruntime")
    return (f"Measured {today()} with `{command}` (onnxquant {v['onnxquant']}, onnxruntime "
            f"{v['onnxruntime']} CPU, Python {platform.python_version()})")


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f" {f}" in flags]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": ",".join(isa), "ram_gib": round(mem, 1),
            "python": platform.python_version(),
            **versions("onnx", "onnxruntime", "numpy", "onnxquant"), "library": "?",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def header(info: dict, command: str) -> str:
    """The machine/versions/date/command block of a benchmark report."""
    return (f"- machine: {info['cpu']}, {info['cores']} cores ({info['isa']}), "
            f"{info['ram_gib']} GiB RAM; shared and noisy (other jobs may run)\n"
            f"- versions: python {info['python']}, onnx {info['onnx']}, onnxruntime "
            f"{info['onnxruntime']}, numpy {info['numpy']}, onnxquant {info['onnxquant']} "
            f"({info['library']})\n"
            f"- date: {info['date']}\n- command: `{command}`\n")


def begin(work: Path, script: str, argv=None) -> tuple[dict, str]:
    """Start a benchmark: snapshot the library into ``work``, print and return the header's
    machine description and command."""
    info = machine()
    info["library"] = snapshot_library(work)
    command = command_line(script, argv)
    print(header(info, command))
    return info, command


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


# ---- report bodies ---------------------------------------------------------------------

def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (title, key, format)."""
    cells = [[("-" if r.get(k) is None else format(r[k], f)) for _, k, f in columns] for r in rows]
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, (t, _, _) in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line([t for t, _, _ in columns]), line(["-" * w for w in widths])]
    return "\n".join(out + [line(c) for c in cells])


def write_latency_report(title: str, script: str, argv, args, rows: list, columns: list,
                         reading: str) -> str:
    """The report of a latency tool (``args.threads``, ``args.runs``, ``args.out``): heading,
    command, how it was timed, ``reading`` (what the columns mean), the table, kept notes.
    Written to ``args.out`` and returned."""
    text = (f"# {title}\n\n{measured_line(command_line(script, argv))}.\n\nonnxruntime CPU, "
            f"batch 1, {args.threads} intra-op thread(s), spinning off; {args.runs} rounds, every "
            f"variant once per round in a shuffled order; medians. {reading}\n\n"
            f"{table(rows, columns)}\n\n{kept_notes(Path(args.out))}\n")
    Path(args.out).write_text(text, encoding="utf-8")
    return text


NOTES_BEGIN = "<!-- notes: kept when the tool rewrites this file -->"
NOTES_END = "<!-- /notes -->"


def write_doc(out, text: str) -> None:
    """A tool's report: written to ``out`` (a doc under docs/, usually) and printed."""
    Path(out).write_text(text, encoding="utf-8")
    print(text)


def kept_notes(path: Path, default: str | None = None) -> str:
    """The hand-written block between the notes markers of ``path``, with a newline either
    side; else an empty block holding ``default``; else ''."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    start, end = text.find(NOTES_BEGIN), text.find(NOTES_END)
    if start >= 0 and end > start:
        return "\n" + text[start:end + len(NOTES_END)] + "\n"
    return f"\n{NOTES_BEGIN}\n{default}\n{NOTES_END}\n" if default is not None else ""
