"""The block map: every node of the canonical graph in exactly one block, with its boundary.

    conv_block ... -> bridge -> transformer -> transformer -> bridge -> conv_block ...

``partition`` (called by passes/find_blocks.py, which labels each node by its region) cuts
one topological order of the graph into contiguous runs, so a block's inputs are always
produced by earlier blocks and any run of blocks is a valid subgraph (docs/blocks.md):

- transformer: a connected set of transformer regions with their transformer-role convs,
  split between two attentions at the last point where one activation tensor is live
  (before the next layer's norm: one block per attention layer);
- bridge: one bridge conv plus the elementwise ops that only read its output (activation,
  scale) when it leaves a transformer;
- conv_block: the rest, split at every point where one activation tensor is live and a
  conv lies on each side (a residual unit, or conv + activation in a plain chain).

A piece with neither a conv nor an attention joins the block before it. Shape computations
(``Shape`` -> ``Gather`` -> ``Concat``, and whatever hangs off them, e.g. EdgeNeXt's
positional-encoding conv) sit where their input is ready; constant-only nodes sit with
their first consumer and are copied, never passed, to the other blocks that read them. ``extract`` writes a block (or a run) as an ONNX model from the
float or the quantized model (backward slice from its outputs, stopping at its inputs, so
inserted Q/DQ nodes come along); ``block_inputs`` computes its boundary tensors.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import constant_source, data_inputs

KINDS = ("conv_block", "transformer", "bridge")
RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
              "Multinomial", "Bernoulli"}
# What may follow a bridge conv inside its block (reads only the conv's output chain).
EPILOGUE_OPS = {"Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Clip", "Mul",
                "Add", "Sub", "Div", "Pow", "Sqrt", "LeakyRelu", "PRelu", "Elu", "Gelu",
                "Softplus", "BatchNormalization", "Identity"}


@dataclass(frozen=True)
class Block:
    """A contiguous part of the graph and its boundary tensors (names, in graph order)."""

    kind: str  # one of KINDS
    name: str
    nodes: tuple = ()  # node names, in a topological order
    inputs: tuple = ()  # non-constant tensors read inside, made outside (or graph inputs)
    outputs: tuple = ()  # produced inside, read by a later block or a graph output
    convs: tuple = ()  # quantizable sites inside: Conv nodes with a constant weight
    linears: tuple = ()  # MatMul/Gemm with a constant 2-D weight
    attention: tuple = ()  # Softmax nodes of matched attention


# ---- partition ---------------------------------------------------------------------------

class _Topology:
    """Node-level view of a gs graph: producers, consumers and the kind of every node."""

    def __init__(self, graph: gs.Graph):
        self.nodes = list(graph.nodes)
        self.producer = {t.name: i for i, n in enumerate(self.nodes) for t in n.outputs}
        tensors = graph.tensors()
        self.constants = {k for k, t in tensors.items() if isinstance(t, gs.Constant)}
        self.reads = [_reads(n, tensors) for n in self.nodes]  # names, constants included
        self.readers = {}
        for i, names in enumerate(self.reads):
            for t in names:
                self.readers.setdefault(t, []).append(i)
        self.preds = [sorted({self.producer[t] for t in names if t in self.producer})
                      for names in self.reads]
        self.succs = [[] for _ in self.nodes]
        for i, preds in enumerate(self.preds):
            for p in preds:
                self.succs[p].append(i)
        self.order = self._kahn()
        self.rank = {i: r for r, i in enumerate(self.order)}
        self.const = [False] * len(self.nodes)  # every input constant: copied, not passed
        self.data = [False] * len(self.nodes)  # on the activation path from a graph input
        data_tensors = {t.name for t in graph.inputs}
        for i in self.order:
            node = self.nodes[i]
            self.const[i] = node.op not in RANDOM_OPS and all(
                t in self.constants or (t in self.producer and self.const[self.producer[t]])
                for t in self.reads[i])
            if not self.const[i] and any(t.name in data_tensors for t in data_inputs(node)):
                self.data[i] = True
                data_tensors.update(t.name for t in node.outputs)

    def _kahn(self) -> list:
        indeg = [len(p) for p in self.preds]
        ready = [i for i, d in enumerate(indeg) if d == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for s in self.succs[i]:
                indeg[s] -= 1
                if indeg[s] == 0:
                    heapq.heappush(ready, s)
        if len(order) != len(self.nodes):
            raise ValueError("graph has a cycle: no topological order")
        return order


def _reads(node: gs.Node, outer: dict) -> list:
    """Names ``node`` reads: its inputs, and outer tensors its subgraphs (If/Loop) read."""
    names = [t.name for t in node.inputs if t.name]
    for attr in node.attrs.values():
        if isinstance(attr, gs.Graph):
            names += sorted(set(attr.tensors()) & outer.keys())
    return list(dict.fromkeys(names))


def _bridge_epilogues(topo: _Topology, labels: list) -> None:
    """Relabel the elementwise ops that read only a leaving bridge conv's output chain."""
    for i, node in enumerate(topo.nodes):
        if node.op != "Conv" or labels[i][0] != "bridge":
            continue
        owned, work = {i}, list(topo.succs[i])
        while work:
            j = work.pop()
            n = topo.nodes[j]
            if (j in owned or n.op not in EPILOGUE_OPS or labels[j] != ("conv_block", None)
                    or not topo.data[j]):
                continue
            sources = {topo.producer.get(t.name) for t in data_inputs(n)}
            if {p for p in sources if p is None or not topo.const[p]} <= owned:
                owned.add(j)
                labels[j] = labels[i]
                work.extend(topo.succs[j])


