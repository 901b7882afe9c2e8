"""Find linear layers: MatMul/Gemm whose weight (B) is a constant 2-D tensor.

    x -> MatMul(x, W) -> ...        W constant [K, N]    (timm Linear, dynamo=False export)
    x -> Gemm(x, W, b) -> ...       W constant            (classifier heads)

Attention products (both inputs activations) never match. The paper leaves linear layers
in float; they are marked so that the ``linear`` part and the ort target can quantize them
(weight-only: ~0.3x file size; ort: dynamic int8, DESIGN.md §7 QGemm/MatMulInteger).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxquant.graph import constant_source, constant_value
from onnxquant.plan import LinearSite


def _weight(node: gs.Node):
    if len(node.inputs) < 2:
        return None
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return None
    value = constant_value(node.inputs[1])
    return value if value is not None and value.ndim == 2 else None


def run(graph: gs.Graph, ctx) -> int:
    """Append a LinearSite per MatMul/Gemm with a constant 2-D weight; returns the count."""
    found = 0
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or _weight(node) is None:
            continue
        ctx.plan.linears.append(LinearSite(node.name, node.op,
                                           constant_source(node.inputs[1]).name,
                                           node.inputs[0].name))
        found += 1
    ctx.log.info("find_linear: %d linear layers", found)
    return found
