"""QuantSpec: how one tensor is quantized. The decide stage writes one per quantized site;
emission writes exactly what it says and never decides.

    uniform  bits, symmetric (int8 codes, zero point 0) or asymmetric (uint8), per tensor,
             per channel (``axis``) or per block of ``block_size`` along ``axis``, the activation range it was calibrated to and how that
             range was estimated, the weight storage format, optional explicit integer codes
             (learned rounding) and optional resolved parameters (e.g. a widened scale)
    log2     bits, eps and the calibrated range of the post-Softmax values (quantizers.py)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import quantizers

FORMATS = ("qdq", "folded", "dynamic")


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not specs
class QuantSpec:
    kind: str = "uniform"  # "uniform" | "log2"
    bits: int = 8
    symmetric: bool = False
    axis: int | None = None  # channel axis of a per-channel weight; None: per tensor
    block_size: int | None = None  # scales per block of this many along ``axis`` (opset 21)
    range: tuple | None = None  # activations: calibrated (lo, hi)
    estimator: str = "minmax"  # how ``range`` was estimated
    fmt: str = "qdq"  # weights: DequantizeLinear | folded Cast/Sub/Mul | dynamic int8 MatMul
    eps: float | None = None  # log2: floor before the log
    step: float | None = None  # log2: fixed grid step in octaves (None: min-max range)
    codes: np.ndarray | None = None  # explicit integer codes (learned rounding); else RTN
    params: quantizers.UniformParams | None = None  # resolved parameters (overrides min-max)

    def __post_init__(self):
        if self.kind not in ("uniform", "log2"):
            raise ValueError(f"unknown quantizer kind {self.kind!r}")
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown weight format {self.fmt!r}")

    def with_(self, **changes) -> "QuantSpec":
        return replace(self, **changes)

    def uniform_params(self, values: np.ndarray | None = None) -> quantizers.UniformParams:
        """Scale and zero point: the resolved ``params``, else min-max of ``values`` (weights)
        or of the calibrated ``range`` (activations)."""
        if self.params is not None:
            return self.params
        if values is None:
            values = np.asarray(self.range, dtype=np.float64)
        return quantizers.uniform_params(values, self.bits, symmetric=self.symmetric,
                                         axis=self.axis, block_size=self.block_size)

    def log2_params(self) -> quantizers.Log2Params:
        lo, hi = self.range
        return quantizers.log2_params(lo, hi, self.bits, self.eps, step=self.step)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Integer codes of ``values``: the explicit ``codes`` if given, else round to nearest."""
        if self.codes is not None:
            return self.codes
        return quantizers.uniform_quantize(values, self.uniform_params(values))

    def describe(self) -> str:
        if self.kind == "log2":
            return f"log2 {self.bits}-bit"
        grain = ("per-tensor" if self.axis is None else "per-channel" if self.block_size is None
                 else f"per-block({self.block_size})")
        scheme = "int symmetric" if self.symmetric else "uint asymmetric"
        return f"{scheme} {self.bits}-bit {grain}"
