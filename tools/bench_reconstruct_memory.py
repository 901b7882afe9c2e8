"""Peak memory of --reconstruct against the calibration activations it could hold: one
block's (what the driver is built to hold: the walk keeps only the boundary values later
blocks still read, and runs one block at a time) or the whole model's.

Each method runs in its own process (VmHWM of that process image, benchlib.peak_rss_mb);
``none`` (round to nearest, the same calibration) is the baseline: the model, the
calibration samples and the emitted model are in it too. The torch methods' processes
import torch first, and what that import alone makes resident (about 0.5 GB with a CUDA
build) is not counted as reconstruction memory ("over RTN" = peak - RTN's peak - torch's
libraries). The reference sizes come from
the float model run on one sample with every intermediate float tensor as an output, times
the number of calibration samples:

    whole model    every intermediate activation of the calibration set
    largest block  the largest block's boundary inputs and every tensor made inside it

    python tools/bench_reconstruct_memory.py [--models mobilevitv2_050,detector]
        [--methods gptq,adaround,mgrq] [--iters 2] [--out docs/reconstruct_memory.md]

``gptq-plain`` among the methods: GPTQ without its float target (reconstruct.FLOAT_TARGET).

The torch methods' memory does not grow with their iteration budget (each step reruns the
block on a batch), so ``--iters`` only shortens the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from reconstruct_table import DET_CALIB, RECIPES  # noqa: E402

DETECTOR = "PP-OCRv6_det_small"
COLUMNS = [("model", "model", ""), ("method", "method", ""), ("peak MB", "peak", ".0f"),
           ("torch libraries MB", "torch", ".0f"), ("over RTN MB", "extra", ".0f"), ("largest block MB", "block", ".0f"),
           ("whole model MB", "whole", ".0f"), ("quantize s", "seconds", ".0f")]


def _source(name: str, work: Path) -> tuple:
    """(model path, calibration, preprocess or None, samples) of a model name."""
    if name == "detector":
        from onnxquant import ocr

        calib = work / "det_calib.npy"
        if not calib.exists():
            np.save(calib, ocr.detector_calibration_array(DET_CALIB, seed=1001))
        return benchlib.ASSETS / "real" / f"{DETECTOR}.onnx", str(calib), None, DET_CALIB
    ref = benchlib.reference(name)
    if ref is None:
        sys.exit(f"no reference checkpoint {name!r} in {benchlib.REFERENCE}")
    return ref["path"], str(benchlib.CALIB), ref["pre"], benchlib.NUM_CALIB


PLAIN_GPTQ = "gptq-plain"  # --methods name of GPTQ with reconstruct.FLOAT_TARGET off


def _config(method: str, iters: int, samples: int):
    from onnxquant import QuantConfig
    from onnxquant.config import TORCH_RECONSTRUCT

    extra = {"reconstruct_iters": iters} if method in TORCH_RECONSTRUCT else {}
    return QuantConfig(reconstruct=method, num_calib=samples, **extra, **RECIPES["W4"])


def worker(name: str, method: str, iters: int, work: Path) -> None:
    """Quantize in this process; print its peak RSS and time as JSON."""
    import onnxquant
    from onnxquant.config import TORCH_RECONSTRUCT

    before = benchlib.rss_mb()
    if method in TORCH_RECONSTRUCT:  # torch's libraries alone are ~0.5 GB resident
        import onnxquant.reconstruct_torch  # noqa: F401
    libraries = benchlib.rss_mb() - before
    if method == PLAIN_GPTQ:  # GPTQ without its float target (the walk's float copy)
        from onnxquant import reconstruct
        reconstruct.FLOAT_TARGET, method = False, "gptq"
    path, calib, pre, samples = _source(name, work)
    start = time.perf_counter()
    onnxquant.run(str(path), _config(method, iters, samples), calib, pre, progress=False)
    print(json.dumps({"peak": benchlib.peak_rss_mb(), "torch": libraries,
                      "seconds": time.perf_counter() - start}))


def activation_mb(name: str, work: Path) -> tuple:
    """(whole model MB, largest block MB) of float activations over the calibration set."""
    import onnx_graphsurgeon as gs

    from onnxquant import block_runs
    from onnxquant.api import analyze
    from onnxquant.calibrate import sample_feed

    path, calib, pre, samples = _source(name, work)
    cfg = _config("gptq", 1, samples)
    graph, plan = analyze(str(path), cfg)
    model = gs.export_onnx(graph.copy(), do_type_check=False)
    feed = {k: v[:1] for k, v in sample_feed(model, calib, cfg, pre).items()}
    names = [o for node in model.graph.node for o in node.output if o]
    values = block_runs.run(block_runs.with_outputs(model, names), feed, names)
    size = {k: v.nbytes for k, v in {**feed, **values}.items()
            if np.issubdtype(np.asarray(v).dtype, np.floating)}
    made = {node.name: [o for o in node.output if o] for node in model.graph.node}
    blocks = [sum(size.get(t, 0) for t in set(b.inputs) | {o for n in b.nodes
                                                             for o in made.get(n, ())})
              for b in plan.blocks]
    mb = samples / 2**20
    return sum(size.values()) * mb, max(blocks, default=0) * mb


def measure(name: str, method: str, iters: int, work: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", name, method, str(iters),
                          str(work)], capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"{name} {method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = benchlib.reference_parser(__doc__, "docs/reconstruct_memory.md")
    p.set_defaults(models="mobilevitv2_050,detector")
    p.add_argument("--methods", default="gptq,adaround,mgrq")
    p.add_argument("--iters", type=int, default=2, help="torch methods' steps per layer/block")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        name, method, iters, work = args.worker
        worker(name, method, int(iters), Path(work))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            whole, block = activation_mb(name, work)
            base = None
            for method in ["none"] + args.methods.split(","):
                got = measure(name, method, args.iters, work)
                base = got["peak"] if base is None else base
                rows.append({"model": DETECTOR if name == "detector" else name,
                             "method": "RTN (baseline)" if method == "none" else method,
                             "peak": got["peak"], "torch": got["torch"],
                             "extra": got["peak"] - base - got["torch"],
                             "block": block, "whole": whole, "seconds": got["seconds"]})
                print(rows[-1], flush=True)
    text = (f"# Peak memory of --reconstruct\n\n"
            f"{benchlib.measured_line(benchlib.command_line('tools/bench_reconstruct_memory.py', argv))}"
            f" (W4 symmetric per-channel; torch methods at {args.iters} steps per layer/block: "
            f"their memory does not depend on it).\n\n{benchlib.table(rows, COLUMNS)}\n\n"
            f"{benchlib.kept_notes(Path(args.out))}\n")
    benchlib.write_doc(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
