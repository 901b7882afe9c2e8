"""What the log2 op costs on onnxruntime CPU with each body (functions.py: "table", "bitcast"):
the log2 op alone (float weights, parts=softmax) and the paper recipe, against float, medians
of interleaved runs at one thread.

    python tools/bench_log2_body.py [--models mobilevit_xxs,mobilevitv2_050,mobilevit_s,...]
                                    [--runs 300] [--threads 1] [--out docs/log2_body.md]

Reference checkpoints are used where they exist, else the timm zoo export (random weights,
needs torch + timm; exported once into the cache). The log2 op's share of the model's time
is (t(log2 op alone) - t(float)) / t(log2 op alone): the issue-13 goal is <= 10 %. The
profiler column is the op's kernels' share of onnxruntime's profile of the same file (steadier:
one run holds both parts); load time and the RSS a fresh process needs for the file come
from three fresh interpreters.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from bench_ort_graph import _source  # noqa: E402
from bench_peers import _latency  # noqa: E402

import numpy as np  # noqa: E402

from onnxquant import QuantConfig, api  # noqa: E402
from onnxquant.functions import OP_TYPE  # noqa: E402
from onnxquant.model_io import save_model  # noqa: E402

COLUMNS = [("model", "model", ""), ("variant", "variant", ""),
           ("latency ms (median)", "ms", ".3f"), ("float / variant", "speedup", ".3f"),
           ("log2 op ms", "log2_ms", ".3f"), ("log2 share of the model %", "share", ".1f"),
           ("log2 kernels % (profiler)", "profiled", ".1f"),
           ("session load s", "load_s", ".3f"), ("RSS after load + 1 run MB", "rss_mb", ".1f")]
# a fresh interpreter per file: its resident memory after loading the model and one run
# (onnxruntime keeps what constant folding the log2 tables took) and the load time
_LOAD = """
import json, sys, time, numpy as np, onnxruntime as ort
rss = lambda: int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
so = ort.SessionOptions(); so.intra_op_num_threads = 1
start_rss, t = rss(), time.perf_counter()
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
load = time.perf_counter() - t
i = s.get_inputs()[0]
s.run(None, {i.name: np.zeros([1] + list(i.shape[1:]), np.float32)})
print(json.dumps({"load_s": load, "rss_mb": rss() - start_rss}))
"""
VARIANTS = {  # label: (parts, log2 body)
    "log2 op alone, table body": (("softmax",), "table"),
    "log2 op alone, bitcast body": (("softmax",), "bitcast"),
    "paper recipe, table body": (None, "table"),
    "paper recipe, bitcast body": (None, "bitcast"),
}


def variants(name: str, work: Path) -> dict:
    """{label: path}: float and every VARIANTS entry, quantized on the bundled images."""
    path, pre = _source(name)
    out = {"float": Path(path)}
    for label, (parts, body) in VARIANTS.items():
        cfg = QuantConfig(parts=parts, log2_body=body)
        result = api.run(str(path), cfg, str(benchlib.CALIB), pre, progress=False)
        out[label] = work / f"{name}.{len(out)}.onnx"
        save_model(result.model, out[label])
    return out


def profiled_share(path, runs: int = 50, repeats: int = 3) -> float:
    """The log2 op's nodes' share of the kernel time in onnxruntime's profile, %: the median
    of ``repeats`` profiled sessions. Steadier than the difference of two latency medians:
    both parts come from the same runs. (onnxruntime names an inlined node
    "_inlfunc_<function>_<node name>".)"""
    shares = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            sess = benchlib.ort_session(path, 1, str(Path(tmp) / "profile"))
            first = sess.get_inputs()[0]
            x = np.random.default_rng(0).standard_normal([1] + list(first.shape[1:]))
            feed = {first.name: x.astype(np.float32)}  # the input the latency runs use
            for _ in range(runs):
                sess.run(None, feed)
            kernels = [e for e in json.loads(Path(sess.end_profiling()).read_text())
                       if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
            log2 = sum(e["dur"] for e in kernels if f"_inlfunc_{OP_TYPE}_" in e["name"])
            shares.append(100 * log2 / sum(e["dur"] for e in kernels))
    return benchlib.median(shares)


def load_cost(path) -> dict:
    """{"load_s", "rss_mb"}: the median load time of 3 fresh processes, the RSS it adds."""
    runs = [json.loads(subprocess.run([sys.executable, "-c", _LOAD, str(path)], check=True,
                                      capture_output=True, text=True).stdout)
            for _ in range(3)]
    return {k: benchlib.median([r[k] for r in runs]) for k in ("load_s", "rss_mb")}


def rows_for(name: str, times: dict) -> list[dict]:
    base = benchlib.median(times["float"])
    rows = []
    for label, t in times.items():
        ms = benchlib.median(t)
        alone = label.startswith("log2 op alone")
        rows.append({"model": name, "variant": label, "ms": ms, "speedup": base / ms,
                     "log2_ms": ms - base if alone else None,
                     "share": 100 * (ms - base) / ms if alone else None})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mobilevit_xxs,mobilevitv2_050")
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/log2_body.md")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            paths = variants(name, Path(tmp))
            times = _latency({"models": {k: str(v) for k, v in paths.items()},
                              "threads": args.threads, "warmup": args.warmup,
                              "runs": args.runs})["times_ms"]
            rows += [{**row, **load_cost(paths[row["variant"]]),
                      "profiled": (profiled_share(paths[row["variant"]])
                                   if row["variant"].startswith("log2 op alone") else None)}
                     for row in rows_for(name, times)]
            print(benchlib.table(rows[-len(times):], COLUMNS), flush=True)
    text = benchlib.write_latency_report(
        "The log2 op's cost on onnxruntime CPU, by body", "tools/bench_log2_body.py", argv,
        args, rows, COLUMNS, "float / variant > 1 is faster than float; '-': not a "
        "log2-op-alone row.")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
