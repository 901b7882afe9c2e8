"""Softmax quantizers side by side: each registered quantizer at 8, 6, 4 and 3 bits, the
post-Softmax activations alone quantized (weights float), on the reference checkpoints and
the PP-OCR recognizer.

    python tools/softmax_table.py [--models ...] [--limit 300] [--lines 200] [--out docs/softmax.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_table import all_rows, parser, write_report  # noqa: E402

from onnxquant import QuantConfig  # noqa: E402
from onnxquant.softmax_quantizers import NAMES  # noqa: E402

BITS = (8, 6, 4, 3)


def _configs() -> list:
    return [(f"{name} {bits}-bit", QuantConfig(parts=("softmax",), softmax_quantizer=name,
                                               softmax_bits=bits))
            for name in NAMES for bits in BITS]


def main(argv=None) -> int:
    args = parser(__doc__, "docs/softmax.md", 200).parse_args(argv)
    write_report("Softmax quantizers at 8, 6, 4 and 3 bits (post-Softmax only)",
                 "tools/softmax_table.py", argv, all_rows(args, _configs()), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
