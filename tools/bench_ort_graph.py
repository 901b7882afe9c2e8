"""What the ort target's float-graph rewrites (shape folding, attention fusion, Transpose
splitting) add to its int8 kernels: latency of float, float + rewrites, --target ort without
and with the rewrites, medians of interleaved runs at one thread.

    python tools/bench_ort_graph.py [--models mobilevit_xxs,mobilevit_s,...] [--runs 300]
                                    [--threads 1] [--out docs/ort_graph.md]

Reference checkpoints are used where they exist, else the timm zoo export (random weights,
needs torch + timm; exported once into the cache). Every variant of a model runs in one
process, once per round in a shuffled order (bench_peers._latency).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from bench_peers import _latency  # noqa: E402

import onnx  # noqa: E402

from onnxquant import QuantConfig, api  # noqa: E402
from onnxquant.model_io import save_model  # noqa: E402

COLUMNS = [("model", "model", ""), ("variant", "variant", ""),
           ("latency ms (median)", "ms", ".3f"), ("float / variant", "speedup", ".3f"),
           ("rewrites", "rewrites", "")]


def _source(name: str):
    """(path, preprocess or None) of a reference checkpoint, else the zoo export."""
    ref = benchlib.reference(name)
    if ref is not None:
        return ref["path"], ref["pre"]
    from onnxquant.models.export import zoo_cache

    return zoo_cache(name), None


def _without_rewrites(model, cfg, calib, pre):
    real = api._ort_graph
    api._ort_graph = lambda m, plan, config: m
    try:
        return api.run(str(model), cfg, calib, pre, progress=False).model
    finally:
        api._ort_graph = real


def variants(name: str, work: Path) -> tuple[dict, dict]:
    """{label: path} and {label: what was rewritten}."""
    path, pre = _source(name)
    calib = str(benchlib.CALIB)
    plan_notes = {}
    out = {"float": Path(path)}
    ort_model = api.run(str(path), QuantConfig(target="ort"), calib, pre, progress=False)
    kinds = ort_model.config.ort_int8_kinds
    fixed = QuantConfig(target="ort", ort_int8_kinds=kinds)
    float_plan = _Notes()
    rewritten = api._ort_graph(onnx.load(str(path)), float_plan, fixed)
    for label, model, notes in (
            ("float + rewrites", rewritten, float_plan.notes),
            (f"ort int8 on {','.join(kinds) or 'nothing'}, no rewrites",
             _without_rewrites(path, fixed, calib, pre), []),
            ("ort (as shipped)", ort_model.model, ort_model.plan.notes)):
        out[label] = work / f"{name}.{len(out)}.onnx"
        save_model(model, out[label])
        plan_notes[label] = next((n for n in notes if n.startswith("onnxruntime graph")), "")
    return out, plan_notes


class _Notes:
    """A stand-in plan for the float model's rewrites (only ``notes`` is used)."""

    def __init__(self):
        self.notes = []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mobilevit_xxs,mobilevit_s,mobilevitv2_050,"
                                       "fastvit_sa12,efficientformer_l1")
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/ort_graph.md")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            paths, notes = variants(name, Path(tmp))
            times = _latency({"models": {k: str(v) for k, v in paths.items()},
                              "threads": args.threads, "warmup": args.warmup,
                              "runs": args.runs})["times_ms"]
            base = benchlib.median(times["float"])
            for label, t in times.items():
                rows.append({"model": name, "variant": label, "ms": benchlib.median(t),
                             "speedup": base / benchlib.median(t),
                             "rewrites": notes.get(label, "")[len("onnxruntime graph: "):]
                             .split(" (outputs")[0]})
            print(benchlib.table(rows[-len(times):], COLUMNS), flush=True)
    text = benchlib.write_latency_report(
        "The ort target's graph rewrites: latency", "tools/bench_ort_graph.py", argv, args,
        rows, COLUMNS, "float / variant > 1 is faster than float.")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
