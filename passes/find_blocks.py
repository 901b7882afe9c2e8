"""Classify every Conv as conv-block, inside-transformer, or bridge, by topology alone.

Cut the graph at every Conv: the remaining activation-carrying nodes fall into connected
*regions* (a residual stream, a SiLU, an attention core ...). Each Conv then leads from
the region of its input to the region of its output:

    region A --Conv--> region B --Conv--> region C ...

Transformer regions start as the regions of the matched attention nodes (QK MatMul,
Softmax, AV MatMul). A region joins them when it is sandwiched between transformer regions
by at most ``SANDWICH_CONVS`` convs in total (into it from a transformer region, and out
of it back to one): that takes in MobileViT v2's qkv/out-proj/MLP 1x1 convs (2-3 convs)
and EfficientFormer v2's FFN (fc1, mid, fc2) while leaving the conv stages between
transformer stacks out (6-7 convs in mobilevit_xxs / mobilevitv2_050).

    role = transformer  if both regions of a Conv are transformer regions
           bridge       if exactly one is (the convs that enter or leave a transformer)
           conv_block   otherwise

The weight of every Conv is found here too (through Identity/Constant, DESIGN.md §5).

The same labels give the block map (``plan.blocks``, onnxquant/blocks.py): every node is
labelled by its conv role or its region's side, transformer regions linked by transformer
convs form one transformer group, and ``blocks.partition`` cuts a topological order into
conv blocks, bridges and transformer blocks with their boundary tensors.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxquant import blocks
from onnxquant.graph import constant_source, constant_value, data_inputs
from onnxquant.plan import ConvSite

SANDWICH_CONVS = 3
BY_SIDES = ("conv_block", "bridge", "transformer")  # by how many ends are in a transformer


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, key: str) -> str:
        root = key
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while key != root:  # path compression
            self.parent[key], key = root, self.parent.get(key, key)
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


class _Regions(_UnionFind):
    """Union-find over tensors, merged through every non-Conv node's data edges."""

    def __init__(self, graph: gs.Graph):
        super().__init__()
        for node in graph.nodes:
            if node.op == "Conv":
                continue
            outs = [t for t in node.outputs if isinstance(t, gs.Variable)]
            for t in data_inputs(node) + outs[1:]:
                if outs:
                    self.union(t.name, outs[0].name)


def _conv_site(node: gs.Node, graph_inputs: set):
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim < 3:
        return None
    return ConvSite(node=node.name, weight=constant_source(node.inputs[1]).name,
                    input=node.inputs[0].name, output=node.outputs[0].name,
                    kernel=tuple(int(k) for k in weight.shape[2:]),
                    group=int(node.attrs.get("group", 1)), cin=int(weight.shape[1]),
                    cout=int(weight.shape[0]), stem=node.inputs[0].name in graph_inputs)


def _distances(edges, seeds, limit):
    """Fewest convs from any seed region to each region (BFS over conv edges)."""
    dist = {s: 0 for s in seeds}
    frontier = list(seeds)
    while frontier:
        nxt = []
        for region in frontier:
            for other in edges.get(region, ()):
                if other not in dist and dist[region] + 1 <= limit:
                    dist[other] = dist[region] + 1
                    nxt.append(other)
        frontier = nxt
    return dist


def _transformer_regions(edges_fwd, edges_bwd, seeds):
    regions = set(seeds)
    while True:
        after = _distances(edges_fwd, regions, SANDWICH_CONVS)
        before = _distances(edges_bwd, regions, SANDWICH_CONVS)
        joined = {r for r in after if r in before and after[r] + before[r] <= SANDWICH_CONVS}
        if joined <= regions:
            return regions
        regions |= joined


def run(graph: gs.Graph, ctx) -> int:
    """Append a ConvSite (with its role) per Conv with a constant weight; returns the count."""
    regions = _Regions(graph)
    by_name = {n.name: n for n in graph.nodes}
    seeds = {regions.find(t.name) for site in ctx.plan.attention for name in site.nodes
             if by_name[name].op != "Conv" for t in by_name[name].outputs}
    convs, ends = [], []
    graph_inputs = {t.name for t in graph.inputs}
    for node in graph.nodes:
        if node.op != "Conv":
            continue
        site = _conv_site(node, graph_inputs)
        if site is None:
            ctx.log.debug("Conv %s: weight is not a constant, left in float", node.name)
            ctx.plan.notes.append(f"Conv {node.name}: weight is not constant, left in float")
            continue
        convs.append(site)
        ends.append((regions.find(node.inputs[0].name), regions.find(node.outputs[0].name)))
    fwd, bwd = {}, {}
    for src, dst in ends:
        fwd.setdefault(src, set()).add(dst)
        bwd.setdefault(dst, set()).add(src)
    transformer = _transformer_regions(fwd, bwd, seeds) if seeds else set()
    for site, (src, dst) in zip(convs, ends):
        inside = (src in transformer) + (dst in transformer)
        site.role = BY_SIDES[inside]
    ctx.plan.convs.extend(convs)
    ctx.plan.blocks = blocks.partition(graph, _labels(graph, regions, transformer), ctx.plan)
    ctx.log.info("find_blocks: %d convs %s, %d blocks", len(convs), ctx.plan.role_counts(),
                 len(ctx.plan.blocks))
    return len(convs)


def _labels(graph: gs.Graph, regions: _Regions, transformer: set) -> list:
    """(kind, key) per node: a Conv's role, else its region's side; key: the transformer
    group (regions linked by transformer convs) or, for a bridge, the conv itself."""
    groups = _UnionFind()
    ends = [(regions.find(n.inputs[0].name), regions.find(n.outputs[0].name))
            if n.op == "Conv" and n.inputs and n.outputs else None for n in graph.nodes]
    for end in ends:
        if end and end[0] in transformer and end[1] in transformer:
            groups.union(*end)
    labels = []
    for node, end in zip(graph.nodes, ends):
        if end is None:
            outs = [t for t in node.outputs if isinstance(t, gs.Variable)]
            end = (regions.find(outs[0].name),) * 2 if outs else (None, None)
        role = BY_SIDES[(end[0] in transformer) + (end[1] in transformer)]
        key = {"transformer": groups.find(end[0]), "bridge": node.name}.get(role)
        labels.append((role, key))
    return labels