def _schedule(topo: _Topology, labels: list) -> list:
    """A topological order keeping each label's nodes together where the graph allows.

    Shape computations go as soon as they are ready, constant-only nodes just before their
    first consumer; among the rest, nodes of the current label first, then graph order.
    """
    n = len(topo.nodes)
    indeg = [sum(not topo.const[p] for p in preds) for preds in topo.preds]
    emitted, order = [False] * n, []
    side, anywhere, by_label = [], [], {}

    def push(i):
        if not topo.data[i]:
            heapq.heappush(side, i)
        else:
            heapq.heappush(anywhere, i)
            heapq.heappush(by_label.setdefault(labels[i], []), i)

    def emit(i):
        stack = [p for p in topo.preds[i] if topo.const[p] and not emitted[p]]
        if stack:  # constant ancestors first, in graph order
            for p in _const_closure(topo, stack, emitted):
                emitted[p] = True
                order.append(p)
        emitted[i] = True
        order.append(i)
        for s in topo.succs[i]:
            if not topo.const[s]:
                indeg[s] -= 1
                if indeg[s] == 0:
                    push(s)

    for i in range(n):
        if not topo.const[i] and indeg[i] == 0:
            push(i)
    current = None
    while side or anywhere:
        heap = side or by_label.get(current) or anywhere
        i = heapq.heappop(heap)
        if not emitted[i]:
            current = labels[i] if topo.data[i] else current
            emit(i)
    rest = [i for i in range(n) if not emitted[i]]  # constants nothing reads
    order.extend(_const_closure(topo, rest, emitted) if rest else [])
    return order


def _const_closure(topo: _Topology, start: list, emitted: list) -> list:
    """``start`` and their unemitted constant ancestors, in graph topological order."""
    seen, stack = set(), list(start)
    while stack:
        p = stack.pop()
        if p not in seen and not emitted[p]:
            seen.add(p)
            stack.extend(q for q in topo.preds[p] if topo.const[q])
    return sorted(seen, key=topo.rank.__getitem__)


def _segment_keys(topo: _Topology, labels: list, order: list) -> list:
    """Label per position: shape nodes take the previous one, constants the next one."""
    keys, last = [None] * len(order), None
    for pos, i in enumerate(order):
        if topo.data[i]:
            last = labels[i]
        keys[pos] = last if not topo.const[i] else None
    nxt = last
    for pos in range(len(order) - 1, -1, -1):
        nxt = keys[pos] = keys[pos] if keys[pos] is not None else nxt
    first = next((k for k in keys if k is not None), ("conv_block", None))
    return [k if k is not None else first for k in keys]


