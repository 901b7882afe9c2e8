"""Time of ``--reconstruct gptq`` with and without its float target (reconstruct.FLOAT_TARGET):
the whole ``onnxquant.run`` on the reference checkpoints, the two settings interleaved in one
process, median of ``--repeats`` each, and their ratio.

    python tools/bench_float_target.py [--models mobilevitv2_050] [--recipe W4]
                                       [--num-calib 64] [--repeats 3] [--out FILE]

Calibration: the first ``--num-calib`` images of imagenette/train as onnxquant lists them.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import reconstruct_table  # noqa: E402

import onnxquant  # noqa: E402
from onnxquant import QuantConfig, reconstruct  # noqa: E402

SETTINGS = {"float target": True, "plain GPTQ": False}


def seconds(ref: dict, cfg: QuantConfig, float_target: bool) -> float:
    reconstruct.FLOAT_TARGET = float_target
    start = time.perf_counter()
    onnxquant.run(str(ref["path"]), cfg, str(benchlib.CALIB), ref["pre"], progress=False)
    return time.perf_counter() - start


def rows_for(ref: dict, cfg: QuantConfig, repeats: int) -> list:
    times = {name: [] for name in SETTINGS}
    for _ in range(repeats):  # interleaved: a slow spell of the machine hits both
        for name, on in SETTINGS.items():
            times[name].append(seconds(ref, cfg, on))
    base = statistics.median(times["plain GPTQ"])
    return [{"model": ref["name"], "gptq": name, "median s": statistics.median(t),
             "ratio": statistics.median(t) / base, "runs": ", ".join(f"{x:.1f}" for x in t)}
            for name, t in times.items()]


def main(argv=None) -> int:
    p = benchlib.reference_parser(__doc__, "docs/float_target_time.md")
    p.add_argument("--recipe", default="W4", choices=sorted(reconstruct_table.RECIPES))
    p.add_argument("--num-calib", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    rows = []
    for ref in benchlib.selected_references(args):
        cfg = QuantConfig(reconstruct="gptq", num_calib=args.num_calib,
                          **reconstruct_table.RECIPES[args.recipe])
        rows += rows_for(ref, cfg, args.repeats)
        print(rows[-2:], flush=True)
    cols = [("model", "model", ""), ("gptq", "gptq", ""), ("median s", "median s", ".1f"),
            ("x plain", "ratio", ".2f"), ("runs (s)", "runs", "")]
    text = (f"# GPTQ's float target: time\n\n"
            f"{benchlib.measured_line(benchlib.command_line(__file__, argv))}.\n\n"
            f"Whole `onnxquant.run`, recipe {args.recipe}, {args.num_calib} calibration "
            f"images.\n\n{benchlib.table(rows, cols)}\n\n{benchlib.kept_notes(Path(args.out))}\n")
    benchlib.write_doc(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
