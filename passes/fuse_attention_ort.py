"""Fuse a float multi-head attention into onnxruntime's MultiHeadAttention kernel (target ort).

    X[B, N, 3C] -> Reshape[B, N, 3, h, d] -> Transpose(2, 0, 3, 1, 4) -> Split/Squeeze -> q, k, v
    softmax(MatMul(q * c, Transpose(k, 0 1 3 2)) [* c']) -> MatMul(., v)
        -> Transpose(0, 2, 1, 3) -> Reshape[B, N, C] -> Y
    X -> Split(C, C, C; last axis) -> com.microsoft.MultiHeadAttention(h, scale c c') -> Y

The head split, the key transpose and the head merge are layout copies that cost as much as
the attention products on small vision tokens (mobilevit_xxs at 1 thread: 9 attentions,
Transpose/Split/Squeeze ~0.5 ms of ~3 ms); onnxruntime's CPU kernel takes q, k, v as
[B, N, C] and does the heads in place. The ort target has no log2 op on the Softmax (it
runs float there), so the whole pattern is float. This is the packed-qkv layout of timm's
``Attention`` (MobileViT v1, FastViT, TinyViT, MNv4-hybrid exports).

Matched only as drawn: q, k, v the three parts of one head split of a [B, N, 3 h d] tensor,
constant scalar scales (Mul by c, or Div), every intermediate read by the pattern alone,
and the measured shapes (fold_shapes.py) agreeing. Anything else is left alone, and so is
the whole model unless the fused one gives outputs within FUSED_TOLERANCE of the original
at batch 1 and 2 (the kernel sums in another order).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxquant.graph import unique_name
from .fold_shapes import batch_only_inputs, output_shapes, remove_dead_nodes, same_outputs

DOMAIN = "com.microsoft"
FUSED_TOLERANCE = 1e-3  # of each output's largest magnitude


class _Graph:
    """Producer and consumer lookups over a GraphProto, and its constant scalars."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.outputs = {o.name for o in graph.output}

    def op(self, tensor: str, op_type: str):
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type else None

    def only_reader(self, tensor: str, op_type: str):
        readers = self.consumers.get(tensor, [])
        if tensor in self.outputs or len(readers) != 1 or readers[0].op_type != op_type:
            return None
        return readers[0]

    def scalar(self, tensor: str):
        v = self.values.get(tensor)
        return float(v) if v is not None and v.size == 1 else None


def _attr(node, name, default=None):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


def _scaled(g: _Graph, tensor: str) -> tuple[str, float]:
    """(tensor before a constant scalar Mul/Div, the factor)."""
    node = g.producer.get(tensor)
    if node is not None and node.op_type in ("Mul", "Div"):
        for a, b in ((0, 1), (1, 0)) if node.op_type == "Mul" else ((0, 1),):
            c = g.scalar(node.input[b])
            if c is not None and c != 0:
                return node.input[a], c if node.op_type == "Mul" else 1.0 / c
    return tensor, 1.0


def _head(g: _Graph, tensor: str):
    """(split node, part index) when ``tensor`` is Squeeze(axis 0) of a Split(axis 0) output."""
    sq = g.op(tensor, "Squeeze")
    if sq is None:
        return None
    axes = g.values.get(sq.input[1]) if len(sq.input) > 1 else _attr(sq, "axes")
    split = g.op(sq.input[0], "Split")
    if split is None or axes is None or list(np.ravel(axes)) != [0] or _attr(split, "axis", 0) != 0:
        return None
    return split, list(split.output).index(sq.input[0])


