"""How onnxquant's quantization time and peak memory grow with model size (paper recipe).

    zoo models, ~1 M .. ~80 M params (random weights; exported when missing)
    + one synthetic > 2 GB model built here (Conv chain + Softmax attention + big MLP
      MatMuls, saved with external data), so the output is > 2 GB too and must be saved
      with external data; the output is then loaded and run in onnxruntime.

Each quantization runs in its own subprocess (bench_peers' worker): wall time from load to
saved output and the subprocess's peak RSS (VmHWM). Repeats alternate the models; medians.

    python tools/bench_scaling.py [--models a,b] [--repeats 3] [--no-synthetic]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_peers as bp
from benchlib import (CALIB, asset_name, begin, file_mb, header, kept_notes, median, ort_session,
                      table)

MODELS = ("mobilevit_xxs", "efficientformerv2_s0", "mobilevit_s", "efficientformer_l1",
          "efficientformer_l3", "efficientformer_l7")
# Synthetic model: 12 blocks on 1024 channels x 16 tokens. Per block a 3x3 Conv (37.7 MB,
# quantized to uint8 by the paper recipe) and float MatMuls the recipe keeps in float
# (q/k/v/o 16.8 MB + MLP 1024->19456->1024 159 MB): input 2.39 GiB, output 2.07 GiB, both
# above protobuf's 2 GiB limit.
SYN = {"channels": 1024, "side": 4, "blocks": 12, "hidden": 19456, "classes": 1000}


# ---- synthetic model (built in a subprocess) -------------------------------------------

def _build_synthetic(job: dict) -> dict:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c, side, hidden = SYN["channels"], SYN["side"], SYN["hidden"]
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def weight(name, shape, fan_in, gain=1.0):
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(gain / np.sqrt(fan_in))
        inits.append(numpy_helper.from_array(w, name))
        return name

    def const(name, values, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    const("tokens_shape", [0, c, side * side])
    const("image_shape", [0, c, side, side])
    const("scale", np.float32(1 / np.sqrt(c)), np.float32)
    x = "input"
    for b in range(SYN["blocks"]):
        p = f"b{b}."
        y = node("Conv", [x, weight(p + "conv.w", [c, c, 3, 3], 9 * c, 0.5),
                          const(p + "conv.b", np.zeros(c), np.float32)], p + "conv", pads=[1] * 4)
        x = node("Add", [x, node("Relu", [y], p + "relu")], p + "conv_res")
        t = node("Transpose", [node("Reshape", [x, "tokens_shape"], p + "to_tokens")],
                 p + "tokens", perm=[0, 2, 1])
        q, k, v = (node("MatMul", [t, weight(p + n + ".w", [c, c], c)], p + n) for n in "qkv")
        s = node("MatMul", [q, node("Transpose", [k], p + "kT", perm=[0, 2, 1])], p + "qk")
        a = node("Softmax", [node("Mul", [s, "scale"], p + "scaled")], p + "softmax", axis=-1)
        o = node("MatMul", [node("MatMul", [a, v], p + "av"), weight(p + "o.w", [c, c], c, 0.5)],
                 p + "o")
        t = node("Add", [t, o], p + "attn_res")
        h = node("Relu", [node("MatMul", [t, weight(p + "fc1.w", [c, hidden], c)], p + "fc1")],
                 p + "mlp_relu")
        t = node("Add", [t, node("MatMul", [h, weight(p + "fc2.w", [hidden, c], hidden, 0.5)],
                                 p + "fc2")], p + "mlp_res")
        x = node("Reshape", [node("Transpose", [t], p + "channels", perm=[0, 2, 1]),
                             "image_shape"], p + "to_image")
    pooled = node("ReduceMean", [x], "pool", axes=[2, 3], keepdims=0)
    node("MatMul", [pooled, weight("head.w", [c, SYN["classes"]], c)], "logits")
    graph = helper.make_graph(
        nodes, "synthetic_2gb",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", SYN["classes"]])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, job["out"], save_as_external_data=True, all_tensors_to_one_file=True,
                    location=Path(job["out"]).name + ".data", size_threshold=1024)
    np.save(job["calib_out"], rng.standard_normal([32, c, side, side], dtype=np.float32))
    return {"seconds": 0.0}


def _check_output(job: dict) -> dict:
    """The quantized model uses external data, loads in onnxruntime and runs like float."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(job["out"], load_external_data=False)
    external = sum(uses_external_data(t) for t in proto.graph.initializer)
    ops = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    del proto
    x = np.load(job["calib"])[:2]
    outs = {}
    for key in ("model", "out"):
        session = ort_session(job[key])
        outs[key] = session.run(None, {session.get_inputs()[0].name: x})[0]
        del session
    ref, got = outs["model"], outs["out"]
    return {"seconds": 0.0, "external_tensors": external, "ops": ops,
            "finite": bool(np.isfinite(got).all()),
            "rel_err": float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12)),
            "top1_same": float(np.mean(got.argmax(1) == ref.argmax(1)))}


