"""Image preprocessing and listing of labelled images, for calibration and evaluation.

``load_image`` reproduces timm's eval transform (``transforms_imagenet_eval`` with the
default ``crop_mode="center"``) in NumPy + PIL, so that accuracy measured here matches
accuracy measured in PyTorch without importing torch:

    RGB -> resize shorter side to floor(size / crop_pct)  (torchvision Resize, PIL filter)
        -> center crop size x size                        (torchvision CenterCrop rounding)
        -> float32 / 255 -> (x - mean) / std              (ToTensor + Normalize, float32)

Models whose input is not a square image (text-line recognizers: fixed height, free or
wide width) take ``resize="pad"``, PaddleOCR's ``resize_norm_img``: height kept at
``input_size``, aspect kept, width capped at ``width``, then zero padding on the right (after
normalization, as PaddleOCR pads). ``resize="stretch"`` resizes to ``input_size x width``
whatever the aspect. ``channel_order="bgr"`` feeds BGR (OpenCV-trained models), "gray" one
luma channel (PIL's "L", converted before resizing); ``mean`` and ``std`` have one value per
input channel, in the model's channel order.

Labelled folders come in three layouts (see ``list_labelled``); class indices are always
ImageNet-1k indices (timm/torchvision order: the sorted wnids).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CLASSES_TSV = Path(__file__).resolve().parent / "data" / "imagenet_classes.tsv"
RESIZE_MODES = ("crop", "pad", "stretch")
CHANNEL_ORDERS = ("rgb", "bgr", "gray")
_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def slashed(values) -> str:
    """0.5/0.5/0.5: per-channel values for one line of text."""
    return "/".join(f"{v:g}" for v in values)


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing of one model: a square crop of ``input_size`` pixels (``resize``
    "crop"), or a line ``input_size`` high and ``width`` wide ("pad", "stretch")."""

    input_size: int
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: str = "crop"
    width: int | None = None  # "pad": None = the images' median width (see ``fit_width``)
    channel_order: str = "rgb"

    def __post_init__(self):
        if not isinstance(self.input_size, int) or self.input_size <= 0:
            raise ValueError(f"input_size must be a positive int, got {self.input_size!r}")
        # crop_pct > 1 would need torchvision's zero padding; no timm eval config uses it.
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if self.interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_FILTERS)}, "
                             f"got {self.interpolation!r}")
        self._check_shape()
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != self.channels:
                count = "1 value" if self.channels == 1 else f"{self.channels} values"
                raise ValueError(f"{name} needs {count} (one per {self.channel_order} "
                                 f"channel), got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std!r}")

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "gray" else 3

    def _check_shape(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {list(RESIZE_MODES)}, got {self.resize!r}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {list(CHANNEL_ORDERS)}, "
                             f"got {self.channel_order!r}")
        if self.width is not None and (not isinstance(self.width, int) or self.width <= 0):
            raise ValueError(f"width must be a positive int, got {self.width!r}")
        if self.resize == "crop" and self.width not in (None, self.input_size):
            raise ValueError(f"resize 'crop' makes {self.input_size}x{self.input_size} squares, "
                             f"not width {self.width}; use resize 'pad' or 'stretch' for an "
                             "input that is not square")
        if self.resize == "stretch" and self.width is None:
            raise ValueError("resize 'stretch' needs a width (--input-width)")

    def describe(self) -> str:
        """One line: what an image goes through."""
        if self.resize == "crop":
            shape = f"center crop {self.input_size}x{self.input_size} (crop_pct {self.crop_pct:g})"
        else:
            shape = f"{self.resize} to {self.input_size}x{self.width or 'median width'}"
        return (f"{shape}, {self.interpolation}, {self.channel_order.upper()}, "
                f"mean {slashed(self.mean)}, std {slashed(self.std)}")

    @property
    def resize_size(self) -> int:
        """Shorter side before the crop: ``floor(input_size / crop_pct)`` as in timm."""
        return math.floor(self.input_size / self.crop_pct)

    @classmethod
    def from_dict(cls, cfg: dict) -> "Preprocess":
        """From a timm data config (``input_size`` as ``[3, H, W]`` or an int), plus the
        optional keys ``resize``, ``channel_order`` (and ``width`` with an int size)."""
        resize = cfg.get("resize", "crop")
        size, width = cfg["input_size"], cfg.get("width")
        if not isinstance(size, int):
            if len(size) != 3 or (resize == "crop" and size[1] != size[2]):
                raise ValueError(f"only square inputs [3, N, N] can be center-cropped, got "
                                 f"{size!r}; add \"resize\": \"pad\" or \"stretch\"")
            size, width = int(size[1]), None if resize == "crop" else int(size[2])
        crop_mode = cfg.get("crop_mode") or "center"
        if crop_mode != "center":
            raise ValueError(f"crop_mode {crop_mode!r} is not supported (only 'center')")
        return cls(input_size=size, crop_pct=float(cfg.get("crop_pct") or 0.875),
                   interpolation=cfg.get("interpolation", "bicubic"),
                   mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                   std=tuple(cfg.get("std", IMAGENET_STD)),
                   resize=resize, width=width, channel_order=cfg.get("channel_order", "rgb"))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Preprocess":
        """From a reference JSON (key ``eval_preprocessing``) or a bare data-config JSON."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object with the preprocessing")
        try:
            return cls.from_dict(data.get("eval_preprocessing", data))
        except KeyError as exc:
            raise ValueError(f"{path}: no {exc.args[0]!r} in the preprocessing config") from None

    @classmethod
    def from_timm(cls, model_name: str) -> "Preprocess":
        """From the pretrained config of a timm model (builds it without weights)."""
        try:
            import timm
        except ImportError:
            raise ImportError("Preprocess.from_timm needs timm: pip install 'onnxquant[torch]', "
                              "or give the preprocessing explicitly") from None
        model = timm.create_model(model_name, pretrained=False)
        return cls.from_dict(timm.data.resolve_data_config({}, model=model))


GRAY_NORMALIZATION = dict(mean=(0.5,), std=(0.5,))  # (x/255 - 0.5)/0.5, CRNN's


def default_preprocess(height: int | None, width: int | None, channels: int | None = 3
                       ) -> Preprocess:
    """Preprocessing for a model input of ``channels`` x ``height`` x ``width`` (None: free)
    when the user gives none: timm's ImageNet eval crop for square (or fully free) inputs; for
    a fixed height with another or a free width (text-line recognizers) the "pad" resize; one
    channel: gray, (x/255 - 0.5)/0.5."""
    gray = dict(channel_order="gray", **GRAY_NORMALIZATION) if channels == 1 else {}
    if height is None or height == width:
        return Preprocess(input_size=width or height or 224, **gray)
    return Preprocess(input_size=height, resize="pad", width=width, **gray)


def for_input(pre: Preprocess, height: int | None, width: int | None,
              channels: int | None = None) -> Preprocess:
    """``pre`` with the model's fixed width filled in where a line resize has none; with
    ``channels`` (images are read), a channel count the model does not take is refused."""
    if channels is not None and channels != pre.channels:
        fix = {1: "pass --channel-order gray", 3: "pass --channel-order rgb or bgr"}.get(
            channels, f"images give 1 or 3; pass --calib FILE.npy of N x {channels} x H x W")
        raise UserError(f"the model input has {channels} channel(s), the preprocessing makes "
                        f"{pre.channels} ({pre.channel_order}); {fix}")
    if pre.resize != "crop" and pre.width is None and width is not None:
        return replace(pre, width=width)
    return pre


def _resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(int): shorter side = short, longer side truncated (int())."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


@contextlib.contextmanager
def _reading(path):
    """Image.open(path), any failure of PIL's a one-line UserError naming the file."""
    try:
        with Image.open(path) as img:
            yield img
    except Image.DecompressionBombError:
        raise UserError(f"{path}: image header claims more than {Image.MAX_IMAGE_PIXELS * 2} "
                        "pixels (decompression bomb?); remove it or resize it") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as exc:  # PIL raises all of these
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: cannot read image ({first}); remove it or fix the file") from None


