"""Node builders for quantized tensors: the only place that creates Q/DQ-style nodes.

    store_weight     W_q -> DequantizeLinear(s, z)                       (format "qdq")
                     W_q -> Cast -> Sub(z) -> Mul(s)                     (format "folded")
    quant_dequant    x -> QuantizeLinear -> DequantizeLinear            (activations)
    int32_bias       b_q -> DequantizeLinear(s_x * s_w)                 (QLinearConv bias)
    dynamic_matmul   x -> DynamicQuantizeLinear -> MatMulInteger(W_q) -> Cast -> Mul

"folded": onnxruntime's constant folding evaluates Cast/Sub/Mul on initializers at session
load (it deliberately never folds DequantizeLinear), so the file keeps 8-bit weights while
the session runs the float graph with its fast NCHWc convs. Measured on mobilevit_xxs:
DequantizeLinear 0.76x float speed, folded 0.98x, outputs bit-identical to the float model
with the dequantized weights baked in (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import quantizers


class _Names:
    """Names already used in one graph; hands out ``base_suffix`` (``_1``, ``_2`` ... on a
    collision), so an inserted tensor never shadows one the exporter already named so."""

    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}

    def new(self, base: str, suffix: str) -> str:
        name, i = f"{base}_{suffix}", 0
        while name in self.taken:
            i += 1
            name = f"{base}_{suffix}_{i}"
        self.taken.add(name)
        return name


def tensor_name(graph: gs.Graph, base: str, suffix: str) -> str:
    """Deterministic, unused name for an inserted tensor or node; never parsed back.

    The set of used names is taken from ``graph`` on the first call (before anything is
    inserted) and kept on the graph object for the rest of the emission.
    """
    names = graph.__dict__.get("_onnxquant_names")
    if names is None:
        names = graph.__dict__["_onnxquant_names"] = _Names(graph)
    return names.new(base, suffix)


def add_node(graph: gs.Graph, op: str, name: str, inputs: list, outputs: list,
             attrs: dict | None = None) -> list:
    """Append a node; string outputs become new Variables of exactly that name (type left
    to the checker's inference).

    (``gs.Graph.layer`` walks the whole graph per call to make names unique: O(nodes) per
    inserted node, 1 s of the emit time on efficientformer_l7.)
    """
    outs = [gs.Variable(o) if isinstance(o, str) else o for o in outputs]
    graph.nodes.append(gs.Node(op=op, name=name, attrs=attrs or {}, inputs=inputs, outputs=outs))
    return outs


def _const(graph: gs.Graph, base: str, suffix: str, value) -> gs.Constant:
    return gs.Constant(tensor_name(graph, base, suffix), np.asarray(value))


def _params_arrays(p: quantizers.UniformParams, ndim: int, broadcast: bool):
    """Scale/zero point as scalars (per tensor) or per-channel arrays (1-D or broadcastable)."""
    if p.axis is None:
        return p.scale[0], p.zero_point[0]
    if not broadcast:
        return p.scale, p.zero_point
    shape = [1] * ndim
    shape[p.axis] = -1
    return p.scale.reshape(shape), p.zero_point.reshape(shape)


def store_weight(graph: gs.Graph, base: str, w: np.ndarray, p: quantizers.UniformParams,
                 fmt: str = "qdq", codes: np.ndarray | None = None) -> gs.Variable:
    """Quantize constant ``w`` with ``p`` (or store the given integer ``codes``, e.g. learned
    rounding); returns the float tensor that replaces it. Block-wise ``p`` needs "qdq" (and
    opset 21: config.py and api.py see to both)."""
    if codes is None:
        codes = quantizers.uniform_quantize(w, p)
    elif codes.shape != w.shape or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes for {base} must be integers of shape {w.shape}")
    codes = gs.Constant(tensor_name(graph, base, "quantized"),
                        np.clip(codes, p.qmin, p.qmax).astype(p.zero_point.dtype))
    out = gs.Variable(tensor_name(graph, base, "dequantized"), dtype=np.float32)
    if fmt == "qdq":
        scale, zero = _params_arrays(p, w.ndim, broadcast=False)
        attrs = {} if p.axis is None else {"axis": int(p.axis)}
        if p.block_size is not None:  # opset 21: scale shaped like W, ceil(D / B) at axis
            attrs["block_size"] = int(p.block_size)
        add_node(graph, "DequantizeLinear", tensor_name(graph, base, "DequantizeLinear"),
                 [codes, _const(graph, base, "scale", scale.astype(np.float32)),
                  _const(graph, base, "zero_point", zero)], [out], attrs)
        return out
    scale, zero = _params_arrays(p, w.ndim, broadcast=True)
    cast = add_node(graph, "Cast", tensor_name(graph, base, "Cast"), [codes],
                    [tensor_name(graph, base, "codes_float")], {"to": 1})[0]
    zero_f = _const(graph, base, "zero_point_float", np.asarray(zero, np.float32))
    centered = add_node(graph, "Sub", tensor_name(graph, base, "Sub"), [cast, zero_f],
                        [tensor_name(graph, base, "centered")])[0]
    add_node(graph, "Mul", tensor_name(graph, base, "Mul"),
             [centered, _const(graph, base, "scale", np.asarray(scale, np.float32))], [out])
    return out


def quant_dequant(graph: gs.Graph, tensor: gs.Tensor, p: quantizers.UniformParams) -> gs.Variable:
    """Activation fake-quant pair on ``tensor`` (per tensor).

    Symmetric int8 at opset >= 21 is written without a zero point (``output_dtype`` on
    QuantizeLinear instead): onnxruntime 1.32's MatMul+Add -> Gemm fusion rebuilds a Q/DQ
    pair with a uint8 zero point and refuses to load the model otherwise (3-D MatMul
    inputs; found by tools/fuzz.py, reproduced without onnxquant).
    """
    scale = _const(graph, tensor.name, "act_scale", p.scale[0])
    implicit_zero = graph.opset >= 21 and p.zero_point.dtype == np.int8 and not p.zero_point.any()
    q = gs.Variable(tensor_name(graph, tensor.name, "quantized"), dtype=p.zero_point.dtype)
    out = gs.Variable(tensor_name(graph, tensor.name, "qdq"), dtype=np.float32)
    if implicit_zero:
        add_node(graph, "QuantizeLinear", tensor_name(graph, tensor.name, "QuantizeLinear"),
                 [tensor, scale], [q], {"output_dtype": onnx.TensorProto.INT8})
        add_node(graph, "DequantizeLinear", tensor_name(graph, tensor.name, "DequantizeLinear"),
                 [q, scale], [out])
        return out
    zero = _const(graph, tensor.name, "act_zero_point", p.zero_point[0])
    add_node(graph, "QuantizeLinear", tensor_name(graph, tensor.name, "QuantizeLinear"),
             [tensor, scale, zero], [q])
    add_node(graph, "DequantizeLinear", tensor_name(graph, tensor.name, "DequantizeLinear"),
             [q, scale, zero], [out])
    return out


def int32_bias(graph: gs.Graph, base: str, b: np.ndarray, act_scale: float,
               weight_scale: np.ndarray) -> gs.Variable:
    """Bias as int32 with scale s_x * s_w[c]: the form onnxruntime fuses into QLinearConv."""
    scale = (np.float32(act_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    scale = np.broadcast_to(scale, np.shape(b)).copy()  # per-tensor weights: one per channel too
    codes = np.round(b.astype(np.float64) / scale).clip(-(2**31), 2**31 - 1).astype(np.int32)
    out = gs.Variable(tensor_name(graph, base, "dequantized"), dtype=np.float32)
    add_node(graph, "DequantizeLinear", tensor_name(graph, base, "DequantizeLinear"),
             [_const(graph, base, "quantized", codes), _const(graph, base, "scale", scale),
              _const(graph, base, "zero_point", np.zeros_like(codes))], [out], {"axis": 0})
    return out


def dynamic_matmul(graph: gs.Graph, node: gs.Node, w: np.ndarray,
                   p: quantizers.UniformParams) -> None:
    """Replace float MatMul(x, W) by dynamic int8 (onnxruntime: DynamicQuantizeMatMul);
    ``p``: int8 symmetric per-tensor weight parameters."""
    base, x, y = node.name, node.inputs[0], node.outputs[0]
    xq, xs, xz = add_node(graph, "DynamicQuantizeLinear", tensor_name(graph, base, "DynQuant"), [x],
                          [tensor_name(graph, base, n) for n in ("x_quantized", "x_scale", "x_zero")])
    w_q = _const(graph, base, "w_quantized", quantizers.uniform_quantize(w, p))
    acc = add_node(graph, "MatMulInteger", tensor_name(graph, base, "MatMulInteger"),
                   [xq, w_q, xz, _const(graph, base, "w_zero_point", np.int8(0))],
                   [tensor_name(graph, base, "acc")])[0]
    acc_f = add_node(graph, "Cast", tensor_name(graph, base, "Cast"), [acc],
                     [tensor_name(graph, base, "acc_float")], {"to": 1})[0]
    scale = add_node(graph, "Mul", tensor_name(graph, base, "scale_Mul"),
                     [xs, _const(graph, base, "w_scale", p.scale[0])], [tensor_name(graph, base, "out_scale")])[0]
    node.outputs.clear()
    node.inputs.clear()
    add_node(graph, "Mul", tensor_name(graph, base, "Mul"), [acc_f, scale], [y])
