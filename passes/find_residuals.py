"""Find residual joins fed by a Conv: where TensorRT wants the skip input quantized.

    x --------------------------------> Add -> ...
    x -> ... -> Conv -> (output) -----> ^
                                        skip input (x side) gets Q/DQ (target tensorrt)

TensorRT's Q/DQ placement rules: quantize the inputs of weighted ops and the residual input
of a skip connection, not outputs; with both Add inputs int8-ready the builder can fuse the
Add into the Conv's INT8 kernel (docs/tensorrt_engines.md found every conv writing float32
and the residual Add running in a separate kernel without it). Other targets ignore these.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxquant.graph import producer
from onnxquant.plan import ResidualSite


def run(graph: gs.Graph, ctx) -> int:
    """Append a ResidualSite per Add with one Conv-produced and one other activation input."""
    found = 0
    for node in graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2:
            continue
        makers = [producer(t) if isinstance(t, gs.Variable) else None for t in node.inputs]
        if any(m is None for m in makers):
            continue  # a bias or constant, not a skip connection
        from_conv = [m.op == "Conv" for m in makers]
        if sum(from_conv) != 1:
            continue
        skip = node.inputs[from_conv.index(False)]
        conv = makers[from_conv.index(True)]
        ctx.plan.residuals.append(ResidualSite(node.name, skip.name, conv.name))
        found += 1
    ctx.log.info("find_residuals: %d conv residual joins", found)
    return found
