"""Emit every quantize/dequantize node the plan asks for. The only module that adds Q/DQ.

    conv weight   W_q (initializer) -> DequantizeLinear(s, z) -> Conv          (all targets)
    conv input    x -> QuantizeLinear -> DequantizeLinear -> Conv             (ort, tensorrt)
    attention     Softmax -> onnxquant.Log2QuantDequant -> consumers          (all targets)

Weight scheme: the paper's uint8 asymmetric per-tensor by default; the ort and tensorrt
targets use symmetric int8 per output channel (TensorRT rejects uint8 and non-zero zero
points, DESIGN.md §4; onnxruntime's fast U8S8 kernels want signed weights).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import functions, quantizers
from .config import QuantConfig
from .graph import constant_value
from .plan import Plan


def tensor_name(base: str, suffix: str) -> str:
    """Deterministic name of an inserted tensor or node; never parsed back."""
    return f"{base}_{suffix}"


def _weight_scheme(cfg: QuantConfig) -> dict:
    if cfg.target in ("ort", "tensorrt"):
        return {"bits": cfg.weight_bits, "symmetric": True, "axis": 0}
    return {"bits": cfg.weight_bits, "symmetric": cfg.weight_symmetric,
            "axis": 0 if cfg.per_channel else None}


def _dequant(graph, base, codes, p: quantizers.UniformParams):
    """Constant codes -> DequantizeLinear -> new float tensor."""
    per_tensor = p.axis is None
    scale = p.scale[0] if per_tensor else p.scale
    zero = p.zero_point[0] if per_tensor else p.zero_point
    inputs = [gs.Constant(tensor_name(base, "quantized"), codes),
              gs.Constant(tensor_name(base, "scale"), np.asarray(scale, np.float32)),
              gs.Constant(tensor_name(base, "zero_point"), np.asarray(zero))]
    out = gs.Variable(tensor_name(base, "dequantized"), dtype=np.float32)
    attrs = {} if per_tensor else {"axis": int(p.axis)}
    graph.layer(op="DequantizeLinear", name=tensor_name(base, "DequantizeLinear"),
                inputs=inputs, outputs=[out], attrs=attrs)
    return out


def _quant_dequant(graph, tensor, p: quantizers.UniformParams):
    """Activation fake-quant pair: tensor -> QuantizeLinear -> DequantizeLinear."""
    scale = gs.Constant(tensor_name(tensor.name, "act_scale"), np.asarray(p.scale[0]))
    zero = gs.Constant(tensor_name(tensor.name, "act_zero_point"), np.asarray(p.zero_point[0]))
    q = gs.Variable(tensor_name(tensor.name, "quantized"), dtype=p.zero_point.dtype)
    out = gs.Variable(tensor_name(tensor.name, "qdq"), dtype=np.float32)
    graph.layer(op="QuantizeLinear", name=tensor_name(tensor.name, "QuantizeLinear"),
                inputs=[tensor, scale, zero], outputs=[q])
    graph.layer(op="DequantizeLinear", name=tensor_name(tensor.name, "DequantizeLinear"),
                inputs=[q, scale, zero], outputs=[out])
    return out


def _activation_params(stats, name: str, cfg: QuantConfig) -> quantizers.UniformParams:
    lo, hi = stats[name]
    symmetric = cfg.target == "tensorrt"
    return quantizers.uniform_params(np.array([lo, hi]), 8, symmetric=symmetric)


def emit_convs(graph: gs.Graph, plan: Plan, cfg: QuantConfig) -> int:
    nodes = {n.name: n for n in graph.nodes if n.op == "Conv"}
    scheme = _weight_scheme(cfg)
    weights, inputs, count = {}, {}, 0
    for site in plan.convs:
        if not site.quantize:
            continue
        node = nodes[site.node]
        if site.weight not in weights:  # a shared weight is stored once
            w = constant_value(node.inputs[1])
            p = quantizers.uniform_params(w, **scheme)
            weights[site.weight] = _dequant(graph, site.weight, quantizers.uniform_quantize(w, p), p)
        node.inputs[1] = weights[site.weight]
        if site.int8_input:
            if site.input not in inputs:
                p = _activation_params(plan.stats, site.input, cfg)
                inputs[site.input] = _quant_dequant(graph, node.inputs[0], p)
            node.inputs[0] = inputs[site.input]
        count += 1
    return count


def emit_log2(graph: gs.Graph, plan: Plan, cfg: QuantConfig) -> int:
    tensors = graph.tensors()
    count = 0
    for site in plan.attention:
        if not site.quantize:
            continue
        x = tensors[site.output]
        lo, hi = plan.stats[site.output]
        p = quantizers.log2_params(lo, hi, cfg.softmax_bits, cfg.log2_eps)
        y = gs.Variable(tensor_name(site.output, "log2qdq"), dtype=np.float32, shape=x.shape)
        for consumer in list(x.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is x:
                    consumer.inputs[i] = y
        node = gs.Node(op=functions.OP_TYPE, name=tensor_name(site.softmax, "log2qdq"),
                       domain=functions.DOMAIN, attrs=functions.log2_node_attrs(p),
                       inputs=[x], outputs=[y])
        graph.nodes.append(node)
        count += 1
    return count


def emit(graph: gs.Graph, plan: Plan, cfg: QuantConfig) -> dict:
    """Insert all Q/DQ; returns counts per kind."""
    counts = {"convs": emit_convs(graph, plan, cfg), "softmax": emit_log2(graph, plan, cfg)}
    graph.cleanup().toposort()
    return counts
