"""Bias correction: after the weights' codes are fixed, move each quantized layer's bias by
the mean output error its rounded weight makes on the calibration samples.

A layer y = W x + b with rounded weights W_hat is off by (W - W_hat) x. Its mean over the
calibration samples and positions is a per-output-channel shift that the bias can take
back exactly (Nagel et al. 2019, "Data-Free Quantization", bias correction; here measured,
not derived from BatchNorm statistics):

    b' = b + (W - W_hat) E[x]

x is what the layer reads in the quantized model: every weight before it rounded, its own
activation Q/DQ applied (W4A8), on the same samples GPTQ fits (``column_sum`` in layers.py
gives E[x] as the im2col column mean, padding included). One pass: the shifts of earlier
layers are not fed forward. The corrected float bias is what every target writes (float in
Q/DQ models, int32 at QLinearConv's scale).

Matches the quantized weights of Conv (bias input added where there is none), Gemm (C, as
C + shift / beta) and MatMul followed by an Add of a constant vector (the exporters' Linear);
a MatMul without one, a dynamic int8 MatMul (its codes are made at run time) or a bias that
is not a constant is left as it is and counted.

Measured at 4-bit weights on the reference checkpoints (docs/reconstruct_table.md, "Bias
correction"): with weights rounded to nearest it recovers about half of the loss; after
GPTQ, whose least-squares fit already takes the mean error into account, it gained 0.13
points on average over four draws of calibration images, within their spread; at 3 bits,
where every layer's input is far off, the one-pass shifts cost mobilevit_xxs 4.6 points.
Default: on for 4-bit weights rounded to nearest (QuantConfig.corrects_bias);
``--bias-correction yes`` adds it elsewhere, after reconstruction too.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import block_runs, quantizers
from .emit_qdq import tensor_name
from .graph import constant_value
from .layers import Layer
from .plan import Plan

CHUNK = 8  # calibration samples per run of the quantized model (its activations' memory)
# one sample per run above this many positions per sample: the run holds every quantized
# layer's input, and 8 full-resolution pages of the PP-OCR detector peaked at 4.3 GB
BIG_POSITIONS = block_runs.BIG_POSITIONS


def chunk_for(feed: dict) -> int:
    """Samples per run for a model with a free batch: CHUNK, or 1 where a sample of an
    image-like input (rank 4 or more) has more than BIG_POSITIONS positions."""
    positions = max((int(np.prod(np.shape(v)[2:])) for v in feed.values()
                     if np.ndim(v) >= 4), default=0)
    return 1 if positions > BIG_POSITIONS else CHUNK


def correct(graph: gs.Graph, plan: Plan, canonical: onnx.ModelProto, feed: dict,
            chunk: int = CHUNK) -> str:
    """Shift the biases in ``graph`` (before emission) for the plan's quantized weights;
    ``canonical``: the float model the plan's node names refer to, ``feed``: calibration
    samples, run ``chunk`` at a time (a model exported for a fixed batch: that batch).
    Returns the summary's note."""
    layers = _layers(plan, canonical)
    if not layers:
        return ""
    shifts = _shifts(layers, emitted_for_inputs(canonical, plan, layers), feed, chunk)
    nodes = {n.name: n for n in graph.nodes}
    done = sum(_apply(graph, nodes[layer.site.node], shift)
               for layer, shift in zip(layers, shifts))
    left = len(layers) - done
    mean = np.mean([np.abs(s).mean() for s in shifts])
    return (f"bias correction: {done} of {len(layers)} quantized layers' biases moved by "
            f"(W - W_hat) E[x] (mean |shift| {mean:.2e}, {block_runs.sample_count(feed)} "
            "samples)" + (f"; {left} without a constant bias to move (left as they are)"
                          if left else ""))