bp.WORKERS.update({"build_synthetic": _build_synthetic, "check_output": _check_output})


# ---- measurements ----------------------------------------------------------------------

def describe(path) -> dict:
    """Parameters (float initializer elements) and nodes, without loading external data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT)
    return {"params": params, "nodes": len(model.graph.node), "mb": file_mb(path),
            "convs": sum(n.op_type == "Conv" for n in model.graph.node),
            "softmax": sum(n.op_type == "Softmax" for n in model.graph.node)}


def in_subprocess(job: dict) -> dict:
    return bp.in_subprocess(job, script=__file__)


def synthetic(work: Path) -> dict:
    out = work / "synthetic_2gb.onnx"
    calib = work / "synthetic_calib.npy"
    start = time.perf_counter()
    in_subprocess({"kind": "build_synthetic", "out": str(out), "calib_out": str(calib)})
    print(f"built {out} ({file_mb(out):.0f} MB) in {time.perf_counter() - start:.0f} s",
          flush=True)
    return {"name": "synthetic_2gb", "path": str(out), "calib": str(calib),
            "source": "synthetic", "pre": {"input_size": SYN["side"]}}


def run_all(models, repeats, work: Path) -> dict:
    results = {m["name"]: [] for m in models}
    for rep in range(repeats):
        order = models if rep % 2 == 0 else models[::-1]
        for model in order:
            if model["name"] == "synthetic_2gb" and rep:
                continue  # one run: ~10 GB peak, minutes
            out = str(work / f"{model['name']}.paper.onnx")
            job = bp.quant_job("onnxquant-paper", model, out, model.get("calib", str(CALIB)))
            res = bp.quantize_once(job, "onnxquant-paper",
                                   f"[{rep + 1}/{repeats}] {model['name']:<22}", __file__)
            if res is not None:
                results[model["name"]].append(res)
    return results


COLUMNS = [("model", "name", ""), ("params M", "params_m", ".1f"), ("nodes", "nodes", "d"),
           ("Conv", "convs", "d"), ("Softmax", "softmax", "d"), ("file MB", "mb", ".0f"),
           ("out MB", "out_mb", ".0f"), ("quant s", "seconds", ".2f"),
           ("calib s", "calibration", ".2f"), ("other s", "other", ".2f"),
           ("peak RSS MB", "rss", ".0f"), ("RSS / file", "rss_ratio", ".1f"),
           ("other ms / M params", "ms_per_mparam", ".1f"), ("other ms / node", "ms_per_node", ".2f")]


def rows_of(models, results) -> list[dict]:
    rows = []
    for m in models:
        runs = results[m["name"]]
        if not runs:
            continue
        med = lambda f: median([f(r) for r in runs])
        other = med(lambda r: r["seconds"] - r["phases"]["calibration"])
        d = describe(m["path"])
        rows.append({**d, "name": m["name"], "params_m": d["params"] / 1e6,
                     "out_mb": runs[-1]["size_mb"], "seconds": med(lambda r: r["seconds"]),
                     "calibration": med(lambda r: r["phases"]["calibration"]), "other": other,
                     "rss": med(lambda r: r["peak_rss_mb"]),
                     "rss_ratio": med(lambda r: r["peak_rss_mb"]) / d["mb"],
                     "ms_per_mparam": other * 1e3 / (d["params"] / 1e6),
                     "ms_per_node": other * 1e3 / d["nodes"], "phases": runs[-1]["phases"]})
    return rows


def fit(rows, x, y) -> str:
    """Least squares y = a + b x and the largest relative residual."""
    xs, ys = np.array([r[x] for r in rows], float), np.array([r[y] for r in rows], float)
    b, a = np.polyfit(xs, ys, 1)
    resid = np.max(np.abs(a + b * xs - ys) / ys)
    r = np.corrcoef(xs, ys)[0, 1]
    return f"{y} = {a:.3g} + {b:.3g} * {x}  (r = {r:.3f}, max relative residual {resid:.0%})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-synthetic", action="store_true", help="skip the > 2 GB model")
    parser.add_argument("--workdir", help="keep models here (default: a temp folder, removed)")
    parser.add_argument("--out", default="docs/scaling.md")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scaling."))
    work.mkdir(parents=True, exist_ok=True)
    info, command = begin(work, __file__, argv)
    try:
        models = [bp.resolve(n) for n in args.models.split(",") if n]
        for m in models:
            if m["class_map"] is not None:  # reference checkpoint: use the 224 px zoo export
                m.update(bp.resolve(str(bp.zoo_path(m["name"]))), name=m["name"])
        if not args.no_synthetic:
            models.append(synthetic(work))
        results = run_all(models, args.repeats, work)
        rows = rows_of(models, results)
        check = None
        if not args.no_synthetic and results["synthetic_2gb"]:
            syn = models[-1]
            check = in_subprocess({"kind": "check_output", "model": syn["path"],
                                   "out": str(work / "synthetic_2gb.paper.onnx"),
                                   "calib": syn["calib"]})
            print("synthetic output check:", json.dumps(check))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    text = table(rows, COLUMNS)
    zoo = [r for r in rows if r["name"] != "synthetic_2gb"]
    fits = [fit(zoo, "params_m", "other"), fit(zoo, "nodes", "other"),
            fit(zoo, "params_m", "seconds"), fit(zoo, "params_m", "rss")]
    print("\n" + text + "\n\n" + "\n".join(fits))
    if args.out:
        write_report(Path(args.out), info, command, args, rows, text, fits, check)
    return 0


def write_report(path, info, command, args, rows, text, fits, check) -> None:
    phases = "\n".join(f"- {r['name']}: " + ", ".join(f"{k} {v:.2f} s" for k, v in
                                                      r["phases"].items()) for r in rows)
    syn = ""
    if check:
        syn = (f"\nSynthetic > 2 GB model ({SYN}): onnxquant loaded it (external data), quantized "
               f"it and saved the output with external data ({check['external_tensors']} "
               f"initializers in `<out>.data`); onnxruntime loaded the output and ran it: "
               f"finite={check['finite']}, max |quant - float| / max |float| = "
               f"{check['rel_err']:.3g}, top-1 same on {check['top1_same']:.0%} of 2 random "
               f"inputs. Output ops: {check['ops']}.\n")
    failed = "".join(f"\nFAILED {m} ({t}): `{e}`\n" for (m, t), e in bp.FAILURES.items())
    notes = kept_notes(path)
    path.write_text(f"""# onnxquant quantization time and memory vs model size

{header(info, command)}
Paper recipe (`QuantConfig(target="paper")`), 32 calibration images of `{asset_name(CALIB)}` (224 px
zoo exports with random weights; the synthetic model calibrates on 32 random inputs).
Each quantization in its own subprocess, {args.repeats} repeats alternating the models
(synthetic once), medians. quant s = load .. saved; calib s = the calibration phase (float
inference over 32 images + JPEG decoding, which grows with FLOPs, not with parameters);
other s = quant s - calib s (load, passes, emit, checker, save); peak RSS = VmHWM of the
subprocess (imports included).

{text}

Phases of the last repeat:
{phases}
{syn}{failed}
Linear fits over the zoo models (synthetic excluded):

""" + "\n".join(f"- {f}" for f in fits) + "\n" + notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        bp.worker_main(sys.argv[2])
    else:
        sys.exit(main())