def _open(path, pre: Preprocess) -> Image.Image:
    """The image at ``path``, decoded and converted to the model's mode (``_mode``)."""
    with _reading(path) as img:
        return img.convert(_mode(pre))


def _center_crop(img: Image.Image, pre: Preprocess) -> Image.Image:
    """timm's eval resize (shorter side) and torchvision's center crop."""
    size = _resized_size(img.width, img.height, pre.resize_size)
    if size != img.size:  # torchvision returns the image untouched when sizes match
        img = img.resize(size, _FILTERS[pre.interpolation])
    crop = pre.input_size
    # Python's round (half to even), as torchvision's CenterCrop.
    top = int(round((img.height - crop) / 2.0))
    left = int(round((img.width - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def normalize(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """float32 CHW in the model's channel order: x / 255, then (x - mean) / std per channel."""
    x = np.asarray(img, dtype=np.float32)
    x = (x[None] if x.ndim == 2 else x.transpose(2, 0, 1)) / np.float32(255.0)
    if pre.channel_order == "bgr":
        x = x[::-1]
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(-1, 1, 1)
    return (x - mean) / std


def line_width(img_size: tuple[int, int], height: int) -> int:
    """Width of an image resized to ``height`` with its aspect kept (PaddleOCR rounds up)."""
    width, h = img_size
    return math.ceil(height * width / h)


def _mode(pre: Preprocess) -> str:
    """PIL mode of a model's images: luma ("L") for gray, else RGB; set before resizing."""
    return "L" if pre.channel_order == "gray" else "RGB"


def _in_mode(img: Image.Image, pre: Preprocess) -> Image.Image:
    return img if img.mode == _mode(pre) else img.convert(_mode(pre))


def pad_line(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """PaddleOCR's ``resize_norm_img``: aspect kept, width capped, right zero padding."""
    img = _in_mode(img, pre)
    height, width = pre.input_size, pre.width
    w = min(width, line_width(img.size, height))
    x = np.zeros((pre.channels, height, width), np.float32)
    x[:, :, :w] = normalize(img.resize((w, height), _FILTERS[pre.interpolation]), pre)
    return x


def load_image(path: str | os.PathLike, pre: Preprocess) -> np.ndarray:
    """One image as float32 CHW; "crop" exactly as timm's eval transform computes it."""
    img = _open(path, pre)
    if pre.resize == "crop":
        return normalize(_center_crop(img, pre), pre)
    if pre.width is None:
        raise ValueError("resize 'pad' needs a width here: call fit_width first")
    if pre.resize == "stretch":
        return normalize(img.resize((pre.width, pre.input_size), _FILTERS[pre.interpolation]), pre)
    return pad_line(img, pre)


def fit_width(paths: Sequence, pre: Preprocess) -> Preprocess:
    """``pre`` with a width when "pad" has none (the model's width is free): the median width
    of the images at its height, so half the lines are padded and half squeezed.

    On the PP-OCRv6 recognizer at W4A8 with GPTQ (three sets of 32 calibration lines, 300
    test lines; docs/ocr.md) the median width lost 0.33 / 0.67 / 0.33 points of line accuracy
    (a pixel either way: up to 2.67, this figure's noise), the widest line (PaddleOCR's rule
    for one batch, mostly padding) 3.33 / 3.67 / 5.33 in twice the time, its training width
    320 2.00 / 2.00 / 3.67. Reads headers only.
    """
    if pre.resize != "pad" or pre.width is not None:
        return pre
    widths = []
    for path in paths:
        with _reading(path) as img:
            widths.append(line_width(img.size, pre.input_size))
    return replace(pre, width=max(1, math.ceil(np.median(widths))) if widths else 1)


def iter_batches(paths: Sequence, pre: Preprocess, batch_size: int = 32,
                 workers: int | None = None) -> Iterator[np.ndarray]:
    """Float32 NCHW batches in the order of ``paths``; the next batch decodes meanwhile.

    PIL releases the GIL while decoding and resizing, so threads are enough.
    """
    paths = list(paths)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        pending = None
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            futures = [pool.submit(load_image, p, pre) for p in chunk]
            if pending is not None:
                yield np.stack([f.result() for f in pending])
            pending = futures
        if pending:
            yield np.stack([f.result() for f in pending])


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All images under ``folder`` (recursive, extensions case-insensitive), sorted.

    os.walk with the extension checked on the name, no stat per file: 0.05 s for the 9,103
    Imagenette train images where rglob + is_file took 0.3-0.5 s (a third of a quantization).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; pass a folder of images")
    relative = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel_root = os.path.relpath(root, folder)
        relative += [name if rel_root == "." else f"{rel_root}/{name}" for name in files
                     if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    found = [folder / r for r in sorted(relative)]
    if not found:
        raise UserError(f"{folder}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def take_evenly(items: Sequence, n: int | None) -> list:
    """``n`` items spread evenly over ``items`` (the middle of each of n equal slices).

    Listings are sorted by class folder or class-prefixed names, so an even spread shows
    every class to calibration, where the first n would show only the first classes.
    """
    items = list(items)
    if n is None or n >= len(items):
        return items
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [items[(2 * i + 1) * len(items) // (2 * n)] for i in range(n)]


def wnid_to_index(path: str | os.PathLike = CLASSES_TSV) -> dict[str, int]:
    """ImageNet-1k wnid -> class index, from a ``index  wnid  names`` TSV."""
    with open(path, encoding="utf-8", newline="") as f:
        return {r["wnid"]: int(r["index"]) for r in csv.DictReader(f, delimiter="\t")}


def _read_label_rows(tsv: Path) -> list[tuple[str, int]]:
    """(relative path, class index) rows of a labels TSV with ``path`` and a class column."""
    with open(tsv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        fields = reader.fieldnames or []
        rows = list(reader)
    if "path" not in fields or not ({"class_index", "wnid"} & set(fields)):
        raise UserError(f"{tsv}: needs a header with columns 'path' and 'class_index' (or "
                        f"'wnid'), found {fields}")
    if "class_index" in fields:
        return [(r["path"], int(r["class_index"])) for r in rows]
    wnids = wnid_to_index()
    unknown = sorted({r["wnid"] for r in rows} - set(wnids))
    if unknown:
        raise UserError(f"{tsv}: unknown wnid {unknown[0]!r}; use ImageNet-1k wnids")
    return [(r["path"], wnids[r["wnid"]]) for r in rows]


def _rows_under(rows, base: Path, folder: Path) -> list[tuple[Path, int]]:
    """Rows (paths relative to ``base``) whose file lies inside ``folder``."""
    kept = []
    for rel, label in rows:
        path = base / rel
        if path.resolve().is_relative_to(folder):
            kept.append((path, label))
    return kept


def _from_tsv(folder: Path, tsv: Path, explicit: bool) -> list[tuple[Path, int]]:
    """Paths are relative to the TSV's folder; for an explicit TSV kept outside the image
    folder (a flat folder with its labels elsewhere) they are relative to the image folder."""
    rows = _read_label_rows(tsv)
    items = _rows_under(rows, tsv.resolve().parent, folder)
    if not items and explicit:
        items = _rows_under(rows, folder, folder)
    missing = [p for p, _ in items if not p.is_file()]
    if missing:
        raise UserError(f"{tsv}: {len(missing)} listed images are missing, e.g. {missing[0]}")
    return items


def _from_wnid_folders(folder: Path) -> list[tuple[Path, int]]:
    """``folder/<wnid>/**/*.JPEG``; folders not named like a wnid are ignored."""
    wnids = wnid_to_index()
    items = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name in wnids):
        items += [(p, wnids[sub.name]) for p in sorted(sub.rglob("*")) if _is_image(p)]
    return items


def _find_labels_tsv(folder: Path) -> Path | None:
    for parent in (folder, *folder.parents):
        if (parent / "labels.tsv").is_file():
            return parent / "labels.tsv"
    return None


def list_labelled(folder: str | os.PathLike,
                  labels_tsv: str | os.PathLike | None = None) -> list[tuple[Path, int]]:
    """(image path, ImageNet class index) pairs under ``folder``, sorted by path.

    Labels come from, in order: the explicit ``labels_tsv``; the nearest ``labels.tsv`` in
    ``folder`` or a parent (rows outside ``folder`` are dropped, so ``imagenette/val`` keeps
    only the val rows of ``imagenette/labels.tsv``); ``<folder>/<wnid>/`` subfolders.
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; pass a folder of labelled images")
    if labels_tsv is not None:
        tsv = Path(labels_tsv)
        if not tsv.is_file():
            raise UserError(f"{tsv}: no such labels file")
        items = _from_tsv(folder, tsv, explicit=True)
    else:
        tsv = _find_labels_tsv(folder)
        items = _from_tsv(folder, tsv, explicit=False) if tsv else []
        items = items or _from_wnid_folders(folder)
    if not items:
        raise UserError(f"{folder}: no labelled images found; add a labels.tsv (columns path, "
                        f"class_index), use <wnid>/ subfolders, or pass --labels")
    return sorted(items, key=lambda item: item[0].as_posix())
