"""Convert a quantized model to a newer opset (or swap a body) and prove it computes the same.

Used where a storage or speed format needs a newer opset than the model has: INT4 weights
(opset 21, storage4.py) and the log2 op's BitCast body (opset 26, log2_body.py). The
converted model is compared with the original in onnxruntime on one seeded input: within
opset.py's float tolerance, and where that fails, again with the activation quantizers of
both models bypassed (``differs_beyond_rounding``): kernels of two opset versions may round
1 ulp apart, and a quantizer at a rounding boundary turns that into a whole step.
Model-local functions keep their own opset imports (the converter drops them): they are
copied back with the default domain raised to the new version, which onnxruntime requires to
match the model's.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import version_converter

from .errors import first_line
from .functions import is_log2
from .model_io import quiet_session
from .opset import ATOL, RTOL, model_opset, restore_functions


def convert(model: onnx.ModelProto, version: int) -> tuple[onnx.ModelProto | None, str | None]:
    """(model at ``version`` with its functions copied back, None) or (None, why not)."""
    try:
        converted = version_converter.convert_version(model, version)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare C++ errors
        return None, f"opset {model_opset(model)} -> {version} conversion failed ({first_line(exc)})"
    # keep the model's own value_info: the converter adds ~750 entries (70 kB, mobilevit_xxs)
    kept = {v.name for v in model.graph.value_info}
    infos = [v for v in converted.graph.value_info if v.name in kept]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(infos)
    restore_functions(converted, model, version)
    min_ir = onnx.helper.find_min_ir_version_for(list(converted.opset_import), True)
    converted.ir_version = max(converted.ir_version, min_ir)
    return converted, None


def differs(a: onnx.ModelProto, b: onnx.ModelProto, what: str, feed: dict, exact: bool,
             optimized: bool = False) -> str | None:
    """None when onnxruntime gives the same outputs for ``a`` and ``b`` on one seeded input
    (``exact``: bit-identical, else opset.py's tolerance); else why not (``what``, or the
    error of the session that failed). ``optimized``: sessions as users run them.

    Why not bit-identical with optimizations: onnxruntime 1.32 fuses a weight-only
    DequantizeLinear -> MatMul into MatMulNBits (8-bit codes as well as 4-bit), which by
    default quantizes the activations to int8 (session.qdq_matmulnbits_accuracy_level 4), and
    its 4-bit and 8-bit kernels round differently (tests/test_storage4.py: 9.5e-7 on outputs
    of magnitude 2); at opset 21 it also fuses Add + LayerNormalization into
    SkipLayerNormalization where 17 does not (mobilevit_xxs: 1 ulp). Without optimizations
    17 vs 21 and INT4 vs int8 containers are bit-identical on every model tried.
    """
    try:
        out_a = quiet_session(a, optimized).run(None, feed)
        out_b = quiet_session(b, optimized).run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        return f"onnxruntime cannot run it ({first_line(exc)})"
    for x, y in zip(out_a, out_b):
        if exact and not np.array_equal(x, y, equal_nan=True):
            return what
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        atol = ATOL * max(1.0, np.abs(x).max(initial=0))
        if x.shape != y.shape or not np.allclose(x, y, rtol=RTOL, atol=atol, equal_nan=True):
            return what
    return None


def differs_beyond_rounding(a: onnx.ModelProto, b: onnx.ModelProto, step: str, what: str,
                             feed: dict, rounding: list, optimized: bool = False) -> str | None:
    """``differs`` within opset.py's tolerance, and where that fails, again with the
    activation quantizers of both models bypassed (``bypass_activation_quantizers``; a pass
    that needed it adds ``step`` to ``rounding``).

    Why: two kernels of one op may round differently (onnxruntime's AveragePool-11 and -19
    differ by 1-2 ulp; its MatMulNBits rounds 4-bit and 8-bit codes differently), and an
    activation quantizer turns a 1-ulp change at a rounding boundary into a whole step (a
    factor of 2 through a log2 op); later layers carry that to the outputs. On a model that
    sits at many boundaries (the recognizer with 3-bit weights) the outputs then exceed any
    float tolerance while every op still computes what it did. With the quantizers bypassed
    each op is still compared, without the amplifier; the quantize/dequantize ops themselves
    are checked by the exact comparison of the packed and unpacked models."""
    if differs(a, b, what, feed, exact=False, optimized=optimized) is None:
        return None
    why = differs(bypass_activation_quantizers(a), bypass_activation_quantizers(b),
                   f"{what} (also with activation quantizers bypassed)", feed, exact=False,
                   optimized=optimized)
    if why is None:
        rounding.append(step)
    return why


def bypass_activation_quantizers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose activation quantizers pass their input through: a
    QuantizeLinear -> DequantizeLinear pair on a computed tensor, and onnxquant's log2
    quantize-dequantize op. Their outputs' readers read the input instead; the bypassed
    nodes are removed (a QuantizeLinear feeding anything but DequantizeLinear stays)."""
    out = copy_model(model)
    graph = out.graph
    inits = {t.name for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    same: dict = {}  # bypassed output -> the tensor it stands for
    for node in graph.node:
        if is_log2(node):
            same[node.output[0]] = node.input[0]
        elif node.op_type == "DequantizeLinear":
            q = producer.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits:
                same[node.output[0]] = q.input[0]
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        for i, t in enumerate(node.input):
            while t in same:
                t = same[t]
            node.input[i] = t
    kept = [n for n in graph.node
            if not (n.output and n.output[0] in same and n.output[0] not in outputs)]
    read = {t for n in kept for t in n.input} | outputs
    kept = [n for n in kept if n.op_type != "QuantizeLinear" or any(o in read for o in n.output)]
    del graph.node[:]
    graph.node.extend(kept)
    return out


def random_feed(model: onnx.ModelProto, seed: int = 0) -> dict:
    """Seeded standard-normal float inputs (integer inputs: zeros); symbolic dims are 1."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feed = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        feed[inp.name] = (rng.standard_normal(shape).astype(dtype)
                          if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype))
    return feed


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def at_least(model: onnx.ModelProto, version: int, feed: dict, rounding: list
             ) -> tuple[onnx.ModelProto | None, str | None]:
    """(``model`` itself if already at ``version`` or newer, else a converted copy whose
    outputs were checked against it, None) or (None, why not). ``rounding`` collects the
    conversion step where the check passed only with the activation quantizers bypassed."""
    opset = model_opset(model)
    if opset >= version:
        return model, None
    target, why = convert(model, version)
    if why is None:
        step = f"opset {opset} -> {version}"
        why = differs_beyond_rounding(model, target, step, f"{step} changed the outputs", feed,
                                      rounding)
    return (None, why) if why is not None else (target, None)

