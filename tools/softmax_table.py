"""Softmax quantizers side by side: each registered quantizer at 8, 6, 4 and 3 bits, the
post-Softmax activations alone quantized (weights float), on the reference checkpoints and
the PP-OCR recognizer.

    python tools/softmax_table.py [--models ...] [--limit 300] [--lines 200] [--out docs/softmax.md]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from int8_table import COLUMNS, _quantize  # noqa: E402

from onnxquant import QuantConfig  # noqa: E402
from onnxquant.softmax_quantizers import NAMES  # noqa: E402

BITS = (8, 6, 4, 3)


def _configs() -> list:
    return [(f"{name} {bits}-bit", QuantConfig(parts=("softmax",), softmax_quantizer=name,
                                               softmax_bits=bits))
            for name in NAMES for bits in BITS]


def reference_rows(ref, configs, limit, work: Path) -> list:
    models, rows = [], []
    for label, cfg in configs:
        out = work / f"{ref['name']}.{label.replace(' ', '_')}.onnx"
        seconds = _quantize(ref["path"], cfg, str(benchlib.CALIB), ref["pre"], out)
        models.append(out)
        rows.append({"model": ref["name"], "recipe": label, "seconds": seconds,
                     "mb": benchlib.file_mb(out)})
    fp32, results = benchlib.against_fp32(ref["path"], models,
                                          benchlib.IMAGE_SETS["imagenette/val"], ref, limit,
                                          ref["name"])
    for row, res in zip(rows, results):
        row.update(acc=res["top1"], change=res["change"], agree=res["agree"])
    return [{"model": ref["name"], "recipe": "float", "acc": fp32["top1"], "change": 0.0,
             "agree": 100.0}] + rows


def main(argv=None) -> int:
    from int8_table import recognizer_rows

    parser = benchlib.reference_parser(__doc__, "docs/softmax.md")
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--no-recognizer", action="store_true")
    args = parser.parse_args(argv)
    configs, rows = _configs(), []
    with tempfile.TemporaryDirectory() as tmp:
        for ref in benchlib.selected_references(args):
            rows += reference_rows(ref, configs, args.limit, Path(tmp))
        if not args.no_recognizer:
            rows += recognizer_rows(configs, args.lines, Path(tmp))
    text = (f"# Softmax quantizers at 8, 6, 4 and 3 bits (post-Softmax only)\n\n"
            f"{benchlib.measured_line(benchlib.command_line('tools/softmax_table.py', argv))}."
            f"\n\n{benchlib.CHANGE}; the recognizer's accuracy is exact-line accuracy.\n\n"
            f"{benchlib.table(rows, COLUMNS)}\n{benchlib.kept_notes(Path(args.out))}")
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
