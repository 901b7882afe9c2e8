"""Measure, on the machine at hand, where onnxruntime runs convs faster in int8.

``QuantConfig(target="ort", measure_kernels=True)`` times the whole model in onnxruntime
with int8 (QLinearConv) on each kind of conv (dense kxk, pointwise, depthwise, stem) added
greedily, and keeps a kind only if the model gets faster by ``MIN_GAIN``. The fixed rule
(dense only) came from an AVX2 machine without VNNI; CPUs with VNNI or ARM dot-product
kernels may gain on more kinds. Whole-model timing, not per layer: a one-conv model favours
int8 because its float conv pays the NCHWc layout reorder that a chain of float convs
shares (measured on mobilevit_xxs: 1x1 convs 1.0-1.6x faster alone, slower in the model).

Timing uses one intra-op thread and the thread's CPU time (best of interleaved medians):
robust to other load on the machine, which wall-clock medians here were not (DESIGN.md §7).
Scales do not change kernel speed, so the variants are calibrated on random inputs.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort

from .config import CONV_KINDS

RUNS = 10
ROUNDS = 2
MIN_GAIN = 1.03  # a kind must make the whole model this much faster to be kept


def _session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _cpu_median(session, feed) -> float:
    times = []
    for _ in range(RUNS):
        start = time.thread_time()
        session.run(None, feed)
        times.append(time.thread_time() - start)
    return float(np.median(times))


def _variant(model: onnx.ModelProto, cfg, kinds: tuple, calibration) -> bytes:
    from .api import run

    variant = replace(cfg, ort_int8_kinds=kinds, measure_kernels=False, num_calib=2)
    return run(model, variant, calibration, progress=False).model.SerializeToString()


def _compare(model, cfg, kinds_a: tuple, kinds_b: tuple, calibration) -> tuple:
    """Best-of-rounds CPU time of two variants, timed interleaved."""
    feed = {model.graph.input[0].name: calibration[:1]}
    sessions = [_session(_variant(model, cfg, k, calibration)) for k in (kinds_a, kinds_b)]
    for s in sessions:
        s.run(None, feed)
    times = [[], []]
    for _ in range(ROUNDS):
        for t, s in zip(times, sessions):
            t.append(_cpu_median(s, feed))
    return min(times[0]), min(times[1])


def choose_int8_kinds(model: onnx.ModelProto, cfg, shape: list, log=None) -> tuple:
    """The conv kinds worth int8 on this CPU, by timing whole-model variants."""
    dims = [2] + [d or 224 for d in shape[1:]]
    calibration = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    chosen = ()
    for kind in CONV_KINDS:
        base, with_kind = _compare(model, cfg, chosen, chosen + (kind,), calibration)
        if log:
            log.info("measure_kernels: int8 %s convs: %.3f -> %.3f ms", kind, base * 1e3,
                     with_kind * 1e3)
        if base / with_kind >= MIN_GAIN:
            chosen = chosen + (kind,)
    return chosen
