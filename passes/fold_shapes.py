"""Fold the shape arithmetic in front of Reshape nodes into constants (target ort).

    x -> Shape -> Gather -> Unsqueeze -> Concat(.., 64, 16) -> Reshape(y, .)
    y -> Reshape(y, [-1, 64, 16])            (the one batch-dependent entry becomes -1)

Exporters write the target shape of a Reshape as arithmetic on ``Shape`` outputs whenever the
batch dimension is symbolic, and onnxruntime cannot fold that chain at load (the batch is
unknown then), so it runs Shape/Gather/Unsqueeze/Concat on every inference: on the
mobilevit_xxs export, 24 Shape, 24 Gather, 60 Unsqueeze and 30 Concat nodes for 30
Reshapes, 3-7 % of its time at one thread (docs/latency.md).

Matched: a Reshape whose shape input is computed (not an initializer or Constant), in a
model whose graph inputs are static but for their first (batch) dimension. The Reshape's
output shape is measured in onnxruntime at three batch sizes: a shape that never changes
becomes the constant target; one whose dims all stay fixed but one becomes a constant with
-1 there (Reshape infers that dim from the element count, which is what the arithmetic
computed). Anything else is left alone, and so is the whole model if the folded one does
not give bit-identical outputs to the original at two batch sizes, or cannot be run. The
nodes left without consumers are removed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxquant.graph import unique_name
from onnxquant.model_io import quiet_session

PROBE_BATCHES = (1, 2, 3)
CHECK_BATCHES = (1, 2)


def constants(graph: onnx.GraphProto) -> set:
    return ({i.name for i in graph.initializer}
            | {o for n in graph.node if n.op_type == "Constant" for o in n.output})


def batch_only_inputs(model: onnx.ModelProto):
    """[(name, numpy dtype, static dims after the batch)] or None if another dim is symbolic."""
    inits = {i.name for i in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        rest = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        if not dims or None in rest or 0 in rest:
            return None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        inputs.append((value.name, dtype, rest))
    return inputs


def _feed(inputs, batch: int, rng) -> dict:
    feed = {}
    for name, dtype, rest in inputs:
        shape = [batch] + rest
        if np.issubdtype(dtype, np.floating):
            feed[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[name] = rng.integers(0, 2, shape).astype(dtype)
    return feed


def output_shapes(model: onnx.ModelProto, names: list, inputs) -> list:
    """Each tensor's shape at every PROBE_BATCHES size: [ {name: shape} ]."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    session = quiet_session(probe, optimized=False)
    rng = np.random.default_rng(0)
    return [{n: v.shape for n, v in zip(names, session.run(names, _feed(inputs, b, rng)))}
            for b in PROBE_BATCHES]


def _folded(shapes: list):
    """The constant target shape for a Reshape whose output had ``shapes``, or None."""
    v = np.array(shapes, np.int64)
    if v.ndim != 2 or (v == 0).any():  # 0 would read as "copy this dim" (allowzero=0)
        return None
    varying = np.nonzero((v != v[0]).any(0))[0]
    if len(varying) > 1:
        return None
    folded = v[0].copy()
    folded[varying] = -1
    return folded


def remove_dead_nodes(graph: onnx.GraphProto) -> None:
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(keep))
    live = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(live)


def _subgraph_inputs(node: onnx.NodeProto) -> set:
    """Names an If/Loop/Scan body reads from the outer graph (kept alive conservatively)."""
    names = set()
    for attr in node.attribute:
        for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            for inner in sub.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names


def same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, inputs, tolerance: float = 0.0) -> bool:
    """Whether ``b`` gives ``a``'s outputs at every CHECK_BATCHES size: bit for bit, or
    within ``tolerance`` of each output's largest magnitude."""
    sa, sb = quiet_session(a), quiet_session(b)
    rng = np.random.default_rng(1)
    for batch in CHECK_BATCHES:
        feed = _feed(inputs, batch, rng)
        for x, y in zip(sa.run(None, feed), sb.run(None, feed)):
            if x.shape != y.shape:
                return False
            if tolerance == 0.0 and not np.array_equal(x, y, equal_nan=True):
                return False
            if tolerance and np.abs(x.astype(np.float64) - y).max(initial=0.0) > \
                    tolerance * np.abs(x).max(initial=0.0):
                return False
    return True


def fold_reshape_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, str]:
    """-> (model, how many Reshape shapes were folded, a note when nothing could be)."""
    graph = model.graph
    fixed = constants(graph)
    reshapes = [n for n in graph.node if n.op_type == "Reshape" and n.input[1] not in fixed]
    if not reshapes:
        return model, 0, ""
    inputs = batch_only_inputs(model)
    if inputs is None:
        return model, 0, "Reshape shapes not folded: an input has a symbolic dim after the batch"
    names = [n.output[0] for n in reshapes]
    try:
        shapes = output_shapes(model, names, inputs)
    except Exception as err:  # noqa: BLE001 - a model that cannot run at batch 2 or 3
        return model, 0, f"Reshape shapes not folded: the model does not run at batch 2-3 ({err})"
    folded = {n: f for n in names if (f := _folded([d[n] for d in shapes])) is not None}
    if not folded:
        return model, 0, ""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {i.name for i in out.graph.initializer} | {o for n in out.graph.node for o in n.output}
    count = 0
    for node in out.graph.node:
        if node.op_type == "Reshape" and node.output[0] in folded:
            name = unique_name(taken, f"{node.output[0]}_shape")
            out.graph.initializer.append(numpy_helper.from_array(folded[node.output[0]], name))
            node.input[1] = name
            count += 1
    remove_dead_nodes(out.graph)
    if not same_outputs(model, out, inputs):
        return model, 0, "Reshape shapes not folded: the folded model's outputs differed"
    return out, count, ""

