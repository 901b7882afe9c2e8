"""MGRQ ablation: the contribution of each term of its loss (docs/reconstruct.md),

    L = L_block + a * L_global + b * L_local + lambda * R

run as --reconstruct mgrq with (a, b) in {(0, 0), (0, b), (a, 0), (a, b)} (the first is
BRECQ's loss) at W4 on the reference checkpoints and the real recognizer: accuracy,
agreement with float, time. --local-mse adds MGRQ with each layer's output MSE as L_local.

    python tools/mgrq_ablation.py [--models mobilevit_xxs] [--limit 1000] [--iters N]
                                  [--mgrq-only | --local-mse | --local-mse-only]
                                  [--no-recognizer] [--lines 300] [--out docs/mgrq_ablation.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8_table  # noqa: E402
import reconstruct_table  # noqa: E402

from onnxquant import QuantConfig  # noqa: E402
from onnxquant import reconstruct_torch as rt  # noqa: E402

TERMS = {  # label -> (global weight a, local weight b)
    "L_block": (0.0, 0.0),
    "L_block + L_local": (0.0, rt.LOCAL_WEIGHT),
    "L_block + L_global": (rt.GLOBAL_WEIGHT, 0.0),
    "L_block + L_global + L_local (MGRQ)": (rt.GLOBAL_WEIGHT, rt.LOCAL_WEIGHT),
    "L_block + L_global + per-layer MSE": (rt.GLOBAL_WEIGHT, rt.LOCAL_WEIGHT),
}
LOCAL_MSE = "L_block + L_global + per-layer MSE"  # the local term as values, not moments


def _terms(label: str):
    def setup():
        rt.GLOBAL_WEIGHT, rt.LOCAL_WEIGHT = TERMS[label]
        rt.LOCAL_TERM = "mse" if label == LOCAL_MSE else "moments"
    return setup


def main(argv=None) -> int:
    p = int8_table.parser(__doc__, "docs/mgrq_ablation.md", 300)
    p.add_argument("--iters", type=int, default=None, help="steps per block (default: mgrq's)")
    p.add_argument("--mgrq-only", action="store_true", help="only the full MGRQ loss")
    p.add_argument("--local-mse", action="store_true",
                   help="also MGRQ with the per-layer output MSE as its local term")
    p.add_argument("--local-mse-only", action="store_true",
                   help="only MGRQ with the per-layer output MSE as its local term")
    args = p.parse_args(argv)
    args.models = args.models or "mobilevit_xxs"
    base = dict(reconstruct_table.RECIPES["W4"], reconstruct="mgrq",
                reconstruct_iters=args.iters)
    labels = [l for l in TERMS if l.endswith("(MGRQ)")] if args.mgrq_only else \
        [l for l in TERMS if args.local_mse or l != LOCAL_MSE]
    if args.local_mse_only:
        labels = [LOCAL_MSE]
    configs = [(label, QuantConfig(**base)) for label in labels]
    int8_table.per_label({label: _terms(label) for label in labels})
    rows = int8_table.all_rows(args, configs)
    int8_table.write_report("MGRQ ablation: each loss term at W4", "tools/mgrq_ablation.py",
                            argv, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
