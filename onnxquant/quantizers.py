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
The rounding boundaries are a float32 table (``log2_tables``): the code of x is the number
of boundaries it reaches. Each boundary 2^(s (k + 1/2 - z)) sits on the nearest float32 whose
mantissa has ``SNAP_BITS`` bits (a relative grid of 2^-10, at most 7e-4 octaves from the
log-domain midpoint: 1.1 % of the default 8-bit step), so that the code is a function
of the input's top float32 bits and the onnxruntime body can be one table lookup
(functions.py, "bitcast"). That makes codes exact across backends whose ``log`` differs
(onnxruntime's float32 Log differs from NumPy's by up to 5 ulp): the ONNX function estimates
the code with a float32 log and corrects it with one table comparison, at float32 speed
(float64 Log/Exp in onnxruntime are 8-100x slower than float32, not vectorized).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LN2 = float(np.log(2.0))
MIN_EPS = 2.0**-120  # thresholds 2^(-120 - s/2) stay normal float32
MIN_LOG2_SCALE = 2.0**-8  # a boundary's snap (<= 7e-4 octave) stays under 0.2 of a step
SNAP_BITS = 10  # mantissa bits of a rounding boundary (see the module docstring)


@dataclass(frozen=True)
class UniformParams:
    """Scale/zero point of a uniform quantizer; arrays have one entry per channel (or one)."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int8 or uint8, same shape as scale
    qmin: int
    qmax: int
    axis: int | None  # None: per-tensor
    block_size: int | None = None  # blocks of this many along ``axis``, one scale each

    def expanded(self, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point broadcastable to a tensor of ``shape`` (float64): scalars per
        tensor, one per slice along ``axis``, or repeated over each block."""
        if self.axis is None:
            return self.scale.astype(np.float64)[0], self.zero_point.astype(np.float64)[0]
        if self.block_size is None:
            bshape = [1] * len(shape)
            bshape[self.axis] = -1
            return (self.scale.astype(np.float64).reshape(bshape),
                    self.zero_point.astype(np.float64).reshape(bshape))
        n = shape[self.axis]

        def spread(a):
            return np.repeat(a.astype(np.float64), self.block_size, axis=self.axis).take(
                np.arange(n), axis=self.axis)
        return spread(self.scale), spread(self.zero_point)


