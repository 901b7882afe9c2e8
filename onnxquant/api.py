"""Public API: ``quantize(model, config, calibration) -> ModelProto``.

load -> passes mark a plan -> calibration fills its statistics -> emit inserts Q/DQ -> check.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import block_runs, emit, functions, opset, targets
from .calibrate import collect_stats, sample_feed
from .decide import decide
from .config import INT8_KINDS, QuantConfig
from .errors import UserError, first_line
from .model_io import PROTOBUF_LIMIT, is_large, load_model
from .passes import PIPELINE, select_sites
from .plan import PassContext, Plan

log = logging.getLogger("onnxquant")


@dataclass
class Result:
    """The quantized model and what was done to it (for the CLI summary and tests)."""

    model: onnx.ModelProto
    plan: Plan
    counts: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    config: QuantConfig | None = None  # as applied (ort: with the measured int8 kinds)


def _model_name(model) -> str:
    return "model" if isinstance(model, onnx.ModelProto) else str(model)


def _as_model(model) -> onnx.ModelProto:
    """The ModelProto itself (never modified, so no copy: models can be > 2 GB), or loaded."""
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def _import(model: onnx.ModelProto) -> gs.Graph:
    """graphsurgeon graph that shares nothing mutable with ``model``.

    gs keeps the model's ``opset_import`` list as ``graph.import_domains``; exporting would
    then append our domain to the caller's model.
    """
    graph = gs.import_onnx(model)
    graph.import_domains = [onnx.helper.make_opsetid(d.domain, d.version)
                            for d in graph.import_domains]
    _detach_constant_nodes(graph)
    return graph


def _detach_constant_nodes(graph: gs.Graph) -> None:
    """Constant-node values as gs holds them point into the caller's TensorProtos, and
    export writes their (empty) names back there (found by tools/fuzz.py): give each its own
    copy. Constant nodes hold small tensors; initializers are not affected."""
    for node in graph.nodes:
        value = node.attrs.get("value") if node.op == "Constant" else None
        if isinstance(value, gs.Constant):
            node.attrs["value"] = gs.Constant(value.name, np.array(value.values))


def _with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred value types where a Cast needs its input type to be judged
    a no-op (passes/canonicalize.py); models without Cast, or > 2 GB, are used as they are."""
    if not any(n.op_type == "Cast" for n in model.graph.node) or is_large(model):
        return model
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort: a Cast then stays
        return model


def analyze(model, config: QuantConfig | None = None) -> tuple[gs.Graph, Plan]:
    """Run the passes only: the block map and what would be quantized (no calibration)."""
    ctx = PassContext(config or QuantConfig())
    graph = _import(_with_types(_as_model(model)))
    for run_pass in PIPELINE:
        run_pass(graph, ctx)
    if not ctx.plan.attention:
        ctx.plan.notes.append(_no_attention_note(graph, ctx.plan))
    return graph, ctx.plan


def _no_attention_note(graph: gs.Graph, plan: Plan) -> str:
    n_softmax = sum(n.op == "Softmax" for n in graph.nodes)
    if n_softmax == 0:
        return ("no attention found: the graph has no Softmax (pure conv or ReLU/linear "
                "attention, e.g. fastvit_t8, efficientvit_b0); only conv weights are quantized")
    return (f"no attention found: {n_softmax} Softmax node(s) feed no attention product "
            "(e.g. a classifier head); they stay in float")


def _finish(graph: gs.Graph, source: onnx.ModelProto) -> onnx.ModelProto:
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = source.ir_version
    model.producer_name, model.producer_version = "onnxquant", _version()
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    model.functions.extend(f for f in source.functions
                           if f.name not in {g.name for g in model.functions})
    if functions.has_log2_ops(model):
        functions.install(model)
    return model


def _version() -> str:
    from . import __version__

    return __version__


def build(graph: gs.Graph, plan: Plan, config: QuantConfig, source: onnx.ModelProto):
    """Decide the specs of the marked sites (``plan.stats`` filled), emit them
    -> (quantized ModelProto, counts). ``graph`` is edited in place."""
    decide(graph, plan, config)
    return _emit(graph, plan, source)


def _emit(graph: gs.Graph, plan: Plan, source: onnx.ModelProto):
    counts = emit.emit(graph, plan)
    return _finish(graph, source), counts


