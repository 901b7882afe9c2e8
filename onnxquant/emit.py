"""Emit every quantize/dequantize node the plan asks for. Passes only mark; this module edits.

    conv weight   W_q -> DequantizeLinear (or folded Cast/Sub/Mul) -> Conv     (all targets)
    conv input    x -> QuantizeLinear -> DequantizeLinear -> Conv            (ort, tensorrt)
    conv output   Conv(int32 bias) -> QuantizeLinear -> DequantizeLinear    (ort: QLinearConv)
    residual      skip -> QuantizeLinear -> DequantizeLinear -> Add(Conv, .)  (tensorrt)
    linear        W_q -> DQ -> MatMul/Gemm (weight-only) | dynamic int8 MatMul (ort)
    attention     Softmax -> onnxquant.Log2QuantDequant -> consumers         (paper, tensorrt)

Every scheme, range and format comes from the site's QuantSpec (decide.py fills them from
the target profile, targets.py); this module writes exactly those and decides nothing.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import functions
from .emit_qdq import dynamic_matmul, int32_bias, quant_dequant, store_weight, tensor_name
from .graph import constant_value
from .plan import ConvSite, Plan
from .spec import QuantSpec


def _rewire(old: gs.Tensor, new: gs.Tensor, consumers: list) -> None:
    """Make ``consumers`` (taken before ``new`` was built from ``old``) read ``new``."""
    for consumer in consumers:
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def _quantize_input(graph, node: gs.Node, name: str, spec: QuantSpec, inputs: dict):
    """Q/DQ on the node's data input; one pair per tensor, shared by all its consumers."""
    if name not in inputs:
        inputs[name] = quant_dequant(graph, node.inputs[0], spec.uniform_params())
    node.inputs[0] = inputs[name]


def _stored_weight(graph, cache: dict, name: str, w: np.ndarray, spec: QuantSpec):
    """The float tensor replacing weight ``name``; a weight shared by layers is stored once."""
    if name not in cache:
        cache[name] = store_weight(graph, name, w, spec.uniform_params(w), spec.fmt,
                                   codes=spec.codes)
    return cache[name]


def _qlinear_conv(graph, node: gs.Node, site: ConvSite, inputs: dict) -> None:
    """DQ(x) + DQ(W int8) + DQ(int32 bias) -> Conv -> Q/DQ: onnxruntime's QLinearConv."""
    w = constant_value(node.inputs[1])
    p = site.weight_spec.uniform_params(w)
    node.inputs[1] = store_weight(graph, site.weight + "_" + node.name, w, p, "qdq",
                                  codes=site.weight_spec.codes)
    _quantize_input(graph, node, site.input, site.input_spec, inputs)
    if len(node.inputs) > 2:
        node.inputs[2] = int32_bias(graph, tensor_name(graph, node.name, "bias"),
                                    constant_value(node.inputs[2]),
                                    site.input_spec.uniform_params().scale[0], p.scale)
    out = node.outputs[0]
    consumers = list(out.outputs)
    q_out = quant_dequant(graph, out, site.output_spec.uniform_params())
    _rewire(out, q_out, consumers)


def emit_convs(graph: gs.Graph, plan: Plan, inputs: dict) -> int:
    nodes = {n.name: n for n in graph.nodes if n.op == "Conv"}
    weights, count = {}, 0
    for site in plan.convs:
        if site.weight_spec is None:
            continue
        node, count = nodes[site.node], count + 1
        if site.output_spec is not None:
            _qlinear_conv(graph, node, site, inputs)
            continue
        node.inputs[1] = _stored_weight(graph, weights, site.weight,
                                        constant_value(node.inputs[1]), site.weight_spec)
        if site.input_spec is not None:
            _quantize_input(graph, node, site.input, site.input_spec, inputs)
    return count


def emit_linears(graph: gs.Graph, plan: Plan, inputs: dict) -> int:
    nodes = {n.name: n for n in graph.nodes if n.op in ("MatMul", "Gemm")}
    weights, count = {}, 0
    for site in plan.linears:
        if site.weight_spec is None:
            continue
        node, count = nodes[site.node], count + 1
        w = constant_value(node.inputs[1])
        if site.weight_spec.fmt == "dynamic":
            dynamic_matmul(graph, node, w, site.weight_spec.uniform_params(w))
            continue
        node.inputs[1] = _stored_weight(graph, weights, site.weight, w, site.weight_spec)
        if site.input_spec is not None:
            _quantize_input(graph, node, site.input, site.input_spec, inputs)
    return count


def emit_residuals(graph: gs.Graph, plan: Plan, inputs: dict) -> int:
    """Q/DQ on the skip input of Conv + skip residual Adds (only that Add reads it)."""
    nodes = {n.name: n for n in graph.nodes if n.op == "Add"}
    count = 0
    for site in plan.residuals:
        if site.spec is None:
            continue
        node = nodes[site.node]
        index = next(i for i, t in enumerate(node.inputs) if t.name == site.skip)
        if site.skip not in inputs:
            inputs[site.skip] = quant_dequant(graph, node.inputs[index], site.spec.uniform_params())
        node.inputs[index] = inputs[site.skip]
        count += 1
    return count


def emit_softmax(graph: gs.Graph, plan: Plan) -> int:
    """Each attention probability tensor: the log2 table op, or uniform Q/DQ."""
    tensors = graph.tensors()
    count = 0
    for site in plan.attention:
        if site.spec is None:
            continue
        x = tensors[site.output]
        if site.spec.kind == "uniform":
            consumers = list(x.outputs)
            _rewire(x, quant_dequant(graph, x, site.spec.uniform_params()), consumers)
            count += 1
            continue
        p = site.spec.log2_params()
        y = gs.Variable(tensor_name(graph, site.output, "log2qdq"), dtype=np.float32,
                        shape=x.shape)
        _rewire(x, y, list(x.outputs))
        graph.nodes.append(gs.Node(op=functions.OP_TYPE,
                                   name=tensor_name(graph, site.softmax, "log2qdq"),
                                   domain=functions.DOMAIN, attrs=functions.log2_node_attrs(p),
                                   inputs=[x], outputs=[y]))
        count += 1
    return count


def emit(graph: gs.Graph, plan: Plan) -> dict:
    """Insert the Q/DQ of every spec in the plan; returns counts per kind."""
    inputs = {}  # activation tensor -> its Q/DQ output, shared by all its consumers
    counts = {"convs": emit_convs(graph, plan, inputs),
              "linears": emit_linears(graph, plan, inputs),
              "softmax": emit_softmax(graph, plan)}
    residuals = emit_residuals(graph, plan, inputs)
    if residuals:
        counts["residuals"] = residuals
    graph.cleanup().toposort()
    return counts
