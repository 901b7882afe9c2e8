"""Build TensorRT engines for float and quantized hybrid models and tabulate what they contain.

    for each model (reference checkpoint at 128 px, or a timm zoo export at 224 px):
        float ONNX; quantized with onnxquant.quantize on 8 bundled images: the paper recipe,
        the paper recipe with symmetric per-channel weights, --target tensorrt (and, where
        the target leaves the "linear" part out, tensorrt + linear)
        -> each built ahead of time (no GPU; default SM89) in a fresh process, with the log2
           plugin registered and (quantized ones) without it
    -> one markdown row per build: ok / parse error, times, network layers, Q/DQ layers,
       INT8-eligible convs (data and weights from Dequantize layers) vs weight-only convs,
       plugin layers vs Log2QuantDequant nodes, then the engine's own layer list: how each
       Conv / MatMul runs (int8 input, int8 weight-only, float), separate weight-dequantize
       kernels, weights and engine size

    python tools/engine_table.py [--models a,b] [--work DIR] [--out docs/tensorrt_engines.md]

The engine layer list is the one TensorRT-RTX's builder prints at VERBOSE level at the end of
a build (kernel kinds, data types, the ONNX nodes each layer fuses); it needs no GPU. The
concrete kernels are stubs there, picked on the target GPU; running engines needs that GPU.
--out replaces only the block between the engine_table markers of an existing file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# tools/ is on sys.path when a tool runs
from benchlib import ROOT, command_line, model_input, ort_session, reference, today, versions

sys.path.insert(0, str(ROOT))

CALIB = ROOT / "models" / "reference" / "calib"  # 32 bundled ImageNet images
MODELS = ("mobilevit_xxs", "mobilevitv2_050", "efficientformer_l1", "efficientformerv2_s0",
          "tiny_vit_5m_224")
NUM_CALIB = 8


def variants():
    """(name, QuantConfig or None for the float model, what it is)."""
    from onnxquant import QuantConfig, config

    out = [
        ("float", None, "the exported model"),
        ("paper", QuantConfig(per_channel=False, num_calib=NUM_CALIB),
         "paper recipe (`QuantConfig(per_channel=False)`): uint8 asymmetric per-tensor conv weights "
         "(weight-only), log2 post-Softmax"),
        ("paper-sym", QuantConfig(weight_symmetric=True, per_channel=True, num_calib=NUM_CALIB),
         "paper recipe with `weight_symmetric=True, per_channel=True`: int8 symmetric "
         "per-channel conv weights (weight-only), log2 post-Softmax"),
        ("tensorrt", QuantConfig(target="tensorrt", num_calib=NUM_CALIB),
         '`QuantConfig(target="tensorrt")`: ' + tensorrt_target_text(config)),
    ]
    # linear layers, where the target does not quantize them already: weight-only int8 DQ
    if ("linear" in getattr(config, "PARTS", ())
            and "linear" not in config.TARGET_PARTS["tensorrt"]):
        parts = config.TARGET_PARTS["tensorrt"] | {"linear"}
        out.append(("tensorrt+linear",
                    QuantConfig(target="tensorrt", parts=parts, num_calib=NUM_CALIB),
                    "the tensorrt target with the `linear` part added: MatMul/Gemm weights "
                    "int8 per channel, weight-only"))
    return tuple(out)


def tensorrt_target_text(config) -> str:
    parts = config.TARGET_PARTS["tensorrt"]
    if "linear" in parts:
        return ("int8 per-channel weights + int8 Q/DQ on the inputs of every Conv and every "
                "linear layer (MatMul/Gemm with a weight), log2 post-Softmax (a Conv fed by "
                "the log2 output gets no second quantizer on that input)")
    return "int8 per-channel conv weights + int8 Q/DQ on every Conv input, log2 post-Softmax"


# ---- models ----------------------------------------------------------------------------


def source_model(name: str, source: str, work: Path) -> tuple[Path, str, object]:
    """A private copy of the model to build (other jobs rewrite the shared zoo cache), what
    it is, and its preprocessing (the reference checkpoint's own; None: timm's defaults)."""
    ref = reference(name) if source == "reference" else None
    if ref is not None:
        origin, pre = ref["path"], ref["pre"]
        label = f"reference checkpoint ({origin.name})"
    else:
        from onnxquant.models.export import zoo_cache

        origin, pre = zoo_cache(name), None
        label = f"timm zoo export, random init ({origin.name})"
    dst = work / f"{name}.float.onnx"
    shutil.copyfile(origin, dst)
    return dst, label, pre


def onnx_counts(path: Path) -> dict:
    import onnx

    from onnxquant import functions

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return {"conv_nodes": sum(n.op_type == "Conv" for n in nodes),
            "log2_nodes": sum(n.op_type == functions.OP_TYPE and n.domain == functions.DOMAIN
                              for n in nodes),
            "onnx_q": sum(n.op_type == "QuantizeLinear" for n in nodes),
            "onnx_dq": sum(n.op_type == "DequantizeLinear" for n in nodes),
            "op_types": {n.name: n.op_type for n in nodes}}


def ort_runs(path: Path, size: int) -> str:
    """Does stock onnxruntime run the model (the log2 op through its function body)?"""
    import numpy as np

    try:
        sess = ort_session(path)
        x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
        y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        return "yes" if np.isfinite(y).all() else "non-finite output"
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"no: {str(exc).splitlines()[0][:80]}"


# ---- builds ----------------------------------------------------------------------------


def report_dict(report, op_types: dict) -> dict:
    kind = lambda names, op: sum(op_types.get(n) == op for n in names)  # noqa: E731
    return {"ok": True, "parse_s": report.parse_seconds, "build_s": report.build_seconds,
            "layers": report.network_layers, "q_layers": report.quantize_layers,
            "dq_layers": report.dequantize_layers, "plugin_layers": report.plugin_layers,
            "int8_convs": kind(report.int8_eligible, "Conv"),
            "int8_matmuls": len(report.int8_eligible) - kind(report.int8_eligible, "Conv"),
            "weight_only_convs": kind(report.weight_only, "Conv"),
            "weight_only_other": len(report.weight_only) - kind(report.weight_only, "Conv"),
            "engine_bytes": report.engine_bytes, "layer_types": report.layer_types}


# The builder's VERBOSE log ends with the engine's layer list (TensorRT-RTX, compiler
# backend): one "Name: ..., LayerType: ..., Inputs: [...], Constants: [...], Outputs: [...],
# TacticName: ..., Metadata: [ONNX Layer: a][ONNX Layer: b]" line per engine layer. It is
# printed by an ahead-of-time build with no GPU, so the kernel kinds and data types TensorRT
# chose are visible here; the concrete kernels are stubs resolved on the device.
_FIELD = {key: re.compile(rf"{key}: \[(.*?)\], {after}") for key, after in
          (("Inputs", "Constants:"), ("Constants", "Outputs:"), ("Outputs", "TacticName:"))}
_MATH_KINDS = ("correlation", "gemm", "runtime_fusion", "kgen")


def _dtypes(line: str, key: str) -> set:
    m = _FIELD[key].search(line)
    return set(re.findall(r"Datatype: (\w+)", m.group(1))) if m else set()


def engine_layers(dump: str, op_types: dict) -> dict:
    """Summary of the engine layer list: layer kinds, and how each ONNX Conv / MatMul / Gemm
    runs, from the engine layer whose metadata names it: "int8" (int8 data input),
    "woq" (float input, int8 weight constants inside the same kernel: weight-only), "float"."""
    layers = [line for line in dump.splitlines() if line.startswith("Name: ")]
    kinds, how, weight_dq = {}, {"Conv": {}, "MatMul": {}}, 0
    rank = {"float": 0, "woq": 1, "int8": 2}
    for line in layers:
        kind = re.search(r"LayerType: (\w+)", line).group(1)
        kinds[kind] = kinds.get(kind, 0) + 1
        inputs, consts = _dtypes(line, "Inputs"), _dtypes(line, "Constants")
        if not inputs and "Int8" in consts:
            weight_dq += 1  # dequantizes int8 constants to float: a separate weight DQ kernel
        if kind not in _MATH_KINDS or not inputs:
            continue
        mode = "int8" if "Int8" in inputs else "woq" if "Int8" in consts else "float"
        for node in re.findall(r"\[ONNX Layer: ([^\]]*)\]", line):
            op = {"Gemm": "MatMul"}.get(op_types.get(node), op_types.get(node))
            if op in how and rank[mode] >= rank[how[op].get(node, "float")]:
                how[op][node] = mode
    out = {"engine_layers": len(layers), "engine_kinds": kinds,
           "engine_custom": kinds.get("custom_layer", 0),
           "engine_weight_dq_kernels": weight_dq}
    for op, key in (("Conv", "convs"), ("MatMul", "matmuls")):
        for mode in rank:
            out[f"engine_{mode}_{key}"] = sum(m == mode for m in how[op].values())
    return out


def _capture_logger(trt):
    """A VERBOSE logger keeping the builder's layer list and weights size; warnings to
    stderr. Must be the process's first TensorRT logger (TensorRT-RTX keeps the first)."""
    class Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.layers, self.weights = "", None

        def log(self, severity, msg):
            if msg.startswith("Layers:"):
                self.layers = msg
            elif msg.startswith("Total Weights Memory:"):
                self.weights = int(msg.split()[-2])
            elif severity <= trt.ILogger.WARNING:
                print(f"[TRT] {msg}", file=sys.stderr)

    return Capture()


