"""Accuracy of every onnxquant recipe and of onnxruntime's quantize_static on real images.

    for each reference checkpoint (assets/reference/*.imagenette.onnx):
        quantize it with each recipe of RECIPES, with each part alone (ablation, PARTS),
        and with onnxruntime quantize_static (the peer), all calibrated on the same
        32 images of imagenette/train (spread evenly over the classes)
        for each image set: FP32 and every quantized model in one pass (evaluate_many),
        each judged against FP32: top-1, change, top-1 agreement, mean KL
    -> docs/results.md

Calibration and evaluation images never overlap (train vs val folders).

    python tools/recipe_table.py [--models mobilevit_xxs,...] [--limit N] [--out docs/results.md]
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import onnxquant
from onnxquant import config as qconfig

# tools/ is on sys.path when a tool runs; ASSETS, REFERENCE, reference_models: still importable
# from here for scripts written against the older recipe_table
from benchlib import (ASSETS, CALIB, CALIB_BATCH, CHANGE, IMAGE_SETS, NUM_CALIB,  # noqa: F401
                      REFERENCE, against_fp32, command_line, file_mb, kept_notes, measured_line,
                      ort_quantize_static, reference_models, reference_parser,
                      selected_references, top1_change)

JSON_KEYS = {"imagenette/val": "imagenette-val", "imagenet-val/nette": "imagenet-val-nette"}

# The recipes compared with the paper's, as QuantConfig overrides. Add a row for a new
# option; a row this QuantConfig rejects (field or value unknown) is listed as skipped.
RECIPES = [
    ("paper (per-tensor)", {"per_channel": False}),
    ("per-channel (default)", {}),
    ("symmetric", {"weight_symmetric": True, "per_channel": False}),
    ("W6", {"weight_bits": 6, "per_channel": False}),
    ("W4", {"weight_bits": 4, "per_channel": False}),
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


def quantize_ort(ref: dict, tmp: Path) -> Entry:
    """The onnxruntime peer (benchlib.ort_quantize_static) on the same calibration images."""
    out = tmp / f"{ref['name']}.ort.onnx"
    res = ort_quantize_static(ref["path"], out, ref["pre"])
    note = "QDQ S8S8 per-channel MinMax" + ("; pre-processed with skip_symbolic_shape=True"
                                            if res["note"] else "")
    return Entry("ORT quantize_static", str(out), res["seconds"], file_mb(out), note)


def evaluate_set(fp32: Path, entries: list, images: Path, ref: dict, limit) -> list[dict]:
    """FP32 and every entry with a model in one pass; rows judged against FP32."""
    live = [e for e in entries if e.model is not None]
    base, judged = against_fp32(fp32, [e.model for e in live], images, ref, limit,
                                f"  {images}")
    by_label = dict(zip((e.label for e in live), judged))
    rows = [{"label": "FP32", **base, "agree": 100.0, "kl": 0.0, "size": file_mb(fp32)}]
    for e in entries:
        row = {"label": e.label, "seconds": e.seconds, "size": e.size_mb, "note": e.note}
        row.update(by_label.get(e.label, {}))
        rows.append(row)
    return rows


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(rows: list[dict], ablation: bool = False) -> list[str]:
    head = ["| " + ("part quantized alone" if ablation else "recipe") + " | top-1 % | change (pts) "
            "| agreement % | mean KL | images | quant s | size MB | what was quantized |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines = []
    for r in rows:
        if "top1" not in r:
            lines.append(f"| {r['label']} |" + " – |" * 7 + f" {r['note']} |")
            continue
        lines.append(f"| {r['label']} | {r['top1']:.2f} | {_fmt(r.get('change'), '+.2f')} | "
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


def render(refs, results, skipped, command: str, notes: str) -> str:
    lines = [
        "# Accuracy of the recipes on real images", "",
        measured_line(command) + ".", "",
        "Reference checkpoints: timm models fine-tuned on the 10 Imagenette classes "
        "(`assets/reference/*.imagenette.onnx`, 128 px). Every quantized model is calibrated on "
        f"the same {NUM_CALIB} images of `imagenette/train` (spread evenly over the classes) and "
        "evaluated on images it never saw: `imagenette/val` and `imagenet-val/nette` (the "
        f"ImageNet-1k validation images of those classes). {CHANGE}; one image is "
        "100/images points; every doc here uses this sign; *agreement* = share of images whose "
        "top-1 equals FP32's; *mean KL* = mean KL(softmax(FP32) ‖ softmax(quantized)); "
        "*quant s* = wall time of quantization including loading and calibration "
        "(onnxruntime: `quant_pre_process` + `quantize_static`).", "",
        "The paper recipe (`QuantConfig(per_channel=False)`): conv weights uint8 asymmetric min-max per "
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
        "## Reading the tables", "", notes.strip("\n"), ""]
    if skipped:
        lines += ["Recipes in the tool's table that this QuantConfig rejects (skipped): " +
                  "; ".join(f"{label} ({why})" for label, why in skipped) + ".", ""]
    uncovered = uncovered_fields()
    if uncovered:
        lines += [f"QuantConfig fields no recipe varies: {', '.join(uncovered)}.", ""]
    for ref in refs:
        for set_name, (rows, _) in results[ref["name"]].items():
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
        for set_name, (_, rows) in results[ref["name"]].items():
            lines += [f"### {ref['name']}, {set_name}", ""] + table(rows, ablation=True) + [""]
    lines += paper_section(refs)
    return "\n".join(lines)


def paper_section(refs) -> list[str]:
    lines = ["## The paper's numbers (a different model and dataset)", "",
             "EfficientQuant paper, **ImageNet-1k** top-1 of the **ImageNet-pretrained** timm "
             "models (1000 classes, 224/256 px), DESIGN.md section 2. Not comparable one-to-one "
             "with the tables above (10-class fine-tuned checkpoints at 128 px, Imagenette "
             "images): a 10-way task leaves fewer near-ties for quantization noise to flip.", "",
             "| model (ImageNet-1k) | FP32 | EfficientQuant | change (pts) |",
             "|---|---:|---:|---:|"]
    names = [r["name"] for r in refs if r["name"] in PAPER] or list(PAPER)
    for name in names:
        fp32, eq = PAPER[name]
        lines.append(f"| {name} | {fp32:.2f} | {eq:.2f} | {top1_change(fp32, eq):+.2f} |")
    return lines + [""]


def main(argv=None) -> int:
    args = reference_parser(__doc__, "docs/results.md").parse_args(argv)
    refs = selected_references(args)
    recipes, skipped = recipe_configs()
    parts, skipped_parts = ablation_configs()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ref in refs:
            results[ref["name"]] = run_model(ref, recipes, parts, args.limit, Path(tmp))
    out = Path(args.out)
    notes = kept_notes(out, "(what the numbers say: written by hand after a run)")
    out.write_text(render(refs, results, skipped + skipped_parts, command_line(__file__, argv),
                          notes), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
