"""Store 4-bit weight codes as real ONNX INT4/UINT4 tensors (two codes per byte).

    W_q int8  (codes in [-8, 7])  -> DequantizeLinear(s, z int8)   ->  Conv / MatMul / Gemm
    W_q INT4  (the same codes)    -> DequantizeLinear(s, z INT4)   ->  Conv / MatMul / Gemm
    (uint8 codes in [0, 15] with a zero point in range: UINT4)

A post-emission step: weights quantized to 2..4 bits are emitted in 8-bit containers, which
keeps the file at 8 bits per weight. DequantizeLinear takes INT4/UINT4 from opset 21, so a
model below 21 is converted with ``onnx.version_converter`` first. The result is kept only
if, in onnxruntime on a seeded input, the converted model gives the original's outputs
(optimizations off, opset.py's tolerance), the packed one gives bit-identical outputs to
the unpacked one (optimizations off) and runs optimized; otherwise the model stays as it
was and the note says why (``checked_convert.differs`` says why not bit-identical with optimizations).
The conversion and its checks are checked_convert.py's (float comparisons repeated with the
activation quantizers bypassed where kernels of two opsets round 1 ulp apart).
Measurements: docs/int4.md.

Only codes that are initializers of the main graph and feed nothing but DequantizeLinear
x-inputs are packed. "folded" weights (Cast -> Sub -> Mul) are left alone: onnxruntime folds
them to float at session load, and Cast from INT4 would gain nothing there.
"""

from __future__ import annotations

import logging

import ml_dtypes
import onnx
from onnx import TensorProto, numpy_helper

from .checked_convert import at_least, copy_model, differs, differs_beyond_rounding, random_feed
from .opset import model_opset
from .wording import count

log = logging.getLogger("onnxquant")

MIN_OPSET = 21  # DequantizeLinear-21: INT4/UINT4 inputs, block_size
# 8-bit container type: (4-bit type, its numpy dtype, code range)
_KINDS = {TensorProto.INT8: (TensorProto.INT4, ml_dtypes.int4, -8, 7),
          TensorProto.UINT8: (TensorProto.UINT4, ml_dtypes.uint4, 0, 15)}
_NAMES = {TensorProto.INT4: "INT4", TensorProto.UINT4: "UINT4"}
_SUBGRAPHS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def pack_4bit(model: onnx.ModelProto, name: str = "model", feed: dict | None = None,
              block_wise_only: bool = False) -> tuple[onnx.ModelProto, str | None]:
    """(model with 4-bit weight codes stored as INT4/UINT4, note for the summary or None when
    there was nothing to pack). ``model`` is not modified; on any refusal it is returned
    itself with a note saying why the weights stayed in 8-bit containers. ``feed``: the
    inputs the checks run on (e.g. a calibration sample: models with dynamic sizes may not
    run at size 1); default ``random_feed``. ``block_wise_only``: pack only the codes of
    block-wise DequantizeLinears (TensorRT: INT4 is its block-wise weight-only format, while
    4-bit codes of its int8 convs must stay INT8)."""
    codes = packable(model.graph, block_wise_only)
    folded = _folded_4bit(model.graph)
    folded_note = (f"{folded} folded 4-bit weights (Cast -> Sub -> Mul) left in 8-bit "
                   "containers (onnxruntime folds them to float at load)") if folded else None
    if not codes:
        return model, folded_note
    rounding: list = []  # checks passed only with activation quantizers bypassed
    packed, why = _packed_at_21(model, codes, feed or random_feed(model), rounding)
    if why is not None:
        note = f"{len(codes)} 4-bit weights stay in 8-bit containers: {why}"
        log.info("%s: %s", name, note)
        return model, note
    opset = model_opset(model)
    how = (f"opset {opset} converted to {MIN_OPSET}" + ("" if rounding else ", outputs unchanged")
           if opset < MIN_OPSET else f"opset {opset}")
    if rounding:
        how += (f"; float rounding moved activation codes ({', '.join(rounding)}): outputs "
                "agree with the activation quantizers bypassed")
    types = "/".join(sorted({_NAMES[t.data_type] for t in packed.graph.initializer
                             if t.name in codes}))
    note = f"4-bit weights stored as {types}: {count(len(codes), 'tensor')} ({how})"
    log.info("%s: %s", name, note)
    return packed, note if not folded_note else f"{note}; {folded_note}"


def _packed_at_21(model: onnx.ModelProto, codes: list[str], feed: dict,
                  rounding: list) -> tuple:
    """(packed copy at opset >= 21, None) or (None, why not): the conversion must keep the
    outputs, the packed model must dequantize to the same floats and run optimized
    (``rounding``: what passed only with the activation quantizers bypassed)."""
    target, why = at_least(model, MIN_OPSET, feed, rounding)
    if why is not None:
        return None, why
    packed = copy_model(target)
    _pack(packed.graph, codes)
    min_ir = onnx.helper.find_min_ir_version_for(list(packed.opset_import), True)
    packed.ir_version = max(packed.ir_version, min_ir)
    why = (differs(target, packed, "INT4 weights dequantize differently", feed, exact=True)
           or differs_beyond_rounding(target, packed, "optimized INT4 model", "optimized INT4 "
                                       "model gives other outputs", feed, rounding,
                                       optimized=True))
    return (packed, None) if why is None else (None, why)