class _Liveness:
    """How many activation tensors cross each gap of the order (gap g: before position g)."""

    def __init__(self, topo: _Topology, order: list, graph: gs.Graph):
        pos = {i: p for p, i in enumerate(order)}
        n = len(order)
        outputs = {t.name for t in graph.outputs}
        self.spans = []  # (first gap live, last gap live)
        for t in graph.inputs:
            last = max((pos[c] for c in topo.readers.get(t.name, ())), default=-1)
            self.spans.append((0, n if t.name in outputs else last))
        for i in order:
            if not topo.data[i]:
                continue
            for t in topo.nodes[i].outputs:
                uses = [pos[c] for c in topo.readers.get(t.name, ())]
                last = n if t.name in outputs else max(uses, default=-1)
                if last > pos[i]:
                    self.spans.append((pos[i] + 1, last))
        diff = np.zeros(n + 2, np.int64)
        for a, b in self.spans:
            if b >= a:
                diff[a] += 1
                diff[b + 1] -= 1
        self.live = np.cumsum(diff)

    def covering(self, windows: list) -> np.ndarray:
        """Per window (first gap, last gap), sorted and disjoint: tensors live all over it."""
        starts = [a for a, _ in windows]
        ends = [b for _, b in windows]
        diff = np.zeros(len(windows) + 1, np.int64)
        for a, b in self.spans:
            lo, hi = bisect_left(starts, a), bisect_right(ends, b) - 1
            if lo <= hi:
                diff[lo] += 1
                diff[hi + 1] -= 1
        return np.cumsum(diff)[:len(windows)]


def _conv_cuts(s: int, e: int, live: np.ndarray, over: int, is_conv: list) -> list:
    """Cut points of a conv segment [s, e): one live tensor (besides the ``over`` that pass
    over the whole segment), a conv on each side."""
    starts = [s] + [g for g in range(s + 1, e) if live[g] - over <= 1]
    keep = [a for a, b in zip(starts, starts[1:] + [e]) if any(is_conv[a:b])]
    return keep[1:]  # a conv-less piece joins the piece before it (the first: after it)


def _layer_cuts(spans: list, live: np.ndarray, over: int) -> list:
    """Cut points between consecutive attention layers: the last one-live-tensor gap
    before the next layer's attention (before its norm: the residual stream alone)."""
    cuts = []
    for (_, hi), (lo, _) in zip(spans, spans[1:]):
        cuts += [g for g in range(hi + 1, lo + 1) if live[g] - over <= 1][-1:]
    return cuts


def partition(graph: gs.Graph, labels: list, plan) -> list:
    """The blocks of ``graph``, in topological order.

    ``labels[i]``: (kind, key) of ``graph.nodes[i]`` from passes/find_blocks.py: the conv
    role or the region's side, the key naming the transformer group or the bridge conv.
    ``plan``: its attention sites split transformer groups, its conv sites are listed.
    """
    topo = _Topology(graph)
    labels = list(labels)
    _bridge_epilogues(topo, labels)
    order = _schedule(topo, labels)
    keys = _segment_keys(topo, labels, order)
    segments = []
    for pos in range(len(order)):
        if pos and keys[pos] == keys[pos - 1]:
            segments[-1][1] = pos + 1
        else:
            segments.append([pos, pos + 1])
    cuts = sorted([s for s, _ in segments] + _inner_cuts(topo, graph, order, keys, segments, plan))
    bounds = _join_fragments(topo, order, cuts, plan) + [len(order)]
    return _make_blocks(topo, graph, order, keys, list(zip(bounds, bounds[1:])), plan)


def _join_fragments(topo, order, cuts: list, plan) -> list:
    """Drop the cuts that would leave a block with neither a conv nor an attention: such a
    piece joins the block before it (MobileNetV4-hybrid's layer-scale Mul + residual Add
    after each conv unit of its attention stages, a BatchNormalization between two bridge
    convs in PP-OCRv6_rec)."""
    softmax = {s.softmax for s in plan.attention}
    keep = cuts[:1]
    for a, b in zip(cuts[1:], cuts[2:] + [len(order)]):
        if any(topo.nodes[i].op == "Conv" or topo.nodes[i].name in softmax for i in order[a:b]):
            keep.append(a)
    return keep


