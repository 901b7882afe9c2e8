"""Line and character accuracy of ONNX text recognizers (PaddleOCR CTC models), float vs quantized.

The classifier harness (``onnxquant.evaluate``) needs labelled photos; a text recognizer needs
labelled text lines, which ``onnxquant.ocr_render`` draws. This module is the rest of the
pipeline, following rapidocr's / PaddleOCR's public recognizer code (README of the shared
``real`` assets):

    RGB line -> BGR -> resize to height 48, aspect kept (width capped at the batch width)
             -> (x / 255 - 0.5) / 0.5 -> CHW -> right zero-pad to the batch width (>= 320)
    N x T x C softmax -> greedy CTC: argmax per step, collapse repeats, drop blank (index 0)

The alphabet is the model's own metadata entry ``character``: ``["blank"] + lines + [" "]``.
Scores: line accuracy (exact match), character accuracy (1 - edit distance / characters),
and, between two models, agreement (lines decoded identically).

The DB text detector is judged only against its float original (``detector_compare``): IoU
of the probability maps thresholded at 0.3 on rendered pages, as rapidocr thresholds them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import onnx
from PIL import Image

from .errors import UserError
from .evaluate import _Runner
from .images import Preprocess, line_width, pad_line
from .ocr_render import iter_lines, render_lines, render_pages

Model = Union[str, os.PathLike, onnx.ModelProto]
HEIGHT = 48
MIN_WIDTH = 320
DET_SIDE = 736  # rapidocr's detector config: shorter side at least 736 (limit_type "min")
DET_THRESHOLD = 0.3


@dataclass
class OcrResult:
    """One recognizer on rendered lines; accuracies in percent."""

    name: str
    n: int
    line_acc: float
    char_acc: float
    texts: list[str]  # decoded, in the order of the lines
    seconds: float  # model time only (preprocessing shared)


@dataclass
class OcrCompare:
    """Two recognizers on the same lines; ``b`` judged against ``a`` (the float one)."""

    a: OcrResult
    b: OcrResult
    agreement: float  # percent of lines decoded identically


def load_alphabet(model: Model) -> list[str]:
    """``["blank"] + metadata character lines + [" "]``; UserError if the entry is missing."""
    proto = model if isinstance(model, onnx.ModelProto) else _load_header(model)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "character" not in meta:
        raise UserError(f"{_name(model)}: no 'character' metadata entry (not a PaddleOCR "
                        "recognizer?); pass the float model's alphabet")
    # PaddleOCR reads its dictionary line by line; splitlines() would also split at \x0b etc.
    chars = [c.rstrip("\r") for c in meta["character"].split("\n")]
    return ["blank"] + (chars[:-1] if chars and chars[-1] == "" else chars) + [" "]


def _load_header(path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several untyped failures
        raise UserError(f"{path}: cannot read the ONNX file ({exc})") from None


def _name(model: Model) -> str:
    return model.graph.name if isinstance(model, onnx.ModelProto) else os.fspath(model)


def line_preprocess(width: int | None = None) -> Preprocess:
    """PaddleOCR's recognizer preprocessing as an ``images.Preprocess`` (``onnxquant --calib``
    with a folder of line images: ``--resize pad --interpolation bilinear --mean 0.5 0.5 0.5
    --std 0.5 0.5 0.5 --channel-order bgr``)."""
    return Preprocess(HEIGHT, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3,
                      resize="pad", width=width, channel_order="bgr")


def preprocess(images: Sequence[Image.Image], width: int | None = None) -> np.ndarray:
    """float32 N x 3 x 48 x W: BGR, aspect kept, (x/255-0.5)/0.5, right zero padding.

    W is ``width`` when given (wider lines are squeezed to it, as rapidocr caps them at the
    batch width), else ``48 * max(320/48, widest w/h)``. Resizing is PIL bilinear.
    """
    if width is None:
        width = int(HEIGHT * max(MIN_WIDTH / HEIGHT, *(im.width / im.height for im in images)))
    pre = line_preprocess(width)
    return np.stack([pad_line(im, pre) for im in images])


def ctc_decode(probs: np.ndarray, alphabet: Sequence[str]) -> list[str]:
    """Greedy CTC of N x T x C scores: argmax per step, collapse repeats, drop index 0."""
    if probs.shape[-1] != len(alphabet):
        raise UserError(f"the model has {probs.shape[-1]} classes but the alphabet has "
                        f"{len(alphabet)}; use the recognizer's own metadata alphabet")
    best = probs.argmax(axis=-1)
    keep = best != 0
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    return ["".join(alphabet[k] for k in row[mask]) for row, mask in zip(best, keep)]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    previous = np.arange(len(b) + 1)
    for i, ca in enumerate(a, 1):
        current = np.empty_like(previous)
        current[0] = i
        cost = previous[:-1] + (np.array([cb != ca for cb in b], dtype=np.int64))
        for j in range(1, len(b) + 1):  # insertions chain along the row: sequential
            current[j] = min(previous[j] + 1, current[j - 1] + 1, cost[j - 1])
        previous = current
    return int(previous[-1])


def scores(predicted: Sequence[str], truth: Sequence[str]) -> tuple[float, float]:
    """(line accuracy %, character accuracy %) of decoded texts against the rendered ones."""
    exact = sum(p == t for p, t in zip(predicted, truth))
    errors = sum(levenshtein(p, t) for p, t in zip(predicted, truth))
    chars = max(1, sum(len(t) for t in truth))
    return 100.0 * exact / max(1, len(truth)), 100.0 * (1.0 - errors / chars)


def _decode_all(models, lines, batch_size, alphabet):
    """Every model on each batch; lines sorted by aspect ratio so a batch pads little."""
    runners = [_Runner(m, spinning=len(models) == 1) for m in models]
    width = _fixed_width(runners)
    order = sorted(range(len(lines)), key=lambda i: lines[i][0].width / lines[i][0].height)
    texts = [[""] * len(lines) for _ in runners]
    seconds = [0.0] * len(runners)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        x = preprocess([lines[i][0] for i in index], width)
        for k, runner in enumerate(runners):
            began = time.perf_counter()
            probs = runner(x).reshape(len(x), -1, len(alphabet))
            seconds[k] += time.perf_counter() - began
            for i, text in zip(index, ctc_decode(probs, alphabet)):
                texts[k][i] = text
    return [r.name for r in runners], texts, seconds


def _fixed_width(runners) -> int | None:
    """The input width the recognizers fix (lines are then squeezed or padded to it), or None
    (each batch padded to its widest line); fixed widths that differ are the user's to fix."""
    widths = {r.input_shape[-1] for r in runners if isinstance(r.input_shape[-1], int)}
    if len(widths) > 1:
        raise UserError(f"recognizers fix different input widths {sorted(widths)}; compare "
                        "models of one input shape")
    return widths.pop() if widths else None


