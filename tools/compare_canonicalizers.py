"""Compare graph canonicalizers on the models onnxquant matches: what each changes, at what cost.

    for each model, for each tool (a copy of the ModelProto in, a ModelProto out):
        median wall time; op counts before/after; attention Softmaxes feeding a MatMul
        directly; float initializers kept bit-exact / changed under the same name / renamed
        / merged / removed, new values; node outputs still named as in the input model;
        max |diff| of outputs vs the original in onnxruntime (seeded input); input/output
        names kept; opset changed; exception
    --bn: Conv + BatchNormalization in onnxruntime's own optimized graph (float recognizer;
        quantized, weights as DequantizeLinear with fold_batchnorm=False / True, or as
        Cast -> Sub -> Mul) and the 8-bit error of the weight that runs when it is
        quantized before or after the fold

Tools: onnxscript's optimizer (defaults); onnx-ir + onnxscript reduced to what our pass does
(no-op Dropout/Cast rules, IdentityEliminationPass); onnxslim (defaults); onnxslim with
dead-node elimination only; onnxquant.api.analyze (passes/canonicalize.py and
passes/fold_batchnorm.py), exported with onnx_graphsurgeon. A library that does not import
gets "not installed". "toy11" is built here: opset 11 with Identity, Dropout, a no-op Cast
and Conv -> BatchNormalization. Results: docs/canonicalize.md.

    /tmp/venv-canon/bin/python tools/compare_canonicalizers.py [--models rec,toy11] [--bn]
        [--json F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
MODELS = {  # key -> (path under ASSETS or None: built here, input shape of the seeded check)
    "rec": ("real/PP-OCRv6_rec_small.onnx", (1, 3, 48, 320)),
    "det": ("real/PP-OCRv6_det_small.onnx", (1, 3, 640, 640)),
    "mobilevit_xxs": ("reference/mobilevit_xxs.imagenette.onnx", (1, 3, 128, 128)),
    "mobilevitv2_050": ("reference/mobilevitv2_050.imagenette.onnx", (1, 3, 128, 128)),
    "toy11": (None, (1, 4, 8, 8)),
}
PACKAGES = ("onnx", "onnxruntime", "numpy", "onnxscript", "onnx-ir", "onnxslim",
            "onnx-graphsurgeon", "onnxquant")
WATCHED = ("Identity", "Dropout", "Cast", "BatchNormalization", "Constant")
PASSTHROUGH = ("Identity", "Dropout", "Cast")


def onnxscript_optimize(model):
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model)


def onnx_ir_minimal(model):
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.rules.common import (dropout_inference_rule, dropout_zero_rule,
                                                  no_op_cast_rule)

    model = ir.serde.deserialize_model(model)
    model = rewrite(model, [dropout_inference_rule, dropout_zero_rule, no_op_cast_rule])
    ir.passes.Sequential(common.IdentityEliminationPass(), common.RemoveUnusedNodesPass())(model)
    return ir.serde.serialize_model(model)


def onnxslim_default(model):
    import onnxslim

    return onnxslim.slim(model)


def onnxslim_dead_nodes(model):
    import onnxslim

    skip = ["constant_folding", "graph_fusion", "subexpression_elimination", "weight_tying"]
    return onnxslim.slim(model, skip_optimizations=skip)


def onnxquant_analyze(model):
    import onnx_graphsurgeon as gs
    from onnxquant.api import analyze

    graph, _ = analyze(model)
    return gs.export_onnx(graph)


TOOLS = {  # column -> (function, module that must import)
    "onnxscript optimize": (onnxscript_optimize, "onnxscript"),
    "onnx-ir minimal": (onnx_ir_minimal, "onnxscript"),
    "onnxslim": (onnxslim_default, "onnxslim"),
    "onnxslim dead-node": (onnxslim_dead_nodes, "onnxslim"),
    "onnxquant": (onnxquant_analyze, "onnxquant"),
}


def versions() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import versions as installed_versions

    return installed_versions(*PACKAGES)


def installed(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def toy11() -> onnx.ModelProto:
    """Opset 11: x -> Conv -> BN -> Cast(float) -> Dropout -> Relu -> [1,4,64] -> t;
    Softmax(t t^T) -> Dropout -> Identity -> MatMul(., t) -> y (paddle2onnx-like leftovers)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("W", rng.normal(size=(4, 4, 1, 1))), ("gamma", rng.uniform(0.1, 3, 4)),
        ("beta", rng.normal(size=4)), ("mean", rng.normal(size=4)),
        ("var", rng.uniform(0.1, 2, 4)))] + [numpy_helper.from_array(np.array([1, 4, 64]), "shape")]
    nodes = [helper.make_node(*a, name=n, **kw) for n, a, kw in (
        ("conv", ("Conv", ["x", "W"], ["c"]), {}),
        ("bn", ("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"]), {}),
        ("cast", ("Cast", ["b"], ["f"]), {"to": TensorProto.FLOAT}),
        ("drop1", ("Dropout", ["f"], ["d"]), {"ratio": 0.1}),
        ("relu", ("Relu", ["d"], ["r"]), {}),
        ("reshape", ("Reshape", ["r", "shape"], ["t"]), {}),
        ("kt", ("Transpose", ["t"], ["tt"]), {"perm": [0, 2, 1]}),
        ("qk", ("MatMul", ["t", "tt"], ["s"]), {}),
        ("softmax", ("Softmax", ["s"], ["p"]), {"axis": 2}),
        ("drop2", ("Dropout", ["p"], ["pd"]), {"ratio": 0.1}),
        ("ident", ("Identity", ["pd"], ["pi"]), {}),
        ("av", ("MatMul", ["pi", "t"], ["y"]), {}))]
    graph = helper.make_graph(nodes, "toy11",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 64])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)
    onnx.checker.check_model(model, full_check=True)
    return model


