"""Sweep the log2 epsilon: accuracy of the reference checkpoints against eps.

    for each reference checkpoint, for eps in EPS:
        quantize with the log2 Softmax quantizer alone (parts={"softmax"}) and with the
        full paper recipe, calibrated on 32 images of imagenette/train
        read L_min = -zero_point * scale of every Log2QuantDequant node of the output
    evaluate FP32 and all of them in one pass over imagenette/val (evaluate_many)
    -> docs/log2_eps.md (tables) and docs/log2_eps.png (drop and agreement vs eps)

eps floors the probabilities before log2 (DESIGN.md section 2.3): calibration sets
L_min = log2(max(min x, eps)), so a large eps clamps small probabilities to eps, and a
small one stretches the 2^b codes over more octaves (a coarser step s for the large ones).

    python tools/eps_sweep.py [--models mobilevit_xxs,...] [--limit N] [--out docs/log2_eps.md]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx

import onnxquant
from onnxquant import config as qconfig
from onnxquant import functions
from onnxquant.evaluate import compare_results, evaluate_many

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_table import (ASSETS, CALIB, CALIB_BATCH, NUM_CALIB, kept_notes,  # noqa: E402
                          reference_models)

EVAL = ASSETS / "imagenette" / "val"
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
    start = time.perf_counter()
    results = evaluate_many([str(ref["path"])] + [r["model"] for r in runs], str(EVAL),
                            ref["pre"], ref["class_map"], limit=limit, progress=False)
    print(f"{ref['name']}: {len(results)} models x {results[0].n} images in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    base = results[0]
    for run, res in zip(runs, results[1:]):
        cmp = compare_results(base, res)
        run.update(fp32=base.top1, top1=res.top1, drop=base.top1 - res.top1,
                   agree=cmp.agreement, kl=cmp.kl, n=res.n)
        del run["model"]
    return runs


def accuracy_table(name: str, runs: list[dict]) -> list[str]:
    lines = [f"### {name}", "", f"FP32 top-1 {runs[0]['fp32']:.2f} % on {runs[0]['n']} images.",
             "", "| eps | " + " | ".join(f"{m}: top-1 % / drop / agreement % / KL"
                                        for m in MODES) + " |",
             "|---|" + "---:|" * len(MODES)]
    for k in EPS_LOG2:
        cells = []
        for mode in MODES:
            r = next(r for r in runs if r["mode"] == mode and r["k"] == k)
            cells.append(f"{r['top1']:.2f} / {r['drop']:+.2f} / {r['agree']:.2f} / {r['kl']:.5f}")
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


def summary(measured: dict) -> list[str]:
    """Measured facts behind the default, one line per model and mode."""
    lines = []
    for name, runs in measured.items():
        for mode in MODES:
            rs = [r for r in runs if r["mode"] == mode]
            flat = [r for r in rs if r["k"] >= FLAT_FROM]
            coarse = [r for r in rs if r["k"] < FLAT_FROM]
            default = next(r for r in rs if 2.0**-r["k"] == qconfig.DEFAULT_LOG2_EPS)
            lines.append(
                f"- {name}, {mode}: for eps ≤ 2^-{FLAT_FROM}, agreement "
                f"{min(r['agree'] for r in flat):.2f}–{max(r['agree'] for r in flat):.2f} %, "
                f"drop {min(r['drop'] for r in flat):+.2f} to {max(r['drop'] for r in flat):+.2f}; "
                + ", ".join(f"at 2^-{r['k']}: agreement {r['agree']:.2f} %, drop {r['drop']:+.2f}"
                            for r in coarse)
                + f"; default 2^-{default['k']}: "
                f"agreement {default['agree']:.2f} %, drop {default['drop']:+.2f}.")
    return lines


def plot(measured: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_drop, ax_agree) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {m: s for m, s in zip(MODES, ("--", "-"))}
    for i, (name, runs) in enumerate(measured.items()):
        for mode in MODES:
            rs = [r for r in runs if r["mode"] == mode]
            ks = [r["k"] for r in rs]
            kw = dict(color=f"C{i}", linestyle=styles[mode], marker="o", label=f"{name}, {mode}")
            ax_drop.plot(ks, [r["drop"] for r in rs], **kw)
            ax_agree.plot(ks, [r["agree"] for r in rs], **kw)
    default_k = -math.log2(qconfig.DEFAULT_LOG2_EPS)
    for ax, ylabel in ((ax_drop, "top-1 drop vs FP32 (points)"),
                       (ax_agree, "top-1 agreement with FP32 (%)")):
        ax.axvline(default_k, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xticks(EPS_LOG2, [f"$2^{{-{k}}}$" for k in EPS_LOG2])
        ax.set(xlabel="log2 epsilon", ylabel=ylabel)
        ax.grid(alpha=0.3)
    ax_drop.axhline(0, color="black", linewidth=0.6)
    fig.legend(*ax_drop.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"log2 Softmax quantizer: eps sweep on {EVAL.parent.name}/{EVAL.name} "
                 f"(dotted: default)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(measured: dict, command: str, png: str, notes: list[str]) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = ["# log2 epsilon: the sweep behind the default", "",
             f"Measured {date} with `{command}` (onnxquant {onnxquant.__version__}, onnxruntime "
             f"{version('onnxruntime')} CPU, Python {platform.python_version()}): the reference "
             f"checkpoints, calibrated on {NUM_CALIB} images of `imagenette/train`, evaluated on "
             "`imagenette/val`; *softmax only* = `QuantConfig(parts={'softmax'}, log2_eps=eps)` "
             "(isolates the log2 quantizer), *paper recipe* = `QuantConfig(log2_eps=eps)`. drop = "
             "FP32 top-1 − quantized top-1 (points), agreement = same top-1 as FP32.", "",
             f"![drop and agreement vs eps]({png})", "", "## What the sweep shows", ""]
    default_k = -math.log2(qconfig.DEFAULT_LOG2_EPS)
    lines += summary(measured) + ["", f"## Why the default is 2^-{default_k:.0f}", ""] + notes
    lines += ["", "## Accuracy", ""]
    for name, runs in measured.items():
        lines += accuracy_table(name, runs)
    lines += ["## Calibrated log2 range", "",
              "L_min = −zero_point·scale of each `Log2QuantDequant` node (Softmax nodes in "
              "graph order), i.e. log2(max(min x, eps)) over the calibration images: where it "
              "equals log2 eps the floor clamps observed probabilities; where it stops following "
              "eps, the smallest observed probability sets it and smaller eps change nothing.", ""]
    for name, runs in measured.items():
        lines += lmin_table(name, runs)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated reference names (default: all)")
    parser.add_argument("--limit", type=int, help="images, spread evenly (default: all)")
    parser.add_argument("--out", default="docs/log2_eps.md")
    args = parser.parse_args(argv)
    refs = reference_models(args.models.split(",") if args.models else None)
    if not refs:
        sys.exit("no reference checkpoints found")
    measured = {ref["name"]: sweep_model(ref, args.limit) for ref in refs}
    out = Path(args.out)
    png = out.with_suffix(".png")
    plot(measured, png)
    command = "python tools/eps_sweep.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    notes = kept_notes(out, "(the argument for the default: written by hand after a run)")
    out.write_text(render(measured, command, png.name, notes), encoding="utf-8")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
