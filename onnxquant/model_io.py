"""Loading and saving models: checks that name the file, atomic writes, external data.

Models over 2 GB keep their weights in external data files; those are loaded only from
inside the model's own folder (a path that escapes it is refused: a model file must not
make the tool read arbitrary files), and saved beside the output as ``<name>.data``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .errors import UserError, first_line

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 2**31 - 2**26  # leave headroom for the graph itself


def is_large(model: onnx.ModelProto, limit: int | None = None) -> bool:
    """Whether ``model`` is too large for one protobuf message (must use external data).

    Counted part by part: protobuf's ``ByteSize()`` itself fails (EncodeError) past 2 GB.
    """
    limit = EXTERNAL_THRESHOLD if limit is None else limit
    graph = model.graph
    parts = list(graph.initializer) + list(graph.node) + list(model.functions)
    total = 0
    for part in parts:
        total += part.ByteSize()
        if total > limit:
            return True
    return False


def _external_tensors(model: onnx.ModelProto):
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if uses_external_data(tensor):
            yield tensor


def _check_external_paths(model: onnx.ModelProto, path: Path) -> None:
    base = path.parent.resolve()
    for tensor in _external_tensors(model):
        location = ExternalDataInfo(tensor).location
        target = (base / location).resolve()
        if Path(location).is_absolute() or base not in target.parents:
            raise UserError(f"{path}: external data of tensor {tensor.name!r} points outside the "
                            f"model's folder ({location}); move the data file beside the model")
        if not target.is_file():
            raise UserError(f"{path}: external data file {location} of tensor {tensor.name!r} "
                            "is missing; copy it beside the model")


def _check_external_sizes(model: onnx.ModelProto, path: Path) -> None:
    """onnx reads past the end of a data file without complaint: check each tensor's bytes."""
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        size = _itemsize(tensor.data_type)
        if tensor.HasField("raw_data") and size:
            need = int(np.prod(tensor.dims, dtype=np.int64)) * size
            if need != len(tensor.raw_data):
                raise UserError(f"{path}: tensor {tensor.name!r} has {len(tensor.raw_data)} bytes "
                                f"of data, its shape needs {need} (truncated external data "
                                "file or wrong offset?); re-export the model")


def _itemsize(data_type: int) -> int:
    """Bytes per element; 0 where unknown or packed (strings, 4-bit types)."""
    T = onnx.TensorProto
    if data_type in (T.STRING, T.UNDEFINED, T.INT4, T.UINT4, getattr(T, "FLOAT4E2M1", -1)):
        return 0
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and sanity-check an ONNX model; every failure is a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; pass the path of an exported .onnx model")
    if not path.is_file():
        raise UserError(f"{path}: is not a file; pass the path of an exported .onnx model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: not an ONNX model or truncated ({type(exc).__name__}); "
                        "re-export it with torch.onnx.export") from None
    if not model.graph.node or not model.opset_import:
        raise UserError(f"{path}: not an ONNX model or truncated (no graph nodes); re-export it")
    _check_external_paths(model, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: cannot read its external data ({exc}); copy the complete "
                        "data file beside the model") from None
    _check_external_sizes(model, path)
    try:
        if not is_large(model, PROTOBUF_LIMIT):
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise UserError(f"{path}: invalid ONNX model ({first_line(exc)}); re-export it"
                        ) from None
    return model


def _input_files(src: Path) -> list:
    """The input model file and the external data files it names (resolved)."""
    files = [src.resolve()]
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception:  # noqa: BLE001 - load_model reports unreadable models
        return files
    files += [(src.parent / ExternalDataInfo(t).location).resolve()
              for t in _external_tensors(model)]
    return files


def check_output_path(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Refuse to overwrite the input or its external data; the output folder must be writable."""
    src, dst = Path(src), Path(dst)
    if src.is_file():
        written = {dst.resolve(), dst.with_name(f"{dst.name}.data").resolve()}
        clash = next((f for f in _input_files(src) if f in written), None)
        if clash is not None:
            what = "the input model" if clash == src.resolve() else "the input's external data"
            raise UserError(f"{dst}: output path is {what} ({clash.name}); "
                            "choose another output file")
    if dst.is_dir():
        raise UserError(f"{dst}: is a folder; give an output file name such as model.int8.onnx")
    folder = dst.parent
    if not folder.is_dir():
        raise UserError(f"{dst}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{dst}: folder {folder} is not writable; choose another output path")
    return dst


def save_model(model: onnx.ModelProto, dst: str | os.PathLike) -> Path:
    """Write ``model`` atomically: into a temporary folder beside ``dst``, then renames.

    Models over ~2 GB get their initializers in ``<name>.data`` beside the output (renamed
    into place before the model file, so a reader never sees a model without its data).
    ``model`` is left as it was (saving external data moves tensors out; they are reloaded).
    """
    dst = Path(dst)
    data = dst.with_name(f"{dst.name}.data")
    try:
        with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as tmp:
            staged = Path(tmp) / dst.name
            if is_large(model):
                onnx.save_model(model, staged, save_as_external_data=True,
                                all_tensors_to_one_file=True, location=data.name,
                                size_threshold=1024)
                onnx.load_external_data_for_model(model, tmp)
                _publish(Path(tmp) / data.name, data)
            else:
                onnx.save_model(model, staged)
            _publish(staged, dst)
    except OSError as exc:
        raise UserError(f"{dst}: cannot write the output ({exc.strerror or exc}); "
                        "choose another output path") from None
    return dst


def _publish(staged: Path, final: Path) -> None:
    """Rename into place with the permissions of a normally created file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o666 & ~umask)  # temporary files are owner-only
    os.replace(staged, final)


def quiet_session(model: onnx.ModelProto, optimized: bool = True):
    """A CPU onnxruntime session on ``model`` (warnings off); ``optimized=False``: no graph
    optimization, so every intermediate tensor exists as the graph states it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