def _layers(plan: Plan, canonical: onnx.ModelProto) -> list:
    """A Layer per quantized Conv/Gemm/MatMul weight, its params the ones emission uses."""
    nodes = {n.name: n for n in canonical.graph.node}
    inits = {i.name: i for i in canonical.graph.initializer}
    out = []
    for site in plan.convs + plan.linears:
        spec = getattr(site, "weight_spec", None)
        node = nodes.get(site.node)
        if spec is None or spec.fmt == "dynamic" or node is None or node.input[1] not in inits:
            continue
        w = onnx.numpy_helper.to_array(inits[node.input[1]])
        if np.issubdtype(w.dtype, np.floating):
            out.append(Layer(site, node, w, spec.uniform_params(w)))
    return out


def rounded_weight(layer: Layer) -> np.ndarray:
    """W_hat: the weight as the emitted DequantizeLinear gives it."""
    spec, p = layer.site.weight_spec, layer.params
    return quantizers.uniform_dequantize(np.clip(spec.quantize(layer.weight), p.qmin, p.qmax), p)


def emitted_for_inputs(canonical: onnx.ModelProto, plan: Plan, layers: list) -> onnx.ModelProto:
    """The quantized model (the plan's specs as they are now) with every layer's input as an
    output (graph inputs are read from the feed)."""
    model = block_runs.emitted(gs.import_onnx(canonical), plan)
    inputs = {i.name for i in model.graph.input}
    names = list(dict.fromkeys(l.site.input for l in layers if l.site.input not in inputs))
    return block_runs.with_outputs(model, names)


def _shifts(layers: list, model: onnx.ModelProto, feed: dict, chunk: int) -> list:
    """(W - W_hat) E[x] per layer, flattened to its output channels."""
    n = block_runs.sample_count(feed)
    run = block_runs.runner(model)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)
    for start in range(0, n, chunk):
        values = {k: v[start:start + chunk] for k, v in feed.items()}
        values.update(run(values))
        for i, layer in enumerate(layers):
            s, c = layer.column_sum(layer.as_seen(values[layer.site.input]))
            sums[i], counts[i] = sums[i] + s, counts[i] + c
    out = []
    for layer, s, c in zip(layers, sums, counts):
        error = layer.stack() - layer.stack(rounded_weight(layer))  # [G, R, C]
        out.append(np.einsum("grc,gc->gr", error, s / max(c, 1)).reshape(-1))
    return out


def _apply(graph: gs.Graph, node: gs.Node, shift: np.ndarray) -> bool:
    """Add ``shift`` to ``node``'s bias (see the module docstring); False where it has none
    that can move."""
    if node.op == "Conv":
        return _add_to_input(graph, node, 2, shift, create=True)
    if node.op == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        return beta != 0 and _add_to_input(graph, node, 2, shift / beta, create=True)
    add = _bias_add(node)
    return add is not None and _add_to_input(graph, add[0], add[1], shift, create=False)


def _bias_add(node: gs.Node):
    """(the Add after a MatMul, the index of its constant vector input), or None."""
    consumers = node.outputs[0].outputs
    if len(consumers) != 1 or consumers[0].op != "Add":
        return None
    add = consumers[0]
    other = [i for i, t in enumerate(add.inputs) if t is not node.outputs[0]]
    return (add, other[0]) if len(other) == 1 else None


def _add_to_input(graph: gs.Graph, node: gs.Node, index: int, shift: np.ndarray,
                  create: bool) -> bool:
    """Replace input ``index`` of ``node`` by its constant value + ``shift`` (a new
    constant: a bias shared with another node keeps its value there)."""
    has = len(node.inputs) > index and node.inputs[index].name != ""
    old = constant_value(node.inputs[index]) if has else None
    if has and old is None or not has and not create:
        return False
    if old is None:  # the weight's float type (the DequantizeLinear's output)
        old = np.zeros(shift.shape, constant_value(node.inputs[1]).dtype)
    if old.size != shift.size or not np.issubdtype(old.dtype, np.floating):
        return False
    new = (old.astype(np.float64) + shift.reshape(old.shape)).astype(old.dtype)
    const = gs.Constant(tensor_name(graph, node.name, "bias_corrected"), new)
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = const
    return True
