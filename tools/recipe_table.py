"""Accuracy of every onnxquant recipe and of onnxruntime's quantize_static on real images.

    for each reference checkpoint (assets/reference/*.imagenette.onnx):
        quantize it with each recipe of RECIPES, with each part alone (ablation, PARTS),
        and with onnxruntime quantize_static (the peer), all calibrated on the same
        32 images of imagenette/train (spread evenly over the classes)
        for each image set: FP32 and every quantized model in one pass (evaluate_many),
        each judged against FP32: top-1, drop, top-1 agreement, mean KL
    -> docs/results.md

Calibration and evaluation images never overlap (train vs val folders).

    python tools/recipe_table.py [--models mobilevit_xxs,...] [--limit N] [--out docs/results.md]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import onnx

import onnxquant
from onnxquant import config as qconfig
from onnxquant.evaluate import compare_results, evaluate_many
from onnxquant.images import Preprocess, iter_batches, list_images, take_evenly

import benchlib  # noqa: E402  (tools/ is on sys.path when a tool runs)

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
REFERENCE = ASSETS / "reference"
CALIB = ASSETS / "imagenette" / "train"
IMAGE_SETS = {"imagenette/val": ASSETS / "imagenette" / "val",
              "imagenet-val/nette": ASSETS / "imagenet-val" / "nette"}
JSON_KEYS = {"imagenette/val": "imagenette-val", "imagenet-val/nette": "imagenet-val-nette"}
NUM_CALIB = 32
CALIB_BATCH = 8

# The recipes compared with the paper's, as QuantConfig overrides. Add a row for a new
# option; a row this QuantConfig rejects (field or value unknown) is listed as skipped.
RECIPES = [
    ("paper (default)", {}),
    ("per-channel", {"per_channel": True}),
    ("symmetric", {"weight_symmetric": True}),
    ("W6", {"weight_bits": 6}),
    ("W4", {"weight_bits": 4}),
    ("softmax 6-bit", {"softmax_bits": 6}),
    ("softmax 4-bit", {"softmax_bits": 4}),
    ("folded weights", {"weight_format": "folded"}),
    ("paper + linear", {"parts": {"conv_block", "transformer", "bridge", "softmax", "linear"}}),
    ("target ort", {"target": "ort"}),  # int8 kinds chosen by timing this CPU
    ("target ort, all int8", {"target": "ort", "ort_int8_kinds": (
        "dense", "pointwise", "grouped", "depthwise", "stem", "linear")}),
    ("target tensorrt", {"target": "tensorrt"}),
]
# Fields no recipe needs to vary here: eps has its own sweep (tools/eps_sweep.py), parts
# the ablation below, and the calibration size is fixed to the paper's 32 images.
NOT_VARIED = {"log2_eps", "parts", "num_calib", "batch_size"}

# Paper, ImageNet-1k top-1 (DESIGN.md section 2): model -> (FP32, EfficientQuant).
PAPER = {"mobilevit_xxs": (68.91, 66.86), "mobilevit_xs": (74.62, 73.80),
         "mobilevit_s": (78.31, 77.87), "mobilevitv2_050": (70.10, 65.59),
         "mobilevitv2_075": (75.57, 72.50), "mobilevitv2_100": (77.90, 72.03),
         "mobilevitv2_125": (79.64, 77.58), "mobilevitv2_150": (80.36, 79.08),
         "mobilevitv2_175": (80.86, 80.30), "mobilevitv2_200": (81.12, 80.48)}


@dataclasses.dataclass
class Entry:
    """One model to evaluate: a quantized ModelProto or path, or why there is none."""

    label: str
    model: object = None
    seconds: float | None = None
    size_mb: float | None = None
    note: str = ""


def reference_models(names=None) -> list[dict]:
    found = sorted(REFERENCE.glob("*.imagenette.onnx"))
    refs = []
    for path in found:
        name = path.name.removesuffix(".imagenette.onnx")
        if names and name not in names:
            continue
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        refs.append({"name": name, "path": path, "pre": Preprocess.from_json(meta_path),
                     "class_map": meta["imagenet_index"],
                     "torch": meta.get("top1_fp32_torch", {})})
    return refs


def make_configs(rows) -> tuple[list, list]:
    """[(label, QuantConfig)] of the rows this QuantConfig accepts, [(label, why)] of the rest."""
    ok, skipped = [], []
    for label, overrides in rows:
        try:
            ok.append((label, qconfig.QuantConfig(num_calib=NUM_CALIB, batch_size=CALIB_BATCH,
                                                  **overrides)))
        except (TypeError, ValueError) as exc:
            skipped.append((label, str(exc)))
    return ok, skipped


def recipe_configs() -> tuple[list, list]:
    rows = list(RECIPES)
    default = qconfig.QuantConfig().target
    listed = {o.get("target", default) for _, o in RECIPES}
    rows += [(f"target {t}", {"target": t}) for t in qconfig.TARGETS if t not in listed]
    return make_configs(rows)


def ablation_configs() -> tuple[list, list]:
    """Each part alone, with the paper recipe otherwise."""
    return make_configs([(f"{p} only", {"parts": {p}}) for p in qconfig.PARTS])


def uncovered_fields() -> list[str]:
    varied = {k for _, o in RECIPES for k in o}
    return [f.name for f in dataclasses.fields(qconfig.QuantConfig)
            if f.name not in varied | NOT_VARIED]


def quantize_onnxquant(label: str, cfg, ref: dict) -> Entry:
    start = time.perf_counter()
    try:
        result = onnxquant.run(str(ref["path"]), cfg, calibration=str(CALIB),
                               preprocess=ref["pre"], progress=False)
    except Exception as exc:  # a recipe still being built must not sink the whole table
        return Entry(label, note=f"failed: {type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - start
    note = ", ".join(f"{v} {k}" for k, v in result.counts.items() if v)
    return Entry(label, result.model, seconds, result.model.ByteSize() / 2**20, note)


@contextlib.contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def quantize_ort(ref: dict, tmp: Path) -> Entry:
    """quant_pre_process, then quantize_static (QDQ, per-channel, MinMax, ORT defaults S8S8)
    on the same 32 calibration images, in the same batches, as onnxquant."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(str(ref["path"]), load_external_data=False).graph.input[0].name
    paths = take_evenly(list_images(CALIB), NUM_CALIB)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter_batches(paths, ref["pre"], CALIB_BATCH)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}

    pre_path, out = tmp / f"{ref['name']}.pre.onnx", tmp / f"{ref['name']}.ort.onnx"
    start = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # one "Axis 1 is out-of-range" warning per LayerNorm constant
    try:
        with _cwd(tmp):  # onnxruntime leaves temporary models in the working directory
            quant_pre_process(str(ref["path"]), str(pre_path))
            quantize_static(str(pre_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    finally:
        root.setLevel(level)
    seconds = time.perf_counter() - start
    return Entry("ORT quantize_static", str(out), seconds, out.stat().st_size / 2**20,
                 "QDQ S8S8 per-channel MinMax")


def evaluate_set(fp32: Path, entries: list, images: Path, ref: dict, limit) -> list[dict]:
    """FP32 and every entry with a model in one pass; rows judged against FP32."""
    live = [e for e in entries if e.model is not None]
    start = time.perf_counter()
    results = evaluate_many([str(fp32)] + [e.model for e in live], str(images), ref["pre"],
                            ref["class_map"], limit=limit, progress=False)
    print(f"  {images}: {len(results)} models x {results[0].n} images in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    base, by_label = results[0], dict(zip((e.label for e in live), results[1:]))
    rows = [{"label": "FP32", "top1": base.top1, "n": base.n, "agree": 100.0, "kl": 0.0,
             "size": Path(fp32).stat().st_size / 2**20}]
    for e in entries:
        row = {"label": e.label, "seconds": e.seconds, "size": e.size_mb, "note": e.note}
        if e.label in by_label:
            cmp = compare_results(base, by_label[e.label])
            row.update(top1=cmp.b.top1, n=cmp.b.n, drop=base.top1 - cmp.b.top1,
                       agree=cmp.agreement, kl=cmp.kl)
        rows.append(row)
    return rows


def kept_notes(path: Path, default: str) -> list[str]:
    """The hand-written notes block of ``path`` (a re-run keeps it), or ``default``."""
    block = benchlib.kept_notes(path).strip("\n")
    return [block] if block else [benchlib.NOTES_BEGIN, default, benchlib.NOTES_END]


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(rows: list[dict], ablation: bool = False) -> list[str]:
    head = ["| " + ("part quantized alone" if ablation else "recipe") + " | top-1 % | drop (pts) "
            "| agreement % | mean KL | images | quant s | size MB | what was quantized |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines = []
    for r in rows:
        if "top1" not in r:
            lines.append(f"| {r['label']} |" + " – |" * 7 + f" {r['note']} |")
            continue
        lines.append(f"| {r['label']} | {r['top1']:.2f} | {_fmt(r.get('drop'), '+.2f')} | "
                     f"{r['agree']:.2f} | {r['kl']:.5f} | {r['n']} | "
                     f"{_fmt(r.get('seconds'), '.2f')} | {_fmt(r.get('size'), '.2f')} | "
                     f"{r.get('note', '')} |")
    return head + lines


def run_model(ref: dict, recipes, parts, limit, tmp: Path) -> dict:
    print(f"{ref['name']}: quantizing {len(recipes) + len(parts) + 1} variants", flush=True)
    main = [quantize_onnxquant(label, cfg, ref) for label, cfg in recipes]
    main.append(quantize_ort(ref, tmp))
    abl = [quantize_onnxquant(label, cfg, ref) for label, cfg in parts]
    out = {}
    for set_name, folder in IMAGE_SETS.items():
        rows = evaluate_set(ref["path"], main + abl, folder, ref, limit)
        out[set_name] = (rows[:len(main) + 1], rows[:1] + rows[len(main) + 1:])
    return out


def render(refs, measured, skipped, command: str, notes: list[str]) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [
        "# Accuracy of the recipes on real images", "",
        f"Measured {date} with `{command}` (onnxquant {onnxquant.__version__}, onnxruntime "
        f"{version('onnxruntime')} CPU, Python {platform.python_version()}).", "",
        "Reference checkpoints: timm models fine-tuned on the 10 Imagenette classes "
        "(`assets/reference/*.imagenette.onnx`, 128 px). Every quantized model is calibrated on "
        f"the same {NUM_CALIB} images of `imagenette/train` (spread evenly over the classes) and "
        "evaluated on images it never saw: `imagenette/val` and `imagenet-val/nette` (the "
        "ImageNet-1k validation images of those classes). *drop* = FP32 top-1 − quantized "
        "top-1 in points (one image is 100/images points); *agreement* = share of images whose "
        "top-1 equals FP32's; *mean KL* = mean KL(softmax(FP32) ‖ softmax(quantized)); "
        "*quant s* = wall time of quantization including loading and calibration "
        "(onnxruntime: `quant_pre_process` + `quantize_static`).", "",
        "The paper recipe (`QuantConfig()` defaults): conv weights uint8 asymmetric min-max per "
        "tensor, weight-only (DequantizeLinear), post-Softmax activations log2 8-bit. The peer "
        "is onnxruntime `quantize_static` (QDQ, per-channel, MinMax, its defaults: int8 "
        "weights and activations of every Conv/MatMul, Softmax output included).", "",
        "![Figure 3](figure3_mobilevit_xxs.png)", "",
        "Figure 3 of the paper for the reference mobilevit_xxs (`onnxquant inspect "
        "models/reference/mobilevit_xxs.imagenette.onnx --plots DIR --calib "
        "models/reference/calib --preprocess-json "
        "models/reference/mobilevit_xxs.imagenette.json`): "
        "conv-block weights are bell-shaped around 0, post-Softmax activations pile up near 0 "
        "(uniform grid wastes codes) and spread evenly in the log2 domain.", "",
        "## Reading the tables", ""] + notes + [""]
    if skipped:
        lines += ["Recipes in the tool's table that this QuantConfig rejects (skipped): " +
                  "; ".join(f"{label} ({why})" for label, why in skipped) + ".", ""]
    uncovered = uncovered_fields()
    if uncovered:
        lines += [f"QuantConfig fields no recipe varies: {', '.join(uncovered)}.", ""]
    for ref in refs:
        for set_name, (rows, _) in measured[ref["name"]].items():
            torch = ref["torch"].get(JSON_KEYS[set_name])
            lines += [f"## {ref['name']}, {set_name}", ""]
            if torch is not None:
                lines += [f"FP32 top-1 measured in PyTorch at export: {torch:.2f} %.", ""]
            lines += table(rows) + [""]
    lines += ["## Ablation: one part at a time", "",
              "The paper recipe applied to one part only (`QuantConfig(parts={...})`), the rest "
              "left in float: which part costs the accuracy. conv_block = convs outside "
              "transformer blocks, transformer = convs inside them (MobileViT's local/fusion "
              "convs), bridge = convs entering/leaving a transformer block, softmax = log2 on "
              "post-Softmax activations, linear = MatMul/Gemm weights (not in the paper "
              "recipe).", ""]
    for ref in refs:
        for set_name, (_, rows) in measured[ref["name"]].items():
            lines += [f"### {ref['name']}, {set_name}", ""] + table(rows, ablation=True) + [""]
    lines += paper_section(refs)
    return "\n".join(lines)


def paper_section(refs) -> list[str]:
    lines = ["## The paper's numbers (a different model and dataset)", "",
             "EfficientQuant paper, **ImageNet-1k** top-1 of the **ImageNet-pretrained** timm "
             "models (1000 classes, 224/256 px), DESIGN.md section 2. Not comparable one-to-one "
             "with the tables above (10-class fine-tuned checkpoints at 128 px, Imagenette "
             "images): a 10-way task leaves fewer near-ties for quantization noise to flip.", "",
             "| model (ImageNet-1k) | FP32 | EfficientQuant | drop (pts) |", "|---|---:|---:|---:|"]
    names = [r["name"] for r in refs if r["name"] in PAPER] or list(PAPER)
    for name in names:
        fp32, eq = PAPER[name]
        lines.append(f"| {name} | {fp32:.2f} | {eq:.2f} | {fp32 - eq:+.2f} |")
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated reference names (default: all)")
    parser.add_argument("--limit", type=int, help="images per set, spread evenly (default: all)")
    parser.add_argument("--out", default="docs/results.md")
    args = parser.parse_args(argv)
    refs = reference_models(args.models.split(",") if args.models else None)
    if not refs:
        sys.exit(f"no reference checkpoints in {REFERENCE}")
    recipes, skipped = recipe_configs()
    parts, skipped_parts = ablation_configs()
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ref in refs:
            measured[ref["name"]] = run_model(ref, recipes, parts, args.limit, Path(tmp))
    command = "python tools/recipe_table.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    out = Path(args.out)
    notes = kept_notes(out, "(what the numbers say: written by hand after a run)")
    out.write_text(render(refs, measured, skipped + skipped_parts, command, notes),
                   encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