# ---- measurements -------------------------------------------------------------------------

def opset(model) -> dict:
    return {d.domain or "ai.onnx": d.version for d in model.opset_import}


def _digest(arr: np.ndarray) -> str:
    """dtype + bytes, shape ignored: a bias reshaped from 1xCx1x1 to C is the same value."""
    arr = np.ascontiguousarray(arr)
    return hashlib.sha1(str(arr.dtype).encode() + arr.tobytes()).hexdigest()


def float_tensors(model, constants: bool = True) -> dict:
    """name -> digest of every float initializer (and Constant node value)."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node if constants else ():
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                out[node.output[0]] = numpy_helper.to_array(attr.t)
    return {k: _digest(v) for k, v in out.items() if v.dtype.kind == "f"}


def weights_report(before, after) -> dict:
    """Fate of each float initializer of ``before`` in ``after`` (by name, then by value)."""
    old, new, old_all = float_tensors(before, False), float_tensors(after), float_tensors(before)
    new_by_value: dict = {}
    for name, digest in new.items():
        new_by_value.setdefault(digest, set()).add(name)
    sizes = {t.name: int(np.prod(t.dims)) for t in before.graph.initializer}
    fate = Counter()
    for name, digest in old.items():
        if name in new:
            fate["kept" if new[name] == digest else "changed"] += 1
        elif digest not in new_by_value:
            fate["removed"] += 1
        elif new_by_value[digest] & set(old):
            fate["merged"] += 1
            fate["merged_nonscalar"] += sizes[name] > 1
        else:
            fate["renamed"] += 1
    old_values = set(old_all.values())
    fate["new"] = sum(d not in old_values for d in new.values())
    convs = [n for n in after.graph.node if n.op_type == "Conv" and len(n.input) > 1]
    fate["conv_w_exact"] = sum(new.get(n.input[1]) in old_values for n in convs)
    fate["conv"] = len(convs)
    return dict(fate)


def softmax_to_matmul(model, through: tuple = ()) -> int:
    """Softmax nodes whose output reaches a MatMul directly (or through ``through`` ops)."""
    consumers: dict = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    count = 0
    for node in (n for n in model.graph.node if n.op_type == "Softmax"):
        frontier = list(consumers.get(node.output[0], []))
        while frontier:
            nxt = frontier.pop()
            if nxt.op_type == "MatMul":
                count += 1
                break
            if nxt.op_type in through:
                frontier += consumers.get(nxt.output[0], [])
    return count


def activation_names(before, after) -> list:
    """[node outputs of ``after`` named as a tensor of ``before``, all node outputs]:
    calibration runs the input model and reads tensors by these names."""
    names = {o for n in before.graph.node for o in n.output}
    outs = [o for n in after.graph.node for o in n.output if o]
    return [sum(o in names for o in outs), len(outs)]


def session(model, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, save: str | None = None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.graph_optimization_level = level
    if save:
        opts.optimized_model_filepath = save
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_outputs(model, x: np.ndarray) -> list:
    sess = session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x})


def timed(fn, model, repeats: int):
    """(result of the last run, median seconds); each run gets a fresh copy (not timed)."""
    times = []
    for _ in range(repeats):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        t0 = time.perf_counter()
        out = fn(copy)
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def _io(model) -> list:
    return [[i.name for i in model.graph.input], [o.name for o in model.graph.output]]


def measure(tool, model, x, reference, repeats: int) -> dict:
    out, seconds = timed(TOOLS[tool][0], model, repeats)
    before, after = (Counter(n.op_type for n in m.graph.node) for m in (model, out))
    row = {"seconds": round(seconds, 3), "nodes": [len(model.graph.node), len(out.graph.node)],
           "ops_changed": {op: [before[op], after[op]] for op in sorted(set(before) | set(after))
                           if before[op] != after[op]},
           "watched": {op: after[op] for op in WATCHED}, "softmax_matmul": softmax_to_matmul(out),
           "weights": weights_report(model, out), "names_kept": _io(model) == _io(out),
           "activations_named_as_input": activation_names(model, out),
           "opset": opset(out), "opset_changed": opset(out) != opset(model)}
    try:
        got = run_outputs(out, x)
        row["max_abs_diff"] = max(float(np.abs(np.asarray(a, np.float64) - b).max())
                                  for a, b in zip(got, reference))
    except Exception as exc:  # noqa: BLE001 - an unrunnable result is a finding
        row["ort_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return row


def load(key: str) -> onnx.ModelProto:
    rel = MODELS[key][0]
    return toy11() if rel is None else onnx.load(ASSETS / rel)


def compare(keys, tools, repeats: int) -> dict:
    results = {}
    for key in keys:
        model = load(key)
        x = np.random.default_rng(0).uniform(-1, 1, MODELS[key][1]).astype(np.float32)
        reference = [np.asarray(a, np.float64) for a in run_outputs(model, x)]
        ops = Counter(n.op_type for n in model.graph.node)
        results[key] = {"_original": {
            "nodes": len(model.graph.node), "opset": opset(model),
            "watched": {op: ops[op] for op in WATCHED},
            "attention_softmax": softmax_to_matmul(model, PASSTHROUGH),
            "softmax_matmul": softmax_to_matmul(model),
            "float_initializers": len(float_tensors(model, constants=False))}}
        for tool in tools:
            if not installed(TOOLS[tool][1]):
                results[key][tool] = "not installed"
                continue
            try:
                results[key][tool] = measure(tool, model, x, reference, repeats)
            except Exception as exc:  # noqa: BLE001 - a crash is a finding
                first = (str(exc).splitlines() or [""])[0][:160]
                results[key][tool] = {"error": f"{type(exc).__name__}: {first}"}
            print(f"{key:16s} {tool:20s} done", file=sys.stderr)
    return results


# ---- BatchNormalization: onnxruntime's fusion and quantization error ----------------------

def ort_optimized_ops(model, level) -> Counter:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        session(model, level, save=path)
        return Counter(n.op_type for n in onnx.load(path).graph.node)


def bn_weight_error(model) -> list:
    """Per Conv -> BatchNormalization pair: relative L2 error of the weight that runs
    (W * k, k = gamma / sqrt(var + eps)) when 8-bit asymmetric quantization (per tensor, the
    paper recipe, or per channel) is applied before the fold, Q(W) * k, or after, Q(W * k)."""
    from onnxquant.quantizers import uniform_fake_quant

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    rows = []
    for bn in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv":
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, _, _, var = (inits[n].astype(np.float64) for n in bn.input[1:5])
        k = (gamma / np.sqrt(var + eps)).reshape(-1, 1, 1, 1)
        w = inits[conv.input[1]]
        runs = w * k
        row = {"conv": conv.name, "k min/max": [float(k.min()), float(k.max())]}
        for axis, scheme in ((None, "per-tensor"), (0, "per-channel")):
            for order, approx in (("quantize then fold", uniform_fake_quant(w, axis=axis) * k),
                                  ("fold then quantize",
                                   uniform_fake_quant(runs.astype(np.float32), axis=axis))):
                err, ref = (a.reshape(len(k), -1) for a in (approx - runs, runs))
                per_ch = np.linalg.norm(err, axis=1) / np.linalg.norm(ref, axis=1)
                row[f"{scheme} {order}"] = {
                    "rel": round(float(np.linalg.norm(err) / np.linalg.norm(runs)), 4),
                    "worst channel": round(float(per_ch.max()), 4)}
        rows.append(row)
    return rows


def bn_study() -> dict:
    """Does BatchNormalization survive onnxruntime's load-time fusion, float and quantized?"""
    import onnxquant

    model = load("rec")
    calib = np.random.default_rng(0).uniform(-1, 1, (8, 3, 48, 320)).astype("float32")
    variants = {"float": model}
    for fmt, fold in (("qdq", False), ("qdq", True), ("folded", False)):
        cfg = onnxquant.QuantConfig(fold_batchnorm=fold, weight_format=fmt)
        variants[f"quantized {fmt} fold_batchnorm={fold}"] = onnxquant.quantize(
            model, cfg, calibration=calib)
    levels = {"BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    watch = ("BatchNormalization", "Conv", "FusedConv", "DequantizeLinear", "Cast")
    out = {}
    for name, m in variants.items():
        ops = Counter(n.op_type for n in m.graph.node)
        out[name] = {"file": {"nodes": len(m.graph.node), **{op: ops[op] for op in watch}}}
        for level_name, level in levels.items():
            opt = ort_optimized_ops(m, level)
            out[name][level_name] = {"nodes": sum(opt.values()), **{op: opt[op] for op in watch}}
    out["weight error"] = bn_weight_error(model)
    return out


# ---- report -------------------------------------------------------------------------------

ROWS = ("seconds", "nodes", "Id/Drop/Cast/BN/Const", "Softmax->MatMul",
        "weights kept/changed/renamed/merged/removed/new", "Conv W bit-exact",
        "activation names from input", "max abs diff", "I/O names kept", "opset")


def cell(row, what: str) -> str:
    if isinstance(row, str) or "error" in row:
        return row if isinstance(row, str) else "crash: " + row["error"]
    w = row["weights"]
    if what == "weights kept/changed/renamed/merged/removed/new":
        return "/".join(str(w.get(k, 0)) for k in ("kept", "changed", "renamed", "merged",
                                                   "removed", "new"))
    return {
        "seconds": f"{row['seconds']:.2f}",
        "nodes": f"{row['nodes'][0]} -> {row['nodes'][1]}",
        "Id/Drop/Cast/BN/Const": "/".join(str(row["watched"][op]) for op in WATCHED),
        "Softmax->MatMul": str(row["softmax_matmul"]),
        "Conv W bit-exact": f"{w['conv_w_exact']}/{w['conv']}",
        "activation names from input": "{}/{}".format(*row["activations_named_as_input"]),
        "max abs diff": row.get("ort_error") or f"{row['max_abs_diff']:.1e}",
        "I/O names kept": "yes" if row["names_kept"] else "NO",
        "opset": ("changed " if row["opset_changed"] else "") + str(row["opset"].get("ai.onnx")),
    }[what]


def markdown(results: dict, tools) -> str:
    lines = []
    for key, per_tool in results.items():
        o = per_tool["_original"]
        lines += [f"\n### {key}: opset {o['opset'].get('ai.onnx')}, {o['nodes']} nodes, "
                  f"Id/Drop/Cast/BN/Const {'/'.join(str(o['watched'][op]) for op in WATCHED)}, "
                  f"{o['float_initializers']} float initializers, {o['attention_softmax']} "
                  f"attention Softmax ({o['softmax_matmul']} feeding MatMul directly)\n",
                  "| | " + " | ".join(tools) + " |", "|---" * (len(tools) + 1) + "|"]
        lines += [f"| {what} | " + " | ".join(cell(per_tool[t], what) for t in tools) + " |"
                  for what in ROWS]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of " + ",".join(MODELS))
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of " + ",".join(TOOLS))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per tool (median)")
    ap.add_argument("--bn", action="store_true", help="also the BatchNormalization study")
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    report = {"versions": versions(),
              "results": compare(args.models.split(","), tools, args.repeats)}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(markdown(report["results"], tools))
    if args.bn:
        report["bn"] = bn_study()
        print("\n" + json.dumps(report["bn"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
