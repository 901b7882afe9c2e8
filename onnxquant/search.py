"""Q-HyViT at graph level (``--auto``): choose, per quantized layer, the weight granularity
and scheme and the activation range estimator by the reconstruction error of its block.

For each block of the block map (onnxquant/blocks.py) that holds quantized layers, in
graph order: its float boundary inputs and outputs on the calibration samples come from one
onnxruntime run of the float model; then, layer by layer, every candidate the target allows
is emitted into the extracted block (with the block's other layers at their current
choice), run in onnxruntime, and scored by the relative squared error of the block outputs,
    err = sum ||Y_q - Y||^2 / sum ||Y||^2 ;
Y_q as the emitted model hands it on: an int8 conv's output (target ort) that a later block
reads is requantized, as its readers requantize it.
the best candidate stays (greedy coordinate descent, one pass). A bridge block (a conv
entering or leaving a transformer, whose post-activation range is one-sided: a zero point
far from the middle, the bridge problem of Q-HyViT) is scored jointly with the block after
it, on that block's outputs.

Candidates (constrained by the target profile, targets.py):
    weights      per tensor | per channel, x asymmetric | symmetric (paper target; int8
                 kernels: symmetric, per channel or per tensor)
    activations  range by minmax | percentile | mse | entropy (targets ort, tensorrt)
Not done: the paper's Hessian (Fisher) weighting of the error; see docs/qhyvit.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from . import blocks as blockmap
from . import block_runs
from .decide import activation_spec, int8_weight_spec
from .plan import Plan
from .spec import QuantSpec
from .targets import profile

ESTIMATORS = ("minmax", "percentile", "mse", "entropy")
SEARCH_SAMPLES = 16  # calibration samples each candidate is scored on (ranges use them all)


@dataclass
class Choice:
    """What the search chose for one layer, and the block errors that decided it."""

    site: str
    block: str
    role: str  # "weight" or "input"
    chosen: str
    errors: dict = field(default_factory=dict)  # candidate -> relative block error


def _weight_candidates(spec: QuantSpec, symmetric_only: bool) -> dict:
    grains = {"per-channel": spec.axis if spec.axis is not None else 0, "per-tensor": None}
    if spec.block_size is not None:  # blocks were asked for: only the scheme is searched
        grains = {f"per-block({spec.block_size})": spec.axis}
    schemes = (True,) if symmetric_only else (False, True)
    return {f"{'sym' if s else 'asym'} {g}": spec.with_(symmetric=s, axis=a, params=None)
            for g, a in grains.items() for s in schemes}


class _Search:
    """The float model, its boundary values on the calibration samples, and the sites."""

    def __init__(self, canonical: onnx.ModelProto, plan: Plan, cfg, feed: dict):
        self.model, self.plan, self.cfg = canonical, plan, cfg
        self.prof = profile(cfg)
        self.types = blockmap.value_types(canonical)
        names = sorted({t for b in plan.blocks for t in (*b.inputs, *b.outputs)} - set(feed))
        self.values = dict(feed)
        self.values.update(blockmap.block_inputs(canonical, _pseudo_block(names), feed))
        self.weights = None
        if cfg.search_metric == "fisher":
            from .fisher import sensitivities

            outputs = sorted({t for b in plan.blocks for t in b.outputs})
            self.weights = sensitivities(canonical, outputs, feed)
        self.nodes = {n.name: n for n in gs.import_onnx(canonical).nodes}
        self.sites = {s.node: s for s in plan.convs + plan.linears}
        self.extracted = {}  # the float run being searched, imported once
        self.index = {b.name: i for i, b in enumerate(plan.blocks)}
        self.last = block_runs.last_reads(plan.blocks)

    def _float_run(self, run: list) -> tuple:
        """The run being searched, made once for all its candidates: its float graph, its
        nodes, and its outputs that later blocks read."""
        key = tuple(b.name for b in run)
        if key not in self.extracted:
            graph = gs.import_onnx(blockmap.extract(self.model, run, self.types))
            self.extracted = {key: (graph, {n for b in run for n in b.nodes},
                                    block_runs.read_after(run, self.index[run[-1].name],
                                                          self.last))}
        return self.extracted[key]

    def error(self, run: list) -> float:
        """Relative squared error of the run's outputs, with the plan's current specs (an
        int8 conv's output that later blocks read, requantized as they read it)."""
        graph, nodes, read_later = self._float_run(run)
        model = block_runs.emitted(graph, block_runs.subplan(self.plan, nodes), read_later)
        got = block_runs.run(model, self.values)
        weights = self.weights if self.weights and all(k in self.weights for k in got) else None
        return block_runs.relative_error(got, self.values, weights)


def _pseudo_block(names: list) -> blockmap.Block:
    return blockmap.Block("conv_block", "all", inputs=tuple(names))


def _try(search: _Search, run: list, site, role: str, candidates: dict) -> Choice:
    """Score every candidate spec for ``role`` of ``site``; keep the best."""
    attr = f"{role}_spec"
    errors = {}
    for name, spec in candidates.items():
        _set(search, site, attr, spec)
        errors[name] = search.error(run)
    best = min(errors, key=errors.get)  # ties: the first (the target's default comes first)
    _set(search, site, attr, candidates[best])
    return Choice(site.node, run[0].name, role, best, errors)


def _set(search: _Search, site, attr: str, spec) -> None:
    setattr(site, attr, spec)
    if getattr(site, "int8_output", False) and spec is not None:  # QLinearConv bias scale
        site.weight_spec = int8_weight_spec(search.nodes[site.node], site, site.weight_spec)


def _input_candidates(search: _Search, site) -> dict:
    spec = site.input_spec
    return {m: activation_spec(search.plan.stats, site.input, spec.symmetric, spec.bits, m)
            for m in ESTIMATORS}


def _search_block(search: _Search, run: list, block) -> list:
    choices = []
    for name in block.convs + block.linears:
        site = search.sites.get(name)
        if site is None or site.weight_spec is None or site.weight_spec.fmt == "dynamic":
            continue
        int8 = site.input_spec is not None
        symmetric = int8 or search.prof.symmetric_only  # TensorRT: INT4 weight-only too
        choices.append(_try(search, run, site, "weight",
                            _weight_candidates(site.weight_spec, symmetric)))
        if int8 and site.input_spec.kind == "uniform":
            choices.append(_try(search, run, site, "input", _input_candidates(search, site)))
    return choices


def calibration_feed(model: onnx.ModelProto, source, cfg, preprocess=None,
                     limit: int = SEARCH_SAMPLES, why: str = "--auto scores candidates") -> dict:
    """The calibration samples themselves (the search scores blocks on them)."""
    from .calibrate import batches, input_dtype, model_input
    from .errors import UserError

    if source is None or hasattr(source, "get_next"):
        raise UserError(f"{why} on the calibration samples: pass them as a "
                        "folder of images, a .npy file or an array (a reader cannot be replayed)")
    name, shape = model_input(model)
    got = [np.asarray(b) for _, b in batches(source, name, shape, cfg, preprocess,
                                             input_dtype(model))]
    return {name: np.concatenate(got)[:min(cfg.calib_samples, limit)]}


def search(canonical: onnx.ModelProto, plan: Plan, cfg, feed: dict, progress: bool = True,
           log=None) -> list:
    """Improve the plan's specs in place; returns the Choices (also kept in ``plan.choices``)."""
    start = time.perf_counter()
    work = _Search(canonical, plan, cfg, feed)
    blocks = [b for b in plan.blocks if b.convs or b.linears]
    by_name = {b.name: i for i, b in enumerate(plan.blocks)}
    choices = []
    for block in tqdm(blocks, desc="auto search", unit="block", disable=not progress):
        i = by_name[block.name]
        joint = block.kind == "bridge" and i + 1 < len(plan.blocks)
        run = plan.blocks[i:i + 2] if joint else [block]
        choices += _search_block(work, run, block)
    plan.choices = choices
    plan.notes.append(summary(choices, time.perf_counter() - start))
    if log:
        log.info("auto search: %d choices in %.1f s", len(choices), time.perf_counter() - start)
    return choices


def summary(choices: list, seconds: float) -> str:
    weights = [c for c in choices if c.role == "weight"]
    inputs = [c for c in choices if c.role == "input"]
    per_channel = sum("per-channel" in c.chosen for c in weights)
    asym = sum(c.chosen.startswith("asym") for c in weights)
    clipped = sum(c.chosen != "minmax" for c in inputs)
    return (f"auto: {per_channel}/{len(weights)} weights per-channel, {asym} asymmetric; "
            f"{clipped}/{len(inputs)} activation ranges clipped; search {seconds:.1f} s")
