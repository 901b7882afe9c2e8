"""Weighted layers as matrices: the geometry reconstruction methods need.

A quantized Conv/MatMul/Gemm weight is viewed as a stack ``[G, R, C]`` (G groups, R output
rows, C input columns; see gptq.py), its fixed quantization grid as the scale and zero point
of every weight ``[G, R, C]`` (per row, or per block of columns), and its calibration inputs
as columns ``[G, C, n]`` (im2col for convs, one row per token for linear layers), so that
``W x`` of the layer is ``stack @ columns`` per group.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx

from . import quantizers


@dataclass
class Layer:
    """One quantized weighted layer of a block."""

    site: object  # plan.ConvSite | plan.LinearSite
    node: onnx.NodeProto  # in the extracted float block
    weight: np.ndarray  # float, as stored in the model
    params: quantizers.UniformParams  # the fixed grid of its codes

    @property
    def attrs(self) -> dict:
        return {a.name: onnx.helper.get_attribute_value(a) for a in self.node.attribute}

    @property
    def groups(self) -> int:
        return int(self.attrs.get("group", 1)) if self.node.op_type == "Conv" else 1

    @property
    def transposed(self) -> bool:
        """The stored weight is [in, out] (MatMul, Gemm with transB=0)."""
        return self.node.op_type == "MatMul" or (self.node.op_type == "Gemm"
                                                 and not self.attrs.get("transB", 0))

    def stack(self, w: np.ndarray | None = None) -> np.ndarray:
        """``w`` (default: the float weight) as [G, R, C]."""
        w = self.weight if w is None else w
        if self.node.op_type == "Conv":
            g = self.groups
            return w.reshape(g, w.shape[0] // g, -1)
        return (w.T if self.transposed else w)[None]

    def unstack(self, s: np.ndarray) -> np.ndarray:
        """Inverse of ``stack``: [G, R, C] back to the stored weight's shape."""
        if self.node.op_type == "Conv":
            return s.reshape(self.weight.shape)
        return s[0].T if self.transposed else s[0]

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point of every weight, [G, R, C] like ``stack`` (float64 holding
        the float32 scale): per tensor, per row, or per block of columns."""
        shape = self.weight.shape
        scale, zero = self.params.expanded(shape)
        return (self.stack(np.broadcast_to(scale, shape)).astype(np.float64),
                self.stack(np.broadcast_to(zero, shape)).astype(np.float64))

    def as_seen(self, x: np.ndarray) -> np.ndarray:
        """``x`` after the layer's own uniform activation Q/DQ (W4A8), if it has one."""
        spec = getattr(self.site, "input_spec", None)
        if spec is None or spec.kind != "uniform":
            return x
        p = spec.uniform_params()
        return quantizers.uniform_dequantize(quantizers.uniform_quantize(x, p), p)

    def column_sum(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """(sum of the layer's input columns over every sample and position [G, C], their
        count): E[x] of what ``stack`` multiplies, every column, padding included."""
        if self.node.op_type == "Conv":
            return _conv_column_sum(x, self.attrs, self.weight.shape)
        x = np.asarray(x, np.float64)
        if self.node.op_type == "Gemm" and self.attrs.get("transA", 0):
            x = x.T
        x = x.reshape(-1, x.shape[-1])
        return x.sum(0)[None], len(x)

    def columns(self, x: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
        """The layer's input ``x`` as sample columns [G, C, n], at most ``limit`` of them."""
        return self.sample_columns(x, limit, seed)[0]

    def sample_columns(self, x: np.ndarray, limit: int, seed: int = 0,
                       samples: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
        """``columns`` and the calibration sample each column comes from ([n], ascending),
        for ``x`` holding ``samples`` samples sample-major along its leading axis (images,
        or tokens of n x k rows); None where that axis does not split into them."""
        if self.node.op_type == "Conv":
            cols, image = _conv_columns(x, self.attrs, self.weight.shape, limit, seed)
            return cols, _sample_of(image, len(x), samples)
        x = np.asarray(x, np.float32)
        if self.node.op_type == "Gemm" and self.attrs.get("transA", 0):
            x = x.T
        x = x.reshape(-1, x.shape[-1])
        total, rows = len(x), np.arange(len(x))
        if total > limit:
            rows = np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))
            x = x[rows]
        return x.T[None], _sample_of(rows, total, samples)


def _pads(attrs: dict, spatial: tuple, kernel: tuple, strides: list, dilations: list) -> list:
    """[begin..., end...] pads, auto_pad resolved as onnxruntime does."""
    nd = len(kernel)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * 2 * nd))
    if auto == "VALID":
        return [0] * 2 * nd
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(big if auto == "SAME_LOWER" else small)
        end.append(small if auto == "SAME_LOWER" else big)
    return begin + end