def evaluate_many(models: Sequence[Model], lines: Sequence[tuple[Image.Image, str]],
                  batch_size: int = 16, alphabet: Sequence[str] | None = None
                  ) -> list[OcrResult]:
    """Each recognizer on ``lines`` ((image, text) pairs) in one pass over the lines.

    The alphabet defaults to the first model's metadata (quantized copies may lack it).
    """
    models = list(models)
    if not models or not lines:
        raise UserError("OCR evaluation needs at least one model and one text line")
    alphabet = list(alphabet or load_alphabet(models[0]))
    names, texts, seconds = _decode_all(models, lines, batch_size, alphabet)
    truth = [text for _, text in lines]
    return [OcrResult(name, len(lines), *scores(t, truth), t, s)
            for name, t, s in zip(names, texts, seconds)]


def evaluate_ocr(model: Model, lines: Sequence[tuple[Image.Image, str]],
                 batch_size: int = 16, alphabet: Sequence[str] | None = None) -> OcrResult:
    """Line and character accuracy of one recognizer on rendered ``lines``."""
    return evaluate_many([model], lines, batch_size, alphabet)[0]


def agreement(a: OcrResult, b: OcrResult) -> float:
    """Percent of lines that ``a`` and ``b`` decode to the same text."""
    if a.n != b.n:
        raise UserError(f"{a.name} read {a.n} lines, {b.name} {b.n}; compare on the same lines")
    return 100.0 * sum(x == y for x, y in zip(a.texts, b.texts)) / max(1, a.n)


def compare(model_a: Model, model_b: Model, lines: Sequence[tuple[Image.Image, str]],
            batch_size: int = 16) -> OcrCompare:
    """Both recognizers on the same lines in one pass; ``b`` against ``a`` (the float one)."""
    a, b = evaluate_many([model_a, model_b], lines, batch_size)
    return OcrCompare(a, b, agreement(a, b))


LAYOUTS = ("squeeze", "natural", "packed")


