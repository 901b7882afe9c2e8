"""How many calibration images reconstruction needs: a method (default GPTQ) at W4 / W4A8 on
the reference checkpoints, calibrated on several draws of imagenette/train and several sizes,
each scored on every image set. One draw of 32 says little: the draws spread further apart
than the sizes (docs/calib_draws.md).

    python tools/calib_draws.py [--models mobilevit_xxs,...] [--recipes W4,W4A8]
                                [--method gptq] [--sizes 32,64,128] [--draws 3]
                                [--limit 1000] [--seeds 0,1,2] [--bias-correction auto|yes|no]
                                [--set FIELD=JSON ...] [--no-float-target]
                                [--out docs/calib_draws.md]

Draw "listing" is what onnxquant takes from the folder itself (images spread evenly over its
listing); draw s (1, 2, ...) is ``--sizes``' largest count of images drawn at random (seed s)
from it, of which each size takes its share spread evenly, so that the sizes of one draw are
nested. Rows: change in top-1 points and agreement with float per image set; then their mean
over the draws per size, with the standard error of each mean change (se: the spread of
the runs over sqrt(runs); the runs share their test images, so it is the spread of a user's
result, not of the test set; *img se* is the test set's: the standard error of one run's
change from its images alone, paired with float's; *kl*: mean KL(float || quantized) of
the class probabilities, the steadiest of the three). ``--seeds`` adds runs per draw with
other seeds (GPTQ's column draw, the torch methods' batches); ``--set`` any other config
field.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import int8_table  # noqa: E402
import reconstruct_table  # noqa: E402

from onnxquant import QuantConfig, images, reconstruct  # noqa: E402
from onnxquant.config import RECONSTRUCT_METHODS  # noqa: E402

LISTING = "listing"


def draw_folders(work: Path, draws: int, count: int) -> dict:
    """{draw: folder}: the calibration folder itself, and ``draws`` random subsets of
    ``count`` images copied (index-prefixed, so their listing keeps the draw's order)."""
    files = images.list_images(benchlib.CALIB)
    folders = {LISTING: benchlib.CALIB}
    for seed in range(1, draws + 1):
        folder = work / f"draw{seed}"
        folder.mkdir()
        for i, path in enumerate(random.Random(seed).sample(files, count)):
            shutil.copy(path, folder / f"{i:04d}_{Path(path).name}")
        folders[str(seed)] = folder
    return folders


def model_rows(ref: dict, recipe: str, method: str, folders: dict, sizes: list,
               image_sets: tuple, limit, work: Path, extra: dict | None = None,
               seeds: tuple = (0,)) -> list:
    """One row per (draw, seed, size): the model quantized once, scored on every image set."""
    rows, outs = [], []
    for draw, folder in folders.items():
        for seed in seeds:
            for size in sizes:
                cfg = QuantConfig(reconstruct=method, num_calib=size, seed=seed,
                                  **reconstruct_table.RECIPES[recipe], **(extra or {}))
                out = work / f"{ref['name']}.{recipe}.{draw}.{seed}.{size}.onnx"
                seconds = int8_table.timed_quantize(ref["path"], cfg, str(folder), ref["pre"],
                                                    out)
                outs.append(out)
                rows.append({"model": ref["name"], "recipe": f"{recipe} {method}",
                             "draw": draw if len(seeds) == 1 else f"{draw}, seed {seed}",
                             "images": size, "seconds": seconds})
    for image_set in image_sets:
        _, results = benchlib.against_fp32(ref["path"], outs, benchlib.IMAGE_SETS[image_set],
                                           ref, limit, f"{ref['name']} {recipe}")
        for row, res in zip(rows, results):
            for key in ("change", "agree", "kl"):
                row[f"{key} {image_set}"] = res[key]
            row[f"img se {image_set}"] = res["change_se"]
    return rows


def means(rows: list, image_sets: tuple) -> list:
    """Per (model, recipe, images): the mean over draws (and seeds) of each change and
    agreement, and the standard error of each mean change (sd / sqrt(runs))."""
    keys = [f"{k} {s}" for s in image_sets for k in ("change", "agree", "kl", "img se")] + \
        ["seconds"]
    groups = {}
    for row in rows:
        groups.setdefault((row["model"], row["recipe"], row["images"]), []).append(row)
    out = []
    for (m, r, n), g in groups.items():
        row = {"model": m, "recipe": r, "images": n, "draw": f"mean of {len(g)}",
               **{k: statistics.fmean(row[k] for row in g) for k in keys}}
        for s in image_sets:
            changes = [row_[f"change {s}"] for row_ in g]
            row[f"se {s}"] = statistics.stdev(changes) / len(g) ** 0.5 if len(g) > 1 else 0.0
        out.append(row)
    return out


def columns(image_sets: tuple) -> list:
    cols = [("model", "model", ""), ("recipe", "recipe", ""), ("images", "images", "d"),
            ("draw", "draw", "")]
    for s in image_sets:
        short = s.rsplit("/", 1)[-1]
        cols += [(f"change {short}", f"change {s}", "+.2f"), (f"se {short}", f"se {s}", ".2f"),
                 (f"img se {short}", f"img se {s}", ".2f"),
                 (f"agree {short} %", f"agree {s}", ".1f"), (f"kl {short}", f"kl {s}", ".4f")]
    return cols + [("quantize s", "seconds", ".1f")]


def config_fields(pairs: list) -> dict:
    """``["exclude=[\"/stem/*\"]"]`` -> ``{"exclude": ("/stem/*",)}``: QuantConfig fields
    from FIELD=JSON strings (lists become tuples, as the config's fields are)."""
    out = {}
    for pair in pairs:
        field, _, value = pair.partition("=")
        value = json.loads(value)
        out[field] = tuple(value) if isinstance(value, list) else value
    return out


def main(argv=None) -> int:
    p = benchlib.reference_parser(__doc__, "docs/calib_draws.md")
    p.add_argument("--recipes", default="W4,W4A8")
    p.add_argument("--method", choices=RECONSTRUCT_METHODS, default="gptq")
    p.add_argument("--sizes", default="32,64,128")
    p.add_argument("--draws", type=int, default=3, help="random draws besides the listing's")
    p.add_argument("--seeds", default="0",
                   help="QuantConfig.seed values, comma-separated: one run per draw and seed")
    p.add_argument("--bias-correction", choices=("auto", "yes", "no"), default="auto",
                   help="QuantConfig.bias_correction (auto: the default for the recipe)")
    p.add_argument("--no-float-target", action="store_true",
                   help="GPTQ rounds toward the float layer on the quantized inputs, as before "
                        "(reconstruct.FLOAT_TARGET off): the ablation")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="any other QuantConfig field, its value as JSON (repeatable), e.g. "
                        "--set 'exclude=[\"/stem/*\"]'")
    p.add_argument("--image-set", type=int8_table._image_sets,
                   default=tuple(benchlib.IMAGE_SETS))
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.no_float_target:
        reconstruct.FLOAT_TARGET = False
    extra = {"bias_correction": {"auto": None, "yes": True, "no": False}[args.bias_correction],
             **config_fields(args.set)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = draw_folders(Path(tmp), args.draws, max(sizes))
        for ref in benchlib.selected_references(args):
            for recipe in args.recipes.split(","):
                rows += model_rows(ref, recipe, args.method, folders, sizes, args.image_set,
                                   args.limit, Path(tmp), extra,
                                   tuple(int(x) for x in args.seeds.split(",")))
    cols = columns(args.image_set)
    text = (f"# How many calibration images reconstruction needs\n\n"
            f"{benchlib.measured_line(benchlib.command_line(__file__, argv))}.\n\n"
            f"{benchlib.CHANGE}; *agree* = share of images where the quantized model's "
            f"top-1 class is float's; *val* = imagenette/val, *nette* = imagenet-val/nette. "
            f"Calibration images from imagenette/train.\n\n"
            f"## Means over the draws\n\n{benchlib.table(means(rows, args.image_set), cols)}"
            f"\n\n## Every draw\n\n{benchlib.table(rows, cols)}\n\n"
            f"{benchlib.kept_notes(Path(args.out))}\n")
    benchlib.write_doc(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
