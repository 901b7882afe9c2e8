"""Split a Transpose that onnxruntime runs element by element into steps it runs fast (target ort).

    x[1, 64, 64, 4] -> Transpose(0, 3, 2, 1)                           116 us (mobilevit_xxs)
    x -> Transpose(0, 3, 1, 2) -> Flatten -> Reshape -> Transpose(0, 1, 3, 2)   ~15 us

onnxruntime's CPU Transpose has fast kernels for a permutation that moves one axis (the
others keep their order) and a generic element-wise loop for every other permutation, about
7 ns per element on this CPU: the MobileViT unfold/fold transposes, (0, 3, 2, 1) on
16k-element maps, cost more than the convolutions next to them. Any permutation is a product
of at most rank-1 single-axis moves (insertion order). Its optimizer would merge consecutive
Transposes back into the slow one, so a Flatten + Reshape pair (two copies of a contiguous
tensor, which its transpose optimizer does not push through) separates the steps.

Matched: a Transpose whose permutation is not a single-axis move, with at least
MIN_ELEMENTS elements at batch 1 and at most one dimension that follows the batch (the
Reshape restores the intermediate shape with -1 there; shapes measured as in fold_shapes.py).
Outputs are bit-identical (checked); anything else is left alone. Smaller tensors are not
worth the two extra kernels (measured: splitting 1.5k-element transposes too cost 3 %).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxquant.graph import unique_name
from .fold_shapes import batch_only_inputs, output_shapes, same_outputs

MIN_ELEMENTS = 4096


def single_axis_move(perm) -> bool:
    """Whether ``perm`` moves at most one axis (the rest keep their relative order)."""
    perm = list(perm)
    return any(rest == sorted(rest) for rest in ([p for p in perm if p != a] for a in perm))


def single_axis_steps(perm) -> list:
    """Single-axis-move permutations whose composition (applied in order) is ``perm``."""
    current, steps = list(range(len(perm))), []
    for position, axis in enumerate(perm):
        at = current.index(axis)
        if at != position:
            step = list(range(len(perm)))
            step.insert(position, step.pop(at))
            steps.append(step)
            current = [current[i] for i in step]
    return steps


def _perm(node: onnx.NodeProto) -> list | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _candidates(model: onnx.ModelProto) -> list:
    return [n for n in model.graph.node if n.op_type == "Transpose"
            and (p := _perm(n)) and not single_axis_move(p)]


def _input_shape(shapes: list, name: str):
    """The input shape with -1 where it follows the batch, or None (two such dims, small)."""
    v = np.array([s[name] for s in shapes], np.int64)
    varying = (v != v[0]).any(0)
    if varying.sum() > 1 or int(np.prod(v[0])) < MIN_ELEMENTS:
        return None
    return np.where(varying, -1, v[0])


def _steps_nodes(node: onnx.NodeProto, shape, taken: set, inits: list) -> list:
    """The nodes that replace ``node``: steps with Flatten + Reshape between them."""
    steps, nodes = single_axis_steps(_perm(node)), []
    current, source = list(range(len(shape))), node.input[0]
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        out = node.output[0] if last else unique_name(taken, f"{node.output[0]}_step{i}")
        nodes.append(helper.make_node("Transpose", [source], [out], perm=step,
                                      name=unique_name(taken, f"{node.name}_step{i}")))
        current = [current[a] for a in step]
        if last:
            break
        flat = unique_name(taken, f"{out}_flat")
        nodes.append(helper.make_node("Flatten", [out], [flat], axis=1,
                                      name=unique_name(taken, f"{node.name}_flatten{i}")))
        target = unique_name(taken, f"{out}_shape")
        inits.append(numpy_helper.from_array(np.array([shape[a] for a in current], np.int64),
                                             target))
        source = unique_name(taken, f"{out}_restored")
        nodes.append(helper.make_node("Reshape", [flat, target], [source],
                                      name=unique_name(taken, f"{node.name}_restore{i}")))
    return nodes


def split_transposes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, str]:
    """-> (model, how many Transposes were split, a note when none could be)."""
    candidates = _candidates(model)
    inputs = batch_only_inputs(model) if candidates else None
    if not candidates or inputs is None:
        return model, 0, ""
    try:
        shapes = output_shapes(model, [n.input[0] for n in candidates], inputs)
    except Exception as err:  # noqa: BLE001 - a model that cannot run at batch 2 or 3
        return model, 0, f"Transposes not split: the model does not run at batch 2-3 ({err})"
    chosen = {n.output[0]: s for n in candidates if (s := _input_shape(shapes, n.input[0])) is not None}
    if not chosen:
        return model, 0, ""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = ({n.name for n in graph.node} | {o for n in graph.node for o in n.output}
             | {i.name for i in graph.initializer} | {i.name for i in graph.input})
    nodes, inits = [], []
    for node in graph.node:
        nodes += _steps_nodes(node, chosen[node.output[0]], taken, inits) \
            if node.op_type == "Transpose" and node.output[0] in chosen else [node]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    if not same_outputs(model, out, inputs):
        return model, 0, "Transposes not split: the split model's outputs differed"
    return out, len(chosen), ""
