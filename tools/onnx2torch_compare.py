"""Compare ONNX -> PyTorch routes for block reconstruction (docs/blocks.md).

    onnx2torch   onnx2torch.convert(model)            -> torch.fx.GraphModule
    onnx2pytorch onnx2pytorch.ConvertModel(model)     -> nn.Module
    interp       onnxquant.torch_graph.GraphModule    -> nn.Module running the graph node by
                                                         node in torch (torch_ops.OPS, 68 op types)

On the 12 timm hybrids of models/zoo.py (seeded random weights, exported with
``onnxquant.models.export.zoo_cache`` at 64 px, timm's own size where 64 px does not run)
and the real models in ../shared/assets/real (opset 11 as shipped, and after
``onnx.version_converter.convert_version(m, 13)``), per converter: does it convert (ops it
lacks), max |torch - onnxruntime| on a seeded input, forward time (median of 20, one
thread, torch.inference_mode), whether a backward pass runs and reaches the weights
(fraction of the ONNX float initializer elements whose parameter gets a gradient), and,
for onnxquant's canonical graph (``--forms canonical``) or its quantized output
(``--forms quantized-paper quantized-tensorrt``), how many extracted blocks
(onnxquant.blocks) convert and match onnxruntime on their real boundary values.

Installs nothing; run it in a venv with torch, timm, onnx, onnxruntime, onnx2torch,
onnx2pytorch and this project (docs/blocks.md has the commands):

    python tools/onnx2torch_compare.py --out /tmp/o2t            # all models, raw + canonical
    python tools/onnx2torch_compare.py --models mobilevit_xxs --converters interp
    python tools/onnx2torch_compare.py --summarize /tmp/o2t/results.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from onnxquant.torch_graph import GraphModule, missing_ops, resolve

REAL = Path(__file__).resolve().parents[2] / "shared" / "assets" / "real"
REAL_SHAPES = {"PP-OCRv6_rec_small": (1, 3, 48, 160), "PP-OCRv6_det_small": (1, 3, 128, 128)}
CONVERTERS = ("onnx2torch", "onnx2pytorch", "interp")

# ---- the harness (the interpreter itself is onnxquant.torch_graph) ----------------------

def unsupported(model: onnx.ModelProto, converter: str) -> list:
    """Op types of ``model`` the converter has no mapping for (static check)."""
    ops = sorted({(n.domain or "", n.op_type) for n in model.graph.node})
    opset = {o.domain or "": o.version for o in model.opset_import}
    if converter == "interp":
        return missing_ops(model)
    if converter == "onnx2torch":
        from onnx2torch.node_converters.registry import get_converter

        lacking = []
        for domain, op in ops:
            try:
                get_converter(op, opset.get(domain, 1), domain)
            except NotImplementedError:
                lacking.append(op)
        return lacking
    import inspect

    from onnx2pytorch.convert import operations

    source = inspect.getsource(operations)
    return [op for _, op in ops if f'"{op}"' not in source]


def convert(model: onnx.ModelProto, converter: str) -> torch.nn.Module:
    """The converter's module for a copy of ``model`` (onnx2pytorch edits the model it
    converts: PP-OCRv6_rec's BatchNormalization inputs)."""
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    model = fresh
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if converter == "onnx2torch":
            import onnx2torch

            return onnx2torch.convert(model)
        if converter == "onnx2pytorch":
            from onnx2pytorch import ConvertModel

            return ConvertModel(model, experimental=True)
        return GraphModule(model, trainable=True)


