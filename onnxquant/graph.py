"""Small onnx-graphsurgeon helpers shared by the passes and the emitter."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def producer(tensor: gs.Tensor):
    """The node that produces ``tensor``, or None (graph input, initializer)."""
    return tensor.inputs[0] if tensor.inputs else None


def constant_source(tensor: gs.Tensor):
    """The tensor that holds a constant's value: an initializer or a Constant node's output,
    found through any Identity chain. None if ``tensor`` is not constant.

    ``torch.onnx.export(dynamo=False)`` de-duplicates equal initializers through Identity
    nodes (DESIGN.md §5), so a Conv weight may arrive that way.
    """
    for _ in range(8):
        if isinstance(tensor, gs.Constant):
            return tensor
        node = producer(tensor)
        if node is None:
            return None
        if node.op == "Constant":
            return tensor if node.attrs.get("value") is not None else None
        if node.op != "Identity":
            return None
        tensor = node.inputs[0]
    return None


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """Value of a constant tensor (see ``constant_source``), or None."""
    source = constant_source(tensor)
    if source is None:
        return None
    if isinstance(source, gs.Constant):
        return np.asarray(source.values)
    return np.asarray(producer(source).attrs["value"].values)


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


def unique_name(taken: set, name: str) -> str:
    """``name``, or ``name_1``, ``name_2`` ... : the first not in ``taken`` (which gets it)."""
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    taken.add(candidate)
    return candidate