def uniform_range(bits: int, symmetric: bool) -> tuple[int, int, type]:
    """Code range and container dtype for ``bits`` in an 8-bit container."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax, np.int8
    return 0, 2**bits - 1, np.uint8


def grain_rows(w: np.ndarray, axis: int | None, block_size: int | None = None) -> np.ndarray:
    """``w`` as 2-D rows, one per scale: [1, n] per tensor, [D, n] per slice along ``axis``,
    or [blocks, block_size] for blocks along ``axis`` (a last partial block padded with
    zeros, which every grid holds exactly and min-max already includes)."""
    if axis is None:
        return w.reshape(1, -1)
    if block_size is None:
        return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    moved = np.moveaxis(w, axis, -1)
    pad = -moved.shape[-1] % block_size
    moved = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)])
    return moved.reshape(-1, block_size)


def from_rows(values: np.ndarray, shape: tuple, axis: int | None,
              block_size: int | None = None) -> np.ndarray:
    """Inverse of ``grain_rows`` for one value per row: the scale's shape, (1,), (D,), or
    ``shape`` with ceil(D / block_size) at ``axis`` (DequantizeLinear's block-wise layout)."""
    if axis is None:
        return values.reshape(1)
    if block_size is None:
        return values.reshape(shape[axis])
    blocks = -(-shape[axis] // block_size)
    moved = [d for i, d in enumerate(shape) if i != axis] + [blocks]
    return np.moveaxis(values.reshape(moved), -1, axis)


def to_rows(values: np.ndarray, axis: int | None, block_size: int | None = None) -> np.ndarray:
    """A scale or zero point as one value per row of ``grain_rows`` (float64 copy)."""
    if block_size is not None:
        values = np.moveaxis(values, axis, -1)
    return values.astype(np.float64).reshape(-1)


def uniform_params(w: np.ndarray, bits: int = 8, symmetric: bool = False,
                   axis: int | None = None, block_size: int | None = None) -> UniformParams:
    """Min-max parameters for ``w``: per tensor, per slice along ``axis``, or per block of
    ``block_size`` elements along ``axis`` (one scale per block and per other index)."""
    if block_size is not None and (axis is None or block_size < 1):
        raise ValueError(f"block_size needs an axis and must be >= 1, got {block_size}")
    qmin, qmax, dtype = uniform_range(bits, symmetric)
    w = np.asarray(w, dtype=np.float64)
    rows = grain_rows(w, axis, block_size)
    if symmetric:
        scale = np.abs(rows).max(axis=1) / qmax
        zero = np.zeros_like(scale)
    else:
        lo = np.minimum(rows.min(axis=1), 0.0)
        hi = np.maximum(rows.max(axis=1), 0.0)
        scale = (hi - lo) / (qmax - qmin)
        zero = np.round(-lo / np.where(scale > 0, scale, 1.0))
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # constant-zero tensor
    zero = np.clip(zero, qmin, qmax).astype(dtype)
    return UniformParams(from_rows(scale, w.shape, axis, block_size),
                         from_rows(zero, w.shape, axis, block_size), qmin, qmax, axis,
                         block_size)


INT32_MAX = 2**31 - 1


def widen_for_bias(p: UniformParams, bias: np.ndarray, act_scale: float) -> UniformParams:
    """Weight params whose scale keeps ``round(bias / (act_scale * s_w))`` inside int32.

    A channel with a tiny weight range and a large bias would saturate its int32 bias code;
    its weight scale is widened to ``|b| / (act_scale * INT32_MAX)`` instead (what
    onnxruntime's own quantizer does), so the bias stays exact to one code and the weights
    lose resolution only in that channel. Symmetric (zero point 0) params only.
    """
    need = np.abs(np.asarray(bias, np.float64)).reshape(-1) / (float(act_scale) * INT32_MAX)
    if p.axis is None:
        need = need.max(keepdims=True)
    need = need * (1 + 2.0**-20)  # float32 rounding of the product must not undo it
    if np.all(p.scale >= need):
        return p
    widened = np.maximum(p.scale.astype(np.float64), need).astype(np.float32)
    return UniformParams(widened, p.zero_point, p.qmin, p.qmax, p.axis)


def uniform_quantize(w: np.ndarray, p: UniformParams) -> np.ndarray:
    """Integer codes of ``w`` in the container dtype of ``p.zero_point``."""
    s, z = p.expanded(np.shape(w))
    q = np.clip(np.round(np.asarray(w, np.float64) / s) + z, p.qmin, p.qmax)
    return q.astype(p.zero_point.dtype)


def uniform_dequantize(q: np.ndarray, p: UniformParams) -> np.ndarray:
    """``s * (q - z)`` in float32, as ONNX DequantizeLinear computes it."""
    s, z = p.expanded(np.shape(q))  # float64 holding the float32 scale exactly
    return ((q.astype(np.float32) - np.float32(z)) * np.float32(s)).astype(np.float32)


def uniform_fake_quant(w: np.ndarray, bits: int = 8, symmetric: bool = False,
                       axis: int | None = None, block_size: int | None = None) -> np.ndarray:
    p = uniform_params(w, bits, symmetric, axis, block_size)
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


def log2_params(xmin: float, xmax: float, bits: int = 8, eps: float = 2.0**-16,
                step: float | None = None) -> Log2Params:
    """Calibrated parameters from the observed min/max of the (non-negative) input.

    ``step=None``: the paper's min-max grid, ``s = (L_max - L_min) / (2^b - 1)``. A fixed
    ``step`` (in octaves: 0.5 is RepQ-ViT's log-sqrt2 grid, 1 FQ-ViT's log2 grid) anchors
    the top code at the calibrated max instead, ``z = round((2^b - 1) - L_max / s)``, and
    lets the grid run down from there (codes below ``eps`` clamp to 0).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if not MIN_EPS <= eps < 1:
        raise ValueError(f"eps must be in [2^-120, 1), got {eps}")  # float32 tables
    eps32 = float(np.float32(eps))
    l_min = np.log2(max(float(xmin), eps32))
    l_max = np.log2(max(float(xmax), eps32))
    if step is not None:
        scale = float(np.float32(max(step, MIN_LOG2_SCALE)))
        return Log2Params(scale, int(np.round((2**bits - 1) - l_max / scale)), bits, eps32)
    scale = (l_max - l_min) / (2**bits - 1)
    # constant input (one key) or a range too narrow for distinct float32 thresholds
    scale = max(scale, MIN_LOG2_SCALE)
    scale = float(np.float32(scale))
    return Log2Params(scale, int(np.round(-l_min / scale)), bits, eps32)


def log2_tables(p: Log2Params) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, levels), both float32 of length 2^b.

    ``levels[k] = 2^(s (k - z))`` is the dequantized value of code k. ``thresholds[k]`` is
    the smallest input that gets a code above k: ``2^(s (k + 1/2 - z))`` (the log-domain
    rounding boundary) snapped to ``SNAP_BITS`` mantissa bits, and +inf for the last code.
    Computed in float64 as ``exp(((k + 0.5) - z) * (s ln 2))``, snapped, then rounded to
    float32 (exact: 11 significant bits), in exactly this order in the ONNX function body,
    so both sides hold the same tables.
    """
    k = np.arange(p.qmax + 1, dtype=np.float64)
    s_ln2 = p.scale * LN2
    levels = np.exp((k - p.zero_point) * s_ln2).astype(np.float32)
    thresholds = snap_mantissa(np.exp(((k + 0.5) - p.zero_point) * s_ln2)).astype(np.float32)
    thresholds[-1] = np.inf
    return thresholds, levels


def snap_mantissa(t: np.ndarray, bits: int = SNAP_BITS) -> np.ndarray:
    """Positive float64 values rounded (half to even) to ``bits`` mantissa bits after the
    leading one: ``round(t / 2^(e - bits)) * 2^(e - bits)`` with ``2^e <= t < 2^(e+1)``."""
    mantissa, exponent = np.frexp(np.asarray(t, np.float64))  # mantissa in [0.5, 1)
    return np.ldexp(np.round(np.ldexp(mantissa, bits + 1)), exponent - bits - 1)


def log2_quantize(x: np.ndarray, p: Log2Params) -> np.ndarray:
    """Codes in [0, 2^b - 1] (int32): how many thresholds ``max(x, eps)`` reaches.

    This is ``clamp(round(log2(max(x, eps)) / s) + z, 0, 2^b - 1)`` with the rounding
    boundaries taken from ``log2_tables`` (float32), so that every implementation that
    compares against the same table gets the same codes, whatever its ``log`` rounds to.
    """
    thresholds, _ = log2_tables(p)
    xm = np.maximum(np.asarray(x, np.float32), np.float32(p.eps))
    return np.searchsorted(thresholds[:-1], xm, side="right").astype(np.int32)


def log2_dequantize(q: np.ndarray, p: Log2Params) -> np.ndarray:
    """``2^(s (q - z))`` in float32 (a lookup in ``log2_tables``)."""
    return log2_tables(p)[1][np.asarray(q)]


def log2_fake_quant(x: np.ndarray, p: Log2Params) -> np.ndarray:
    return log2_dequantize(log2_quantize(x, p), p)


CLIP_RATIOS = np.linspace(1.0, 0.5, 21)  # fractions of the min-max range tried per channel
CLIP_NORM = 2.4  # error norm of the clipping search (GPTQ's reference grid search)


def clipped_params(p: UniformParams, w: np.ndarray) -> UniformParams:
    """``p``'s grid with each channel's (or block's) range shrunk to the ratio (of
    ``CLIP_RATIOS``) that minimizes sum |dequant(quant(w)) - w|^2.4 over it (per tensor: one
    ratio). Low-bit grids gain most: a few outliers no longer stretch every step."""
    w = np.asarray(w, np.float64)
    rows = grain_rows(w, p.axis, p.block_size)
    symmetric = p.qmin < 0
    best = np.full(len(rows), np.inf)
    scale, zero = (to_rows(a, p.axis, p.block_size) for a in (p.scale, p.zero_point))
    for ratio in CLIP_RATIOS:
        if symmetric:
            s = ratio * np.abs(rows).max(axis=1) / p.qmax
            z = np.zeros_like(s)
        else:
            lo = ratio * np.minimum(rows.min(axis=1), 0)
            hi = ratio * np.maximum(rows.max(axis=1), 0)
            s = (hi - lo) / (p.qmax - p.qmin)
            z = np.clip(np.round(-lo / np.where(s > 0, s, 1)), p.qmin, p.qmax)
        s = np.where(s > 0, s, 1.0)
        q = np.clip(np.round(rows / s[:, None]) + z[:, None], p.qmin, p.qmax)
        err = np.sum(np.abs((q - z[:, None]) * s[:, None] - rows) ** CLIP_NORM, axis=1)
        better = err < best
        best[better], scale[better], zero[better] = err[better], s[better], z[better]
    return UniformParams(from_rows(scale.astype(np.float32), w.shape, p.axis, p.block_size),
                         from_rows(zero.astype(p.zero_point.dtype), w.shape, p.axis,
                                   p.block_size), p.qmin, p.qmax, p.axis, p.block_size)