def _sampled(plan: Plan, config: QuantConfig) -> set:
    """Tensors whose values a searched quantizer needs (AdaLog-style Softmax step)."""
    if config.softmax_quantizer != "adalog":
        return set()
    return {a.output for a in plan.attention if a.quantize}


def _canonical(source: onnx.ModelProto, graph: gs.Graph) -> onnx.ModelProto:
    canonical = gs.export_onnx(graph.copy(), do_type_check=False)
    canonical.functions.extend(source.functions)
    return canonical


def _block_strategy_inputs(source, graph, config, calibration, preprocess) -> tuple:
    """(canonical float model, calibration samples) that --auto and --reconstruct run their
    blocks on: exported and read once for both (decide changes the plan, not the graph)."""
    from . import search

    why = "--reconstruct fits weights" if config.reconstruct != "none" else \
        "--auto scores candidates"
    limit = config.calib_samples if config.reconstruct != "none" else search.SEARCH_SAMPLES
    feed = search.calibration_feed(source, calibration, config, preprocess, limit=limit, why=why)
    canonical = _canonical(source, graph)
    return canonical, feed, block_runs.free_batch(canonical)


def _correct_bias(source, graph, plan, config, calibration, preprocess, strategy) -> None:
    """Bias correction (bias_correction.py) on the calibration samples: the ones
    --reconstruct read (``strategy``: canonical, samples, fixed batch), or read now."""
    from . import bias_correction, search

    if calibration is None or hasattr(calibration, "get_next"):
        why = "no calibration data" if calibration is None else "a reader cannot be replayed"
        if config.bias_correction:
            raise UserError(f"bias correction needs the calibration samples themselves ({why})"
                            ": pass them as a folder of images, a .npy file or an array")
        plan.notes.append(f"bias correction skipped: {why}; pass the calibration samples as "
                          "a folder of images, a .npy file or an array")
        return
    if strategy is None:
        feed = search.calibration_feed(source, calibration, config, preprocess,
                                       limit=config.calib_samples, why="bias correction")
        canonical = _canonical(source, graph)
        strategy = canonical, feed, block_runs.free_batch(canonical)
    canonical, feed, batch = strategy
    with _whole_batches(batch, "bias correction"):
        note = bias_correction.correct(graph, plan, canonical, feed,
                                       batch or bias_correction.chunk_for(feed))
    if note:
        plan.notes.append(note)


@contextlib.contextmanager
def _whole_batches(batch: int | None, flag: str):
    """A model exported for a fixed batch that bakes it into its ops (a Reshape to [1, ...])
    cannot run all calibration samples at once: one line saying so, not a traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime and torch raise their own types
        if batch is None:
            raise
        raise UserError(f"{flag} runs blocks on all calibration samples at once; the model "
                        f"was exported for batch {batch} and fails on more ({first_line(exc)})"
                        "; export it with a dynamic batch axis") from None


def _auto_search(canonical, feed: dict, plan, config, progress) -> None:
    """Strategy (--auto): per-layer granularity, scheme and range by block error, on the
    first SEARCH_SAMPLES samples."""
    from . import search

    feed = {k: v[:search.SEARCH_SAMPLES] for k, v in feed.items()}
    search.search(canonical, plan, config, feed, progress, log)


def _reconstruct(canonical, feed: dict, plan, config, progress) -> None:
    """Strategy (--reconstruct): the codes of every quantized weight, block by block."""
    from . import reconstruct

    reconstruct.reconstruct(canonical, plan, config, feed, progress, log)


def _probe_int8_kinds(source, graph: gs.Graph, plan: Plan, config: QuantConfig) -> QuantConfig:
    """Strategy (ort target): which layer kinds get int8 kernels on this CPU. Every variant
    is built from copies of the one analysis and calibration; the chosen kinds re-mark
    ``plan`` in place."""
    from .kernel_probe import choose_int8_kinds, present_kinds

    def variant(kinds: tuple) -> onnx.ModelProto:
        cfg = replace(config, ort_int8_kinds=kinds)
        g, p = graph.copy(), copy.deepcopy(plan)
        select_sites.run(g, PassContext(cfg, p))
        return build(g, p, cfg, source)[0]

    kinds = choose_int8_kinds(source, config, present_kinds(plan), variant, log)
    config = replace(config, ort_int8_kinds=kinds)
    select_sites.run(graph, PassContext(config, plan))
    return config


def _calibration_model(source: onnx.ModelProto, graph: gs.Graph, plan: Plan) -> onnx.ModelProto:
    """The model calibration runs: the input itself (no copy; canonicalization keeps the
    names of every tensor it leaves), or the canonical graph where node names had to be
    made unique (onnxruntime refuses duplicate node names)."""
    if not plan.canonical.get("renamed") or is_large(source):
        return source
    return gs.export_onnx(graph.copy(), do_type_check=False)


def _pack_4bit(model: onnx.ModelProto, plan: Plan, config: QuantConfig, name: str, sample):
    """Weights of 4 bits or fewer stored as real INT4/UINT4 (storage4.py): the paper
    target's DequantizeLinear weights, and block-wise weights on any target (TensorRT's
    INT4 weight-only layers; its int8 convs keep INT8 codes; ort's weights are folded).
    ``sample()``: a calibration feed the checks run on."""
    block_wise_only = targets.profile(config).int4_weights == "block_wise"
    if config.weight_bits > 4 or config.weight_format != "qdq" or (
            block_wise_only and config.weight_block_size is None):
        return model
    from .storage4 import pack_4bit

    packed, note = pack_4bit(model, name, sample(), block_wise_only)
    if note:
        plan.notes.append(note)
    return packed


def _log2_body(model: onnx.ModelProto, plan: Plan, config: QuantConfig, name: str, sample):
    """The log2 op's body in the file: BitCast at opset 26 where its checks pass
    (log2_body.py), else the table body at the model's opset."""
    from .log2_body import apply_body

    out, note = apply_body(model, config, name, sample)
    if note:
        plan.notes.append(note)
    return out