def short_error(message: str) -> str:
    """'node NAME (Op): reason' from a parser error, else the message without the path."""
    m = re.search(r"In node \d+ with name: (.*?) and operator: (\w+).*?: "
                  r"(?:Assertion failed: [^:]*: )?([^:]*)$", message)
    if m:
        return f"node {m.group(1)} ({m.group(2)}): {m.group(3).strip()}"
    return message.split(": ", 1)[-1]


def build_one(onnx_path: Path, engine: Path, cc: str, use_plugin: bool) -> dict:
    """Build in this process (its first TensorRT use): report + engine layer summary."""
    from onnxquant import tensorrt as qt
    from onnxquant import trt_loader

    trt = qt.import_trt()
    capture = _capture_logger(trt)
    trt_loader._state.setdefault("logger", capture)
    op_types = onnx_counts(onnx_path)["op_types"]
    try:
        report = qt.build_engine(onnx_path, engine, compute_capability=cc,
                                 use_plugin=use_plugin)
    except qt.TensorRTError as exc:
        return {"ok": False, "error": short_error(str(exc))}
    out = report_dict(report, op_types)
    if trt_loader._state["logger"] is capture and capture.layers:
        out.update(engine_layers(capture.layers, op_types), engine_weights=capture.weights)
    return out


def build_fresh(onnx_path: Path, engine: Path, cc: str, use_plugin: bool) -> dict:
    """One build in a new process: clean plugin registry, and the capturing logger first."""
    cmd = [sys.executable, __file__, "--one", str(onnx_path), str(engine),
           "--compute-capability", cc] + ([] if use_plugin else ["--no-plugin"])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"subprocess exit {out.returncode}: {tail}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def quantize(float_path: Path, cfg, pre, dst: Path) -> float:
    import onnx

    import onnxquant

    t0 = time.perf_counter()
    model = onnxquant.quantize(str(float_path), cfg, calibration=str(CALIB), preprocess=pre)
    onnx.save(model, str(dst))
    return time.perf_counter() - t0


