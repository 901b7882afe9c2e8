"""Benchmark onnxquant against onnxruntime's quantize_static on hybrid models (one run).

    for each repeat, for each model, tools in a rotated order:
        one subprocess per quantization -> wall time (load .. saved) and peak RSS (VmHWM)
    then, per model, one subprocess times every variant interleaved (onnxruntime CPU,
    batch 1, 2 threads, spinning off: DESIGN.md section 7), and top-1 agreement with float
    on 200 labelled images for the reference checkpoints.

Tools: onnxquant variants (VARIANTS: paper recipe in DQ and folded form, --target ort,
softmax-only), and onnxruntime
(quant_pre_process, then quantize_static QDQ per-channel MinMax, ORT 1.32 defaults S8S8).
All calibrate on the same 32 images (take_evenly over the calibration folder, as the CLI).

    python tools/bench_peers.py [--models a,b] [--repeats 3] [--runs 50] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from benchlib import (CALIB, CALIB_BATCH, IMAGE_SETS, NUM_CALIB, asset_name, begin, file_mb,
                      header, kept_notes, median, model_input, ort_quantize_static, ort_session,
                      p90, peak_rss_mb, reference, table)

EVAL = IMAGE_SETS["imagenet-val/nette"]
MODELS = ("mobilevit_xxs", "mobilevit_s", "mobilevitv2_050", "efficientformer_l1",
          "efficientformerv2_s0", "fastvit_t8")
# onnxquant variants: tool name -> QuantConfig keyword arguments (besides num_calib, batch).
PAPER_PARTS = ["conv_block", "transformer", "bridge", "softmax"]
VARIANTS = {
    "onnxquant-paper": {"target": "paper"},
    "onnxquant-ort": {"target": "ort"},
    # the paper recipe with weights stored Cast -> Sub -> Mul, which onnxruntime folds at load
    "onnxquant-paper-folded": {"weight_format": "folded"},
    "onnxquant-paper-folded+linear": {"weight_format": "folded",
                                      "parts": PAPER_PARTS + ["linear"]},
    # what the log2 post-Softmax fake-quant alone costs (weights stay float)
    "onnxquant-softmax-only": {"parts": ["softmax"]},
}
TOOLS = tuple(VARIANTS) + ("ort-quantize_static",)
BATCH = CALIB_BATCH  # calibration batch of both tools
FAILURES: dict = {}  # (model, tool) -> last line of the error
NOTES: set = set()


# ---- models ----------------------------------------------------------------------------

PRIVATE_ZOO = Path(tempfile.gettempdir()) / "onnxquant-bench-zoo"


def zoo_path(name: str) -> Path:
    """A private copy of the random-init (seed 0) zoo export of ``name``.

    Other jobs rewrite and clean the shared cache (files vanished mid-run here), so the
    file is copied out of it once, or exported (in a subprocess, torch) when absent.
    """
    from onnxquant.models.export import cache_dir

    sub = f"timm-{version('timm')}/{name}.seed0.onnx"
    private = PRIVATE_ZOO / sub
    if private.is_file():
        return private
    private.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(cache_dir() / sub, f"{private}.tmp")
        os.replace(f"{private}.tmp", private)
        return private
    except FileNotFoundError:
        pass
    print(f"exporting {name} into {PRIVATE_ZOO} ...", flush=True)
    subprocess.run([sys.executable, "-c", "import sys; from onnxquant.models.export import "
                    "zoo_cache; zoo_cache(sys.argv[1])", name], check=True,
                   env={**os.environ, "ONNXQUANT_ZOO_CACHE": str(PRIVATE_ZOO)})
    return private


def resolve(name: str) -> dict:
    """{name, path, source, pre (Preprocess kwargs), class_map} of a model name or .onnx path."""
    ref = None if name.endswith(".onnx") else reference(name)
    if ref is not None:
        return {"name": name, "path": str(ref["path"]), "source": "reference (Imagenette, "
                f"{ref['pre'].input_size} px)", "pre": dataclasses.asdict(ref["pre"]),
                "class_map": ref["class_map"]}
    path = Path(name) if name.endswith(".onnx") else zoo_path(name)
    size = model_input(path)[1]
    return {"name": Path(name).stem if name.endswith(".onnx") else name, "path": str(path),
            "source": f"timm export, random weights, {size} px", "pre": {"input_size": size},
            "class_map": None}


def preprocess(spec: dict):
    from onnxquant.images import Preprocess

    return Preprocess.from_dict(spec)


# ---- workers (run in their own process) ------------------------------------------------

def _quant_onnxquant(job: dict) -> dict:
    import onnxquant
    from onnxquant.model_io import load_model, save_model

    cfg = onnxquant.QuantConfig(**job["config"], num_calib=job["num_calib"], batch_size=BATCH)
    calib = np.load(job["calib"]) if job["calib"].endswith(".npy") else job["calib"]
    job["import_rss"] = peak_rss_mb()
    start = time.perf_counter()
    model = load_model(job["model"])
    loaded = time.perf_counter()
    result = onnxquant.run(model, cfg, calibration=calib, preprocess=preprocess(job["pre"]),
                           progress=False)
    done = time.perf_counter()
    save_model(result.model, job["out"])
    end = time.perf_counter()
    phases = {"load": loaded - start, **result.seconds, "save": end - done}
    return {"seconds": end - start, "phases": phases, "counts": result.counts}


def _quant_ort(job: dict) -> dict:
    import onnxruntime.quantization  # noqa: F401  (imported before the clock, as onnxquant)

    pre = preprocess(job["pre"])
    job["import_rss"] = peak_rss_mb()
    return ort_quantize_static(job["model"], job["out"], pre, job["calib"], job["num_calib"],
                               BATCH)


def _latency(job: dict) -> dict:
    """Every model of ``job`` once per round, in a shuffled order; ms per run."""
    sessions = {label: ort_session(path, job["threads"]) for label, path in job["models"].items()}
    first = next(iter(sessions.values())).get_inputs()[0]
    x = np.random.default_rng(0).standard_normal([1] + list(first.shape[1:])).astype(np.float32)
    feeds = {s: {s.get_inputs()[0].name: x} for s in sessions.values()}
    for _ in range(job["warmup"]):
        for s in sessions.values():
            s.run(None, feeds[s])
    times = {label: [] for label in sessions}
    order, rng = list(sessions), random.Random(0)
    for _ in range(job["runs"]):
        rng.shuffle(order)
        for label in order:
            s = sessions[label]
            t = time.perf_counter()
            s.run(None, feeds[s])
            times[label].append((time.perf_counter() - t) * 1e3)
    return {"times_ms": times}


WORKERS = {"onnxquant": _quant_onnxquant, "ort": _quant_ort, "latency": _latency}


def worker_main(job_json: str) -> None:
    job = json.loads(job_json)
    out = WORKERS[job["kind"]](job)
    out["peak_rss_mb"] = peak_rss_mb()
    out["start_rss_mb"] = job.get("import_rss", 0)
    print("RESULT " + json.dumps(out), flush=True)


def in_subprocess(job: dict, timeout: float = 3600, script: str = __file__) -> dict:
    """Run one worker job in a fresh Python; its VmHWM is the peak RSS of that job."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "_worker", json.dumps(job)],
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{job['kind']} on {job.get('model')}: exit {proc.returncode}\n"
                           f"{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][7:])
    out["process_seconds"] = time.perf_counter() - start
    return out


