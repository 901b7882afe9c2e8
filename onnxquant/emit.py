"""Emit every quantize/dequantize node the plan asks for. Passes only mark; this module edits.

    conv weight   W_q -> DequantizeLinear (or folded Cast/Sub/Mul) -> Conv     (all targets)
    conv input    x -> QuantizeLinear -> DequantizeLinear -> Conv            (ort, tensorrt)
    conv output   Conv(int32 bias) -> QuantizeLinear -> DequantizeLinear    (ort: QLinearConv)
    residual      skip -> QuantizeLinear -> DequantizeLinear -> Add(Conv, .)  (tensorrt)
    linear        W_q -> DQ -> MatMul/Gemm (weight-only) | dynamic int8 MatMul (ort)
    attention     Softmax -> onnxquant.Log2QuantDequant -> consumers         (paper, tensorrt)

Weight schemes: the paper's uint8 asymmetric per tensor by default (options: per channel,
symmetric, 2-8 bits). tensorrt: int8 symmetric per channel (TensorRT rejects uint8 and
non-zero zero points, DESIGN.md §4). ort: QLinearConv weights int8 symmetric per channel with
7-bit codes (AVX2 u8s8 kernels can saturate their 16-bit intermediate sums with full 8-bit
weights, DESIGN.md §7); every other weight uint8 per channel, folded.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import functions, quantizers
from .config import QuantConfig
from .emit_qdq import dynamic_matmul, int32_bias, quant_dequant, store_weight, tensor_name
from .graph import constant_value
from .plan import ConvSite, Plan

ORT_CONV_WEIGHT_BITS = 7


def _weight_only_scheme(cfg: QuantConfig) -> dict:
    if cfg.target == "tensorrt":
        return {"bits": cfg.weight_bits, "symmetric": True, "axis": 0}
    if cfg.target == "ort":
        return {"bits": cfg.weight_bits, "symmetric": False, "axis": 0}
    return {"bits": cfg.weight_bits, "symmetric": cfg.weight_symmetric,
            "axis": 0 if cfg.per_channel else None}


def _weight_format(cfg: QuantConfig) -> str:
    return "folded" if cfg.target == "ort" else cfg.weight_format


def _rewire(old: gs.Tensor, new: gs.Tensor, consumers: list) -> None:
    """Make ``consumers`` (taken before ``new`` was built from ``old``) read ``new``."""
    for consumer in consumers:
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def _activation(stats, name: str, symmetric: bool) -> quantizers.UniformParams:
    lo, hi = stats[name]
    return quantizers.uniform_params(np.array([lo, hi]), 8, symmetric=symmetric)


def _quantize_input(graph, node: gs.Node, name: str, stats, inputs: dict, symmetric: bool):
    """Q/DQ on the node's data input; one pair per tensor, shared by all its consumers."""
    if name not in inputs:
        inputs[name] = quant_dequant(graph, node.inputs[0], _activation(stats, name, symmetric))
    node.inputs[0] = inputs[name]


def _fused_conv(graph, node: gs.Node, site: ConvSite, plan: Plan, inputs: dict) -> None:
    """ort: DQ(x) + DQ(W int8) + DQ(int32 bias) -> Conv -> Q/DQ: onnxruntime's QLinearConv."""
    w = constant_value(node.inputs[1])
    p = quantizers.uniform_params(w, ORT_CONV_WEIGHT_BITS, symmetric=True, axis=0)
    act = _activation(plan.stats, site.input, symmetric=False)
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    if bias is not None:  # int32 bias codes must not saturate (issue: silent overflow)
        p = quantizers.widen_for_bias(p, bias, act.scale[0])
    node.inputs[1] = store_weight(graph, site.weight + "_" + node.name, w, p, "qdq")
    _quantize_input(graph, node, site.input, plan.stats, inputs, symmetric=False)
    if bias is not None:
        node.inputs[2] = int32_bias(graph, tensor_name(graph, node.name, "bias"), bias,
                                    act.scale[0], p.scale)
    out = node.outputs[0]
    consumers = list(out.outputs)
    q_out = quant_dequant(graph, out, _activation(plan.stats, site.output, symmetric=False))
    _rewire(out, q_out, consumers)


