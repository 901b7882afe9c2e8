"""Top-1/top-5 of ONNX classifiers on labelled images, and float-vs-quantized comparison.

Models run in onnxruntime on CPU, one session per model for the whole run. Labels are
ImageNet-1k indices; a model with fewer outputs (the 10-class reference models) gives a
``class_map``: output index -> ImageNet index. Images whose class the model cannot
predict are skipped and counted, not scored as errors.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from .errors import UserError
from .images import Preprocess, iter_batches, list_labelled, take_evenly
from .preprocess_args import add_preprocess_arguments, preprocess_from_args

Model = Union[str, os.PathLike, onnx.ModelProto]


@dataclass
class EvalResult:
    """Accuracy of one model; ``logits`` (n, C) and ``labels`` (n,) are in output-index space."""

    name: str
    n: int
    top1: float  # percent
    top5: float  # percent (top-C when the model has fewer than 5 outputs)
    skipped: int  # images whose class is not among the model's outputs
    logits: np.ndarray
    labels: np.ndarray


@dataclass
class CompareResult:
    """Two models on the same images; ``kl`` is the mean KL(softmax(a) || softmax(b))."""

    a: EvalResult
    b: EvalResult
    agreement: float  # percent of images with the same top-1
    kl: float
    max_abs_err: float  # max |logit_a - logit_b| over all images and outputs
    change_se: float = 0.0  # standard error of b's top-1 minus a's from these images alone



class _Runner:
    """One onnxruntime CPU session; accepts any batch, splits/pads for a fixed batch dim."""

    def __init__(self, model: Model, spinning: bool = True):
        opts = ort.SessionOptions()
        # Two sessions spinning their intra-op threads while the other one runs slow both
        # down; turning spinning off costs nothing measurable for batched evaluation.
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.name = _model_name(model)
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        try:
            self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped failures
            raise UserError(f"{self.name}: onnxruntime cannot load the model ({exc})") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        first = self.input_shape[0] if self.input_shape else None
        self.fixed_batch = first if isinstance(first, int) and first > 0 else None
        last = self.session.get_outputs()[0].shape[-1]
        self.num_outputs = last if isinstance(last, int) else None

    def check_input(self, pre: Preprocess) -> None:
        """A fixed spatial size must match the preprocessing crop."""
        hw = self.input_shape[2:]
        if all(isinstance(d, int) for d in hw) and hw != [pre.input_size] * 2:
            raise UserError(f"{self.name}: input is {hw[0]}x{hw[1]} but the preprocessing crops "
                            f"{pre.input_size}x{pre.input_size}; fix --input-size")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch is None:
            return self._run(x)
        b = self.fixed_batch
        outs = []
        for start in range(0, len(x), b):
            chunk = x[start:start + b]
            pad = np.zeros((b - len(chunk),) + x.shape[1:], x.dtype)
            outs.append(self._run(np.concatenate([chunk, pad]))[:len(chunk)])
        return np.concatenate(outs)

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: x})[0]
        return out.reshape(len(x), -1).astype(np.float32)


def _model_name(model: Model) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "model"
    path = Path(model)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    return path.name


def _targets(items, class_map, num_outputs):
    """Keep the images the model can classify; map labels to output indices."""
    if class_map is None:
        index = None if num_outputs is None else {i: i for i in range(num_outputs)}
    else:
        if num_outputs is not None and len(class_map) != num_outputs:
            raise UserError(f"class map has {len(class_map)} entries but the model has "
                            f"{num_outputs} outputs; give one ImageNet index per output")
        index = {int(c): i for i, c in enumerate(class_map)}
    if index is None:
        return [p for p, _ in items], np.array([c for _, c in items], np.int64)
    top = max((c for _, c in items), default=-1)
    if class_map is None and top >= num_outputs:
        raise UserError(f"the model has {num_outputs} outputs but the labels go up to class "
                        f"{top} (ImageNet-1k indices?); pass --class-map (the label of each "
                        "output) or --reference-json")
    kept = [(p, index[c]) for p, c in items if c in index]
    if not kept:
        raise UserError("no image's class is among the model's outputs; pass --class-map "
                        "or --reference-json")
    if len(kept) * 2 < len(items):
        raise UserError(f"only {len(kept)} of {len(items)} images have a class the model "
                        "predicts: the score would not describe these images; pass the "
                        "images of the model's classes (or the right --class-map)")
    return [p for p, _ in kept], np.array([t for _, t in kept], np.int64)


def _scores(name, logits, labels, skipped) -> EvalResult:
    k = min(5, logits.shape[1])
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    top1 = float(np.mean(topk[:, 0] == labels) * 100)
    top5 = float(np.mean(np.any(topk == labels[:, None], axis=1)) * 100)
    return EvalResult(name, len(labels), top1, top5, skipped, logits, labels)


def _run_models(models, images, pre, class_map, batch_size, limit, progress):
    """One pass over the images, every model on each batch."""
    runners = [_Runner(m, spinning=len(models) == 1) for m in models]
    for r in runners:
        r.check_input(pre)
    items = list_labelled(images) if isinstance(images, (str, os.PathLike)) else list(images)
    items = take_evenly(items, limit)
    paths, labels = _targets(items, class_map, runners[0].num_outputs)
    outs = [[] for _ in runners]
    with tqdm(total=len(paths), unit="img", disable=not progress, desc="eval") as bar:
        for x in iter_batches(paths, pre, batch_size):
            for out, runner in zip(outs, runners):
                out.append(runner(x))
            bar.update(len(x))
    skipped = len(items) - len(paths)
    return [_scores(r.name, np.concatenate(o), labels, skipped) for r, o in zip(runners, outs)]


def evaluate(model: Model, images, pre: Preprocess, class_map: Sequence[int] | None = None,
             batch_size: int = 32, limit: int | None = None, progress: bool = True) -> EvalResult:
    """Top-1/top-5 of ``model`` on ``images``: a labelled folder or (path, class) pairs.

    ``limit`` takes that many images spread evenly over the sorted list (all classes).
    """
    return _run_models([model], images, pre, class_map, batch_size, limit, progress)[0]


def evaluate_many(models: Sequence[Model], images, pre: Preprocess,
                  class_map: Sequence[int] | None = None, batch_size: int = 32,
                  limit: int | None = None, progress: bool = True) -> list[EvalResult]:
    """``evaluate`` for several models in one pass: each image is decoded and preprocessed
    once and every model runs on each batch (sessions do not spin, DESIGN.md section 7).

    The results are in the order of ``models``; judge one against another with
    ``compare_results``.
    """
    models = list(models)
    if not models:
        raise ValueError("evaluate_many needs at least one model")
    return _run_models(models, images, pre, class_map, batch_size, limit, progress)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def compare(model_a: Model, model_b: Model, images, pre: Preprocess,
            class_map: Sequence[int] | None = None, batch_size: int = 32,
            limit: int | None = None, progress: bool = True) -> CompareResult:
    """Both models on the same images in one pass; b is judged against a (the float one)."""
    a, b = _run_models([model_a, model_b], images, pre, class_map, batch_size, limit, progress)
    return compare_results(a, b)


def compare_results(a: EvalResult, b: EvalResult) -> CompareResult:
    """Judge ``b`` against ``a`` (the float model); both evaluated on the same images."""
    if a.logits.shape != b.logits.shape:
        raise UserError(f"{a.name} has {a.logits.shape[1]} outputs, {b.name} has "
                        f"{b.logits.shape[1]}; compare models of the same classifier")
    la, lb = _log_softmax(a.logits), _log_softmax(b.logits)
    kl = float(np.mean(np.sum(np.exp(la) * (la - lb), axis=1)))
    agreement = float(np.mean(a.logits.argmax(1) == b.logits.argmax(1)) * 100)
    err = float(np.max(np.abs(a.logits - b.logits)))
    return CompareResult(a, b, agreement, kl, err, paired_change_se(a, b))


def paired_change_se(a: EvalResult, b: EvalResult) -> float:
    """Standard error, in points, of ``b``'s top-1 minus ``a``'s as an estimate over the
    population these images were drawn from: the spread of the per-image difference
    (-1, 0 or +1) over sqrt(n). Only images one model gets right and the other wrong count,
    so 500 images with 30 of them make it about 1.1 points."""
    d = ((b.logits.argmax(1) == b.labels).astype(np.float64)
         - (a.logits.argmax(1) == a.labels))
    return float(np.std(d, ddof=1) / np.sqrt(len(d)) * 100) if len(d) > 1 else 0.0


# ---- CLI glue (wired into `onnxquant eval` by onnxquant.cli) ----

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``onnxquant eval``."""
    parser.add_argument("model", help="ONNX classifier (the float model when comparing)")
    parser.add_argument("--images", required=True, help="folder of labelled images")
    parser.add_argument("--labels", help="labels TSV (columns path, class_index)")
    parser.add_argument("--compare", metavar="QUANT.onnx", help="second model, judged against MODEL")
    add_preprocess_arguments(parser)
    parser.add_argument("--class-map", help="ImageNet index of each output, e.g. '0,217,482'")
    parser.add_argument("--limit", type=int, help="evaluate N images spread over the classes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("-q", "--quiet", "--no-progress", dest="no_progress",
                        action="store_true", help="no progress bar")


