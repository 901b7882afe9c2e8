"""Bring a model to an opset every recipe can be written at, and prove nothing changed.

Per-channel ``DequantizeLinear`` (its ``axis``) and the int32 bias of QLinearConv need
opset 13; the log2 function's body reads its attributes through ``Constant(value_float)``
and compares with ``GreaterOrEqual`` (opset 12). Exporters still write opset 11
(paddle2onnx: PP-OCR models), so a model below ``MIN_OPSET`` is converted with
``onnx.version_converter`` and its float outputs are compared with the original's in
onnxruntime on the same input before anything else happens. Models at ``MIN_OPSET`` or
above are left at their own opset, and everything emitted is valid there.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import version_converter

from .errors import UserError, first_line
from .model_io import quiet_session

MIN_OPSET = 13
RTOL, ATOL = 1e-4, 1e-5  # float32 kernels of two opset versions may round differently


def model_opset(model: onnx.ModelProto) -> int:
    """Version of the default ONNX domain the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def upgrade(model: onnx.ModelProto, name: str = "model", feed: dict | None = None,
            minimum: int = MIN_OPSET, why: str = "per-channel Q/DQ and the log2 op need it"
            ) -> tuple[onnx.ModelProto, str | None]:
    """(model at >= ``minimum``, note for the summary or None). ``model`` is not modified.

    ``feed`` (one input batch) lets the ranks of Softmax inputs that shape inference cannot
    tell be measured: the Softmax 11 -> 13 adapter wraps a Softmax of unknown rank in
    Flatten/Reshape, and then no attention matches (timm exports at opset 11: 0 of 9 log2
    ops in mobilevit_xxs); one whose axis is the last is rewritten as axis -1 first.
    """
    opset = model_opset(model)
    if opset >= minimum:
        return model, None
    try:
        converted = version_converter.convert_version(_last_axis_softmax(model, feed), minimum)
    except Exception as exc:  # the converter raises bare RuntimeError/ValueError/C++ errors
        first = first_line(exc, 160)
        raise UserError(f"{name}: opset {opset} could not be converted to {minimum} ({first}); "
                        f"re-export the model at opset {minimum} or newer") from None
    restore_functions(converted, model, minimum)
    min_ir = onnx.helper.find_min_ir_version_for(list(converted.opset_import), True)
    converted.ir_version = max(converted.ir_version, min_ir)
    return converted, f"opset {opset} converted to {minimum} ({why})"


def restore_functions(converted: onnx.ModelProto, model: onnx.ModelProto, version: int) -> None:
    """Put ``model``'s local functions (which the converter drops) back into ``converted``,
    their default-domain import raised to ``version`` (onnxruntime wants the model's)."""
    del converted.functions[:]
    for f in model.functions:
        converted.functions.append(f)
        for entry in converted.functions[-1].opset_import:
            if entry.domain in ("", "ai.onnx") and entry.version < version:
                entry.version = version


def _softmax_axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)  # opset < 13 default


def _input_ranks(model: onnx.ModelProto, names: list, feed: dict | None) -> dict:
    """Rank of each tensor in ``names``: from shape inference, else measured on ``feed``."""
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - best effort
        typed = model
    infos = {v.name: v for v in [*typed.graph.value_info, *typed.graph.input]}
    ranks = {n: len(infos[n].type.tensor_type.shape.dim) for n in names
             if n in infos and infos[n].type.tensor_type.HasField("shape")}
    unknown = [n for n in names if n not in ranks]
    if unknown and feed:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in unknown)
        try:
            ranks.update((n, v.ndim) for n, v in zip(unknown, quiet_session(probe, optimized=False).run(unknown, feed)))
        except Exception:  # noqa: BLE001 - unknown ranks stay unknown: the adapter wraps them
            pass
    return ranks


def _last_axis_softmax(model: onnx.ModelProto, feed: dict | None) -> onnx.ModelProto:
    """A copy whose last-axis Softmax nodes say axis=-1 (the same math at every opset)."""
    nodes = [n for n in model.graph.node if n.op_type == "Softmax" and _softmax_axis(n) != -1]
    if not nodes:
        return model
    ranks = _input_ranks(model, [n.input[0] for n in nodes], feed)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == "Softmax" and ranks.get(node.input[0], 0) - 1 == _softmax_axis(node):
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("axis", -1))
    return copy


def verify_same(original: onnx.ModelProto, converted: onnx.ModelProto, feed: dict,
                name: str = "model") -> float:
    """Max |difference| of all outputs of the two models on ``feed``; UserError if they differ."""
    try:
        a = quiet_session(original, optimized=False).run(None, feed)
        b = quiet_session(converted, optimized=False).run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = first_line(exc, 160)
        raise UserError(f"{name}: onnxruntime cannot run the model to check the opset "
                        f"conversion ({first}); re-export it at opset {MIN_OPSET} or newer") from None
    worst = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape or not np.allclose(x, y, rtol=RTOL, atol=ATOL * max(1.0, np.abs(x).max(initial=0)), equal_nan=True):
            raise UserError(f"{name}: converting to opset {MIN_OPSET} changed the float outputs; "
                            f"re-export the model at opset {MIN_OPSET} or newer")
        if x.size:
            worst = max(worst, float(np.nanmax(np.abs(x - y), initial=0.0)))
    return worst
