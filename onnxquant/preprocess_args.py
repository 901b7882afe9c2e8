"""Image preprocessing options, shared by ``onnxquant`` (calibration), ``inspect`` and ``eval``.

A base configuration (a reference JSON, a timm model's config, or timm's defaults at the
model's own input size), then explicit flags override single fields.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from .errors import UserError
from .images import Preprocess


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("image preprocessing")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--preprocess-json", "--reference-json", dest="preprocess_json",
                        help="JSON with eval_preprocessing (and imagenet_index: the class map "
                             "of a reference checkpoint)")
    source.add_argument("--timm-model", help="take preprocessing from this timm model's config")
    g.add_argument("--input-size", type=int, help="crop size (default: the model input's H)")
    g.add_argument("--crop-pct", type=float, help="crop fraction (default 0.875)")
    g.add_argument("--interpolation", choices=("bicubic", "bilinear", "nearest"),
                   help="resize filter (default bicubic)")
    g.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="default ImageNet's")
    g.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="default ImageNet's")


def _from_json(path: Path) -> tuple[Preprocess, list | None]:
    if not path.is_file():
        raise UserError(f"{path}: no such preprocessing JSON")
    try:
        pre = Preprocess.from_json(path)
        class_map = json.loads(path.read_text(encoding="utf-8")).get("imagenet_index")
    except (ValueError, OSError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: {exc}") from None
    return pre, class_map


def preprocess_from_args(args, input_size: int | None) -> tuple[Preprocess, list | None]:
    """(Preprocess, class map from a reference JSON or None); ``input_size``: the model's H."""
    class_map = None
    if args.preprocess_json:
        pre, class_map = _from_json(Path(args.preprocess_json))
    elif args.timm_model:
        try:
            pre = Preprocess.from_timm(args.timm_model)
        except (ImportError, RuntimeError, ValueError) as exc:  # timm: RuntimeError if unknown
            raise UserError(f"--timm-model {args.timm_model}: {exc}") from None
    else:
        pre = Preprocess(input_size=input_size or 224)
    flags = {"input_size": args.input_size, "crop_pct": args.crop_pct,
             "interpolation": args.interpolation, "mean": args.mean, "std": args.std}
    try:
        pre = replace(pre, **{k: v for k, v in flags.items() if v is not None})
    except ValueError as exc:
        raise UserError(f"preprocessing: {exc}") from None
    return pre, class_map