def _ort_graph(model: onnx.ModelProto, plan: Plan, config: QuantConfig) -> onnx.ModelProto:
    """ort target: float-graph rewrites onnxruntime CPU runs faster, each checked on the
    model's outputs: Reshape shape arithmetic folded to constants, timm-style attention fused
    into MultiHeadAttention, slow Transposes split (passes/fold_shapes.py,
    fuse_attention_ort.py, split_transposes.py)."""
    if config.target != "ort" or is_large(model):
        return model
    from .passes.fold_shapes import fold_reshape_shapes
    from .passes.fuse_attention_ort import fuse_attention
    from .passes.split_transposes import split_transposes

    done = []
    for rewrite, what in ((fold_reshape_shapes, "Reshape target shapes folded to constants"),
                          (fuse_attention, "attentions fused into MultiHeadAttention"),
                          (split_transposes, "slow Transposes split into fast steps")):
        model, count, note = rewrite(model)
        if count:
            done.append(f"{count} {what}")
        if note:
            plan.notes.append(note)
    if done:
        plan.notes.append("onnxruntime graph: " + "; ".join(done) + " (outputs checked at "
                          "batch 1 and 2)")
    return model


def _record_choices(model: onnx.ModelProto, config: QuantConfig, probed: bool) -> None:
    """ort target: what runs in int8, and on what basis, in the model's metadata."""
    if config.target != "ort":
        return
    from .probe_cache import cpu_id

    basis = f"measured on {cpu_id()}, onnxruntime {ort_version()}" if probed else "given"
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        "onnxquant.ort_int8_kinds": ",".join(config.ort_int8_kinds),
                                        "onnxquant.ort_int8_basis": basis})


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


BLOCK_OPSET = 21  # DequantizeLinear block_size


def _opset_needed(config: QuantConfig) -> tuple[int, str]:
    """(lowest opset the output needs, why) for the summary's conversion note."""
    if config.weight_block_size is not None:
        return BLOCK_OPSET, "block-wise DequantizeLinear needs it"
    return opset.MIN_OPSET, "per-channel Q/DQ and the log2 op need it"


def _probing(config: QuantConfig) -> bool:
    return config.target == "ort" and config.ort_int8_kinds is None


