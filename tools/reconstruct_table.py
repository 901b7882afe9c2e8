"""Low-bit weights with and without reconstruction (--reconstruct): W4 (weights only), W4A8
and W3, per method, on the reference checkpoints, the real PP-OCR recognizer and the real
PP-OCR detector: accuracy, agreement with float, quantization time, real file size.

    python tools/reconstruct_table.py [--methods none,gptq,...] [--recipes W4,W4A8,W3]
                                      [--models mobilevit_xxs,...] [--limit 1000]
                                      [--lines 300] [--pages 8] [--out docs/reconstruct_table.md]

Recipes: W4 / W3 = the paper target with symmetric per-channel weights (stored as INT4);
W4A8 = the tensorrt target (symmetric int8 activations on every conv/linear input, log2
post-Softmax). Reference checkpoints and the recognizer are scored as in tools/int8_table.py;
the detector by the IoU of its text maps with float's and the share of rendered lines found
(``onnxquant.ocr.detector_compare``), calibrated on 8 other rendered pages.
"""

from __future__ import annotations

import sys
from dataclasses import replace
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import int8_table  # noqa: E402

from onnxquant import QuantConfig  # noqa: E402
from onnxquant.config import PARTS, RECONSTRUCT_METHODS  # noqa: E402

DET_CALIB = 8  # rendered pages (736 x 992): GPTQ needs few of them (45k positions each)
RECIPES = {
    "W4": {"weight_bits": 4, "per_channel": True, "weight_symmetric": True},
    "W4A8": {"target": "tensorrt", "weight_bits": 4, "act_bits": 8},
    "W4A8-auto": {"target": "tensorrt", "weight_bits": 4, "act_bits": 8, "auto": True},
    "W4A8-mse": {"target": "tensorrt", "weight_bits": 4, "act_bits": 8, "calib_method": "mse"},
    # W4A8's activations (mse ranges) with 8-bit weights: the floor activations set for it
    "W8A8-mse": {"target": "tensorrt", "weight_bits": 8, "act_bits": 8, "calib_method": "mse"},
    "W3": {"weight_bits": 3, "per_channel": True, "weight_symmetric": True},
    # W4 with the MatMul/Gemm weights too: per output channel, or per block of 32 along K
    "W4-lin": {"weight_bits": 4, "per_channel": True, "weight_symmetric": True,
               "parts": frozenset(PARTS)},
    "W4-lin-b32": {"weight_bits": 4, "per_channel": True, "weight_symmetric": True,
                   "parts": frozenset(PARTS), "weight_block_size": 32},
    # W4A8 with its linear layers INT4 block-wise weight-only (TensorRT's INT4)
    "W4A8-b32": {"target": "tensorrt", "weight_bits": 4, "act_bits": 8, "weight_block_size": 32},
}


def configs(recipes: list, methods: list) -> list:
    return [(f"{recipe} {'RTN' if m == 'none' else m}",
             QuantConfig(reconstruct=m, **RECIPES[recipe]))
            for recipe in recipes for m in methods]


def detector_rows(cfgs: list, pages: int, work: Path) -> list:
    from onnxquant import ocr

    model = benchlib.ASSETS / "real" / "PP-OCRv6_det_small.onnx"
    if not model.is_file():
        return []
    calib = work / "det_calib.npy"
    np.save(calib, ocr.detector_calibration_array(DET_CALIB, seed=1001))
    rows = [{"model": "PP-OCRv6_det_small", "recipe": "float", "acc": None, "change": 0.0,
             "agree": 100.0, "seconds": 0.0, "mb": benchlib.file_mb(model)}]
    for label, cfg in cfgs:
        out = work / f"det.{label.replace(' ', '_')}.onnx"
        seconds = int8_table.timed_quantize(model, replace(cfg, num_calib=DET_CALIB),
                                       str(calib), None, out)
        cmp = ocr.detector_compare(str(model), str(out), pages=pages)
        rows[0]["acc"] = cmp.found_a
        rows.append({"model": "PP-OCRv6_det_small", "recipe": label, "acc": cmp.found_b,
                     "change": cmp.found_b - cmp.found_a, "agree": cmp.iou,
                     "seconds": seconds, "mb": benchlib.file_mb(out)})
        print(f"PP-OCRv6_det_small {label}: {rows[-1]}", flush=True)  # hours of work each
    return rows


def main(argv=None) -> int:
    p = int8_table.parser(__doc__, "docs/reconstruct_table.md", 300)
    p.add_argument("--methods", default="none,gptq")
    p.add_argument("--recipes", default="W4,W4A8,W3")
    p.add_argument("--pages", type=int, default=8)
    p.add_argument("--no-detector", action="store_true")
    p.add_argument("--detector-only", action="store_true")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    unknown = set(methods) - set(RECONSTRUCT_METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {RECONSTRUCT_METHODS}")
    cfgs = configs(args.recipes.split(","), methods)
    rows = [] if args.detector_only else int8_table.all_rows(args, cfgs)
    if not args.no_detector:
        with tempfile.TemporaryDirectory() as tmp:
            rows += detector_rows(cfgs, args.pages, Path(tmp))
    int8_table.write_report("Low-bit weights: round-to-nearest vs reconstruction",
                            "tools/reconstruct_table.py", argv, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