def packable(graph: onnx.GraphProto, block_wise_only: bool = False) -> list[str]:
    """Names of the initializers that are 8-bit weight codes within 4 bits, consumed only as
    DequantizeLinear x-inputs (with ``block_size`` if ``block_wise_only``) whose zero points
    (if any) are initializers within range too."""
    inits = {t.name: t for t in graph.initializer}
    uses = _uses(graph)
    outputs = {o.name for o in graph.output}
    found = []
    for tensor_name, tensor in inits.items():
        kind = _KINDS.get(tensor.data_type)
        users = uses.get(tensor_name, [])
        if kind is None or not users or tensor_name in outputs:
            continue
        if not all(n is not None and n.op_type == "DequantizeLinear" and i == 0 for n, i in users):
            continue
        if block_wise_only and not all(_block_wise(n) for n, _ in users):
            continue
        zeros = [n.input[2] for n, _ in users if len(n.input) > 2 and n.input[2]]
        if all(_fits(inits.get(t), tensor.data_type, kind) for t in [tensor_name, *zeros]):
            found.append(tensor_name)
    return found


def _block_wise(node: onnx.NodeProto) -> bool:
    return any(a.name == "block_size" and a.i > 0 for a in node.attribute)


def _fits(tensor, data_type: int, kind: tuple) -> bool:
    if tensor is None or tensor.data_type != data_type:
        return False
    values = numpy_helper.to_array(tensor)
    return values.size == 0 or (kind[2] <= values.min() and values.max() <= kind[3])


def _uses(graph: onnx.GraphProto) -> dict:
    """tensor -> [(node, input index)] in the main graph; a use inside a subgraph (If, Loop,
    Scan bodies read outer names) is recorded as (None, -1)."""
    uses: dict = {}
    for node in graph.node:
        for i, t in enumerate(node.input):
            uses.setdefault(t, []).append((node, i))
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.type in _SUBGRAPHS else []:
                for t in _names_read(sub):
                    uses.setdefault(t, []).append((None, -1))
    return uses


def _names_read(graph: onnx.GraphProto) -> set:
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.type in _SUBGRAPHS else []:
                names |= _names_read(sub)
    return names


def _pack(graph: onnx.GraphProto, codes: list[str]) -> None:
    """Rewrite ``codes`` and their zero points in place as INT4/UINT4."""
    index = {t.name: i for i, t in enumerate(graph.initializer)}
    uses = _uses(graph)
    to_pack = set(codes)
    zeros = {n.input[2]: None for c in codes for n, _ in uses[c] if len(n.input) > 2 and n.input[2]}
    for z in zeros:  # a zero point shared with a DequantizeLinear that stays 8-bit: copy it
        if all(n is not None and n.op_type == "DequantizeLinear" and i == 2
               and n.input[0] in to_pack for n, i in uses[z]):
            to_pack.add(z)
            continue
        copy = _free_name(graph, f"{z}_4bit")
        graph.initializer.append(graph.initializer[index[z]])
        graph.initializer[-1].name = copy
        index[copy] = len(graph.initializer) - 1
        to_pack.add(copy)
        for c in codes:
            for n, _ in uses[c]:
                if len(n.input) > 2 and n.input[2] == z:
                    n.input[2] = copy
    for t in to_pack:
        old = graph.initializer[index[t]]
        four_bit = _KINDS[old.data_type][1]
        old.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(old).astype(four_bit), t))
    _drop_value_info(graph, to_pack)


def _free_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in [*graph.initializer, *graph.input, *graph.output]}
    taken.update(o for n in graph.node for o in n.output)
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _drop_value_info(graph: onnx.GraphProto, names: set) -> None:
    """Stale 8-bit types of packed tensors (inputs or value_info) would fail the checker."""
    for field in (graph.value_info, graph.input):
        keep = [v for v in field if v.name not in names]
        if len(keep) != len(field):
            del field[:]
            field.extend(keep)


def _folded_4bit(graph: onnx.GraphProto) -> int:
    """Cast nodes reading an 8-bit initializer whose codes fit in 4 bits ("folded" format)."""
    inits = {t.name: t for t in graph.initializer}
    return sum(1 for n in graph.node if n.op_type == "Cast" and n.input[0] in inits
               and _fits(inits[n.input[0]], inits[n.input[0]].data_type,
                         _KINDS.get(inits[n.input[0]].data_type, (0, 0, 1, 0))))