def _match(g: _Graph, softmax: onnx.NodeProto):
    """The pattern around one Softmax: dict(x, split, y, last, scale, reshape) or None."""
    if _attr(softmax, "axis", -1) not in (-1, 3):
        return None
    scores, post = _scaled(g, softmax.input[0])
    qk = g.op(scores, "MatMul")
    if qk is None:
        return None
    q, c_q = _scaled(g, qk.input[0])
    kt = g.op(qk.input[1], "Transpose")
    if kt is None or _attr(kt, "perm") != [0, 1, 3, 2]:
        return None
    k, c_k = _scaled(g, kt.input[0])
    av = g.only_reader(softmax.output[0], "MatMul")
    if av is None or av.input[0] != softmax.output[0]:
        return None
    heads = [_head(g, t) for t in (q, k, av.input[1])]
    if None in heads or len({id(h[0]) for h in heads}) != 1 or [h[1] for h in heads] != [0, 1, 2]:
        return None
    split = heads[0][0]
    perm = g.op(split.input[0], "Transpose")
    reshape = g.op(perm.input[0], "Reshape") if perm is not None else None
    if reshape is None or _attr(perm, "perm") != [2, 0, 3, 1, 4]:
        return None
    merge = g.only_reader(av.output[0], "Transpose")
    last = g.only_reader(merge.output[0], "Reshape") if merge is not None else None
    if last is None or _attr(merge, "perm") != [0, 2, 1, 3]:
        return None
    return {"x": reshape.input[0], "heads": reshape.output[0], "y": last.output[0],
            "last": last, "scale": c_q * c_k * post}


def _shapes_agree(shapes: dict, m: dict):
    """(h, d) when X is [B, N, 3hd], the head view [B, N, 3, h, d] and Y [B, N, hd]."""
    x, heads, y = shapes[m["x"]], shapes[m["heads"]], shapes[m["y"]]
    if len(x) != 3 or len(heads) != 5 or len(y) != 3 or heads[2] != 3:
        return None
    h, d = heads[3], heads[4]
    if tuple(heads[:2]) != tuple(x[:2]) or x[2] != 3 * h * d or tuple(y) != (x[0], x[1], h * d):
        return None
    return h, d


def _fused_nodes(m: dict, h: int, d: int, taken: set, inits: list) -> list:
    q, k, v = (unique_name(taken, f"{m['y']}_{p}") for p in "qkv")
    sizes = unique_name(taken, f"{m['y']}_qkv_sizes")
    inits.append(numpy_helper.from_array(np.array([h * d] * 3, np.int64), sizes))
    name = m["last"].name or m["y"]
    return [helper.make_node("Split", [m["x"], sizes], [q, k, v], axis=-1,
                             name=unique_name(taken, f"{name}_qkv_split")),
            helper.make_node("MultiHeadAttention", [q, k, v], [m["y"]], domain=DOMAIN,
                             num_heads=h, scale=m["scale"],
                             name=unique_name(taken, f"{name}_attention"))]


def fuse_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, str]:
    """-> (model, how many attentions were fused, a note when none could be)."""
    g = _Graph(model.graph)
    matches = [m for s in model.graph.node if s.op_type == "Softmax" and (m := _match(g, s))]
    inputs = batch_only_inputs(model) if matches else None
    if not matches or inputs is None:
        return model, 0, ""
    names = sorted({m[k] for m in matches for k in ("x", "heads", "y")})
    try:
        shapes = output_shapes(model, names, inputs)[0]
    except Exception as err:  # noqa: BLE001 - a model that cannot run at batch 2 or 3
        return model, 0, f"attention not fused: the model does not run at batch 2-3 ({err})"
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = ({n.name for n in graph.node} | {o for n in graph.node for o in n.output}
             | {i.name for i in graph.initializer} | {i.name for i in graph.input})
    fused, inits = {}, []
    for m in matches:
        hd = _shapes_agree(shapes, m)
        if hd is not None:
            fused[m["y"]] = _fused_nodes(m, *hd, taken, inits)
    if not fused:
        return model, 0, ""
    nodes = []
    for node in graph.node:
        nodes += fused[node.output[0]] if node.op_type == "Reshape" and node.output[0] in fused \
            else [node]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    remove_dead_nodes(graph)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    if not same_outputs(model, out, inputs, FUSED_TOLERANCE):
        return model, 0, "attention not fused: the fused model's outputs differed"
    return out, len(fused), ""
