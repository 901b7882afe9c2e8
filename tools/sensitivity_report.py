"""Per-layer sensitivity of real models, and the accuracy that keeping the worst layers float buys.

    for each model: the reference checkpoints (mobilevit_xxs, mobilevitv2_050) and the
    PP-OCRv6 text recognizer (shared assets beside this checkout, or $ONNXQUANT_ASSETS)
        for each recipe: target tensorrt (W8A8) and the paper recipe at 4-bit weights
            onnxquant.sensitivity on 32 calibration samples (imagenette/train images spread
            over the classes; for the recognizer rendered text lines, seed 1001)
            quantize with the top 0/1/3/5 sites kept float (QuantConfig.exclude), same data
            float + those 4 models in one pass over held-out data: top-1 on 500 images of
            imagenette/val (recognizer: exact-line accuracy on 300 rendered lines, seed 1)
    -> docs/sensitivity.md (+ docs/sensitivity_mobilevit_xxs.png)

    python tools/sensitivity_report.py [--models mobilevit_xxs,...] [--recipes tensorrt,paper-w4]
                                       [--limit 500] [--lines 300] [--out docs/sensitivity.md]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

import onnxquant  # noqa: E402
from onnxquant import QuantConfig  # noqa: E402
from onnxquant.sensitivity import sensitivity  # noqa: E402

RECOGNIZER = benchlib.ASSETS / "real" / "PP-OCRv6_rec_small.onnx"
MODELS = ("mobilevit_xxs", "mobilevitv2_050", RECOGNIZER.stem)
RECIPES = {"tensorrt": QuantConfig(target="tensorrt"), "paper-w4": QuantConfig(weight_bits=4)}
OCR_CALIB_SEED, OCR_TEST_SEED = 1001, 1  # tools/ocr_eval.py's: never the same lines
PLOT = ("mobilevit_xxs", "tensorrt")  # the one plot written beside the doc


class Classifier:
    """A reference checkpoint: calibration images in, top-1 on imagenette/val out."""

    metric = "top-1 %"

    def __init__(self, name: str, args):
        self.ref = benchlib.reference(name)
        if self.ref is None:
            sys.exit(f"no reference checkpoint {name!r} in {benchlib.REFERENCE}")
        self.name, self.path, self.pre = name, self.ref["path"], self.ref["pre"]
        self.calibration, self.limit = str(benchlib.CALIB), args.limit
        self.calib_note = f"calibration: {benchlib.NUM_CALIB} images of imagenette/train"

    def accuracy(self, models: list) -> list[dict]:
        """[float's {acc}] + per model {acc, change, agree}, in one pass."""
        images = benchlib.IMAGE_SETS["imagenette/val"]
        fp32, rows = benchlib.against_fp32(self.path, models, images, self.ref, self.limit,
                                           self.name)
        self.note = f"{self.calib_note}; accuracy: top-1 on {fp32['n']} images of imagenette/val"
        return [{"acc": fp32["top1"]}] + [dict(r, acc=r["top1"]) for r in rows]


class Recognizer:
    """The PP-OCRv6 recognizer: rendered lines in (onnxquant.ocr), line accuracy out."""

    metric = "line acc %"

    def __init__(self, name: str, args):
        from onnxquant import ocr

        self.ocr, self.name, self.path, self.pre = ocr, name, RECOGNIZER, None
        self.lines = args.lines
        self.alphabet = ocr.load_alphabet(self.path)
        self.calibration = ocr.calibration_array(benchlib.NUM_CALIB, OCR_CALIB_SEED,
                                                 alphabet=self.alphabet)
        self.calib_note = (f"calibration: {benchlib.NUM_CALIB} rendered lines (seed "
                           f"{OCR_CALIB_SEED}, 3 x 48 x 320)")

    def accuracy(self, models: list) -> list[dict]:
        lines = self.ocr.render_lines(self.lines, OCR_TEST_SEED, self.alphabet)
        results = self.ocr.evaluate_many([str(self.path)] + models, lines, alphabet=self.alphabet)
        self.note = (f"{self.calib_note}; accuracy: exact-line accuracy on {len(lines)} "
                     f"rendered lines (seed {OCR_TEST_SEED}), agreement = lines decoded as the "
                     "float model does")
        base = results[0]
        return [{"acc": base.line_acc}] + [
            {"acc": r.line_acc, "change": r.line_acc - base.line_acc,
             "agree": self.ocr.agreement(base, r)} for r in results[1:]]


def run_one(subject, label: str, cfg: QuantConfig, out: Path) -> dict:
    report = sensitivity(str(subject.path), cfg, subject.calibration, subject.pre, progress=False)
    print(f"{subject.name} {label}: sensitivity of {len(report.rows)} sites in "
          f"{report.seconds:.0f} s", flush=True)
    ks = (0,) + tuple(k for k, *_ in report.exclusions)
    models = [onnxquant.run(str(subject.path), replace(cfg, exclude=tuple(report.top(k))),
                            subject.calibration, subject.pre, progress=False).model for k in ks]
    accuracy = subject.accuracy(models)
    errors = [report.full[0]] + [e for _, e, _ in report.exclusions]
    rows = [{"kept": "none (float model)", "acc": accuracy[0]["acc"], "agree": 100.0}]
    rows += [dict(acc, kept="none (full recipe)" if k == 0 else f"top {k}", err=err)
             for k, acc, err in zip(ks, accuracy[1:], errors)]
    if (subject.name, label) == PLOT:
        report.plot(out.with_name(f"sensitivity_{subject.name}.png"))
    return {"subject": subject.name, "label": label, "report": report, "rows": rows,
            "metric": subject.metric, "note": subject.note}


def section(run: dict) -> list[str]:
    report = run["report"]
    columns = [("kept float", "kept", ""), ("output error (calib.)", "err", ".2e"),
               (run["metric"], "acc", ".2f"), ("change (pts)", "change", "+.2f"),
               ("agreement with float %", "agree", ".2f")]
    sites, roles, _ = report.to_markdown(10).split("\n\n")
    lines = [f"## {run['subject']}, {run['label']}", "",
             f"{report.recipe}. {run['note']}. Sensitivity: {len(report.rows)} sites, "
             f"{report.seconds:.0f} s.", "", benchlib.table(run["rows"], columns), "",
             f"`{report.exclude_argument(3)}`", "", "Worst 10 sites:", "", sites, "",
             "Per role:", "", roles, ""]
    if (run["subject"], run["label"]) == PLOT:
        lines += [f"![sensitivity](sensitivity_{run['subject']}.png)", ""]
    return lines


def render(runs: list, command: str, info: dict, notes: str) -> str:
    lines = ["# Per-layer sensitivity", "",
             "Which layers cost accuracy when quantized, measured by `onnxquant inspect "
             "--sensitivity` (`onnxquant.sensitivity`), and what keeping the worst few float "
             "(`--exclude`) buys on held-out data.", "", benchlib.header(info, command),
             "How to read: *output error* = mean over the calibration samples of "
             "||y_q - y||^2 / ||y||^2 on the first output (logits; the recognizer's N x T x C "
             "character probabilities); *alone* = only that site quantized, *left float* = "
             "every site but that one; agreement in the site tables = argmax along the last "
             "axis equal to float's on the calibration samples (per image; per time step for "
             f"the recognizer). {benchlib.CHANGE}; *agreement with float* = held-out "
             "top-1 (lines) equal to the float model's. Sites are ranked by error alone; "
             "`top k` keeps the k worst float.", "",
             "Commands:", "", "```",
             "onnxquant inspect models/reference/mobilevit_xxs.imagenette.onnx --sensitivity "
             "--target tensorrt --calib models/reference/calib --preprocess-json "
             "models/reference/mobilevit_xxs.imagenette.json --plots plots/",
             command, "```", "", notes, ""]
    for run in runs:
        lines += section(run)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = benchlib.reference_parser(__doc__, str(benchlib.ROOT / "docs" / "sensitivity.md"))
    parser.set_defaults(models=",".join(MODELS), limit=500)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--lines", type=int, default=300, help="rendered lines (recognizer)")
    args = parser.parse_args(argv)
    missing = [p for p in (benchlib.CALIB, RECOGNIZER) if not p.exists()]
    if missing:
        sys.exit(f"{missing[0]} not found: the shared assets are not beside this checkout "
                 "(or set ONNXQUANT_ASSETS)")
    info = dict(benchlib.machine(), library=benchlib.library_state())
    out, runs, start = Path(args.out), [], time.perf_counter()
    for name in args.models.split(","):
        subject = (Recognizer if name == RECOGNIZER.stem else Classifier)(name, args)
        runs += [run_one(subject, label, RECIPES[label], out) for label in args.recipes.split(",")]
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = benchlib.kept_notes(out).strip("\n") or "\n".join(
        [benchlib.NOTES_BEGIN, "(notes)", benchlib.NOTES_END])
    command = benchlib.command_line("tools/sensitivity_report.py", argv)
    out.write_text(render(runs, command, info, notes) + "\n", encoding="utf-8")
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
