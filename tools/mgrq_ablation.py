"""MGRQ ablation: the contribution of each term of its loss (docs/reconstruct.md),

    L = L_block + a * L_global + b * L_local + lambda * R

run as --reconstruct mgrq with (a, b) in {(0, 0), (0, b), (a, 0), (a, b)} (the first is
BRECQ's loss) at W4 on the reference checkpoints: accuracy, agreement with float, time.

    python tools/mgrq_ablation.py [--models mobilevit_xxs] [--limit 1000] [--iters N]
                                  [--mgrq-only] [--out docs/mgrq_ablation.md]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import int8_table  # noqa: E402
import reconstruct_table  # noqa: E402

from onnxquant import QuantConfig  # noqa: E402
from onnxquant import reconstruct_torch as rt  # noqa: E402

TERMS = {  # label -> (global weight a, local weight b)
    "L_block": (0.0, 0.0),
    "L_block + L_local": (0.0, rt.LOCAL_WEIGHT),
    "L_block + L_global": (rt.GLOBAL_WEIGHT, 0.0),
    "L_block + L_global + L_local (MGRQ)": (rt.GLOBAL_WEIGHT, rt.LOCAL_WEIGHT),
}


def _with_terms(quantize):
    """timed_quantize with the loss weights of the config's label set first."""
    def timed(model, cfg, calib, pre, out: Path) -> float:
        by_file = {label.replace(" ", "_"): label for label in TERMS}
        label = by_file[out.name.split(".", 1)[1].rsplit(".onnx", 1)[0]]
        rt.GLOBAL_WEIGHT, rt.LOCAL_WEIGHT = TERMS[label]
        return quantize(model, cfg, calib, pre, out)
    return timed


def main(argv=None) -> int:
    p = int8_table.parser(__doc__, "docs/mgrq_ablation.md", 300)
    p.add_argument("--iters", type=int, default=None, help="steps per block (default: mgrq's)")
    p.add_argument("--mgrq-only", action="store_true", help="only the full MGRQ loss")
    args = p.parse_args(argv)
    args.models = args.models or "mobilevit_xxs"
    base = dict(reconstruct_table.RECIPES["W4"], reconstruct="mgrq",
                reconstruct_iters=args.iters)
    labels = list(TERMS)[-1:] if args.mgrq_only else list(TERMS)
    configs = [(label, QuantConfig(**base)) for label in labels]
    int8_table.timed_quantize = _with_terms(int8_table.timed_quantize)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ref in benchlib.selected_references(args):
            rows += int8_table.reference_rows(ref, configs, args.limit, Path(tmp))
    int8_table.write_report("MGRQ ablation: each loss term at W4", "tools/mgrq_ablation.py",
                            argv, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