def _inner_cuts(topo, graph, order, keys, segments, plan) -> list:
    """Where conv segments split into units and transformer segments into layers.

    Liveness counts the activation tensors crossing a gap, less those live over the whole
    window (a conv segment; a transformer segment's attentions, e.g. the MobileViT
    shortcut that skips the whole transformer stack to the fusion Concat)."""
    liveness = _Liveness(topo, order, graph)
    is_conv = [topo.nodes[i].op == "Conv" for i in order]
    where = {topo.nodes[i].name: p for p, i in enumerate(order)}
    attn = sorted((min(where[n] for n in s.nodes), max(where[n] for n in s.nodes))
                  for s in plan.attention if all(n in where for n in s.nodes))
    over = liveness.covering(segments)
    cuts, layers = [], []
    for (s, e), k in zip(segments, over):
        spans = [a for a in attn if s <= a[0] and a[1] < e]
        if keys[s][0] == "conv_block":
            cuts += _conv_cuts(s, e, liveness.live, k, is_conv)
        elif keys[s][0] == "transformer" and len(spans) > 1:
            layers.append(spans)
    windows = [(spans[0][0], spans[-1][1] + 1) for spans in layers]
    for spans, k in zip(layers, liveness.covering(windows)):
        cuts += _layer_cuts(spans, liveness.live, k)
    return cuts


def _is_linear(node: gs.Node) -> bool:
    """MatMul/Gemm with a constant 2-D weight (the predicate of passes/find_linear.py),
    judged by shape: no weight is loaded."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.attrs.get("transA", 0):
        return False
    source = constant_source(node.inputs[1])
    if source is None:
        return False
    value = source if isinstance(source, gs.Constant) else source.inputs[0].attrs["value"]
    return len(value.shape) == 2


def _make_blocks(topo, graph, order, keys, pieces, plan) -> list:
    piece_of = [0] * len(order)
    for k, (a, b) in enumerate(pieces):
        for p in range(a, b):
            piece_of[order[p]] = k
    outputs = {t.name for t in graph.outputs}
    sites = {c.node for c in plan.convs}
    softmax = {s.softmax for s in plan.attention}
    blocks = []
    for k, (a, b) in enumerate(pieces):
        nodes = [topo.nodes[i] for i in order[a:b]]
        ins, outs = {}, {}
        for i, node in zip(order[a:b], nodes):
            for t in topo.reads[i]:
                src = topo.producer.get(t)
                if t not in topo.constants and (
                        src is None or (piece_of[src] != k and not topo.const[src])):
                    ins[t] = None
            if topo.const[i]:
                continue
            for t in node.outputs:
                if t.name in outputs or any(piece_of[r] != k for r in topo.readers.get(t.name, ())):
                    outs[t.name] = None
        kind = keys[a][0]
        blocks.append(Block(
            kind, f"{kind}_{k}", tuple(n.name for n in nodes), tuple(ins), tuple(outs),
            convs=tuple(n.name for n in nodes if n.name in sites),
            linears=tuple(n.name for n in nodes if _is_linear(n)),
            attention=tuple(n.name for n in nodes if n.name in softmax)))
    return blocks


# ---- extraction ----------------------------------------------------------------------------

def _boundary(blocks: list) -> tuple:
    """(inputs, declared outputs) of a consecutive run of blocks."""
    produced = {t for b in blocks for t in b.outputs}
    inputs = dict.fromkeys(t for b in blocks for t in b.inputs if t not in produced)
    return list(inputs), list(dict.fromkeys(t for b in blocks for t in b.outputs))


def _slice(graph: onnx.GraphProto, outputs: list, stop: set) -> set:
    """Indices of the nodes ``outputs`` depend on, walking back no further than ``stop``."""
    producer = {t: i for i, n in enumerate(graph.node) for t in n.output if t}
    inits = {i.name for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    keep, seen, stack = set(), set(), [(t, True) for t in outputs]
    while stack:
        t, direct = stack.pop()
        if not t or t in seen or t in stop or t in inits:
            continue
        seen.add(t)
        i = producer.get(t)
        if i is None and (direct or t in graph_inputs):
            where = "a graph input" if t in graph_inputs else "produced by no node"
            raise ValueError(f"tensor {t!r} is {where} but not a block input: the model "
                             "does not match the block map (use the canonical graph)")
        if i is not None and i not in keep:
            keep.add(i)
            node = graph.node[i]
            stack += [(n, True) for n in node.input] + [(n, False) for n in _subgraph_reads(node)]
    return keep


def _subgraph_reads(node: onnx.NodeProto) -> list:
    """Names read inside ``node``'s subgraphs (If/Loop/Scan); outer ones are walked."""
    names = []
    for attr in node.attribute:
        for sub in [attr.g, *attr.graphs] if attr.type in (attr.GRAPH, attr.GRAPHS) else []:
            for inner in sub.node:
                names += list(inner.input) + _subgraph_reads(inner)
    return names


