"""Decide, per marked site, what gets quantized and how, from the config's target and parts.

    paper     every Conv weight (uniform, weight-only) + every attention Softmax (log2)
    ort       int8 activations+weights only on dense kxk convs, where onnxruntime CPU has a
              faster int8 kernel (DESIGN.md §7: dense 3x3 1.96x; 1x1 0.97x, depthwise 0.42x,
              stem 0.41x), log2 Softmax kept
    tensorrt  int8 activations+weights on every Conv (TensorRT quantizes both together;
              weight-only INT8 gives no INT8 kernel, DESIGN.md §4), log2 Softmax kept

``parts`` (ablation) switches off whole roles: conv_block, transformer, bridge, softmax.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

ORT_INT8_KINDS = ("dense",)


def run(graph: gs.Graph, ctx) -> int:
    """Set ``quantize``/``int8_input`` on the plan's sites; returns how many are quantized."""
    cfg = ctx.config
    for site in ctx.plan.attention:
        site.quantize = "softmax" in cfg.parts
    for site in ctx.plan.convs:
        site.quantize = site.role in cfg.parts
        if cfg.target == "ort":
            site.quantize = site.quantize and site.kind in ORT_INT8_KINDS
        site.int8_input = site.quantize and cfg.target in ("ort", "tensorrt")
    chosen = sum(s.quantize for s in ctx.plan.attention + ctx.plan.convs)
    ctx.log.info("select_sites: %d sites to quantize (target %s)", chosen, cfg.target)
    return chosen
