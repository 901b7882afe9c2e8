"""Full-integer recipes (W8A8, W6A6), with and without --auto, on the reference checkpoints
and the real PP-OCR recognizer: accuracy, agreement with float, quantization time, size.

    python tools/int8_table.py [--models mobilevit_xxs,...] [--limit 500] [--lines 300]
                               [--targets tensorrt,ort] [--out docs/int8.md]

Reference checkpoints: top-1 on imagenette/val (``--limit`` images spread evenly) with their
own preprocessing, calibrated on 32 imagenette/train images. Recognizer: line/char accuracy
on ``--lines`` rendered lines (seed 1), calibrated on 32 other rendered lines (seed 1001),
written as PNG files and read with PaddleOCR's flags as a user would (``--rec-calib-layout
folder``, the default since 2026-12-04; the tables before it used lines squeezed to 320 px).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

import onnxquant  # noqa: E402
from onnxquant import ocr  # noqa: E402
from onnxquant import QuantConfig  # noqa: E402

RECIPES = {
    "W8A8": {"weight_bits": 8, "act_bits": 8},
    "W6A6": {"weight_bits": 6, "act_bits": 6},
}
TARGET_OPTIONS = {"tensorrt": {}, "ort": {"ort_int8_kinds": ("dense", "pointwise", "grouped",
                                                              "depthwise", "stem", "linear")}}


VARIANTS = {"": {}, " --auto": {"auto": True},
            " --auto --search-metric fisher": {"auto": True, "search_metric": "fisher"},
            " --auto --reconstruct gptq": {"auto": True, "reconstruct": "gptq"}}


def _configs(targets: list, variants: list) -> list:
    out = []
    for target in targets:
        for recipe, bits in RECIPES.items():
            for variant in variants:
                out.append((f"{target} {recipe}{variant}",
                            QuantConfig(target=target, **VARIANTS[variant], **bits,
                                        **TARGET_OPTIONS[target])))
    return out


def timed_quantize(model, cfg, calib, pre, out: Path) -> float:
    """Quantize ``model`` into ``out``; returns the seconds ``onnxquant.run`` took."""
    from onnxquant.model_io import save_model

    start = time.perf_counter()
    model_out = onnxquant.run(str(model), cfg, calib, pre, progress=False).model
    seconds = time.perf_counter() - start
    save_model(model_out, out)
    return seconds


def per_label(setup: dict):
    """Make ``timed_quantize`` call ``setup[label]()`` before quantizing a config of that
    label (label -> callable): ablations switch module constants per row this way."""
    global timed_quantize
    quantize = timed_quantize

    def timed(model, cfg, calib, pre, out: Path) -> float:
        by_file = {label.replace(" ", "_"): label for label in setup}
        setup[by_file[out.name.split(".", 1)[1].rsplit(".onnx", 1)[0]]]()
        return quantize(model, cfg, calib, pre, out)
    timed_quantize = timed


def reference_rows(ref: dict, configs: list, limit: int, work: Path,
                   image_sets: tuple = ("imagenette/val",)) -> list:
    """``ref`` quantized with every config once, scored on each of ``image_sets`` (the
    model column names the set when there are several)."""
    models, quantized = [], []
    for label, cfg in configs:
        out = work / f"{ref['name']}.{label.replace(' ', '_')}.onnx"
        seconds = timed_quantize(ref["path"], cfg, str(benchlib.CALIB), ref["pre"], out)
        models.append(out)
        quantized.append({"recipe": label, "seconds": seconds, "mb": benchlib.file_mb(out)})
    rows = []
    for image_set in image_sets:
        name = ref["name"] if len(image_sets) == 1 else f"{ref['name']} [{image_set}]"
        fp32, results = benchlib.against_fp32(ref["path"], models,
                                              benchlib.IMAGE_SETS[image_set], ref, limit, name)
        rows.append({"model": name, "recipe": "float", "acc": fp32["top1"], "change": 0.0,
                     "agree": 100.0, "seconds": 0.0, "mb": benchlib.file_mb(ref["path"])})
        rows += [dict(q, model=name, acc=res["top1"], change=res["change"], agree=res["agree"])
                 for q, res in zip(quantized, results)]
    return rows


def recognizer_rows(configs: list, n_lines: int, work: Path,
                    calib_width: int = ocr.MIN_WIDTH, layout: str = "squeeze",
                    calib_seed: int = 1001, calib_n: int | None = None,
                    test_seed: int = 1) -> list:
    """The recognizer quantized with every config, on ``n_lines`` rendered lines (seed
    ``test_seed``); calibrated
    on ``calib_n`` samples of other lines (seed ``calib_seed``) in ``layout``: "folder" as
    a user does (line PNGs with PaddleOCR's flags, padded at the lines' median width; not
    ``calib_width``), else an array (ocr.calibration_array) at ``calib_width`` px. None:
    as many lines as the hungriest config takes (each takes its own share of them)."""
    model = benchlib.ASSETS / "real" / "PP-OCRv6_rec_small.onnx"
    if not model.is_file():
        return []
    calib_n = calib_n or max(cfg.calib_samples for _, cfg in configs)
    calib, pre = _rec_calibration(work, calib_n, calib_seed, calib_width, layout)
    outs, rows = [], []
    for label, cfg in configs:
        out = work / f"rec.{label.replace(' ', '_')}.onnx"
        seconds = timed_quantize(model, cfg, str(calib), pre, out)
        outs.append(out)
        rows.append({"model": "PP-OCRv6_rec_small", "recipe": label, "seconds": seconds,
                     "mb": benchlib.file_mb(out)})
    lines = ocr.render_lines(n_lines, seed=test_seed)
    results = ocr.evaluate_many([str(model)] + [str(o) for o in outs], lines)
    base = results[0]
    for row, res in zip(rows, results[1:]):
        row.update(acc=res.line_acc, change=res.line_acc - base.line_acc,
                   agree=ocr.agreement(base, res))
    return [{"model": "PP-OCRv6_rec_small", "recipe": "float", "acc": base.line_acc,
             "change": 0.0, "agree": 100.0, "seconds": 0.0, "mb": benchlib.file_mb(model)}] + rows


def _rec_calibration(work: Path, n: int, seed: int, width: int, layout: str) -> tuple:
    """(calibration source, Preprocess or None) for the recognizer (recognizer_rows)."""
    if layout == "folder":
        folder = work / "rec_lines"
        ocr.write_calibration_images(folder, n, seed)
        return folder, ocr.line_preprocess()
    calib = work / "rec_calib.npy"
    np.save(calib, ocr.calibration_array(n, seed, width, layout=layout))
    return calib, None


COLUMNS = [("model", "model", ""), ("recipe", "recipe", ""),
           ("top-1 / line acc %", "acc", ".2f"), ("change (pts)", "change", "+.2f"),
           ("agreement %", "agree", ".1f"), ("quantize s", "seconds", ".1f"),
           ("size MB", "mb", ".2f")]


def _width(text: str) -> int | None:
    return None if text == "natural" else int(text)


def _rec_layout(args) -> tuple:
    """(width, layout); ``--rec-calib-width natural`` (older commands) is the natural layout."""
    if args.rec_calib_width is None:
        return ocr.MIN_WIDTH, "natural"
    return args.rec_calib_width, args.rec_calib_layout


def _image_sets(value: str) -> tuple:
    """``--image-set``: one or more of benchlib.IMAGE_SETS, comma-separated."""
    sets = tuple(v for v in value.split(",") if v)
    unknown = [v for v in sets if v not in benchlib.IMAGE_SETS]
    if unknown or not sets:
        raise argparse.ArgumentTypeError(f"image sets are {', '.join(benchlib.IMAGE_SETS)}, "
                                         f"comma-separated; got {value!r}")
    return sets


def parser(doc: str, out: str, lines: int):
    p = benchlib.reference_parser(doc, out)
    p.add_argument("--lines", type=int, default=lines)
    p.add_argument("--no-recognizer", action="store_true")
    p.add_argument("--rec-calib-width", type=_width, default=ocr.MIN_WIDTH,
                   help="recognizer calibration lines squeezed to this many px, or 'natural' "
                        "(each line at its own width, padded to the widest)")
    p.add_argument("--rec-calib-layout", choices=("folder",) + ocr.LAYOUTS, default="folder",
                   help="recognizer calibration: a folder of line PNGs with PaddleOCR's flags "
                        "(what a user runs; the lines' median width, not --rec-calib-width; "
                        "default since 2026-12-04), or an array of lines squeezed/padded to "
                        "the width, padded to the widest, or packed side by side to fill the "
                        "width (ocr.calibration_array)")
    p.add_argument("--rec-calib-seed", type=int, default=1001,
                   help="seed of the recognizer's calibration lines")
    p.add_argument("--test-seed", type=int, default=1,
                   help="seed of the recognizer's test lines (another seed: lines no choice "
                        "was made on)")
    p.add_argument("--image-set", type=_image_sets, default=("imagenette/val",),
                   help="images the reference checkpoints are scored on, comma-separated "
                        "(imagenet-val/nette: 500 other val images of the same classes, no "
                        "choice was made on); each model is quantized once for all of them")
    p.add_argument("--no-references", action="store_true", help="skip the reference checkpoints")
    p.add_argument("--num-calib", type=int, default=None,
                   help="calibration images (reference checkpoints) and lines (recognizer); "
                        "default: each config's own (32; 64 with --reconstruct)")
    return p


def all_rows(args, configs: list) -> list:
    """Every reference checkpoint, then the recognizer, with every config."""
    rows = []
    if args.num_calib is not None:
        configs = [(label, replace(cfg, num_calib=args.num_calib)) for label, cfg in configs]
    with tempfile.TemporaryDirectory() as tmp:
        for ref in [] if args.no_references else benchlib.selected_references(args):
            rows += reference_rows(ref, configs, args.limit, Path(tmp), args.image_set)
        if not args.no_recognizer:
            rows += recognizer_rows(configs, args.lines, Path(tmp), *_rec_layout(args),
                                    args.rec_calib_seed, args.num_calib, args.test_seed)
    return rows


def write_report(title: str, script: str, argv, rows: list, out: str) -> None:
    text = (f"# {title}\n\n"
            f"{benchlib.measured_line(benchlib.command_line(script, argv))}.\n\n"
            f"{benchlib.CHANGE}; the recognizer's accuracy is exact-line accuracy.\n\n"
            f"{benchlib.table(rows, COLUMNS)}\n\n{benchlib.kept_notes(Path(out))}\n")
    benchlib.write_doc(out, text)


def main(argv=None) -> int:
    p = parser(__doc__, "docs/int8.md", 300)
    p.add_argument("--targets", default="tensorrt,ort")
    p.add_argument("--variants", default="plain,auto,auto+gptq",
                   help="comma list from plain, auto, auto+fisher (--auto --search-metric "
                        "fisher), auto+gptq (--auto --reconstruct gptq)")
    args = p.parse_args(argv)
    names = {"plain": "", "auto": " --auto", "auto+fisher": " --auto --search-metric fisher",
             "auto+gptq": " --auto --reconstruct gptq"}
    variants = [names[v] for v in args.variants.split(",")]
    rows = all_rows(args, _configs(args.targets.split(","), variants))
    write_report("Full-integer recipes (W8A8, W6A6), with and without --auto",
                 "tools/int8_table.py", argv, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
