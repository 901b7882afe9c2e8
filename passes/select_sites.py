"""Mark, per site, what gets quantized (not how: decide.py), from the target profile
(targets.py: the ``where`` fields) and the config's parts and exclusions.

    paper     every Conv weight (uniform, weight-only) + every attention Softmax (log2)
    ort       where onnxruntime CPU has a faster int8 kernel (DESIGN.md §7, measured here:
              dense 3x3 1.96x, 1x1 0.97x, depthwise 0.42x, stem 0.41x): dense kxk convs
              become QLinearConv (Q/DQ on input, weight, int32 bias and output), linear
              MatMuls dynamic int8; every other weight is stored folded (small file, float
              speed); no log2 op (no onnxruntime kernel consumes it). What gets int8 is
              ``config.ort_int8_kinds``, measured on this CPU when None (kernel_probe.py)
    tensorrt  int8 activations+weights on every Conv and linear MatMul/Gemm (TensorRT
              quantizes both together; weight-only INT8 gives no INT8 conv, DESIGN.md §4),
              log2 Softmax kept; a conv that reads a log2-quantized Softmax (EfficientFormer
              v2 talking heads) gets no second, uniform int8 quantizer on that input; the
              skip input of a Conv + skip residual Add gets Q/DQ (TensorRT placement rules)

``parts`` (ablation) switches whole roles on or off: conv_block, transformer, bridge,
softmax, linear.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import onnx_graphsurgeon as gs

from onnxquant.errors import UserError
from onnxquant.graph import constant_value
from onnxquant.targets import profile


def _skip_non_finite(graph: gs.Graph, ctx) -> None:
    """A weight with NaN/Inf has no uniform grid: its layer stays float, and the summary says so."""
    tensors = graph.tensors()
    for site in ctx.plan.convs + ctx.plan.linears:
        if not site.quantize or site.weight not in tensors:
            continue
        w = constant_value(tensors[site.weight])
        if w is not None and w.dtype.kind == "f" and not np.isfinite(w).all():
            for flag in ("quantize", "int8_input", "int8_output", "dynamic"):
                if hasattr(site, flag):
                    setattr(site, flag, False)
            ctx.plan.notes.append(f"weight {site.weight!r} of {site.node!r} has NaN/Inf: "
                                  "left float")  # starts with _OWN_NOTES[0]

_OWN_NOTES = ("weight ", "kept float by --exclude")


def _site_name(site) -> str:
    return getattr(site, "softmax", None) or site.node


def _exclude(ctx) -> None:
    """Sites whose node name matches ``config.exclude`` stay float; a pattern matching no
    quantizable node is a typo the user must hear about."""
    patterns = ctx.config.exclude
    if not patterns:
        return
    sites = ctx.plan.attention + ctx.plan.convs + ctx.plan.linears
    used, excluded = set(), 0
    for site in sites:
        hits = [p for p in patterns if fnmatch.fnmatchcase(_site_name(site), p)]
        used.update(hits)
        if hits and site.quantize:
            for flag in ("quantize", "int8_input", "int8_output", "dynamic"):
                if hasattr(site, flag):
                    setattr(site, flag, False)
            excluded += 1
    unused = [p for p in patterns if p not in used]
    if unused:
        raise UserError(f"--exclude {unused[0]!r} matches no Conv/MatMul/Gemm/attention Softmax "
                        "node; list the node names with 'onnxquant inspect -v'")
    ctx.plan.notes.append(f"kept float by --exclude: {excluded} node(s)")


def _block_wise(graph: gs.Graph, site, cfg) -> bool:
    """A linear layer whose weight gets block-wise scales (decide.py): weight-only on every
    target, as TensorRT's INT4 block-wise layers are."""
    if cfg.weight_block_size is None:
        return False
    node = next((n for n in graph.nodes if n.name == site.node), None)
    w = constant_value(node.inputs[1]) if node is not None and len(node.inputs) > 1 else None
    return w is not None and w.ndim == 2


def _mark(plan, cfg, graph: gs.Graph) -> None:
    """Where to quantize, from the target profile's ``where`` fields and the parts."""
    prof, parts = profile(cfg), cfg.active_parts
    for site in plan.attention:
        site.quantize = "softmax" in parts
    log2_outputs = {a.output for a in plan.attention if a.quantize}
    kinds = cfg.ort_int8_kinds or ()
    for site in plan.convs:
        site.quantize = site.role in parts
        int8 = {"none": False, "all": site.input not in log2_outputs,
                "kinds": site.kind in kinds}[prof.int8_convs]
        site.int8_input = site.quantize and int8
        site.int8_output = site.int8_input and prof.int8_conv_outputs
    for site in plan.linears:
        site.quantize = "linear" in parts
        site.dynamic = (site.quantize and prof.int8_linears == "dynamic" and site.op == "MatMul"
                        and "linear" in kinds)
        site.int8_input = (site.quantize and prof.int8_linears == "static"
                           and not _block_wise(graph, site, cfg))


def run(graph: gs.Graph, ctx) -> int:
    """Set the quantize flags on the plan's sites; returns how many are quantized.

    Idempotent: strategies that change the config (the kernel probe) call it again."""
    cfg = ctx.config
    ctx.plan.notes = [n for n in ctx.plan.notes if not n.startswith(_OWN_NOTES)]
    _mark(ctx.plan, cfg, graph)
    _skip_non_finite(graph, ctx)
    _exclude(ctx)
    quantized_convs = {c.node for c in ctx.plan.convs if c.int8_input}
    for site in ctx.plan.residuals:
        site.quantize = profile(cfg).residual_skips and site.conv in quantized_convs
    sites = ctx.plan.attention + ctx.plan.convs + ctx.plan.linears
    chosen = sum(s.quantize for s in sites)
    ctx.log.info("select_sites: %d sites to quantize (target %s)", chosen, cfg.target)
    return chosen
