"""Learned activation step sizes (LSQ) in block reconstruction: each method with the
calibrated steps and with steps learned alongside the roundings (reconstruct_torch.
LEARN_STEPS), on a recipe that quantizes activations (W4A8 by default): accuracy,
agreement with float, time.

    python tools/step_ablation.py [--methods brecq,mgrq] [--recipe W4A8] [--models M]
                                  [--limit 1000] [--lines 300] [--no-recognizer]
                                  [--out docs/step_ablation.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8_table  # noqa: E402
import reconstruct_table  # noqa: E402

from onnxquant import QuantConfig  # noqa: E402
from onnxquant import reconstruct_torch as rt  # noqa: E402

STEPS = {"calibrated steps": False, "learned steps": True}


def _steps(learn: bool):
    def setup():
        rt.LEARN_STEPS = learn
    return setup


def main(argv=None) -> int:
    p = int8_table.parser(__doc__, "docs/step_ablation.md", 300)
    p.add_argument("--methods", default="brecq,mgrq")
    p.add_argument("--recipe", default="W4A8", choices=sorted(reconstruct_table.RECIPES))
    args = p.parse_args(argv)
    configs, setup = [], {}
    for method in args.methods.split(","):
        for variant, learn in STEPS.items():
            label = f"{args.recipe} {method} {variant}"
            configs.append((label, QuantConfig(reconstruct=method,
                                               **reconstruct_table.RECIPES[args.recipe])))
            setup[label] = _steps(learn)
    int8_table.per_label(setup)
    rows = int8_table.all_rows(args, configs)
    int8_table.write_report(f"Learned activation steps at {args.recipe}",
                            "tools/step_ablation.py", argv, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
