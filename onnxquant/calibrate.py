"""Calibration: run the float model once per batch, keep running min/max of what the plan needs.

Only the plan's tensors are added as graph outputs, so onnxruntime computes nothing extra
and memory stays bounded by one batch. Sources: a folder of images (with a Preprocess),
a ``.npy`` file (N x C x H x W float32, already preprocessed), an array, or any object with
onnxruntime's ``CalibrationDataReader`` interface (``get_next() -> dict | None``).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from .errors import UserError
from .model_io import is_large


def model_input(model: onnx.ModelProto):
    """(name, shape with None for symbolic dims) of the single image input."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"graph {model.graph.name!r} has {len(inputs)} inputs; calibration "
                        "supports single-input image models")
    dims = inputs[0].type.tensor_type.shape.dim
    return inputs[0].name, [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _check_batch(batch: np.ndarray, shape: list, origin: str) -> np.ndarray:
    """Refuse a batch that is not float32 of the model input's shape, naming both."""
    expected = "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"
    if batch.dtype != np.float32:
        raise UserError(f"{origin}: calibration data is {batch.dtype}, the model wants float32 "
                        f"{expected} (already preprocessed)")
    ok = batch.ndim == len(shape) and all(d is None or d == b
                                          for d, b in zip(shape[1:], batch.shape[1:]))
    if not ok:
        raise UserError(f"{origin}: calibration batch has shape {list(batch.shape)}, the model "
                        f"input wants {expected}; resize/preprocess to that shape")
    return batch


def _array_batches(array: np.ndarray, batch_size: int, limit: int):
    for start in range(0, min(len(array), limit), batch_size):
        yield array[start:min(start + batch_size, limit)]


def _reader_batches(reader, name: str, limit: int):
    seen = 0
    while seen < limit:
        feed = reader.get_next()
        if feed is None:
            return
        if name not in feed:
            raise UserError(f"calibration reader gave inputs {sorted(feed)}, the model wants {name!r}")
        batch = np.asarray(feed[name])
        seen += len(batch)
        yield batch


def batches(source, name: str, shape: list, cfg, preprocess=None):
    """Yield (origin, float32 batch) from any supported calibration source."""
    size = cfg.batch_size if shape[0] is None else shape[0]
    if hasattr(source, "get_next"):
        for b in _reader_batches(source, name, cfg.num_calib):
            yield "calibration reader", b
        return
    if isinstance(source, np.ndarray):
        yield from (("calibration array", b) for b in _array_batches(source, size, cfg.num_calib))
        return
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: calibration path does not exist; pass a folder of images or a .npy")
    if path.suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise UserError(f"{path}: not a readable .npy file ({exc})") from None
        if array.ndim != len(shape):
            raise UserError(f"{path}: calibration array has shape {list(array.shape)}, the "
                            f"model input has {len(shape)} dimensions (N x C x H x W)")
        yield from ((str(path), np.ascontiguousarray(b))
                    for b in _array_batches(array, size, cfg.num_calib))
        return
    yield from _image_batches(path, shape, cfg, preprocess, size)


def _image_batches(folder: Path, shape: list, cfg, preprocess, size: int):
    from . import images

    if not folder.is_dir():
        raise UserError(f"{folder}: calibration source must be a folder of images or a .npy file")
    paths = images.take_evenly(images.list_images(folder), cfg.num_calib)
    if not paths:
        raise UserError(f"{folder}: no images found (jpg, png, ...); add ~32 representative images")
    pre = preprocess or images.Preprocess(input_size=shape[-1] or 224)
    for batch in images.iter_batches(paths, pre, size):
        yield str(folder), batch


def probe_session(model: onnx.ModelProto, outputs: list):
    """onnxruntime session of the float model returning only ``outputs``.

    The graph outputs are swapped in place and restored (no copy of a large model).
    """
    saved = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        if not is_large(model):
            return ort.InferenceSession(model.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory() as tmp:  # > 2 GB: onnxruntime needs a file
            path = os.path.join(tmp, "calib.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="calib.data")
            session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            onnx.load_external_data_for_model(model, tmp)  # saving moved the tensors out
            return session
    finally:
        del model.graph.output[:]
        model.graph.output.extend(saved)


def collect_stats(model: onnx.ModelProto, tensors: list, source, cfg, preprocess=None,
                  progress: bool = True) -> dict:
    """{tensor: (min, max)} over up to ``cfg.num_calib`` samples of ``source``."""
    if not tensors:
        return {}
    if source is None:
        raise UserError("this recipe needs calibration data: pass --calib DIR (images) or a .npy")
    name, shape = model_input(model)
    source_batches = batches(source, name, shape, cfg, preprocess)
    first = next(source_batches, None)  # surface source errors before the progress bar
    if first is None:
        raise UserError("calibration source gave no samples; pass a folder with images or a "
                        "non-empty .npy")
    _check_batch(np.asarray(first[1]), shape, first[0])
    session = probe_session(model, tensors)
    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    with tqdm(total=cfg.num_calib, desc="calibrating", unit="img", disable=not progress) as bar:
        for origin, batch in itertools.chain([first], source_batches):
            batch = _check_batch(np.asarray(batch), shape, origin)
            for t, value in zip(tensors, session.run(tensors, {name: batch})):
                lo[t] = min(lo[t], float(value.min()))
                hi[t] = max(hi[t], float(value.max()))
            bar.update(len(batch))
    return {t: (lo[t], hi[t]) for t in tensors}
