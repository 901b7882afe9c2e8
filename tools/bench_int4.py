"""4-bit weights in 8-bit containers against real INT4/UINT4 storage (storage4.pack_4bit):
onnxruntime CPU latency at one thread and file size, ratios against float in the same run.

    python tools/bench_int4.py [--models mobilevit_xxs,mobilevitv2_050] [--rounds 200]
                               [--blockwise]

Per model and weight set (convs: the paper target's parts; convs+linears: MatMul/Gemm
weights too), four files: float, W4 as emitted (8-bit containers, the model's opset), the
same converted to opset 21 (separates what the conversion alone changes), and INT4 storage.
Calibration: 8 seeded random images (latency and size do not depend on it). Latency: one
run of every file per round, rounds interleaved, median per file; batch 1, seeded input.

``--blockwise``: one synthetic DequantizeLinear -> MatMul (x [64, 256] @ W [256, 512]) with
W per column or in blocks along K (``block_size``, opset 21), int8 or INT4 codes: the op
onnxruntime turns it into, latency against float MatMul, and the error of the optimized
session against the same model unoptimized (MatMulNBits at its default accuracy level 4
quantizes activations to int8) and at accuracy level 0.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

import onnxquant  # noqa: E402
from onnxquant import QuantConfig, checked_convert, storage4  # noqa: E402
from onnxquant.config import TARGET_PARTS  # noqa: E402

WEIGHT_SETS = {"convs": None, "convs+linears": TARGET_PARTS["paper"] | {"linear"}}
COLUMNS = [("model", "model", ""), ("weights", "weights", ""), ("file", "file", ""),
           ("opset", "opset", "d"), ("MB", "mb", ".2f"), ("size vs float", "size", ".2f"),
           ("median ms", "ms", ".2f"), ("latency vs float", "ratio", ".2f"),
           ("max |diff| vs container", "diff", ".1e")]


def files_for(ref: dict, work: Path) -> list[dict]:
    """[{weights, file, opset, path}] for one reference model: float first."""
    name, h = benchlib.model_input(ref["path"])
    calib = work / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((8, 3, h, h)).astype(np.float32))
    opset = storage4.model_opset(onnx.load(str(ref["path"]), load_external_data=False))
    rows = [{"weights": "-", "file": "float", "opset": opset, "path": ref["path"]}]
    for label, parts in WEIGHT_SETS.items():
        cfg = QuantConfig(weight_bits=4, per_channel=True, parts=parts)
        q = onnxquant.quantize(str(ref["path"]), cfg, calibration=str(calib))
        converted, why = checked_convert.convert(q, storage4.MIN_OPSET)
        packed, note = storage4.pack_4bit(q, ref["name"])
        print(f"{ref['name']} {label}: {note}", flush=True)
        for kind, model in (("8-bit containers", q), ("8-bit containers", converted),
                            ("INT4 storage", packed)):
            if model is None:
                continue
            opset = storage4.model_opset(model)
            path = work / f"{ref['name']}.{label}.{kind.replace(' ', '_')}.{opset}.onnx"
            onnx.save(model, path)
            rows.append({"weights": label, "file": kind, "opset": opset, "path": path})
    return rows


def measure(rows: list[dict], rounds: int, warmup: int = 10) -> None:
    """Fill ms (median of interleaved runs, 1 thread) and out (the outputs) of each row."""
    sessions = [benchlib.ort_session(r["path"], threads=1) for r in rows]
    inp = sessions[0].get_inputs()[0]
    h = int(inp.shape[-1])
    feed = {inp.name: np.random.default_rng(1).standard_normal((1, 3, h, h)).astype(np.float32)}
    for r, s in zip(rows, sessions):
        r["out"] = s.run(None, feed)[0]
        for _ in range(warmup):
            s.run(None, feed)
    times = [[] for _ in rows]
    for _ in range(rounds):
        for t, s in zip(times, sessions):
            start = time.perf_counter()
            s.run(None, feed)
            t.append(time.perf_counter() - start)
    for r, t in zip(rows, times):
        r["ms"] = benchlib.median(t) * 1e3


def model_rows(ref: dict, rounds: int, work: Path) -> list[dict]:
    rows = files_for(ref, work)
    measure(rows, rounds)
    base = rows[0]
    container = None
    for r in rows:
        r.update(model=ref["name"], mb=benchlib.file_mb(r["path"]))
        r["size"], r["ratio"] = r["mb"] / base["mb"], r["ms"] / base["ms"]
        if r["file"] == "8-bit containers":
            container = r
        elif r["file"] == "INT4 storage":
            r["diff"] = float(np.abs(r["out"] - container["out"]).max())
    return rows


def blockwise_model(bits: int, block: int, m: int = 64, k: int = 256, n: int = 512):
    """x [m, k] @ DequantizeLinear(W codes, scale, zero 0) with symmetric codes; ``block``
    0: one scale per column (axis 1), else blocks of ``block`` rows (axis 0); ``bits`` 32:
    the float MatMul."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    if bits == 32:
        model = onnx.parser.parse_model(f"""
            <ir_version: 10, opset_import: ["" : 21]>
            blockwise (float[{m}, {k}] x) => (float[{m}, {n}] y) {{ y = MatMul(x, w) }}""")
        model.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
        return model, {"x": rng.standard_normal((m, k)).astype(np.float32)}
    qmax = 2 ** (bits - 1) - 1
    blocks = w.reshape(k // (block or k), -1, n)
    scale = (np.abs(blocks).max(1) / qmax).astype(np.float32)  # [k / block, n]
    codes = np.clip(np.round(blocks / scale[:, None]), -qmax - 1, qmax).reshape(k, n)
    dtype = ml_dtypes.int4 if bits == 4 else np.int8
    if not block:
        scale = scale[0]
    attrs = f"<axis=0, block_size={block}>" if block else "<axis=1>"
    model = onnx.parser.parse_model(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        blockwise (float[{m}, {k}] x) => (float[{m}, {n}] y) {{
            w = DequantizeLinear{attrs}(w_q, s, z)
            y = MatMul(x, w)
        }}""")
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array(codes.astype(dtype), "w_q"),
        onnx.numpy_helper.from_array(scale, "s"),
        onnx.numpy_helper.from_array(np.zeros(scale.shape, dtype), "z")])
    return model, {"x": rng.standard_normal((m, k)).astype(np.float32)}


def blockwise_rows(rounds: int, work: Path) -> list[dict]:
    import onnxruntime as ort

    rows = []
    for bits, block in [(32, 0), (8, 0), (8, 32), (4, 0), (4, 32), (4, 128)]:
        model, feed = blockwise_model(bits, block)
        opts = ort.SessionOptions()
        opts.log_severity_level, opts.intra_op_num_threads = 3, 1
        opts.optimized_model_filepath = str(work / "blockwise.opt.onnx")
        fast = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        ops = ",".join(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        plain = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        opts = ort.SessionOptions()
        opts.log_severity_level, opts.intra_op_num_threads = 3, 1
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        exact = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        ref = plain.run(None, feed)[0]
        err = lambda s: float(np.abs(s.run(None, feed)[0] - ref).max() / np.abs(ref).max())
        rows.append({"codes": {32: "float", 8: "int8", 4: "INT4"}[bits],
                     "block": block or ("-" if bits == 32 else "column"),
                     "ops": ops, "err": err(fast), "err0": err(exact),
                     "kb": model.ByteSize() / 1024, "sessions": (fast, plain), "feed": feed})
    times = [[[], []] for _ in rows]
    for _ in range(rounds):
        for r, t in zip(rows, times):
            for s, ts in zip(r["sessions"], t):
                start = time.perf_counter()
                s.run(None, r["feed"])
                ts.append(time.perf_counter() - start)
    for r, (fast, plain) in zip(rows, times):
        r["ms"], r["plain_ms"] = benchlib.median(fast) * 1e3, benchlib.median(plain) * 1e3
        r["ratio"] = r["ms"] / rows[0]["ms"]
    return rows


BLOCK_COLUMNS = [("codes", "codes", ""), ("scales per", "block", ""), ("optimized graph", "ops", ""),
                 ("kB", "kb", ".0f"), ("median ms", "ms", ".3f"), ("vs float", "ratio", ".2f"),
                 ("unoptimized ms (DQ + MatMul)", "plain_ms", ".3f"),
                 ("rel. error, default", "err", ".1e"), ("rel. error, accuracy_level 0", "err0", ".1e")]


def main(argv=None) -> None:
    parser = benchlib.argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mobilevit_xxs,mobilevitv2_050")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--blockwise", action="store_true", help="the synthetic MatMul only")
    args = parser.parse_args(argv)
    refs = benchlib.reference_models(args.models.split(","))
    if not refs:
        sys.exit(f"no reference checkpoints in {benchlib.REFERENCE}")
    with tempfile.TemporaryDirectory(prefix="bench_int4.") as tmp:
        work = Path(tmp)
        benchlib.begin(work, __file__, argv)
        if args.blockwise:
            print(benchlib.table(blockwise_rows(args.rounds, work), BLOCK_COLUMNS))
            return
        rows = [row for ref in refs for row in model_rows(ref, args.rounds, work)]
    print(benchlib.table(rows, COLUMNS))


if __name__ == "__main__":
    main()