def _input_side(path) -> int | None:
    """Static H of the model's image input, or None (missing/odd file: checked later)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        return int(dims[-1].dim_value) or None if len(dims) == 4 else None
    except Exception:  # noqa: BLE001 - the evaluation itself reports a bad model in one line
        return None


def _preprocess_from_args(args) -> tuple[Preprocess, list[int] | None]:
    """Shared preprocessing options, plus ``--class-map`` overriding a reference JSON's."""
    side = _input_side(args.model)
    pre, class_map = preprocess_from_args(args, side, side)
    if args.class_map:
        try:
            class_map = [int(c) for c in args.class_map.split(",")]
        except ValueError:
            raise UserError(f"--class-map {args.class_map!r}: give comma-separated ints") from None
    return pre, class_map


def _table(results: Sequence[EvalResult]) -> str:
    width = max(len(r.name) for r in results) + 2
    lines = [f"{'model':<{width}}{'images':>8}{'skipped':>9}{'top-1 %':>9}{'top-5 %':>9}"]
    for r in results:
        lines.append(f"{r.name:<{width}}{r.n:>8}{r.skipped:>9}{r.top1:>9.2f}{r.top5:>9.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``onnxquant eval``: print the accuracy table; user errors raise UserError."""
    pre, class_map = _preprocess_from_args(args)
    items = list_labelled(args.images, args.labels)
    opts = dict(class_map=class_map, batch_size=args.batch_size, limit=args.limit,
                progress=not args.no_progress)
    start = time.perf_counter()
    if args.compare:
        res = compare(args.model, args.compare, items, pre, **opts)
        results = [res.a, res.b]
    else:
        results = [evaluate(args.model, items, pre, **opts)]
    seconds = time.perf_counter() - start
    print(f"preprocessing: {pre}")
    print(_table(results))
    if args.compare:
        print(f"top-1 agreement {res.agreement:.2f} %   mean KL {res.kl:.5f}   "
              f"max |logit diff| {res.max_abs_err:.4f}")
        print(f"top-1 change {res.b.top1 - res.a.top1:+.2f} points, standard error "
              f"{res.change_se:.2f} from these {res.a.n} images (paired)")
    print(f"{results[0].n} images in {seconds:.1f} s")
    return 0