def median_time(fn, runs: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _first(out):
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out


def gradient_reach(module: torch.nn.Module, x: torch.Tensor, model: onnx.ModelProto) -> dict:
    """Backward of sum(output^2): does it run, and what share of the ONNX float weight
    elements (BatchNormalization statistics excluded) sit in parameters that receive a
    gradient (capped at 1: a converter may add parameters of its own)."""
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    stats = {resolve(t, alias) for n in model.graph.node
             if n.op_type == "BatchNormalization" for t in n.input[3:5]}
    weights = sum(int(np.prod(i.dims)) for i in model.graph.initializer
                  if i.data_type in (1, 10, 11, 16) and i.name not in stats)
    for p in module.parameters():
        p.requires_grad_(True)
        p.grad = None
    out = _first(module(x))
    (out.float() ** 2).sum().backward()
    reached = sum(p.numel() for p in module.parameters() if p.grad is not None)
    params = sum(p.numel() for p in module.parameters())
    return {"backward": True, "params": params, "weights": weights,
            "reached": round(min(1.0, reached / max(weights, 1)), 3)}


def block_coverage(model: onnx.ModelProto, blocks: list, x: np.ndarray, converters: list) -> dict:
    """Per converter: how many blocks (onnxquant.blocks.extract of the canonical graph)
    convert and match onnxruntime within 1e-4 of their output's max |value|."""
    from onnxquant.blocks import Block, block_inputs, extract, value_types

    every = Block("conv_block", "all", inputs=tuple({t for b in blocks for t in b.outputs}))
    values = {model.graph.input[0].name: x, **block_inputs(model, every, {model.graph.input[0].name: x})}
    types = value_types(model)
    counts = {c: 0 for c in converters}
    failures = {c: {} for c in converters}
    for b in blocks:
        sub = extract(model, b, types)
        args = [torch.from_numpy(np.ascontiguousarray(values[i.name])) for i in sub.graph.input]
        for c in converters:
            try:
                with torch.inference_mode():
                    out = convert(sub, c).eval()(*args)
                out = out if isinstance(out, (list, tuple)) else [out]
                ok = all(np.abs(np.asarray(o, np.float64) - values[t]).max()
                         <= 1e-4 * np.abs(values[t]).max() + 1e-6
                         for o, t in zip(out, b.outputs))
                counts[c] += ok
                if not ok:
                    failures[c]["wrong numerics"] = failures[c].get("wrong numerics", 0) + 1
            except Exception as err:  # noqa: BLE001 - counted per kind of error
                key = f"{type(err).__name__}: {str(err).splitlines()[0][:60]}" if str(err) else type(err).__name__
                failures[c][key] = failures[c].get(key, 0) + 1
    return {c: {"ok": counts[c], "blocks": len(blocks), "failures": failures[c]} for c in converters}


def measure(model: onnx.ModelProto, x: np.ndarray, converter: str, runs: int, ref) -> dict:
    row = {"unsupported": unsupported(model, converter)}
    t = time.perf_counter()
    try:
        module = convert(model, converter).eval()
    except Exception as err:  # noqa: BLE001 - recorded, not raised: this is the comparison
        row["error"] = f"convert: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    row["convert_s"] = round(time.perf_counter() - t, 2)
    xt = torch.from_numpy(x)
    try:
        with torch.inference_mode():
            out = _first(module(xt)).float().numpy()
            row["forward_ms"] = round(1e3 * median_time(lambda: module(xt), runs), 2)
    except Exception as err:  # noqa: BLE001
        row["error"] = f"forward: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    if out.shape != ref.shape:
        row["error"] = f"output shape {out.shape} vs {ref.shape}"
        return row
    row["max_abs"] = float(np.abs(out - ref).max())
    row["rel"] = float(row["max_abs"] / max(float(np.abs(ref).max()), 1e-30))
    try:
        row.update(gradient_reach(module, xt, model))
    except Exception as err:  # noqa: BLE001
        row["backward"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return row


def ort_reference(model: onnx.ModelProto, x: np.ndarray, runs: int):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    out = session.run(None, feed)[0]
    return out, round(1e3 * median_time(lambda: session.run(None, feed), runs), 2)


def zoo_models(size: int, names=None) -> list:
    """(label, path, input shape) of the zoo exports, exporting once into the zoo cache."""
    from onnxquant.models import zoo
    from onnxquant.models.export import zoo_cache

    found = []
    for name in names or zoo.names():
        try:
            path, side = zoo_cache(name, input_size=size), size
        except Exception:  # noqa: BLE001 - fixed-size models (EfficientFormer v1): timm's size
            path, side = zoo_cache(name), zoo.get(name).input_size
        found.append((name, path, (1, 3, side, side)))
    return found


def real_models(names=None) -> list:
    """(label, ModelProto loader, shape): as shipped (opset 11) and converted to 13."""
    from onnx import version_converter

    found = []
    for stem, shape in REAL_SHAPES.items():
        path = REAL / f"{stem}.onnx"
        if not path.exists() or (names and stem not in names):
            continue
        found.append((f"{stem} (opset 11)", path, shape))
        found.append((f"{stem} (opset 13)",
                      lambda p=path: version_converter.convert_version(onnx.load(p), 13), shape))
    return found


def canonical(model: onnx.ModelProto):
    """(graph, block map) as onnxquant makes them: Identity/Dropout/no-op Cast bypassed,
    inference BatchNormalization folded into its Conv; blocks are extracted from this."""
    import onnx_graphsurgeon as gs

    import onnxquant

    graph, plan = onnxquant.analyze(model)
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    return out, plan.blocks


def static_shapes(model: onnx.ModelProto, shape) -> onnx.ModelProto:
    """Fix the input to ``shape`` and infer every tensor's shape, propagating Shape values:
    onnx2torch sizes nn.LayerNorm from the inferred shape of its input."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, shape):
        dim.Clear()
        dim.dim_value = size
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def quantized(model: onnx.ModelProto, target: str, shape):
    """(onnxquant output with its model-local functions inlined, blocks of its float
    graph): the form block reconstruction starts from. Calibration: 4 seeded images."""
    from onnx import inliner

    import onnxquant

    calib = np.random.default_rng(1).standard_normal((4, *shape[1:])).astype(np.float32)
    quant = onnxquant.quantize(model, onnxquant.QuantConfig(target=target), calibration=calib)
    upgraded, _ = onnxquant.opset.upgrade(model, "model")
    return inliner.inline_local_functions(quant), canonical(upgraded)[1]


def _form(model, form: str, shape):
    if form == "canonical":
        return canonical(model)
    if form.startswith("quantized-"):
        return quantized(model, form.split("-", 1)[1], shape)
    return model, []


def run_all(models: list, converters: list, runs: int, forms: list, with_blocks=True) -> list:
    rows = []
    for (name, source, shape), form in [(m, f) for m in models for f in forms]:
        model = source() if callable(source) else onnx.load(str(source))
        model, blocks = _form(model, form, shape)
        model = static_shapes(model, shape)
        label = f"{name} [{form}]"
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        ref, ort_ms = ort_reference(model, x, runs)
        row = {"model": label, "shape": list(shape), "nodes": len(model.graph.node),
               "ops": len({n.op_type for n in model.graph.node}), "ort_ms": ort_ms,
               "ref_max": float(np.abs(ref).max())}
        for converter in converters:
            try:
                row[converter] = measure(model, x, converter, runs, ref)
            except Exception:  # noqa: BLE001 - a crash of one converter is a result too
                row[converter] = {"error": traceback.format_exc().splitlines()[-1][:160]}
        if blocks and with_blocks:
            row["blocks"] = block_coverage(model, blocks, x, converters)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _cell(r: dict) -> str:
    if "error" in r:
        lacking = f" (lacks {', '.join(r['unsupported'])})" if r.get("unsupported") else ""
        return f"fails{lacking}: {r['error'][:70]}"
    grad = (f"grad {r['reached']:.0%}" if r.get("backward") is True
            else f"no backward ({str(r.get('backward'))[:40]})")
    return f"{r['rel']:.0e} rel / {r['forward_ms']:.1f} ms / {grad}"


def table(rows: list, converters: list) -> str:
    """Markdown: per model, per converter 'max rel diff / forward ms / gradient reach
    [/ extracted blocks that convert and match]'."""
    head = "| model | nodes | ops | onnxruntime ms | " + " | ".join(converters) + " |"
    lines = [head, "|" + "---|" * (4 + len(converters))]
    for row in rows:
        blocks = row.get("blocks", {})
        cells = [_cell(row[c]) + (f" / blocks {blocks[c]['ok']}/{blocks[c]['blocks']}"
                                  if c in blocks else "") for c in converters]
        lines.append(f"| {row['model']} | {row['nodes']} | {row['ops']} | {row['ort_ms']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


REASONS = (  # error text -> what it means, for the summary tables
    ("onnx::Conv_", "weight behind Identity"), ("conv_dw.bias", "weight behind Identity"),
    ("missing 2 required positional", "weight behind Identity"),
    ("takes 2 positional arguments", "weight behind Identity"),
    ("normalized_shape", "LayerNorm needs static shapes"), ("SAME_UPPER", "no auto_pad SAME_UPPER"),
    ("training_mode", "BatchNorm training_mode attr"), ("Converter is not implemented", "no Q/DQ"),
    ("IndexError", "IndexError on Q/DQ graph"))


def _short(r: dict) -> str:
    if "error" in r:
        return "fails: " + next((why for key, why in REASONS if key in r["error"]), r["error"][:40])
    return f"ok {r['rel']:.0e}" if r["rel"] < 1e-3 else f"wrong output (rel {r['rel']:.0e})"


def summary(rows: list, converters: list) -> str:
    """Compact tables: whole models (raw | canonical or quantized) and, per model, blocks
    that match / gradient reach / forward ms (median of the timed runs, one thread)."""
    models = list(dict.fromkeys(r["model"].rsplit(" [", 1)[0] for r in rows))
    forms = list(dict.fromkeys(r["model"].rsplit(" [", 1)[1][:-1] for r in rows))
    by = {(r["model"].rsplit(" [", 1)[0], r["model"].rsplit(" [", 1)[1][:-1]): r for r in rows}
    head = "| model | " + " | ".join(f"{c} {f}" for c in converters for f in forms) + " |"
    lines = [head, "|---|" + "---|" * (len(converters) * len(forms))]
    for m in models:
        cells = [_short(by[m, f][c]) if (m, f) in by else "" for c in converters for f in forms]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| model [form] | blocks matching: " + " / ".join(converters) +
              " | gradient reach | forward ms: onnxruntime / " + " / ".join(converters) + " |",
              "|---|---|---|---|"]
    for r in rows:
        if "blocks" not in r:
            continue
        blocks = " / ".join(f"{r['blocks'][c]['ok']}/{r['blocks'][c]['blocks']}" for c in converters)
        grad = " / ".join(f"{r[c]['reached']:.0%}" if r[c].get("backward") is True else "-"
                          for c in converters)
        ms = " / ".join(f"{r[c]['forward_ms']:.0f}" if "forward_ms" in r[c] else "-"
                        for c in converters)
        lines.append(f"| {r['model']} | {blocks} | {grad} | {r['ort_ms']:.1f} / {ms} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="zoo names or real model stems (default: all)")
    parser.add_argument("--converters", nargs="*", default=list(CONVERTERS), choices=CONVERTERS)
    parser.add_argument("--size", type=int, default=64, help="zoo export side (default 64)")
    parser.add_argument("--runs", type=int, default=20, help="timed forward passes (median)")
    parser.add_argument("--no-blocks", action="store_true",
                        help="skip converting every extracted block of the canonical graph")
    parser.add_argument("--no-real", action="store_true", help="skip ../shared/assets/real")
    parser.add_argument("--forms", nargs="*", default=["raw", "canonical"],
                        choices=["raw", "canonical", "quantized-paper", "quantized-tensorrt"],
                        help="the exported graph as it is, onnxquant's canonical graph (what "
                        "blocks are extracted from), onnxquant's output for a target")
    parser.add_argument("--out", type=Path,
                        help="folder for results.json, table.md and summary.md")
    parser.add_argument("--summarize", type=Path, nargs="*",
                        help="only print the summary tables of these results.json files")
    args = parser.parse_args(argv)
    if args.summarize:
        rows = [r for path in args.summarize for r in json.loads(path.read_text())]
        print(summary(rows, args.converters))
        return 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from onnxquant.models import zoo

    zoo_names = [n for n in (args.models or zoo.names()) if n in zoo.names(True)]
    models = zoo_models(args.size, zoo_names) if zoo_names or not args.models else []
    if not args.no_real:
        models += real_models([n for n in args.models or [] if n not in zoo_names] or None)
    rows = run_all(models, args.converters, args.runs, args.forms, not args.no_blocks)
    md = table(rows, args.converters)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
        (args.out / "table.md").write_text(md + "\n")
        (args.out / "summary.md").write_text(summary(rows, args.converters) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