def run_model(name: str, source: str, work: Path, cc: str) -> list[dict]:
    from onnxquant.images import Preprocess

    float_path, label, pre = source_model(name, source, work)
    size = model_input(float_path)[1]
    pre = pre or Preprocess(input_size=size)
    rows = []
    for variant, cfg, _ in variants():
        path = float_path if cfg is None else work / f"{name}.{variant}.onnx"
        quant_s = None if cfg is None else quantize(float_path, cfg, pre, path)
        counts = onnx_counts(path)
        base = {"model": name, "source": label, "size": size, "variant": variant,
                "quantize_s": quant_s, "onnx_mb": path.stat().st_size / 1e6,
                "ort": ort_runs(path, size) if cfg is not None else "",
                **{k: v for k, v in counts.items() if k != "op_types"}}
        plugin_modes = (True,) if cfg is None else (True, False)
        for use_plugin in plugin_modes:
            engine = work / f"{name}.{variant}.{'plugin' if use_plugin else 'body'}.engine"
            result = build_fresh(path, engine, cc, use_plugin)
            rows.append({**base, "plugin": use_plugin, **result})
            print(_line(rows[-1]), flush=True)
            engine.unlink(missing_ok=True)
    return rows


# ---- output ----------------------------------------------------------------------------

HEADER = ("| model | variant | plugin | build | parse+build s | network layers | Q / DQ "
          "| INT8-eligible convs / Conv nodes | weight-only convs "
          "| plugin layers / log2 nodes | engine layers | engine convs int8 / woq / float "
          "| engine MatMul+Gemm int8 / woq / float | weight-DQ kernels | weights MB "
          "| engine MB |")