def calibration_array(n: int, seed: int, width: int = MIN_WIDTH,
                      alphabet: Sequence[str] | None = None,
                      layout: str = "squeeze") -> np.ndarray:
    """float32 N x 3 x 48 x W of rendered lines, for ``onnxquant --calib FILE.npy``.

    ``layout``: "squeeze" puts one line per sample, squeezed to ``width`` px if wider, else
    right-padded; "natural" one line per sample at its own aspect, padded to the widest;
    "packed" fills each ``width``-px sample with lines at their own aspect side by side, the
    overflow of one sample starting the next (GPTQ's fixed-length segments of concatenated
    text): no padding and no squeezed glyphs, so every position is text as the model reads it.
    Use a seed other than the evaluation set's, so calibration never sees the test lines.
    """
    if layout not in LAYOUTS:
        raise UserError(f"calibration layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if n < 1 or width < 1:
        raise UserError(f"calibration lines: {n} samples of {width} px; both must be positive")
    if layout == "packed":
        return _packed(n, seed, width, alphabet)
    lines = [image for image, _ in render_lines(n, seed, alphabet)]
    return preprocess(lines, width if layout == "squeeze" else None)


def write_calibration_images(folder, n: int, seed: int, alphabet=None) -> list:
    """``n`` rendered lines of ``seed`` as PNG files in ``folder`` (made; it must not exist),
    each at its own size, as a line detector's crops arrive: a folder for ``--calib`` with
    ``line_preprocess()``'s flags. Returns the paths."""
    folder = Path(folder)
    if folder.exists():
        raise UserError(f"{folder}: already exists; name a new folder for the line images")
    folder.mkdir(parents=True)
    paths = []
    for i, (image, _) in enumerate(render_lines(n, seed, alphabet)):
        paths.append(folder / f"line_{i:04d}.png")
        image.save(paths[-1])
    return paths


def _packed(n: int, seed: int, width: int, alphabet) -> np.ndarray:
    parts, filled = [], 0
    for image, _ in iter_lines(seed, alphabet):  # as many lines as fill n samples
        parts.append(_own_width(image))
        filled += parts[-1].shape[-1]
        if filled >= n * width:
            break
    strip = np.concatenate(parts, axis=-1)[..., :n * width]
    return np.ascontiguousarray(strip.reshape(3, HEIGHT, n, width).transpose(2, 0, 1, 3))


def _own_width(image: Image.Image) -> np.ndarray:
    """3 x 48 x w of one line at its own aspect (no padding)."""
    return preprocess([image], line_width(image.size, HEIGHT))[0]


# ---- text detector (DB): agreement of thresholded probability maps ----

@dataclass
class DetCompare:
    """Two detectors on the same rendered pages; percentages."""

    iou: float  # IoU of the maps thresholded at 0.3, all pages pooled
    found_a: float  # rendered lines with >= 20 % of their box above the threshold, model a
    found_b: float


def detector_preprocess(image: Image.Image) -> np.ndarray:
    """1 x 3 x H x W: BGR, shorter side >= 736, both sides rounded to multiples of 32."""
    scale = max(1.0, DET_SIDE / min(image.size))
    w, h = (max(32, int(round(int(side * scale) / 32)) * 32) for side in image.size)
    rgb = np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR), np.float32)
    return ((rgb[:, :, ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)[None].copy()


def _found(mask: np.ndarray, boxes, size) -> list[bool]:
    """Per rendered box (page pixels): is >= 20 % of it text in ``mask`` (map pixels)?"""
    sx, sy = mask.shape[1] / size[0], mask.shape[0] / size[1]
    hits = []
    for x0, y0, x1, y1 in boxes:
        part = mask[int(y0 * sy):int(np.ceil(y1 * sy)), int(x0 * sx):int(np.ceil(x1 * sx))]
        hits.append(part.size > 0 and part.mean() >= 0.2)
    return hits


def detector_calibration_array(n: int, seed: int) -> np.ndarray:
    """float32 N x 3 x 736 x 992 rendered pages (800 x 600), for the detector's ``--calib``."""
    return np.concatenate([detector_preprocess(page) for page, _ in render_pages(n, seed)])


def detector_compare(model_a: Model, model_b: Model, pages: int = 8, seed: int = 1
                     ) -> DetCompare:
    """Float (a) vs quantized (b) detector on ``pages`` rendered pages of text lines."""
    runners = [_Runner(m, spinning=False) for m in (model_a, model_b)]
    inter = union = 0
    found: list[list[bool]] = [[], []]
    for page, boxes in render_pages(pages, seed):
        x = detector_preprocess(page)
        masks = [r(x).reshape(x.shape[2:]) > DET_THRESHOLD for r in runners]
        inter += int(np.sum(masks[0] & masks[1]))
        union += int(np.sum(masks[0] | masks[1]))
        for hits, mask in zip(found, masks):
            hits.extend(_found(mask, boxes, page.size))
    return DetCompare(100.0 * inter / max(1, union), 100.0 * float(np.mean(found[0])),
                      100.0 * float(np.mean(found[1])))
