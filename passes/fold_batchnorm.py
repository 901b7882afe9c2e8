"""Fold an inference BatchNormalization into the Conv before it: quantize what actually runs.

    x -> Conv(W, b) -> BatchNormalization(g, beta, mu, var, eps) -> y
    x -> Conv(W * k, (b - mu) * k + beta) -> y          k = g / sqrt(var + eps), per channel

onnxruntime folds this pair at session load (ConvBNFusion) when the weight is an
initializer, but not once the weight comes out of a DequantizeLinear: quantizing W unfolded
leaves a separate BatchNormalization at run time. Folding first quantizes the weights that
run, which is free with per-channel weights (same error either way) but costly per tensor:
the BN gains of the 3 unfused BNs in the PP-OCRv6 recognizer span 60-100x, one per-tensor
scale then crushes the small-gain channels (line accuracy 85 % unfolded vs 77 % folded,
docs/canonicalize.md). So by default (``fold_batchnorm=None``) it folds only where conv
weights are per channel. Matched only when every BN input is constant, the Conv output
feeds nothing else, and BN's optional outputs are unused. New weights get new names;
shared initializers are never modified.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxquant.graph import constant_value, unique_name


def _foldable(conv: gs.Node, outputs: set):
    """The BatchNormalization after ``conv`` and its constants, or None."""
    out = conv.outputs[0]
    if len(out.outputs) != 1 or out.name in outputs or out.outputs[0].op != "BatchNormalization":
        return None
    bn = out.outputs[0]
    if bn.attrs.get("training_mode", 0) or any(t.outputs or t.name in outputs
                                               for t in bn.outputs[1:]):
        return None
    consts = [constant_value(t) for t in bn.inputs[1:5]]
    w = constant_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
    b = constant_value(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(1)
    if len(consts) < 4 or any(c is None for c in consts) or w is None or b is None:
        return None
    if w.dtype.kind != "f" or any(c.size != w.shape[0] for c in consts):
        return None
    return bn, w, b, consts


def _fold(conv: gs.Node, bn: gs.Node, w, b, consts, taken: set) -> None:
    gamma, beta, mean, var = (np.asarray(c, np.float64) for c in consts)
    k = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    w_new = (w.astype(np.float64) * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
    b_new = ((np.asarray(b, np.float64) - mean) * k + beta).astype(w.dtype)
    conv.inputs[1] = gs.Constant(unique_name(taken, f"{conv.name}_W_bn_folded"), w_new)
    bias = gs.Constant(unique_name(taken, f"{conv.name}_B_bn_folded"), b_new)
    if len(conv.inputs) > 2:
        conv.inputs[2] = bias
    else:
        conv.inputs.append(bias)
    y = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    conv.outputs[0] = y


def _wanted(cfg) -> bool:
    """The config's choice, or by default: fold where conv weights are per channel."""
    if cfg.fold_batchnorm is not None:
        return cfg.fold_batchnorm
    from onnxquant.targets import profile

    prof = profile(cfg)
    return prof.int8_convs != "none" or prof.weight_scheme(cfg)["per_channel"]


def run(graph: gs.Graph, ctx) -> int:
    """Fold every foldable Conv -> BatchNormalization pair; returns how many."""
    if not _wanted(ctx.config):
        ctx.plan.canonical["bn_folded"] = 0
        return 0
    outputs = {t.name for t in graph.outputs}
    taken = set(graph.tensors()) | {n.name for n in graph.nodes}
    folded = 0
    for conv in [n for n in graph.nodes if n.op == "Conv"]:
        match = _foldable(conv, outputs)
        if match is not None:
            _fold(conv, *match, taken)
            folded += 1
    if folded:
        graph.cleanup()
    ctx.plan.canonical["bn_folded"] = folded
    ctx.log.info("fold_batchnorm: %d BatchNormalization folded into Convs", folded)
    return folded