def _stored_weight(graph, cache: dict, name: str, w: np.ndarray, scheme: dict, fmt: str):
    """The float tensor replacing weight ``name``; a weight shared by layers is stored once."""
    if name not in cache:
        cache[name] = store_weight(graph, name, w, quantizers.uniform_params(w, **scheme), fmt)
    return cache[name]


def emit_convs(graph: gs.Graph, plan: Plan, cfg: QuantConfig, inputs: dict) -> int:
    nodes = {n.name: n for n in graph.nodes if n.op == "Conv"}
    scheme, fmt = _weight_only_scheme(cfg), _weight_format(cfg)
    weights, count = {}, 0
    for site in plan.convs:
        if not site.quantize:
            continue
        node, count = nodes[site.node], count + 1
        if site.int8_output:
            _fused_conv(graph, node, site, plan, inputs)
            continue
        node.inputs[1] = _stored_weight(graph, weights, site.weight,
                                        constant_value(node.inputs[1]), scheme, fmt)
        if site.int8_input:
            _quantize_input(graph, node, site.input, plan.stats, inputs,
                            symmetric=cfg.target == "tensorrt")
    return count


def emit_linears(graph: gs.Graph, plan: Plan, cfg: QuantConfig, inputs: dict) -> int:
    nodes = {n.name: n for n in graph.nodes if n.op in ("MatMul", "Gemm")}
    scheme, fmt = _weight_only_scheme(cfg), _weight_format(cfg)
    weights, count = {}, 0
    for site in plan.linears:
        if not site.quantize:
            continue
        node, count = nodes[site.node], count + 1
        w = constant_value(node.inputs[1])
        if site.dynamic:
            dynamic_matmul(graph, node, w)
            continue
        # output channels: MatMul W is [K, N] (axis 1); Gemm B is [N, K] unless transB=0
        axis = 1 if site.op == "MatMul" or not node.attrs.get("transB", 0) else 0
        per_layer = {**scheme, "axis": None if scheme["axis"] is None else axis}
        node.inputs[1] = _stored_weight(graph, weights, site.weight, w, per_layer, fmt)
        if site.int8_input:
            _quantize_input(graph, node, site.input, plan.stats, inputs, symmetric=True)
    return count


def emit_residuals(graph: gs.Graph, plan: Plan, inputs: dict) -> int:
    """tensorrt: Q/DQ on the skip input of Conv + skip residual Adds (only that Add reads it)."""
    nodes = {n.name: n for n in graph.nodes if n.op == "Add"}
    count = 0
    for site in plan.residuals:
        if not site.quantize:
            continue
        node = nodes[site.node]
        index = next(i for i, t in enumerate(node.inputs) if t.name == site.skip)
        if site.skip not in inputs:
            p = _activation(plan.stats, site.skip, symmetric=True)
            inputs[site.skip] = quant_dequant(graph, node.inputs[index], p)
        node.inputs[index] = inputs[site.skip]
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
        y = gs.Variable(tensor_name(graph, site.output, "log2qdq"), dtype=np.float32, shape=x.shape)
        _rewire(x, y, list(x.outputs))
        graph.nodes.append(gs.Node(op=functions.OP_TYPE, name=tensor_name(graph, site.softmax, "log2qdq"),
                                   domain=functions.DOMAIN, attrs=functions.log2_node_attrs(p),
                                   inputs=[x], outputs=[y]))
        count += 1
    return count


def emit(graph: gs.Graph, plan: Plan, cfg: QuantConfig) -> dict:
    """Insert all Q/DQ; returns counts per kind."""
    inputs = {}  # activation tensor -> its Q/DQ output, shared by all its consumers
    counts = {"convs": emit_convs(graph, plan, cfg, inputs),
              "linears": emit_linears(graph, plan, cfg, inputs),
              "softmax": emit_log2(graph, plan, cfg)}
    residuals = emit_residuals(graph, plan, inputs)
    if residuals:
        counts["residuals"] = residuals
    graph.cleanup().toposort()
    return counts
