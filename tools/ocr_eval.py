"""Line/character accuracy of a PaddleOCR text recognizer and its quantized copies.

    render --lines text lines (seed --seed) -> float model and every --compare model in one
    pass -> one markdown table row per model: line acc, char acc, agreement with the float
    model (lines decoded identically), file size

    python tools/ocr_eval.py [FLOAT.onnx] [--compare Q.onnx ...] [--lines 300] [--seed 1]
                             [--write-calib calib.npy --calib-lines 32 [--calib-seed S]
                              [--calib-layout squeeze|natural|packed] [--calib-width 320]]

FLOAT defaults to ../shared/assets/real/PP-OCRv6_rec_small.onnx beside this checkout.
``--write-calib`` saves rendered lines (another seed than the test lines) as an N x 3 x 48 x W
array for ``onnxquant FLOAT.onnx OUT.onnx --calib calib.npy`` (layouts: ocr.calibration_array);
``--write-calib-images DIR`` saves the same lines as PNG files instead, the way a user's own
line crops arrive, for ``onnxquant FLOAT.onnx OUT.onnx --calib DIR`` with PaddleOCR's
preprocessing flags (printed); ``--lines 0`` only writes them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from onnxquant import ocr
from onnxquant.errors import UserError
from onnxquant.ocr_render import render_lines

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "real"
DEFAULT_MODEL = REAL / "PP-OCRv6_rec_small.onnx"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL),
                   help="float recognizer (default: the shared PP-OCRv6 small one)")
    p.add_argument("--compare", nargs="+", default=[], metavar="Q.onnx",
                   help="quantized copies, each judged against the float model")
    p.add_argument("--lines", type=int, default=300, help="rendered test lines (0: none)")
    p.add_argument("--seed", type=int, default=1, help="seed of the test lines")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--write-calib", metavar="OUT.npy", help="write calibration lines here")
    p.add_argument("--write-calib-images", metavar="DIR",
                   help="write the calibration lines as PNG files into this new folder")
    p.add_argument("--calib-lines", type=int, default=32)
    p.add_argument("--calib-seed", type=int, help="default: --seed + 1000")
    p.add_argument("--calib-layout", choices=ocr.LAYOUTS, default="squeeze",
                   help="one line per sample squeezed/padded to --calib-width, one line "
                        "padded to the widest, or lines packed side by side")
    p.add_argument("--calib-width", type=int, default=ocr.MIN_WIDTH)
    return p.parse_args(argv)


PADDLE_FLAGS = "--interpolation bilinear --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 --channel-order bgr"


def _calib_seed(args) -> int:
    seed = args.seed + 1000 if args.calib_seed is None else args.calib_seed
    if seed == args.seed:
        raise UserError("--calib-seed equals --seed: calibration would see the test lines")
    return seed


def write_calib_images(args, alphabet) -> None:
    """The calibration lines as they come from a line detector: one PNG per line, own size."""
    folder = Path(args.write_calib_images)
    seed = _calib_seed(args)
    ocr.write_calibration_images(folder, args.calib_lines, seed, alphabet)
    print(f"wrote {args.calib_lines} lines (seed {seed}) into {folder}; quantize with\n"
          f"  onnxquant {args.model} OUT.onnx --calib {folder} {PADDLE_FLAGS}")


def write_calib(args, alphabet) -> None:
    seed = _calib_seed(args)
    array = ocr.calibration_array(args.calib_lines, seed, args.calib_width, alphabet,
                                  args.calib_layout)
    np.save(args.write_calib, array)
    print(f"wrote {args.write_calib}: {list(array.shape)} float32, seed {seed}")


def _size_mb(path: str) -> float:
    """The .onnx file plus external data files it names beside it."""
    model = Path(path)
    total = model.stat().st_size
    for sibling in model.parent.glob(model.name + ".data"):
        total += sibling.stat().st_size
    return total / 2**20


def table(results: list[ocr.OcrResult], paths: list[str]) -> str:
    float_result = results[0]
    rows = ["| model | lines | line acc % | char acc % | agreement with float % | size MB "
            "| model time s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for result, path in zip(results, paths):
        agree = ocr.agreement(float_result, result)
        rows.append(f"| {Path(path).name} | {result.n} | {result.line_acc:.2f} | "
                    f"{result.char_acc:.2f} | {agree:.2f} | {_size_mb(path):.2f} | "
                    f"{result.seconds:.1f} |")
    return "\n".join(rows)


def run(args) -> int:
    for path in [args.model, *args.compare]:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such model file")
    alphabet = ocr.load_alphabet(args.model)
    if args.write_calib:
        write_calib(args, alphabet)
    if args.write_calib_images:
        write_calib_images(args, alphabet)
    if args.lines <= 0:
        return 0
    start = time.perf_counter()
    lines = render_lines(args.lines, args.seed, alphabet)
    paths = [args.model, *args.compare]
    results = ocr.evaluate_many(paths, lines, args.batch_size, alphabet)
    print(table(results, paths))
    print(f"\n{args.lines} lines, seed {args.seed}, {time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"ocr_eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