def quantize_once(job: dict, tool: str, label: str, script: str = __file__) -> dict | None:
    """One quantization ``job`` in its own process, a progress line starting with ``label``;
    None when it failed (FAILURES says why: the report lists it, the run goes on)."""
    try:
        res = in_subprocess(job, script=script)
    except RuntimeError as exc:
        FAILURES.setdefault((job["name"], tool), str(exc).splitlines()[-1])
        print(f"  FAILED {job['name']} {tool}: {str(exc).splitlines()[-1]}", flush=True)
        return None
    res["size_mb"] = file_mb(job["out"])
    print(f"  {label} {res['seconds']:7.2f} s  peak {res['peak_rss_mb']:7.0f} MB  "
          f"{' '.join(f'{k}={v:.2f}' for k, v in res['phases'].items())}", flush=True)
    return res


def quant_job(tool: str, model: dict, out: str, calib: str = str(CALIB)) -> dict:
    job = {"name": model["name"], "model": model["path"], "out": out, "pre": model["pre"],
           "calib": calib, "num_calib": NUM_CALIB}
    if tool == "ort-quantize_static":
        return {"kind": "ort", **job}
    return {"kind": "onnxquant", "config": VARIANTS[tool], **job}


# ---- report ----------------------------------------------------------------------------

PEER_COLUMNS = [("model", "model", ""), ("variant", "variant", ""),
                ("quant s (median)", "quant_s", ".2f"), ("min s", "quant_min_s", ".2f"),
                ("peak RSS MB", "rss_mb", ".0f"), ("size MB", "size_mb", ".2f"),
                ("latency ms median", "lat_ms", ".2f"), ("p90 ms", "lat_p90", ".2f"),
                ("float/model", "ratio", ".3f"), ("top-1 agree %", "agree", ".1f")]


