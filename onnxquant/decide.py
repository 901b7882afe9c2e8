"""The decide stage: turn marked sites and calibration statistics into one QuantSpec per
quantized tensor. Emission then writes exactly these specs.

    load -> canonicalize -> passes mark sites -> calibrate -> DECIDE -> emit -> check -> save

``decide`` applies the target profile (targets.py) to every site. Strategies that choose
per site plug in here, before or after it, and never touch emission: the onnxruntime kernel
probe (which layer kinds get int8 kernels, kernel_probe.py) re-marks sites and decides
again; a per-layer search (granularity, scheme, range estimator) or a reconstruction
method (learned codes in ``QuantSpec.codes``) replaces the specs it improves.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import quantizers, ranges
from .config import QuantConfig
from .graph import constant_value
from .plan import ConvSite, LinearSite, Plan
from .softmax_quantizers import REGISTRY
from .spec import QuantSpec
from .targets import TargetProfile, profile


def _weight_only(prof: TargetProfile, cfg: QuantConfig, axis: int) -> QuantSpec:
    w = prof.weight_scheme(cfg)
    return QuantSpec(bits=w["bits"], symmetric=w["symmetric"],
                     axis=axis if w["per_channel"] else None, fmt=w["fmt"])


def activation_spec(stats: dict, name: str, symmetric: bool, bits: int = 8,
                    method: str = "minmax") -> QuantSpec:
    """Per-tensor activation spec; the range from ``method`` (ranges.py) on the stats."""
    if method == "minmax":
        lo, hi = stats[name]
    else:
        lo, hi = ranges.estimate(stats[name], method, bits, symmetric)
    return QuantSpec(bits=bits, symmetric=symmetric, range=(float(lo), float(hi)),
                     estimator=method)


def _activation(stats: dict, name: str, symmetric: bool, cfg: QuantConfig) -> QuantSpec:
    return activation_spec(stats, name, symmetric, cfg.act_bits, cfg.range_method)


def int8_weight_spec(node: gs.Node, site: ConvSite, spec: QuantSpec) -> QuantSpec:
    """QLinearConv form: the weight scale widened where the int32 bias would saturate."""
    if not site.int8_output:
        return spec
    w = constant_value(node.inputs[1])
    p = spec.with_(params=None).uniform_params(w)
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    if bias is not None:
        p = quantizers.widen_for_bias(p, bias, site.input_spec.uniform_params().scale[0])
    return spec.with_(params=p)


def _int8_conv(graph_nodes: dict, site: ConvSite, prof, cfg, stats) -> None:
    site.input_spec = _activation(stats, site.input, prof.activation_symmetric, cfg)
    bits = min(prof.int8_weight_bits or 8, cfg.weight_bits)
    if site.int8_output:
        site.output_spec = _activation(stats, site.output, prof.activation_symmetric, cfg)
    site.weight_spec = int8_weight_spec(graph_nodes[site.node], site,
                                        QuantSpec(bits=bits, symmetric=True, axis=0))


def _constant_zero(stats: dict, name: str) -> bool:
    lo, hi = stats[name]
    return lo == 0 and hi == 0


def _conv(graph_nodes, site: ConvSite, prof, cfg, stats) -> None:
    site.weight_spec = site.input_spec = site.output_spec = None
    if not site.quantize:
        return
    if site.int8_input and _constant_zero(stats, site.input):
        # an all-zero input (a dead ReLU on the calibration set) has no scale: an int8 kernel
        # would quantize the bias with s_x = 1 (found by tools/fuzz.py: 9 % output error)
        site.int8_input = site.int8_output = False
    if site.int8_input:
        _int8_conv(graph_nodes, site, prof, cfg, stats)
    else:
        site.weight_spec = _weight_only(prof, cfg, axis=0)


def _linear(graph_nodes, site: LinearSite, prof, cfg, stats) -> None:
    site.weight_spec = site.input_spec = None
    if not site.quantize:
        return
    if site.dynamic:
        site.weight_spec = QuantSpec(bits=8, symmetric=True, fmt="dynamic")
        return
    node = graph_nodes[site.node]
    # output channels: MatMul W is [K, N] (axis 1); Gemm B is [N, K] unless transB=0
    axis = 1 if site.op == "MatMul" or not node.attrs.get("transB", 0) else 0
    site.weight_spec = _weight_only(prof, cfg, axis)
    if cfg.weight_block_size is not None and constant_value(node.inputs[1]).ndim == 2:
        # blocks along K (the other axis); select_sites made these layers weight-only
        site.weight_spec = site.weight_spec.with_(axis=1 - axis,
                                                  block_size=cfg.weight_block_size)
    if site.int8_input:
        site.input_spec = _activation(stats, site.input, True, cfg)


def decide(graph: gs.Graph, plan: Plan, cfg: QuantConfig) -> Plan:
    """Fill the spec of every quantized site from the target profile and ``plan.stats``."""
    prof, stats = profile(cfg), plan.stats
    nodes = {n.name: n for n in graph.nodes}
    softmax = REGISTRY[cfg.softmax_quantizer]
    for site in plan.attention:
        site_stats = stats.get(site.output) if site.quantize else None
        site.spec = None if site_stats is None else softmax.spec(
            site_stats, cfg.softmax_bits, cfg.log2_eps, prof.activation_symmetric)
    for site in plan.convs:
        _conv(nodes, site, prof, cfg, stats)
    for site in plan.linears:
        _linear(nodes, site, prof, cfg, stats)
    for site in plan.residuals:
        site.spec = _activation(stats, site.skip, True, cfg) if site.quantize else None
    _check_constraints(prof, plan)
    return plan


def specs(plan: Plan):
    """Every (site, role, spec) the plan will emit."""
    for site in plan.attention + plan.residuals:
        if site.spec is not None:
            yield site, "output", site.spec
    for site in plan.convs + plan.linears:
        for role in ("weight", "input", "output"):
            spec = getattr(site, f"{role}_spec", None)
            if spec is not None:
                yield site, role, spec


def _check_constraints(prof: TargetProfile, plan: Plan) -> None:
    """A profile's constraints hold for every uniform spec (a broken strategy fails here)."""
    if not prof.symmetric_only:
        return
    for site, role, spec in specs(plan):
        if spec.kind == "uniform" and not spec.symmetric:
            raise AssertionError(f"target {prof.name}: {role} of {site} is not symmetric")
        if spec.params is not None and np.any(spec.params.zero_point):
            raise AssertionError(f"target {prof.name}: {role} of {site} has a zero point")