def _sample_of(index: np.ndarray, total: int, samples: int) -> np.ndarray | None:
    """The sample of each of ``index`` (rows of a leading axis of ``total`` holding
    ``samples`` samples sample-major), or None where ``total`` does not split into them."""
    if samples < 1 or total % samples:
        return None
    return np.asarray(index) // (total // samples)


def conv_columns(x: np.ndarray, attrs: dict, w_shape: tuple, limit: int, seed: int = 0):
    """im2col of a Conv input [B, Cin, *spatial] -> [G, Cin/G * prod(k), n]; columns in
    the order of ``W.reshape(Cout, -1)``; at most ``limit`` output positions, spread evenly
    over the images and drawn at random within each (only those are gathered)."""
    return _conv_columns(x, attrs, w_shape, limit, seed)[0]


def _padded(x: np.ndarray, attrs: dict, w_shape: tuple, dtype) -> tuple:
    """(the Conv input padded as the Conv pads it, kernel, strides, dilations, output
    spatial size)."""
    kernel = tuple(w_shape[2:])
    nd = len(kernel)
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    pads = _pads(attrs, x.shape[2:], kernel, strides, dilations)
    xp = np.pad(np.asarray(x, dtype),
                [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    out = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
           for i in range(nd)]
    return xp, kernel, strides, dilations, out


def _conv_columns(x: np.ndarray, attrs: dict, w_shape: tuple, limit: int, seed: int = 0):
    """``conv_columns`` and the image (index along B) of each column."""
    xp, kernel, strides, dilations, out = _padded(x, attrs, w_shape, np.float32)
    g = int(attrs.get("group", 1))
    total = int(np.prod(out))
    per_image = max(limit // len(x), 1)
    rng = np.random.default_rng(seed)
    offsets = np.array(list(itertools.product(*(range(k) for k in kernel))))  # [K, nd]
    cols, image_of = [], []
    for b, image in enumerate(xp):
        picked = (np.arange(total) if total <= per_image
                  else np.sort(rng.choice(total, per_image, replace=False)))
        image_of.append(np.full(len(picked), b))
        pos = np.stack(np.unravel_index(picked, out), axis=1)  # [n, nd] output positions
        where = (pos[None, :, :] * np.array(strides)
                 + offsets[:, None, :] * np.array(dilations))  # [K, n, nd] input positions
        patches = image[(slice(None),) + tuple(where[..., i]  # [C, K, n]
                                               for i in range(len(kernel)))]
        cols.append(patches.reshape(g, -1, len(picked)))
    # C order: the gather leaves the groups axis innermost, where batched products of
    # depthwise columns ([G, 9, n]) ran 20x slower than on a C-ordered copy
    return np.ascontiguousarray(np.concatenate(cols, axis=2)), np.concatenate(image_of)


def _conv_column_sum(x: np.ndarray, attrs: dict, w_shape: tuple) -> tuple[np.ndarray, int]:
    """``Layer.column_sum`` of a Conv: per kernel offset, the strided window of the padded
    input summed over images and output positions ([Cin, K] -> [G, Cin/G * K], the column
    order of ``conv_columns``), without building the columns."""
    xp, kernel, strides, dilations, out = _padded(x, attrs, w_shape, np.float64)
    offsets = list(itertools.product(*(range(k) for k in kernel)))
    sums = np.empty((xp.shape[1], len(offsets)))
    axes = (0,) + tuple(range(2, 2 + len(kernel)))
    for k, offset in enumerate(offsets):
        window = tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                       for o, d, s, n in zip(offset, dilations, strides, out))
        sums[:, k] = xp[(slice(None), slice(None)) + window].sum(axis=axes)
    g = int(attrs.get("group", 1))
    return sums.reshape(g, -1), len(x) * int(np.prod(out))
