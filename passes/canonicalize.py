"""Canonicalize what exporters leave behind, so the matchers see one spelling of the math.

    x -> Identity -> y            consumers read x          (paddle2onnx dropout, aliases)
    x -> Dropout -> y             consumers read x          (inference: mask unused)
    x -> Cast(to=type of x) -> y  consumers read x          (no-op casts)
    node named "" or a duplicate  gets a unique name        (ONNX allows both)
    trailing "" optional inputs   dropped                   (Conv(x, W, "") == Conv(x, W))

Why: paddle2onnx leaves an ``Identity`` (its dropout) between Softmax and the attention
MatMul of PP-OCR recognizers, so 0 of 2 attention blocks were found before this pass. A
node is bypassed only when its output is not a graph output and no subgraph reads it by
name. Weight values are never touched (folding BatchNormalization is fold_batchnorm.py).
Surviving tensors keep their names, so calibration on the input model sees them.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from onnxquant.graph import constant_value

PASSTHROUGH = ("Identity", "Dropout", "Cast")


def _subgraph_names(graph: gs.Graph) -> set:
    """Tensor names read inside If/Loop/Scan bodies (outer-scope references)."""
    names = set()
    for node in graph.nodes:
        for attr in node.attrs.values():
            if isinstance(attr, gs.Graph):
                names |= set(attr.tensors())
    return names


def _is_noop(node: gs.Node, graph_outputs: set) -> bool:
    if not node.inputs or not node.outputs:
        return False
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        return not _mask_used(node, graph_outputs) and not _training(node)
    return _onnx_dtype(node.inputs[0].dtype) == node.attrs.get("to")  # Cast


def _mask_used(node: gs.Node, graph_outputs: set) -> bool:
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    return mask is not None and bool(mask.outputs or mask.name in graph_outputs)


def _training(node: gs.Node) -> bool:
    """Dropout in training mode (opset >= 12 input 2 constant true; unknown counts as true)."""
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return False
    value = constant_value(node.inputs[2])
    return value is None or bool(np.asarray(value).any())


def _onnx_dtype(dtype) -> int | None:
    if dtype is None:
        return None
    try:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return None


def _bypass(graph: gs.Graph, keep: set) -> int:
    """Consumers of a no-op node read its input instead; returns how many were bypassed."""
    outputs = {t.name for t in graph.outputs}
    count = 0
    for node in graph.nodes:
        if node.op not in PASSTHROUGH or not _is_noop(node, outputs):
            continue
        src, out = node.inputs[0], node.outputs[0]
        if out.name in outputs or out.name in keep:
            continue
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = src
        node.outputs.clear()
        count += 1
    return count


def _drop_trailing_empty(graph: gs.Graph) -> None:
    for node in graph.nodes:
        while node.inputs and not node.inputs[-1].name:
            node.inputs.pop()


def _unique_names(graph: gs.Graph) -> int:
    """Name every unnamed or duplicate node ``<op>_<n>``, unique among all names."""
    seen, renamed = set(), []
    for node in graph.nodes:
        if node.name and node.name not in seen:
            seen.add(node.name)
        else:
            renamed.append(node)
    taken = seen | set(graph.tensors())
    for i, node in enumerate(renamed):
        name, k = f"{node.op}_{i}", 0
        while name in taken:
            k += 1
            name = f"{node.op}_{i}_{k}"
        node.name = name
        taken.add(name)
    return len(renamed)


def run(graph: gs.Graph, ctx) -> int:
    """Apply the rewrites above; returns the number of nodes changed."""
    _drop_trailing_empty(graph)
    renamed = _unique_names(graph)
    bypassed = _bypass(graph, _subgraph_names(graph))
    if bypassed:
        graph.cleanup()
    ctx.log.info("canonicalize: %d Identity/Dropout/no-op Cast bypassed, %d nodes named",
                 bypassed, renamed)
    ctx.plan.canonical.update(bypassed=bypassed, renamed=renamed)
    return renamed + bypassed
