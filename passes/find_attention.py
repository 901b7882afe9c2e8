"""Find the attention probabilities: anchor on Softmax, check its neighbours.

Patterns (timm 1.0.31 exports, DESIGN.md §2), one name per variant:

    sdpa            MatMul(q, kT) -> [Mul|Div|Add|layout]{0,5} -> Softmax -> [layout]{0,3}
                    -> MatMul(., v)   (layout: Reshape/Squeeze/Unsqueeze/Flatten/Transpose)
                    (MobileViT v1, FastViT-SA, MNv4-hybrid; +Mul EdgeNeXt; +Add TinyViT;
                     +Mul+Add EfficientFormer v1, LeViT)
    talking_heads   MatMul -> [Mul|Add]* -> Conv1x1 -> Softmax -> Conv1x1 -> MatMul
                    (EfficientFormer v2)
    separable       Conv1x1 -> Split|Slice -> Softmax -> Mul -> ReduceSum
                    (MobileViT v2 separable attention: context scores over tokens)

The Softmax output of every match gets the log2 quantizer (EfficientQuant: post-Softmax
activations are heavy-tailed towards 0, where a uniform grid wastes its codes). A Softmax
that matches none (e.g. a classifier head) is left in float and logged with the reason.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxquant.graph import producer
from onnxquant.plan import AttentionSite

SCALE_OPS = ("Mul", "Div", "Add", "Sub")
# layout-only ops exporters put between the products and the Softmax (head reshapes; the
# Flatten/Reshape of an opset-11 Softmax converted to 13 with an unknown rank)
LAYOUT_OPS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose")


def _back(tensor, through, target, limit):
    """Walk producers through ``through`` ops to a ``target`` op, trying every data branch.

    Returns (target node, chain of through-nodes from the target side) or (None, []).
    A bias Add may list the bias first (LeViT gathers it from a table), hence the branches.
    """
    node = producer(tensor)
    if node is None:
        return None, []
    if node.op in target:
        return node, []
    if node.op not in through or limit == 0:
        return None, []
    for t in node.inputs:
        if isinstance(t, gs.Variable) and producer(t) is not None:
            found, chain = _back(t, through, target, limit - 1)
            if found is not None:
                return found, chain + [node]
    return None, []


def _consumers(tensor, op):
    return [n for n in tensor.outputs if n.op == op]


def _forward(tensor, limit: int = 3):
    """The MatMul reading ``tensor`` as its first input, through single-use layout ops."""
    for _ in range(limit + 1):
        av = [n for n in _consumers(tensor, "MatMul") if n.inputs[0] is tensor]
        if av:
            return av[0]
        users = tensor.outputs
        if len(users) != 1 or users[0].op not in LAYOUT_OPS:
            return None
        tensor = users[0].outputs[0]
    return None


def _match_sdpa(sm):
    qk, chain = _back(sm.inputs[0], SCALE_OPS + LAYOUT_OPS, ("MatMul",), 5)
    av = _forward(sm.outputs[0])
    if qk is None or av is None:
        return None
    return "sdpa", [qk, *chain, sm, av]


def _match_talking_heads(sm):
    pre = producer(sm.inputs[0])
    if pre is None or pre.op != "Conv":
        return None
    qk, chain = _back(pre.inputs[0], SCALE_OPS, ("MatMul",), 4)
    post = _consumers(sm.outputs[0], "Conv")
    if qk is None or len(post) != 1:
        return None
    av = _consumers(post[0].outputs[0], "MatMul")
    if not av:
        return None
    return "talking_heads", [qk, *chain, pre, sm, post[0], av[0]]


def _match_separable(sm):
    split = producer(sm.inputs[0])
    if split is None or split.op not in ("Split", "Slice"):
        return None
    conv = producer(split.inputs[0])
    muls = _consumers(sm.outputs[0], "Mul")
    if conv is None or conv.op != "Conv" or not muls:
        return None
    reduce = [n for m in muls for n in _consumers(m.outputs[0], "ReduceSum")]
    if not reduce:
        return None
    return "separable", [conv, split, sm, muls[0], reduce[0]]


MATCHERS = (_match_sdpa, _match_talking_heads, _match_separable)


def run(graph: gs.Graph, ctx) -> int:
    """Append an AttentionSite per matched Softmax; returns the number matched."""
    found = 0
    for sm in (n for n in graph.nodes if n.op == "Softmax"):
        match = next((m for m in (f(sm) for f in MATCHERS) if m), None)
        if match is None:
            reason = "no MatMul/Conv attention product around it"
            ctx.log.debug("Softmax %s: not attention (%s)", sm.name, reason)
            ctx.plan.unmatched_softmax.append((sm.name, reason))
            continue
        pattern, nodes = match
        ctx.plan.attention.append(AttentionSite(sm.name, sm.outputs[0].name, pattern,
                                                tuple(n.name for n in nodes)))
        found += 1
    ctx.log.info("find_attention: %d attention Softmax, %d other", found,
                 len(ctx.plan.unmatched_softmax))
    return found
