"""Calibration: run the float model once per batch, keep running statistics of what the plan needs.

Only the plan's tensors are added as graph outputs, so onnxruntime computes nothing extra
and memory stays bounded by one batch. Per tensor: the running min/max, and with
``histograms=True`` a fixed-size histogram for the range estimators (``ranges.py``).
Sources: a folder of images (with a Preprocess), a ``.npy`` file (N x C x H x W float32,
already preprocessed), an array, or any object with onnxruntime's ``CalibrationDataReader``
interface (``get_next() -> dict | None``).
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

from .errors import UserError, first_line
from .model_io import is_large
from .ranges import TensorStats


def model_input(model: onnx.ModelProto):
    """(name, shape with None for symbolic dims) of the single image input."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"graph {model.graph.name!r} has {len(inputs)} inputs; calibration "
                        "supports single-input image models")
    dims = inputs[0].type.tensor_type.shape.dim
    return inputs[0].name, [d.dim_value if d.HasField("dim_value") else None for d in dims]


def image_dims(shape: list) -> tuple[int | None, int | None, int | None]:
    """(H, W, C) of an N x C x H x W input; None where free or not an image."""
    return (shape[2], shape[3], shape[1]) if len(shape) == 4 else (None, None, None)


def input_dtype(model: onnx.ModelProto) -> np.dtype:
    """NumPy dtype of the single image input (float32, or uint8/int8 for raw-pixel inputs)."""
    name, _ = model_input(model)
    elem = next(i for i in model.graph.input if i.name == name).type.tensor_type.elem_type
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"graph input {name!r} has element type {elem}, not a numeric image "
                        "tensor; calibration needs a float32 or uint8 image input") from None


def _check_batch(batch: np.ndarray, shape: list, origin: str,
                 dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """Refuse a batch not of the model input's dtype and shape, or with NaN/Inf, naming both."""
    expected = "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"
    if batch.dtype != dtype:
        raise UserError(f"{origin}: calibration data is {batch.dtype}, the model wants {dtype} "
                        f"{expected} (already preprocessed)")
    if batch.dtype.kind == "f" and not np.isfinite(batch).all():
        raise UserError(f"{origin}: calibration data contains NaN or Inf; pass finite, "
                        "preprocessed samples")
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


def batches(source, name: str, shape: list, cfg, preprocess=None, dtype=np.float32):
    """Yield (origin, float32 batch) from any supported calibration source."""
    size = cfg.batch_size if shape[0] is None else shape[0]
    if hasattr(source, "get_next"):
        for b in _reader_batches(source, name, cfg.calib_samples):
            yield "calibration reader", b
        return
    if isinstance(source, np.ndarray):
        yield from (("calibration array", b)
                    for b in _array_batches(source, size, cfg.calib_samples))
        return
    try:
        path = Path(source)
    except TypeError:
        raise UserError(f"calibration must be a folder, a .npy path, an array or a "
                        f"CalibrationDataReader, got {type(source).__name__}") from None
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
                    for b in _array_batches(array, size, cfg.calib_samples))
        return
    yield from _image_batches(path, shape, cfg, preprocess, size, dtype)


def image_paths(folder: Path, cfg) -> list[Path]:
    """The ``cfg.calib_samples`` calibration images of ``folder``, spread over its listing."""
    from . import images

    if not folder.is_dir():
        raise UserError(f"{folder}: calibration source must be a folder of images or a .npy file")
    paths = images.take_evenly(images.list_images(folder), cfg.calib_samples)
    if not paths:
        raise UserError(f"{folder}: no images found (jpg, png, ...); add ~32 representative images")
    return paths


def image_preprocess(folder: Path, paths: list[Path], shape: list, preprocess=None):
    """The Preprocess the images of ``paths`` (listed from ``folder``) get for a model input
    of ``shape``: the given one (or the default for that shape), its width filled in from
    the model or the images. A channel count images cannot give names the folder."""
    from . import images

    dims = image_dims(shape)
    try:
        pre = images.for_input(preprocess or images.default_preprocess(*dims), *dims)
    except UserError as exc:
        raise UserError(f"{folder}: {exc}") from None
    return images.fit_width(paths, pre)


def _image_batches(folder: Path, shape: list, cfg, preprocess, size: int, dtype=np.float32):
    from . import images

    if np.dtype(dtype) != np.float32:
        raise UserError(f"{folder}: the model takes {np.dtype(dtype)} input, images are "
                        f"preprocessed to float32; pass --calib FILE.npy with {np.dtype(dtype)} "
                        "samples of the model's input shape")
    paths = image_paths(folder, cfg)
    pre = image_preprocess(folder, paths, shape, preprocess)
    for batch in images.iter_batches(paths, pre, size):
        yield str(folder), batch