_COLUMNS = HEADER.count("|") - 1


def _line(r: dict) -> str:
    plugin = "yes" if r["plugin"] else "no"
    if not r["ok"]:
        return (f"| {r['model']} | {r['variant']} | {plugin} | **fails**: {r['error'][:150]} "
                + "| " * (_COLUMNS - 4) + "|")
    eng = lambda key: r.get(key, "?")  # noqa: E731
    weights = f"{r['engine_weights'] / 1e6:.1f}" if r.get("engine_weights") else "?"
    return (f"| {r['model']} | {r['variant']} | {plugin} | ok "
            f"| {r['parse_s'] + r['build_s']:.1f} | {r['layers']} "
            f"| {r['q_layers']} / {r['dq_layers']} | {r['int8_convs']} / {r['conv_nodes']} "
            f"| {r['weight_only_convs']} | {r['plugin_layers']} / {r['log2_nodes']} "
            f"| {eng('engine_layers')} | {eng('engine_int8_convs')} / {eng('engine_woq_convs')}"
            f" / {eng('engine_float_convs')} | {eng('engine_int8_matmuls')} / "
            f"{eng('engine_woq_matmuls')} / {eng('engine_float_matmuls')} "
            f"| {eng('engine_weight_dq_kernels')} | {weights} "
            f"| {r['engine_bytes'] / 1e6:.1f} |")


def _versions() -> str:
    from onnxquant import tensorrt as qt

    trt = qt.import_trt()
    packages = ", ".join(f"{k} {v}" for k, v in
                         versions("onnx", "onnxruntime", "torch", "timm", "onnxquant").items())
    return (f"{trt.__name__} {trt.__version__}, {packages}, Python "
            f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs")


BEGIN, END = "<!-- engine_table:begin -->", "<!-- engine_table:end -->"


def markdown(rows: list[dict], cc: str, argv: list[str], seconds: float) -> str:
    """The generated block: command, versions, models, variants, the table."""
    sources = {}
    for r in rows:
        sources.setdefault(r["model"], (r["source"], r["size"]))
    lines = [BEGIN, f"Generated by `{command_line(__file__, argv)}` on {today()} in "
             f"{seconds:.0f} s (every build in a fresh process), no GPU, ahead of time for "
             f"{cc}.", "", f"Versions: {_versions()}.", "", "Models:", ""]
    lines += [f"- {m}: {src}, {size} px" for m, (src, size) in sources.items()]
    lines += ["", "Variants (calibration: 8 of the bundled ImageNet images, each model's own "
              "preprocessing):", ""]
    lines += [f"- `{name}`: {what}" for name, _, what in variants()]
    lines += ["", HEADER, "|" + "---|" * _COLUMNS]
    lines += [_line(r) for r in rows]
    ort = sorted({(r["model"], r["variant"], r["ort"]) for r in rows if r["ort"]})
    failed = [f"{m}/{v}: {o}" for m, v, o in ort if o != "yes"]
    lines += ["", f"onnxruntime (CPU) runs {len(ort) - len(failed)} of {len(ort)} quantized "
              "files (the log2 op through its function body) on 2 random images with finite "
              "outputs" + (": failed " + "; ".join(failed) if failed else "") + ".", END]
    return "\n".join(lines) + "\n"


def write(out: Path, block: str) -> None:
    """Replace the generated block of ``out`` (between the markers), keeping the rest."""
    text = out.read_text() if out.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = "# TensorRT engines of float and quantized models (measured)\n\n" + block
    out.write_text(text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--source", choices=("reference", "zoo"), default="reference",
                    help="mobilevit_xxs/mobilevitv2_050: reference checkpoint (128 px, "
                         "default) or the zoo export (256 px)")
    ap.add_argument("--compute-capability", default="SM89")
    ap.add_argument("--work", help="folder for models and engines (default: a temp folder)")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--one", nargs=2, metavar=("ONNX", "ENGINE"), help=argparse.SUPPRESS)
    ap.add_argument("--no-plugin", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # subprocess mode: one build, one JSON line
        print(json.dumps(build_one(Path(args.one[0]), Path(args.one[1]),
                                   args.compute_capability, not args.no_plugin)))
        return 0
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="engine_table."))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(HEADER)
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args.source, work, args.compute_capability)
    text = markdown(rows, args.compute_capability, argv, time.perf_counter() - t0)
    if args.out:
        write(Path(args.out), text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
