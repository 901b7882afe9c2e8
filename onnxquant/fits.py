"""What a reconstruction method returns (``Fit``: codes per layer, learned activation steps
per tensor) and how a fit goes into the plan: the weight specs get the codes, and every
activation spec of a tensor gets its learned step (emission shares one Q/DQ per tensor, so
all of them must agree). reconstruct.py tries each candidate fit of a block this way and
keeps one; ``snapshot``/``restore`` undo what it changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from . import quantizers
from .layers import Layer
from .plan import Plan


@dataclass
class Fit:
    """A method's result: codes per layer node and, optionally, learned activation step
    sizes per tensor (written into every spec that quantizes that tensor)."""

    codes: dict
    steps: dict = field(default_factory=dict)


def codes_spec(layer: Layer, stacked_codes: np.ndarray):
    spec = layer.site.weight_spec
    codes = layer.unstack(stacked_codes).astype(layer.params.zero_point.dtype)
    return spec.with_(params=layer.params, codes=codes)


def apply(layers: list, fit: Fit, rounded: dict, acts: list) -> None:
    """Put ``fit`` into the plan: its codes (else round to nearest) and its steps (else the
    calibrated ones) in every activation spec of ``acts`` [(site, attribute, tensor, spec)]."""
    for layer in layers:
        node = layer.site.node
        layer.site.weight_spec = (codes_spec(layer, layer.stack(fit.codes[node]))
                                  if node in fit.codes else rounded[node])
    for site, attr, tensor, spec in acts:
        step = fit.steps.get(tensor)
        setattr(site, attr, spec if step is None else spec.with_(params=stepped(spec, step)))


def stepped(spec, step) -> quantizers.UniformParams:
    p = spec.uniform_params()
    return quantizers.UniformParams(np.full_like(p.scale, step, dtype=np.float32),
                                    p.zero_point, p.qmin, p.qmax, p.axis)


def activation_specs(plan: Plan) -> list:
    """(site, attribute, tensor) of every uniform activation spec in the plan."""
    out = []
    for site in plan.convs + plan.linears:
        for attr, tensor in (("input_spec", site.input),
                             ("output_spec", getattr(site, "output", None))):
            out.append((site, attr, tensor))
    out += [(site, "spec", site.skip) for site in plan.residuals]
    return [(site, attr, t) for site, attr, t in out
            if getattr(getattr(site, attr, None), "kind", None) == "uniform"]


def learnable_steps(plan: Plan, model: onnx.ModelProto) -> list:
    """(site, attribute, tensor, spec) of the activation specs whose step a block method may
    learn: tensors computed inside this block (earlier blocks were judged with the steps of
    their outputs fixed), none of whose readers is a QLinearConv (its int32 bias was sized
    for the calibrated input step: decide.py)."""
    made = {o for n in model.graph.node for o in n.output}
    specs = activation_specs(plan)
    int8 = {t for site, attr, t in specs
            if attr == "input_spec" and getattr(site, "int8_output", False)}
    return [(site, attr, t, getattr(site, attr)) for site, attr, t in specs
            if t in made and t not in int8]


def snapshot(plan: Plan) -> list:
    """(site, attribute, spec) of every weight and uniform activation spec: what
    reconstruction may change."""
    out = [(site, "weight_spec", site.weight_spec) for site in plan.convs + plan.linears]
    return out + [(site, attr, getattr(site, attr)) for site, attr, _ in activation_specs(plan)]


def restore(snapshot: list) -> None:
    for site, attr, spec in snapshot:
        setattr(site, attr, spec)
