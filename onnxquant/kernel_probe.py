"""Measure, on the machine at hand, where onnxruntime runs faster in int8.

``QuantConfig(target="ort")`` (``ort_int8_kinds=None``) times the whole model in
onnxruntime with int8 added greedily on each kind: dense kxk, pointwise, grouped, depthwise
and stem convs (QLinearConv), then linear MatMuls (dynamic int8), and keeps a kind only if
the model gets faster by ``MIN_GAIN``. A fixed rule cannot hold across CPUs and models:
on this AVX2 machine dense 3x3 convs pay and depthwise/stem do not (DESIGN.md §7), and
dynamic int8 MatMuls paid on mobilevit_xxs but not on efficientformer_l1
(docs/benchmarks.md); VNNI or ARM dot-product kernels shift the balance again. Whole-model timing, not per layer: a one-conv model favours
int8 because its float conv pays the NCHWc layout reorder that a chain of float convs
shares (measured on mobilevit_xxs: 1x1 convs 1.0-1.6x faster alone, slower in the model).

Timing uses one intra-op thread and the thread's CPU time (best of interleaved medians):
robust to other load on the machine, which wall-clock medians here were not (DESIGN.md §7).
All variants share the one calibration of the quantization run (its statistics cover
every candidate), and are timed on a random input (values do not change kernel speed).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort

from .calibrate import model_input
from .config import INT8_KINDS

RUNS = 10  # at most; fewer for slow models (TIME_PER_MEDIAN)
ROUNDS = 2
TIME_PER_MEDIAN = 0.15  # seconds of CPU time per median
MIN_GAIN = 1.05  # a kind must make the whole model this much faster (timing noise here: ~3 %)


def _session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _cpu_median(session, feed, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.thread_time()
        session.run(None, feed)
        times.append(time.thread_time() - start)
    return float(np.median(times))


class _Variants:
    """Quantized variants by int8 kinds, all from one calibration, each built once."""

    def __init__(self, model: onnx.ModelProto, cfg, stats: dict):
        self.model, self.cfg, self.stats = model, cfg, stats
        name, shape = model_input(model)
        dims = [1] + [d or 224 for d in shape[1:]]
        self.feed = {name: np.random.default_rng(0).standard_normal(dims).astype(np.float32)}
        self.sessions = {}

    def session(self, kinds: tuple):
        if kinds not in self.sessions:
            from .api import analyze, build

            variant = replace(self.cfg, ort_int8_kinds=kinds)
            graph, plan = analyze(self.model, variant)
            plan.stats = self.stats
            session = _session(build(graph, plan, variant, self.model)[0].SerializeToString())
            session.run(None, self.feed)
            self.sessions[kinds] = session
        return self.sessions[kinds]


def _compare(variants: _Variants, kinds_a: tuple, kinds_b: tuple) -> tuple:
    """Best-of-rounds CPU time of two variants, timed interleaved."""
    sessions = [variants.session(kinds_a), variants.session(kinds_b)]
    start = time.thread_time()
    sessions[0].run(None, variants.feed)
    runs = int(np.clip(TIME_PER_MEDIAN / max(time.thread_time() - start, 1e-4), 3, RUNS))
    times = [[], []]
    for _ in range(ROUNDS):
        for t, s in zip(times, sessions):
            t.append(_cpu_median(s, variants.feed, runs))
    return min(times[0]), min(times[1])


def _present_kinds(model: onnx.ModelProto, cfg) -> list:
    from .api import analyze

    _, plan = analyze(model, replace(cfg, ort_int8_kinds=()))
    present = {c.kind for c in plan.convs if c.quantize}
    present |= {"linear" for s in plan.linears if s.quantize and s.op == "MatMul"}
    return [k for k in INT8_KINDS if k in present]


def choose_int8_kinds(model: onnx.ModelProto, cfg, stats: dict, log=None) -> tuple:
    """What is worth int8 on this CPU (subset of INT8_KINDS), by timing whole-model variants.

    ``stats`` must cover every candidate (calibrated with ``ort_int8_kinds=INT8_KINDS``).
    """
    variants, chosen = _Variants(model, cfg, stats), ()
    for kind in _present_kinds(model, cfg):
        base, with_kind = _compare(variants, chosen, chosen + (kind,))
        if log:
            log.info("kernel probe: int8 %s: %.3f -> %.3f ms", kind, base * 1e3, with_kind * 1e3)
        if base / with_kind >= MIN_GAIN:
            chosen = chosen + (kind,)
    if log:
        log.info("kernel probe: int8 on %s", ", ".join(chosen) or "nothing")
    return chosen