def _ort_session(data, opts) -> ort.InferenceSession:
    """onnxruntime session; a model it cannot load is the user's to fix (custom op, opset)."""
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UserError(f"onnxruntime cannot load the float model for calibration "
                        f"({first_line(exc)}); calibration needs a model onnxruntime runs "
                        "(register custom ops, or use a recipe without calibration)") from None


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
            return _ort_session(model.SerializeToString(), opts)
        with tempfile.TemporaryDirectory() as tmp:  # > 2 GB: onnxruntime needs a file
            path = os.path.join(tmp, "calib.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="calib.data")
            session = _ort_session(path, opts)
            onnx.load_external_data_for_model(model, tmp)  # saving moved the tensors out
            return session
    finally:
        del model.graph.output[:]
        model.graph.output.extend(saved)


def collect_stats(model: onnx.ModelProto, tensors: list, source, cfg, preprocess=None,
                  progress: bool = True, histograms: bool = False, sampled=()) -> dict:
    """{tensor: TensorStats} over up to ``cfg.calib_samples`` samples of ``source``.

    A ``TensorStats`` unpacks as ``lo, hi`` (the running min/max); with ``histograms`` it also
    holds a fixed-size histogram, what ``ranges.estimate`` needs beyond min/max. Tensors in
    ``sampled`` also get ``.sample``: up to SAMPLE values drawn (seeded) from every batch,
    what a searched quantizer scores its candidates on (softmax_quantizers.adalog).
    """
    if not tensors:
        return {}
    if source is None:
        raise UserError("this recipe needs calibration data: pass --calib DIR (images) or a .npy")
    name, shape = model_input(model)
    dtype = input_dtype(model)
    source_batches = batches(source, name, shape, cfg, preprocess, dtype)
    first = _first_batch(source_batches, shape, dtype)
    session = probe_session(model, tensors)
    stats = {t: TensorStats(histograms) for t in tensors}
    samples, rng = {}, np.random.default_rng(0)
    with tqdm(total=cfg.calib_samples, desc="calibrating", unit="img", disable=not progress) as bar:
        for origin, batch in itertools.chain([first], source_batches):
            batch = _check_batch(np.asarray(batch), shape, origin, dtype)
            for t, value in zip(tensors, _run(session, tensors, {name: batch}, origin)):
                stats[t].update(value)
                if t in sampled:
                    samples.setdefault(t, []).append(_draw(value, rng))
            bar.update(len(batch))
    for t, parts in samples.items():
        stats[t].sample = np.concatenate(parts)[:SAMPLE]
    return _finite_ranges(stats)


SAMPLE = 1 << 16  # values kept per sampled tensor (memory: 256 KB each)


def _draw(value: np.ndarray, rng) -> np.ndarray:
    flat = np.asarray(value, np.float32).ravel()
    if flat.size <= SAMPLE // 4:
        return flat.copy()
    return flat[rng.choice(flat.size, SAMPLE // 4, replace=False)]


def _first_batch(source_batches, shape, dtype):
    """The first (origin, batch), checked: source errors surface before the progress bar."""
    first = next(source_batches, None)
    if first is None:
        raise UserError("calibration source gave no samples; pass a folder with images or a "
                        "non-empty .npy")
    _check_batch(np.asarray(first[1]), shape, first[0], dtype)
    return first


def _run(session, tensors, feed, origin):
    try:
        return session.run(tensors, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UserError(f"{origin}: the float model fails on this calibration batch "
                        f"({first_line(exc)}); check the input shape and preprocessing") from None


def _finite_ranges(stats: dict) -> dict:
    """``stats``; a tensor with no finite value names itself (NaN/Inf upstream)."""
    for t, st in stats.items():
        if not (np.isfinite(st.lo) and np.isfinite(st.hi)):
            raise UserError(f"tensor {t!r}: calibration saw no finite range ({st.lo}, {st.hi}); "
                            "the float model produces NaN/Inf there: check its weights and inputs")
    return stats


def sample_feed(model: onnx.ModelProto, source, cfg, preprocess=None) -> dict:
    """Up to two samples: the first calibration samples, or seeded noise without calibration data."""
    name, shape = model_input(model)
    dtype = input_dtype(model)
    if source is not None and not hasattr(source, "get_next"):  # a reader cannot be rewound
        try:
            batch = _first_batch(batches(source, name, shape, cfg, preprocess, dtype), shape, dtype)
            return {name: np.asarray(batch[1])[:2]}  # two samples show a changed output
        except UserError:  # reported by the calibration itself where it is needed
            pass
    dims = [1 if d is None and i == 0 else d or 64 for i, d in enumerate(shape)]
    rng = np.random.default_rng(0)
    if dtype.kind == "f":
        return {name: rng.standard_normal(dims).astype(dtype)}
    info = np.iinfo(dtype)
    return {name: rng.integers(info.min, info.max, dims, endpoint=True).astype(dtype)}
