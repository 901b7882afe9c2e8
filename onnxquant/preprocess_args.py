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
from .images import (CHANNEL_ORDERS, GRAY_NORMALIZATION, IMAGENET_MEAN, IMAGENET_STD,
                     RESIZE_MODES, Preprocess, default_preprocess)


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("image preprocessing")
    source = g.add_mutually_exclusive_group()
    source.add_argument("--preprocess-json", "--reference-json", dest="preprocess_json",
                        help="JSON with eval_preprocessing (and imagenet_index: the class map "
                             "of a reference checkpoint)")
    source.add_argument("--timm-model", help="take preprocessing from this timm model's config")
    g.add_argument("--input-size", type=int,
                   help="crop size, or the height for --resize pad|stretch (default: the model "
                        "input's)")
    g.add_argument("--input-width", type=int,
                   help="width for --resize pad|stretch (default: the model input's; pad with a "
                        "free width: the calibration images' median width)")
    g.add_argument("--resize", choices=RESIZE_MODES,
                   help="crop: timm's ImageNet center crop (square inputs, the default); pad: "
                        "text lines, height fixed, aspect kept, right zero padding (the default "
                        "for inputs that are not square); stretch: resize to H x W")
    g.add_argument("--crop-pct", type=float, help="crop fraction (default 0.875)")
    g.add_argument("--interpolation", choices=("bicubic", "bilinear", "nearest"),
                   help="resize filter (default bicubic)")
    g.add_argument("--channel-order", choices=CHANNEL_ORDERS,
                   help="channels the model takes (default rgb, gray for a one-channel input; "
                        "bgr for OpenCV-trained models such as PaddleOCR's)")
    g.add_argument("--mean", type=float, nargs="+", metavar="V",
                   help="one per input channel, in the model's channel order (default "
                        "ImageNet's; 0.5 for gray)")
    g.add_argument("--std", type=float, nargs="+", metavar="V",
                   help="one per input channel, in the model's channel order (default "
                        "ImageNet's; 0.5 for gray)")


def _from_json(path: Path) -> tuple[Preprocess, list | None]:
    if not path.is_file():
        raise UserError(f"{path}: no such preprocessing JSON")
    try:
        pre = Preprocess.from_json(path)
        class_map = json.loads(path.read_text(encoding="utf-8")).get("imagenet_index")
    except (ValueError, OSError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: {exc}") from None
    return pre, class_map


def preprocess_from_args(args, height: int | None, width: int | None,
                         channels: int | None = None) -> tuple[Preprocess, list | None]:
    """(Preprocess, class map from a reference JSON or None) for a model input of
    ``channels`` x ``height`` x ``width`` (None: free)."""
    class_map = None
    if args.preprocess_json:
        pre, class_map = _from_json(Path(args.preprocess_json))
    elif args.timm_model:
        try:
            pre = Preprocess.from_timm(args.timm_model)
        except (ImportError, RuntimeError, ValueError) as exc:  # timm: RuntimeError if unknown
            raise UserError(f"--timm-model {args.timm_model}: {exc}") from None
    else:
        pre = default_preprocess(height, width, channels)
    flags = {"input_size": args.input_size, "crop_pct": args.crop_pct,
             "interpolation": args.interpolation, "resize": args.resize,
             "width": args.input_width, "channel_order": args.channel_order}
    flags.update(_normalization(args, pre))
    try:
        pre = replace(pre, **{k: v for k, v in flags.items() if v is not None})
    except ValueError as exc:
        raise UserError(f"preprocessing: {exc}") from None
    return pre, class_map  # the model's width and channels: calibrate.image_preprocess


def _normalization(args, pre: Preprocess) -> dict:
    """--mean/--std; switching between gray and colour without them takes that side's default."""
    given = {"mean": args.mean, "std": args.std}
    order = args.channel_order
    if order is not None and (order == "gray") != (pre.channel_order == "gray"):
        fallback = GRAY_NORMALIZATION if order == "gray" else {"mean": IMAGENET_MEAN,
                                                                 "std": IMAGENET_STD}
        given = {k: v if v is not None else fallback[k] for k, v in given.items()}
    return given


def guessed_normalization(args) -> bool:
    """True when nothing says how the model normalizes its input (ImageNet's is assumed)."""
    return not (args.preprocess_json or args.timm_model or args.mean or args.std)
