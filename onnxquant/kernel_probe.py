"""Measure, on the machine at hand, where onnxruntime runs faster in int8.

``QuantConfig(target="ort")`` (``ort_int8_kinds=None``) times the whole model in
onnxruntime with int8 added greedily on each kind: dense kxk, pointwise, grouped, depthwise
and stem convs (QLinearConv), then linear MatMuls (dynamic int8), and keeps a kind only if
the model gets faster by ``MIN_GAIN``. A fixed rule cannot hold across CPUs and models:
on this AMD EPYC (AVX-512 VNNI) dense 3x3 convs pay and depthwise/stem convs do not, and
1x1 convs paid on efficientformer_l1 but not on mobilevit_xxs (docs/benchmarks.md); CPUs
with other int8 kernels (AVX2 only, ARM dot-product) shift the balance again.
Whole-model timing, not per layer: a one-conv model favours int8 because its float conv
pays the NCHWc layout reorder that a chain of float convs shares (measured on
mobilevit_xxs: 1x1 convs 1.0-1.6x faster alone, slower in the model).

Timing is this thread's CPU time with one intra-op thread: other processes' load hardly
moves it, where wall clock under a CPU hog chose "int8 on nothing" in 3 of 3 runs; the
median of back-to-back run pairs cancels most of what is left.
A last comparison of the chosen placement against none guards the "never slower" promise.
All variants share the one calibration of the quantization run (its statistics cover
every candidate), and are timed on a random input (values do not change kernel speed).
"""

from __future__ import annotations

import time
import numpy as np
import onnx
import onnxruntime as ort

from . import probe_cache
from .calibrate import model_input
from .config import INT8_KINDS

TIME_PER_COMPARISON = 0.6  # seconds of timed runs per comparison
MIN_PAIRS, MAX_PAIRS = 8, 40
MIN_GAIN = 1.05  # a kind must make the whole model this much faster (timing noise here: ~3 %)
CLOSE = 0.03  # a median within this of MIN_GAIN is timed again with EXTRA x the pairs
EXTRA = 2


def _session(data: bytes) -> ort.InferenceSession:
    """One intra-op thread: kernels run on the calling thread, whose CPU time is measured."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _timed(session, feed) -> float:
    """CPU time of this thread for one run: other processes' load hardly moves it (wall
    clock under a CPU hog chose "int8 on nothing" in 3 of 3 runs)."""
    start = time.thread_time()
    session.run(None, feed)
    return time.thread_time() - start


class _Variants:
    """Quantized variants by int8 kinds, all from one calibration, each built once by
    ``build`` (kinds -> ModelProto: the caller's pipeline; no import of the API here)."""

    def __init__(self, model: onnx.ModelProto, build):
        self.build = build
        name, shape = model_input(model)
        dims = [1] + [d or 224 for d in shape[1:]]
        self.feed = {name: np.random.default_rng(0).standard_normal(dims).astype(np.float32)}
        self.sessions = {}

    def session(self, kinds: tuple):
        if kinds not in self.sessions:
            session = _session(self.build(kinds).SerializeToString())
            session.run(None, self.feed)
            self.sessions[kinds] = session
        return self.sessions[kinds]


def _compare(variants: _Variants, kinds_a: tuple, kinds_b: tuple) -> float:
    """Median over alternating runs of time(a) / time(b): > 1 when b is faster.

    Each ratio pairs two runs taken back to back, so load on the machine hits both alike.
    A median close to MIN_GAIN, where a few slow runs decide, is measured again with EXTRA
    times the pairs and decided on all of them (int8 dense convs gain 7-9 % on mobilevit_xxs
    here: one short comparison under load could drop them, and the cache keeps a choice).
    """
    a, b = variants.session(kinds_a), variants.session(kinds_b)
    pair = _timed(a, variants.feed) + _timed(b, variants.feed)
    pairs = int(np.clip(TIME_PER_COMPARISON / max(pair, 1e-4), MIN_PAIRS, MAX_PAIRS))
    ratios = _ratios(a, b, variants.feed, pairs)
    if abs(np.median(ratios) - MIN_GAIN) < CLOSE:
        ratios += _ratios(a, b, variants.feed, EXTRA * pairs)
    return float(np.median(ratios))


def _ratios(a, b, feed, pairs: int) -> list:
    return [_timed(a, feed) / _timed(b, feed) for _ in range(pairs)]


def present_kinds(plan) -> list:
    """Candidate kinds present in the plan's quantized sites, in INT8_KINDS order."""
    present = {c.kind for c in plan.convs if c.quantize}
    present |= {"linear" for s in plan.linears if s.quantize and s.op == "MatMul"}
    return [k for k in INT8_KINDS if k in present]


def choose_int8_kinds(model: onnx.ModelProto, cfg, present: list, build, log=None) -> tuple:
    """What is worth int8 on this CPU (subset of ``present``): cached for this CPU, onnxruntime
    version and model structure (probe_cache.py), else measured by timing whole-model variants
    that ``build(kinds) -> ModelProto`` makes (from one calibration covering every kind).
    """
    key = probe_cache.key(model, ",".join(present) + f"|{cfg.parts}|{cfg.exclude}")
    cached = probe_cache.load(key)
    if cached is not None:
        if log:
            log.info("kernel probe: int8 on %s (cached for this CPU)", ", ".join(cached) or "nothing")
        return cached
    chosen, gains = _measure(_Variants(model, build), present, log)
    probe_cache.store(key, chosen, gains)
    return chosen


def _measure(variants: _Variants, present: list, log=None) -> tuple[tuple, dict]:
    """Greedy: keep a kind if it makes the model MIN_GAIN faster; then check all vs none."""
    chosen, gains = (), {}
    for kind in present:
        gains[kind] = gain = _compare(variants, chosen, chosen + (kind,))
        if log:
            log.info("kernel probe: int8 %s: %.3fx", kind, gain)
        if gain >= MIN_GAIN:
            chosen = chosen + (kind,)
    if chosen:
        gains["all"] = gain = _compare(variants, (), chosen)
        if log:
            log.info("kernel probe: %s vs none: %.3fx", "+".join(chosen), gain)
        if gain < MIN_GAIN:
            chosen = ()
    if log:
        log.info("kernel probe: int8 on %s", ", ".join(chosen) or "nothing")
    return chosen, gains