# ---- main ------------------------------------------------------------------------------

def quantize_all(models, tools, repeats, work: Path) -> dict:
    results = {(m["name"], t): [] for m in models for t in tools}
    for rep in range(repeats):
        for i, model in enumerate(models):
            k = (rep + i) % len(tools)
            for tool in tools[k:] + tools[:k]:
                out = str(work / f"{model['name']}.{tool}.onnx")  # last repeat's stays
                res = quantize_once(quant_job(tool, model, out), tool,
                                    f"[{rep + 1}/{repeats}] {model['name']:<22} {tool:<20}")
                if res is None:
                    continue
                if res.get("note"):
                    NOTES.add(f"{model['name']}, {tool}: {res['note']}")
                results[(model["name"], tool)].append(res)
    return results


def latency_and_agreement(model, tools, work: Path, runs: int, warmup: int, threads: int):
    # control: a byte-identical copy of the float model, timed like the others; its ratio
    # is the measurement's own bias (a second session of the same graph)
    copy = work / f"{model['name']}.float-copy.onnx"
    shutil.copyfile(model["path"], copy)
    paths = {"float": model["path"], "float-copy": str(copy),
             **{t: str(work / f"{model['name']}.{t}.onnx") for t in tools
                if (model["name"], t) not in FAILURES}}
    lat = in_subprocess({"kind": "latency", "model": model["name"], "models": paths,
                         "runs": runs, "warmup": warmup, "threads": threads})["times_ms"]
    agree = {}
    if model["class_map"] is not None and EVAL.is_dir():
        from onnxquant.evaluate import compare
        from onnxquant.images import list_labelled

        items = list_labelled(EVAL)
        for tool in [t for t in tools if t in paths]:
            res = compare(model["path"], paths[tool], items, preprocess(model["pre"]),
                          class_map=model["class_map"], limit=200, progress=False)
            agree[tool] = res.agreement
            agree["float"] = 100.0
    return lat, agree


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated zoo names (reference checkpoint used when one exists)")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model variant")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/benchmarks.md", help="markdown report ('' = none)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (models)")
    args = parser.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    models = [resolve(n) for n in args.models.split(",") if n]
    work = Path(tempfile.mkdtemp(prefix="bench_peers."))
    info, command = begin(work, __file__, argv)
    try:
        quant = quantize_all(models, tools, args.repeats, work)
        rows = []
        for model in models:
            lat, agree = latency_and_agreement(model, tools, work, args.runs, args.warmup,
                                               args.threads)
            base = median(lat["float"])
            for variant in [v for v in ["float", "float-copy"] + tools if v in lat]:
                q = quant.get((model["name"], variant), [])
                rows.append({"model": model["name"], "variant": variant,
                             "quant_s": median([r["seconds"] for r in q]) if q else None,
                             "quant_min_s": min(r["seconds"] for r in q) if q else None,
                             "rss_mb": median([r["peak_rss_mb"] for r in q]) if q else None,
                             "size_mb": q[-1]["size_mb"] if q else file_mb(model["path"]),
                             "lat_ms": median(lat[variant]), "lat_p90": p90(lat[variant]),
                             "ratio": base / median(lat[variant]), "agree": agree.get(variant)})
            print(table([r for r in rows if r["model"] == model["name"]], PEER_COLUMNS),
                  flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = table(rows, PEER_COLUMNS)
    phases = phase_table(quant)
    problems = "\n".join([f"- FAILED {m}, {t}: {e}" for (m, t), e in FAILURES.items()]
                         + [f"- {n}" for n in sorted(NOTES)]) or "- none"
    print("\n" + text + "\n\n" + phases + "\n\nFailures and notes:\n" + problems)
    if args.out:
        write_report(Path(args.out), info, command, models, text, phases + "\n\nFailures "
                     "and notes:\n\n" + problems, args)
    return 0


def phase_table(quant: dict) -> str:
    rows = []
    for (model, tool), runs in quant.items():
        if not runs:
            continue
        keys = runs[0]["phases"]
        row = {"model": model, "tool": tool,
               "phases": ", ".join(f"{k} {median([r['phases'][k] for r in runs]):.2f}"
                                   for k in keys),
               "start": median([r["start_rss_mb"] for r in runs]),
               "proc": median([r["process_seconds"] for r in runs])}
        rows.append(row)
    return table(rows, [("model", "model", ""), ("tool", "tool", ""),
                        ("phases, median s", "phases", ""),
                        ("process s incl. imports", "proc", ".2f"),
                        ("RSS after imports MB", "start", ".0f")])


def write_report(path: Path, info, command, models, text, phases, args) -> None:
    sources = "\n".join(f"- {m['name']}: {m['source']}" for m in models)
    notes = kept_notes(path)
    path.write_text(f"""# onnxquant vs onnxruntime quantize_static

{header(info, command)}
Models:
{sources}

Quantization: each tool in its own subprocess, tools alternated (rotated order per model
and repeat), {args.repeats} repeats, medians. Time = load .. quantized model saved (image
decoding of the 32 calibration images included; interpreter start-up and imports not
included, see the second table). Peak RSS = `VmHWM` of that subprocess (imports
included; not `ru_maxrss`, which Linux carries over from the parent across fork+exec).
All tools calibrate on the same {NUM_CALIB} images of `{asset_name(CALIB)}` (evenly
spread, as the CLI), batches of {BATCH}.

- `onnxquant-paper`: `QuantConfig(target="paper")` (uint8 weight-only convs + log2 Softmax).
- `onnxquant-ort`: `QuantConfig(target="ort")` (int8 where onnxruntime CPU is faster: it
  first times conv kinds and linear layers on this CPU with the run's own calibration, the
  "kernel probe" phase).
- `onnxquant-paper-folded`: `QuantConfig(weight_format="folded")`: the paper recipe with
  weights stored Cast -> Sub -> Mul, which onnxruntime constant-folds at load.
- `onnxquant-paper-folded+linear`: the same plus linear-layer weights,
  `parts={{"conv_block","transformer","bridge","softmax","linear"}}`.
- `onnxquant-softmax-only`: `QuantConfig(parts={{"softmax"}})`: the log2 post-Softmax
  quantize/dequantize alone (float weights), i.e. what that op costs on onnxruntime CPU.
- `ort-quantize_static`: `quant_pre_process` then `quantize_static(QuantFormat.QDQ,
  per_channel=True, CalibrationMethod.MinMax)`, default S8S8 types of onnxruntime
  {info['onnxruntime']}; time includes `quant_pre_process`.

Latency: onnxruntime CPU EP, batch 1, {args.threads} intra-op threads, spinning off
(`session.intra_op.allow_spinning=0`, DESIGN.md section 7), all variants of a model in one
process, {args.warmup} warm-up runs each, then {args.runs} rounds running every variant once
in a shuffled order; median and p90. float/model = float median / variant median (>1 is
faster than float). `float-copy` is a byte-identical copy of the float model timed as one
more variant: its ratio is the bias of the measurement itself. Top-1 agreement with the float model on 200 images of
`{asset_name(EVAL)}` (reference checkpoints only; random-weight exports have no meaningful top-1).

{text}

Phases (median seconds) and process overhead:

{phases}
{notes}""")
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2])
    else:
        sys.exit(main())
