"""Sweep the log2 epsilon: accuracy of the reference checkpoints against eps.

    for each reference checkpoint, for eps in EPS:
        quantize with the log2 Softmax quantizer alone (parts={"softmax"}) and with the
        full paper recipe, calibrated on 32 images of imagenette/train
        read L_min = -zero_point * scale of every Log2QuantDequant node of the output
    evaluate FP32 and all of them in one pass over imagenette/val (evaluate_many)
    -> docs/log2_eps.md (tables) and docs/log2_eps.png (top-1 change and agreement vs eps)

eps floors the probabilities before log2 (DESIGN.md section 2.3): calibration sets
L_min = log2(max(min x, eps)), so a large eps clamps small probabilities to eps, and a
small one stretches the 2^b codes over more octaves (a coarser step s for the large ones).

    python tools/eps_sweep.py [--models mobilevit_xxs,...] [--limit N] [--out docs/log2_eps.md]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import onnx

import onnxquant
from onnxquant import config as qconfig
from onnxquant import functions

# tools/ is on sys.path when a tool runs
from benchlib import (CALIB, CALIB_BATCH, IMAGE_SETS, NUM_CALIB, against_fp32, command_line,
                      kept_notes, measured_line, reference_parser, selected_references)

EVAL = IMAGE_SETS["imagenette/val"]
EPS_LOG2 = (8, 10, 12, 14, 16, 20, 24, 32)  # eps = 2^-k
MODES = {"softmax only": {"parts": {"softmax"}}, "paper recipe": {}}
FLAT_FROM = 12  # the sweep's question: is accuracy flat for every eps <= 2^-12?


def log2_params(model: onnx.ModelProto) -> list[tuple[float, int]]:
    """(scale, zero_point) of every Log2QuantDequant node, in graph order."""
    out = []
    for node in model.graph.node:
        if node.domain == functions.DOMAIN and node.op_type == functions.OP_TYPE:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            out.append((float(attrs["scale"]), int(attrs["zero_point"])))
    return out


def quantize(ref: dict, mode: str, k: int) -> dict:
    cfg = qconfig.QuantConfig(log2_eps=2.0**-k, num_calib=NUM_CALIB, batch_size=CALIB_BATCH,
                              **MODES[mode])
    result = onnxquant.run(str(ref["path"]), cfg, calibration=str(CALIB),
                           preprocess=ref["pre"], progress=False)
    return {"mode": mode, "k": k, "model": result.model, "log2": log2_params(result.model)}


def sweep_model(ref: dict, limit) -> list[dict]:
    runs = [quantize(ref, mode, k) for mode in MODES for k in EPS_LOG2]
    base, judged = against_fp32(ref["path"], [r["model"] for r in runs], EVAL, ref, limit,
                                ref["name"])
    for run, row in zip(runs, judged):
        run.update(row, fp32=base["top1"])
        del run["model"]
    return runs


def accuracy_table(name: str, runs: list[dict]) -> list[str]:
    lines = [f"### {name}", "", f"FP32 top-1 {runs[0]['fp32']:.2f} % on {runs[0]['n']} images.",
             "", "| eps | " + " | ".join(f"{m}: top-1 % / change / agreement % / KL"
                                        for m in MODES) + " |",
             "|---|" + "---:|" * len(MODES)]
    for k in EPS_LOG2:
        cells = []
        for mode in MODES:
            r = next(r for r in runs if r["mode"] == mode and r["k"] == k)
            cells.append(f"{r['top1']:.2f} / {r['change']:+.2f} / {r['agree']:.2f} / "
                         f"{r['kl']:.5f}")
        mark = " (default)" if 2.0**-k == qconfig.DEFAULT_LOG2_EPS else ""
        lines.append(f"| 2^-{k}{mark} | " + " | ".join(cells) + " |")
    return lines + [""]


def lmin_table(name: str, runs: list[dict]) -> list[str]:
    """L_min per Softmax (log2 units) and the log step s; identical in both modes, since
    calibration reads the float model."""
    runs = [r for r in runs if r["mode"] == "softmax only"]
    count = len(runs[0]["log2"])
    lines = [f"### {name}: L_min per Softmax (log2 units), and the step s", "",
             "| eps | " + " | ".join(f"#{i}" for i in range(count)) + " | s (octaves per code) |",
             "|---|" + "---:|" * (count + 1)]
    for r in runs:
        lmins = [-z * s for s, z in r["log2"]]
        steps = [s for s, _ in r["log2"]]
        lines.append(f"| 2^-{r['k']} | " + " | ".join(f"{v:.1f}" for v in lmins) +
                     f" | {min(steps):.3f}–{max(steps):.3f} |")
    return lines + [""]


def summary(sweeps: dict) -> list[str]:
    """Measured facts behind the default, one line per model and mode."""
    lines = []
    for name, runs in sweeps.items():
        for mode in MODES:
            rs = [r for r in runs if r["mode"] == mode]
            flat = [r for r in rs if r["k"] >= FLAT_FROM]
            coarse = [r for r in rs if r["k"] < FLAT_FROM]
            default = next(r for r in rs if 2.0**-r["k"] == qconfig.DEFAULT_LOG2_EPS)
            lines.append(
                f"- {name}, {mode}: for eps ≤ 2^-{FLAT_FROM}, agreement "
                f"{min(r['agree'] for r in flat):.2f}–{max(r['agree'] for r in flat):.2f} %, "
                f"change {min(r['change'] for r in flat):+.2f} to "
                f"{max(r['change'] for r in flat):+.2f}; "
                + ", ".join(f"at 2^-{r['k']}: agreement {r['agree']:.2f} %, change "
                            f"{r['change']:+.2f}" for r in coarse)
                + f"; default 2^-{default['k']}: "
                f"agreement {default['agree']:.2f} %, change {default['change']:+.2f}.")
    return lines


def plot(sweeps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_change, ax_agree) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {m: s for m, s in zip(MODES, ("--", "-"))}
    for i, (name, runs) in enumerate(sweeps.items()):
        for mode in MODES:
            rs = [r for r in runs if r["mode"] == mode]
            ks = [r["k"] for r in rs]
            kw = dict(color=f"C{i}", linestyle=styles[mode], marker="o", label=f"{name}, {mode}")
            ax_change.plot(ks, [r["change"] for r in rs], **kw)
            ax_agree.plot(ks, [r["agree"] for r in rs], **kw)
    default_k = -math.log2(qconfig.DEFAULT_LOG2_EPS)
    for ax, ylabel in ((ax_change, "top-1 change vs FP32 (points, negative = loss)"),
                       (ax_agree, "top-1 agreement with FP32 (%)")):
        ax.axvline(default_k, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xticks(EPS_LOG2, [f"$2^{{-{k}}}$" for k in EPS_LOG2])
        ax.set(xlabel="log2 epsilon", ylabel=ylabel)
        ax.grid(alpha=0.3)
    ax_change.axhline(0, color="black", linewidth=0.6)
    fig.legend(*ax_change.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"log2 Softmax quantizer: eps sweep on {EVAL.parent.name}/{EVAL.name} "
                 f"(dotted: default)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(sweeps: dict, command: str, png: str, notes: str) -> str:
    lines = ["# log2 epsilon: the sweep behind the default", "",
             measured_line(command) + ": the reference checkpoints, calibrated on "
             f"{NUM_CALIB} images of `imagenette/train`, evaluated on `imagenette/val`; "
             "*softmax only* = `QuantConfig(parts={'softmax'}, log2_eps=eps)` (isolates the "
             "log2 quantizer), *paper recipe* = `QuantConfig(log2_eps=eps)`. change = quantized "
             "top-1 − FP32 top-1 (points, negative = loss, the sign of every doc: "
             "[results.md](results.md)), agreement = same top-1 as FP32.", "",
             f"![top-1 change and agreement vs eps]({png})", "", "## What the sweep shows", ""]
    default_k = -math.log2(qconfig.DEFAULT_LOG2_EPS)
    lines += summary(sweeps) + ["", f"## Why the default is 2^-{default_k:.0f}", "",
                                notes.strip("\n")]
    lines += ["", "## Accuracy", ""]
    for name, runs in sweeps.items():
        lines += accuracy_table(name, runs)
    lines += ["## Calibrated log2 range", "",
              "L_min = −zero_point·scale of each `Log2QuantDequant` node (Softmax nodes in "
              "graph order), i.e. log2(max(min x, eps)) over the calibration images: where it "
              "equals log2 eps the floor clamps observed probabilities; where it stops following "
              "eps, the smallest observed probability sets it and smaller eps change nothing.", ""]
    for name, runs in sweeps.items():
        lines += lmin_table(name, runs)
    return "\n".join(lines)


def main(argv=None) -> int:
    args = reference_parser(__doc__, "docs/log2_eps.md").parse_args(argv)
    sweeps = {ref["name"]: sweep_model(ref, args.limit) for ref in selected_references(args)}
    out = Path(args.out)
    png = out.with_suffix(".png")
    plot(sweeps, png)
    notes = kept_notes(out, "(the argument for the default: written by hand after a run)")
    out.write_text(render(sweeps, command_line(__file__, argv), png.name, notes),
                   encoding="utf-8")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
