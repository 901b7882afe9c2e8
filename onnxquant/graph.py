"""Small onnx-graphsurgeon helpers shared by the passes and the emitter."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def producer(tensor: gs.Tensor):
    """The node that produces ``tensor``, or None (graph input, initializer)."""
    return tensor.inputs[0] if tensor.inputs else None


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """Value of a constant tensor: an initializer, a Constant node, or either behind Identity.

    ``torch.onnx.export(dynamo=False)`` de-duplicates equal initializers through Identity
    nodes (DESIGN.md §5), so a Conv weight may arrive that way.
    """
    seen = 0
    while isinstance(tensor, gs.Variable) and seen < 8:
        node = producer(tensor)
        if node is None:
            return None
        if node.op == "Constant":
            value = node.attrs.get("value")
            return None if value is None else np.asarray(value.values)
        if node.op != "Identity":
            return None
        tensor, seen = node.inputs[0], seen + 1
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def data_inputs(node: gs.Node) -> list:
    """Inputs that carry activations (not shapes, axes or weights) for topology walks."""
    if node.op in SHAPE_ONLY:
        return []
    if node.op in MULTI_DATA:
        return [t for t in node.inputs if isinstance(t, gs.Variable)]
    return [node.inputs[0]] if node.inputs and isinstance(node.inputs[0], gs.Variable) else []


SHAPE_ONLY = {"Shape", "Size", "Constant", "ConstantOfShape", "Range"}
MULTI_DATA = {"Add", "Sub", "Mul", "Div", "MatMul", "Concat", "Sum", "Max", "Min", "Where",
              "Pow", "Einsum", "Gemm"}
