"""Post-Softmax quantizers, by name (``--softmax-quantizer``).

    log2       the paper's (EfficientQuant): a uniform grid in log2 over the calibrated
               [max(min, eps), max], ``s = (L_max - L_min) / (2^b - 1)``
    log_sqrt2  RepQ-ViT's log-sqrt2: a fixed half-octave grid (``s = 1/2``) with its top code
               at the calibrated max: twice the resolution near the large probabilities
               that carry the attention, at the price of a shorter reach towards 0
    adalog     AdaLog-style adaptive base: the log step (and with it the base 2^s) chosen
               on the calibration values by the smallest mean squared error, top code at
               the max (searched over candidate steps between 1/8 and 2 octaves)
    uniform    what onnxruntime does (the baseline): uint8 on [0, max] with standard
               QuantizeLinear/DequantizeLinear (int8 symmetric where the target demands it)

All log quantizers are one ONNX op (``onnxquant.Log2QuantDequant``: scale, zero point,
bits, eps) with one threshold-table body and one TensorRT plugin: they differ only in how
the parameters are chosen, so each has the exact-code guarantee of ``functions.py`` at every
opset. Pure NumPy references: ``quantizers.log2_*`` and ``quantizers.uniform_*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import quantizers
from .spec import QuantSpec


@dataclass(frozen=True)
class SoftmaxQuantizer:
    name: str
    kind: str  # "log2" (the table op) | "uniform" (standard Q/DQ)
    step: float | str | None = None  # log2 grid step in octaves; None: min-max; "search"

    def spec(self, stats, bits: int, eps: float, symmetric: bool) -> QuantSpec:
        """The QuantSpec of one attention-probability tensor from its calibration stats."""
        lo, hi = float(stats[0]), float(stats[1])
        if self.kind == "uniform":
            return QuantSpec(bits=bits, symmetric=symmetric, range=(min(lo, 0.0), hi),
                             estimator="minmax")
        step = self.step
        if step == "search":
            step = search_log_step(getattr(stats, "sample", None), lo, hi, bits, eps)
        return QuantSpec(kind="log2", bits=bits, eps=eps, range=(lo, hi), step=step,
                         estimator="minmax" if step is None else f"step {step:g}")


def search_log_step(sample, lo: float, hi: float, bits: int, eps: float) -> float | None:
    """AdaLog-style: the log2 step with the smallest MSE on ``sample`` (None: no sample,
    fall back to the min-max grid)."""
    if sample is None or len(sample) == 0:
        return None
    x = np.asarray(sample, np.float32)
    best, best_err = None, np.inf
    for step in np.geomspace(0.125, 2.0, 25):
        p = quantizers.log2_params(lo, hi, bits, eps, step=float(step))
        err = float(np.mean((quantizers.log2_fake_quant(x, p) - x) ** 2))
        if err < best_err:
            best, best_err = float(p.scale), err
    minmax = quantizers.log2_params(lo, hi, bits, eps)
    if float(np.mean((quantizers.log2_fake_quant(x, minmax) - x) ** 2)) <= best_err:
        return None  # the paper's grid is at least as good on this tensor
    return best


REGISTRY = {q.name: q for q in (
    SoftmaxQuantizer("log2", "log2"),
    SoftmaxQuantizer("log_sqrt2", "log2", step=0.5),
    SoftmaxQuantizer("adalog", "log2", step="search"),
    SoftmaxQuantizer("uniform", "uniform"),
)}
NAMES = tuple(REGISTRY)