def _run_outputs(graph: onnx.GraphProto, blocks: list, declared: list, keep: set) -> list:
    """Declared outputs still needed after the run: a graph output, or read (directly or
    through nodes the emitter inserted, e.g. Q/DQ) by a node outside the run's slice."""
    if len(blocks) == 1:
        return declared
    named = {n for b in blocks for n in b.nodes}
    readers = {}
    for i, node in enumerate(graph.node):
        for t in node.input:
            readers.setdefault(t, []).append(i)
    graph_outputs = {o.name for o in graph.output}

    def needed(t, depth=0):
        for r in readers.get(t, ()):
            node = graph.node[r]
            if r not in keep or (node.name not in named and depth < 8 and
                                 any(needed(o, depth + 1) for o in node.output)):
                return True
        return False

    return [t for t in declared if t in graph_outputs or needed(t)]


def value_types(model: onnx.ModelProto) -> dict:
    """Tensor name -> ValueInfoProto (shape inference); pass to ``extract`` when extracting
    many blocks of one model."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - best effort: boundaries keep what the model declares
        inferred = model
    g = inferred.graph
    return {v.name: v for v in [*g.value_info, *g.input, *g.output] if v.type.HasField("tensor_type")}


def extract(model: onnx.ModelProto, blocks, types: dict | None = None) -> onnx.ModelProto:
    """A standalone model of one block or a consecutive run of blocks of ``model``.

    ``model``: the canonical float graph (``gs.export_onnx`` of ``analyze``'s graph, or the
    input itself when canonicalization changed nothing) or an ``onnxquant`` output made
    from it: the slice walks back from the run's outputs to its inputs, so weight
    DequantizeLinear chains, log2 nodes and activation Q/DQ inside come along. Boundary
    tensors become graph inputs/outputs with their inferred types; initializers used are
    copied, as are the model's opsets and local functions. ``types``: ``value_types(model)``
    computed once for many extractions.
    """
    blocks = [blocks] if isinstance(blocks, Block) else list(blocks)
    inputs, declared = _boundary(blocks)
    keep = _slice(model.graph, declared, set(inputs))
    outputs = _run_outputs(model.graph, blocks, declared, keep)
    if len(outputs) < len(declared):
        keep = _slice(model.graph, outputs, set(inputs))
    infos = value_types(model) if types is None else types
    missing = [t for t in inputs if t not in infos]
    if missing:
        raise ValueError(f"no type known for block input {missing[0]!r}: run shape inference")
    nodes = [n for i, n in enumerate(model.graph.node) if i in keep]
    used = {t for n in nodes for t in n.input}
    graph = onnx.helper.make_graph(
        nodes, "_".join([blocks[0].name] + ([blocks[-1].name] if len(blocks) > 1 else [])),
        [infos[t] for t in inputs],
        [infos.get(t) or onnx.ValueInfoProto(name=t) for t in outputs],
        [i for i in model.graph.initializer if i.name in used])
    out = onnx.helper.make_model(graph, opset_imports=list(model.opset_import),
                                 ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def block_inputs(model: onnx.ModelProto, blocks, feed: dict, session_options=None) -> dict:
    """The boundary inputs of a block (or a run) on ``feed``: one onnxruntime run of the
    whole ``model`` with those tensors as its outputs."""
    import onnxruntime as ort

    blocks = [blocks] if isinstance(blocks, Block) else list(blocks)
    inputs, _ = _boundary(blocks)
    wanted = [t for t in inputs if t not in feed]
    values = {t: feed[t] for t in inputs if t in feed}
    if wanted:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted)
        session = ort.InferenceSession(probe.SerializeToString(), session_options,
                                       providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        values.update(zip(wanted, session.run(wanted, {k: v for k, v in feed.items()
                                                       if k in names})))
    return values
