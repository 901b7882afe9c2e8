"""Quantizer math: pure NumPy, stateless, no ONNX imports.

These functions are the reference for everything else: the DequantizeLinear
initializers, the log2 ONNX function body, the TensorRT plugin kernel and the
accuracy checks all have to agree with them.

Uniform (conv weights, EfficientQuant Sec. conv blocks), min-max:
    s = (max - min) / (2^b - 1),  z = round(-min / s)
    q = clamp(round(W / s) + z, 0, 2^b - 1),   W_hat = s * (q - z)
The range is widened to include 0 so that z is a valid code (for an all-positive
tensor the paper's formula would give z < 0) and zero stays exactly representable.

Log2 (post-Softmax activations):
    L = log2(max(x, eps)),  s = (L_max - L_min) / (2^b - 1),  z = round(-L_min / s)
    q = clamp(round(L / s) + z, 0, 2^b - 1),   x_hat = 2^(s * (q - z))
Computed in float64 as ``log(x) * (1 / (s ln 2))`` and ``exp((q - z) * s ln 2)``,
exactly the arithmetic of the ONNX function body, so codes agree across backends:
a disagreement needs ``log2(x)/s`` within 2 ulp of float64 of a rounding boundary
(onnxruntime's float32 Log differs from NumPy's by up to 5 ulp, its float64 Log by 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LN2 = float(np.log(2.0))


@dataclass(frozen=True)
class UniformParams:
    """Scale/zero point of a uniform quantizer; arrays have one entry per channel (or one)."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int8 or uint8, same shape as scale
    qmin: int
    qmax: int
    axis: int | None  # None: per-tensor


def uniform_range(bits: int, symmetric: bool) -> tuple[int, int, type]:
    """Code range and container dtype for ``bits`` in an 8-bit container."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax, np.int8
    return 0, 2**bits - 1, np.uint8


def _reduce(w: np.ndarray, fn, axis: int | None) -> np.ndarray:
    if axis is None:
        return np.asarray(fn(w), dtype=np.float64).reshape(1)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return fn(moved, axis=1).astype(np.float64)


def uniform_params(w: np.ndarray, bits: int = 8, symmetric: bool = False,
                   axis: int | None = None) -> UniformParams:
    """Min-max parameters for ``w`` (per tensor, or per slice along ``axis``)."""
    qmin, qmax, dtype = uniform_range(bits, symmetric)
    w = np.asarray(w, dtype=np.float64)
    if symmetric:
        amax = _reduce(np.abs(w), np.max, axis)
        scale = amax / qmax
        zero = np.zeros_like(scale)
    else:
        lo = np.minimum(_reduce(w, np.min, axis), 0.0)
        hi = np.maximum(_reduce(w, np.max, axis), 0.0)
        scale = (hi - lo) / (qmax - qmin)
        zero = np.round(-lo / np.where(scale > 0, scale, 1.0))
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # constant-zero tensor
    zero = np.clip(zero, qmin, qmax).astype(dtype)
    return UniformParams(scale, zero, qmin, qmax, axis)


def _broadcast(p: UniformParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    if p.axis is None:
        return p.scale.astype(np.float64)[0], p.zero_point.astype(np.float64)[0]
    shape = [1] * ndim
    shape[p.axis] = -1
    return (p.scale.astype(np.float64).reshape(shape),
            p.zero_point.astype(np.float64).reshape(shape))


def uniform_quantize(w: np.ndarray, p: UniformParams) -> np.ndarray:
    """Integer codes of ``w`` in the container dtype of ``p.zero_point``."""
    s, z = _broadcast(p, np.ndim(w))
    q = np.clip(np.round(np.asarray(w, np.float64) / s) + z, p.qmin, p.qmax)
    return q.astype(p.zero_point.dtype)


def uniform_dequantize(q: np.ndarray, p: UniformParams) -> np.ndarray:
    """``s * (q - z)`` in float32, as ONNX DequantizeLinear computes it."""
    if p.axis is None:
        s, z = p.scale[0], np.float32(p.zero_point[0])
    else:
        shape = [1] * q.ndim
        shape[p.axis] = -1
        s, z = p.scale.reshape(shape), p.zero_point.astype(np.float32).reshape(shape)
    return ((q.astype(np.float32) - z) * s).astype(np.float32)


def uniform_fake_quant(w: np.ndarray, bits: int = 8, symmetric: bool = False,
                       axis: int | None = None) -> np.ndarray:
    p = uniform_params(w, bits, symmetric, axis)
    return uniform_dequantize(uniform_quantize(w, p), p)


@dataclass(frozen=True)
class Log2Params:
    """Parameters of the log2 quantizer, stored as attributes of the ONNX node."""

    scale: float  # float32-representable: the node attribute is a float
    zero_point: int
    bits: int
    eps: float  # float32-representable

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1


def log2_params(xmin: float, xmax: float, bits: int = 8, eps: float = 2.0**-16) -> Log2Params:
    """Calibrated parameters from the observed min/max of the (non-negative) input."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    eps32 = float(np.float32(eps))
    l_min = np.log2(max(float(xmin), eps32))
    l_max = np.log2(max(float(xmax), eps32))
    scale = (l_max - l_min) / (2**bits - 1)
    if not scale > 0:  # constant input (e.g. one key): any scale represents it
        scale = 1.0 / (2**bits - 1)
    scale = float(np.float32(scale))
    return Log2Params(scale, int(np.round(-l_min / scale)), bits, eps32)


def log2_quantize(x: np.ndarray, p: Log2Params) -> np.ndarray:
    """Codes in [0, 2^b - 1] as int32 (float64 arithmetic, see module docstring)."""
    xd = np.maximum(np.asarray(x, np.float64), p.eps)
    t = np.log(xd) * (1.0 / (p.scale * LN2))
    return np.clip(np.round(t) + p.zero_point, 0, p.qmax).astype(np.int32)


def log2_dequantize(q: np.ndarray, p: Log2Params) -> np.ndarray:
    """``2^(s (q - z))`` in float32."""
    return np.exp((np.asarray(q, np.float64) - p.zero_point) * (p.scale * LN2)).astype(np.float32)


def log2_fake_quant(x: np.ndarray, p: Log2Params) -> np.ndarray:
    return log2_dequantize(log2_quantize(x, p), p)