def run(model, config: QuantConfig | None = None, calibration=None, preprocess=None,
        progress: bool = True) -> Result:
    """quantize() with the plan, counts and timings kept (used by the CLI summary).

    load -> canonicalize + passes (analyze) -> calibrate -> decide (+ strategies) -> emit
    -> check. ort target with ``ort_int8_kinds=None``: calibrate once for every candidate
    placement, let the kernel probe choose (kernel_probe.py), then emit the chosen one.
    """
    config = config or QuantConfig()
    if config.reconstruct != "none":  # torch and the device, before any calibration runs
        from . import reconstruct

        reconstruct.check_device(config)
    t0 = time.perf_counter()
    original = _as_model(model)
    minimum, why = _opset_needed(config)
    feed = sample_feed(original, calibration, config, preprocess) \
        if opset.model_opset(original) < minimum else None
    source, upgrade_note = opset.upgrade(original, _model_name(model), feed, minimum, why)
    probing = _probing(config)
    graph, plan = analyze(source, replace(config, ort_int8_kinds=INT8_KINDS) if probing else config)
    if upgrade_note:
        worst = opset.verify_same(original, source, feed, _model_name(model))
        plan.notes.insert(0, f"{upgrade_note}; float outputs unchanged (max diff {worst:.1e})")
    t1 = time.perf_counter()
    stats = collect_stats(_calibration_model(source, graph, plan), plan.calibration_tensors(),
                          calibration, config, preprocess, progress,
                          histograms=config.range_method != "minmax" or config.auto,
                          sampled=_sampled(plan, config))
    t2 = time.perf_counter()
    seconds = {"passes": t1 - t0, "calibration": t2 - t1}
    plan.stats = stats
    if probing:
        config = _probe_int8_kinds(source, graph, plan, config)
        seconds["kernel probe"] = time.perf_counter() - t2
        t2 = time.perf_counter()
    decide(graph, plan, config)
    if config.auto or config.reconstruct != "none":
        canonical, samples, batch = _block_strategy_inputs(source, graph, config, calibration,
                                                           preprocess)
    if config.auto:
        with _whole_batches(batch, "--auto"):
            _auto_search(canonical, samples, plan, config, progress)
        seconds["auto search"] = time.perf_counter() - t2
        t2 = time.perf_counter()
    if config.reconstruct != "none":
        with _whole_batches(batch, f"--reconstruct {config.reconstruct}"):
            _reconstruct(canonical, samples, plan, config, progress)
        seconds["reconstruct"] = time.perf_counter() - t2
        t2 = time.perf_counter()
    if config.corrects_bias:
        strategy = (canonical, samples, batch) if config.reconstruct != "none" else None
        _correct_bias(source, graph, plan, config, calibration, preprocess, strategy)
        seconds["bias correction"] = time.perf_counter() - t2
        t2 = time.perf_counter()
    if config.weight_bits <= 4 and config.reconstruct == "none":
        plan.notes.append(f"{config.weight_bits}-bit weights rounded to nearest: "
                          "--reconstruct gptq usually recovers most of the loss "
                          "(docs/reconstruct_table.md)")
    out, counts = _emit(graph, plan, source)
    sample = functools.cache(lambda: feed or sample_feed(original, calibration, config,
                                                         preprocess))
    out = _pack_4bit(out, plan, config, _model_name(model), sample)
    out = _log2_body(out, plan, config, _model_name(model), sample)
    out = _ort_graph(out, plan, config)
    _record_choices(out, config, probing)
    if not is_large(out, PROTOBUF_LIMIT):
        onnx.checker.check_model(out, full_check=True)
    seconds["emit"] = time.perf_counter() - t2
    log.info("quantized: %s in %.2f s", counts, time.perf_counter() - t0)
    return Result(out, plan, counts, seconds, config)


def quantize(model, config: QuantConfig | None = None, calibration=None, preprocess=None,
             progress: bool = False) -> onnx.ModelProto:
    """Quantize ``model`` (a ModelProto or a path) with ``config``; returns a new ModelProto.

    ``calibration``: a folder of images (with ``preprocess``, an ``images.Preprocess``), a
    ``.npy`` path, an N x C x H x W float32 array, or a ``CalibrationDataReader``. The input
    model is not modified (calibration swaps its graph outputs for a moment: do not share
    one ModelProto between threads while it runs).
    """
    return run(model, config, calibration, preprocess, progress).model


__all__ = ["quantize", "analyze", "run", "Result", "UserError"]
