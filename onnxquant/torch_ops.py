"""ONNX operators in torch: one function per op type, ``fn(attrs, inputs, opset) -> tensor``
(or a list for several outputs), differentiable wherever the op is. The table ``OPS`` is
what ``torch_graph.GraphModule`` runs; it covers the 68 op types of the timm hybrid zoo, the
PP-OCR models and onnxquant's own output (Q/DQ, the inlined log2 function), checked against
onnxruntime by tools/onnx2torch_compare.py (docs/blocks.md).

``attrs`` are the node's attributes as Python values (tensor attributes as torch tensors),
plus ``_n_outputs``; inputs are torch tensors (None for an omitted optional input).
"""

from __future__ import annotations

import math

import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def _ints(t) -> list:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axes(node, ins, opset, since):
    """Axes from the attribute (older opsets) or the second input (``since`` on)."""
    if opset >= since:
        return _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None
    return node["axes"]


def _same_pads(x, kernel, strides, dilations, upper=True):
    pads = []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        pads.append((total // 2, total - total // 2) if upper else (total - total // 2, total // 2))
    return pads


def _pad_pairs(x, node, kernel) -> list:
    """(head, tail) padding per spatial axis from ONNX ``pads`` or ``auto_pad``."""
    n = len(kernel)
    strides, dil = node.get("strides", [1] * n), node.get("dilations", [1] * n)
    auto = node.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(x, kernel, strides, dil, auto == "SAME_UPPER")
    p = node.get("pads", [0] * 2 * n)
    return list(zip(p[:n], p[n:]))


def _pad_for(x, node, kernel, value=0.0):
    """Apply ONNX ``pads``/``auto_pad`` explicitly (torch's padding is symmetric only)."""
    return _padded(x, _pad_pairs(x, node, kernel), value)


def _padded(x, pairs: list, value=0.0):
    """``x`` padded by (head, tail) ``pairs`` per spatial axis."""
    flat = [v for pair in reversed(pairs) for v in pair]
    return F.pad(x, flat, value=value) if any(flat) else x


def _conv(node, ins, _):
    x, w = ins[0], ins[1]
    kernel = list(w.shape[2:])
    x = _pad_for(x, node, kernel)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    return fn(x, w, ins[2] if len(ins) > 2 else None, node.get("strides", 1),
              0, node.get("dilations", 1), node.get("group", 1))


def _conv_transpose(node, ins, _):
    w = ins[1]
    n = w.dim() - 2
    p = node.get("pads", [0] * 2 * n)
    if p[:n] != p[n:]:
        raise NotImplementedError(f"ConvTranspose with asymmetric pads {p}")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d}[n]
    return fn(ins[0], w, ins[2] if len(ins) > 2 else None, node.get("strides", 1), p[:n],
              node.get("output_padding", 0), node.get("group", 1), node.get("dilations", 1))


def _pool(kind):
    """ONNX MaxPool/AveragePool: strides default to 1; with count_include_pad 0 (the
    default) an average is over the real inputs under the window, ``pads`` or ``auto_pad``
    alike; with ceil_mode a window that would start in the right padding is dropped
    (onnxruntime; the ONNX spec since opset 19)."""
    def run(node, ins, _):
        kernel = node["kernel_shape"]
        n = len(kernel)
        strides, x = node.get("strides", [1] * n), ins[0]
        ceil = bool(node.get("ceil_mode", 0))
        pairs = _pad_pairs(x, node, kernel)
        padded = _padded(x, pairs, float("-inf") if kind == "max" else 0.0)
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d}[n]
            out = fn(padded, kernel, strides, 0, node.get("dilations", 1), ceil)
        else:
            fn = {1: F.avg_pool1d, 2: F.avg_pool2d}[n]
            out = fn(padded, kernel, strides, 0, ceil)
            if padded.shape != x.shape and not node.get("count_include_pad", 0):
                ones = _padded(torch.ones_like(x[:1, :1]), pairs)
                out = out / fn(ones, kernel, strides, 0, ceil)
        if not ceil:
            return out
        return _drop_windows_in_right_pad(out, x, pairs, strides)
    return run


def _drop_windows_in_right_pad(out, x, pairs: list, strides):
    """torch saw the padding as input, so it keeps a last ceil_mode window that starts in
    the right padding: keep only windows starting before the input's end."""
    index = [slice(None)] * out.dim()
    for i, (s, (head, _)) in enumerate(zip(strides, pairs)):
        dim = 2 + i
        keep = out.shape[dim]
        while keep > 1 and (keep - 1) * s >= x.shape[dim] + head:
            keep -= 1
        index[dim] = slice(0, keep)
    return out[tuple(index)]


def _gather(node, ins, _):
    data, idx = ins[0], ins[1].long()
    axis = node.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1:]))


def _slice(node, ins, opset):
    x = ins[0]
    if opset < 10:
        starts, ends, axes, steps = node["starts"], node["ends"], node.get("axes"), None
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else None
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        size = x.shape[a]
        if st < 0:  # torch slicing has no negative step: gather the indices
            s, e = max(min(s + size if s < 0 else s, size - 1), -1), e + size if e < 0 else e
            x = x.index_select(a, torch.arange(s, max(e, -1), st, device=x.device))
            continue
        s, e = (v + size if v < 0 else v for v in (s, e))
        index[a] = slice(max(0, min(s, size)), max(0, min(e, size)), st)
    return x[tuple(index)]


def _reshape(node, ins, _):
    x, shape = ins[0], _ints(ins[1])
    if not node.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _split(node, ins, opset):
    x, axis = ins[0], node.get("axis", 0)
    sizes = (_ints(ins[1]) if opset >= 13 and len(ins) > 1 and ins[1] is not None
             else node.get("split"))
    if sizes is None:
        n = node.get("num_outputs", node["_n_outputs"])
        sizes = [math.ceil(x.shape[axis] / n)] * (n - 1)
        sizes.append(x.shape[axis] - sum(sizes))
    return list(torch.split(x, sizes, dim=axis))


def _reduce(fn):
    def run(node, ins, opset):
        since = 13 if fn is torch.sum else 18
        axes = _axes(node, ins, opset, since)
        keep = bool(node.get("keepdims", 1))
        if not axes:
            if node.get("noop_with_empty_axes", 0):
                return ins[0]
            axes = list(range(ins[0].dim()))
        return fn(ins[0], dim=axes, keepdim=keep)
    return run


def _softmax(node, ins, opset):
    x = ins[0]
    if opset >= 13:
        return torch.softmax(x, node.get("axis", -1))
    axis = node.get("axis", 1) % x.dim()  # opset < 13: softmax of the 2-D coerced input
    return torch.softmax(x.reshape(*x.shape[:axis], -1), -1).reshape(x.shape)


def _layer_norm(node, ins, _):
    x = ins[0]
    axis = node.get("axis", -1) % x.dim()
    return F.layer_norm(x, x.shape[axis:], ins[1], ins[2] if len(ins) > 2 else None,
                        node.get("epsilon", 1e-5))


def _resize(node, ins, _):
    x = ins[0]
    scales = ins[2] if len(ins) > 2 and ins[2] is not None and ins[2].numel() else None
    sizes = _ints(ins[3])[2:] if len(ins) > 3 and ins[3] is not None else None
    mode = node.get("mode", b"nearest").decode()
    coord = node.get("coordinate_transformation_mode", b"half_pixel").decode()
    factors = [float(s) for s in scales.tolist()[2:]] if scales is not None else None
    if mode == "nearest":
        return _resize_nearest(x, sizes, factors, coord,
                               node.get("nearest_mode", b"round_prefer_floor").decode())
    if mode != "linear" or coord not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        raise NotImplementedError(f"Resize mode {mode} with {coord} coordinates")
    kwargs = {"size": sizes} if sizes else {"scale_factor": factors,
                                            "recompute_scale_factor": False}
    torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 2]
    return F.interpolate(x, mode=torch_mode, align_corners=coord == "align_corners", **kwargs)


_NEAREST = {"round_prefer_floor": lambda v: torch.ceil(v - 0.5),
            "round_prefer_ceil": lambda v: torch.floor(v + 0.5),
            "floor": torch.floor, "ceil": torch.ceil}


# ONNX Resize's coordinate transformations: output index j -> input coordinate
_SOURCE = {
    "half_pixel": lambda j, scale, size, out: (j + 0.5) / scale - 0.5,
    "pytorch_half_pixel": lambda j, scale, size, out: (j + 0.5) / scale - 0.5 if out > 1 else j * 0,
    "align_corners": lambda j, scale, size, out: j * ((size - 1) / (out - 1)) if out > 1 else j * 0,
    "asymmetric": lambda j, scale, size, out: j / scale,
    "tf_half_pixel_for_nn": lambda j, scale, size, out: (j + 0.5) / scale,
}


def _resize_nearest(x, sizes, factors, coord: str, nearest_mode: str):
    """ONNX Resize, mode nearest, for every coordinate transformation and rounding: each
    output index mapped to an input index per spatial axis (the ONNX formulas), gathered."""
    if nearest_mode not in _NEAREST or coord not in _SOURCE:
        raise NotImplementedError(f"Resize nearest with {coord} coordinates, {nearest_mode}")
    for i in range(x.dim() - 2):
        axis, size = 2 + i, x.shape[2 + i]
        out = sizes[i] if sizes else int(math.floor(size * factors[i]))
        scale = out / size if sizes else factors[i]
        j = torch.arange(out, dtype=torch.float64, device=x.device)
        v = _SOURCE[coord](j, scale, size, out)
        index = _NEAREST[nearest_mode](v).clamp(0, size - 1).long()
        x = x.index_select(axis, index)
    return x


def _pad(node, ins, opset):
    x = ins[0]
    pads = _ints(ins[1]) if opset >= 11 else node["pads"]
    value = float(ins[2]) if len(ins) > 2 and ins[2] is not None and ins[2].numel() else 0.0
    axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(x.dim()))
    n = len(axes)
    pairs = {a % x.dim(): (pads[i], pads[i + n]) for i, a in enumerate(axes)}
    flat = [v for d in reversed(range(x.dim())) for v in pairs.get(d, (0, 0))]
    mode = node.get("mode", b"constant").decode()
    mode = {"edge": "replicate"}.get(mode, mode)
    while len(flat) > 2 and flat[-2:] == [0, 0]:
        flat = flat[:-2]
    return F.pad(x, flat, mode=mode, value=value) if mode == "constant" else F.pad(x, flat, mode)


def _depth_to_space(node, ins, _):
    x, b = ins[0], node["blocksize"]
    n, c, h, w = x.shape
    if node.get("mode", b"DCR").decode() == "CRD":
        return F.pixel_shuffle(x, b)
    x = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(n, c // (b * b), h * b, w * b)


def _gemm(node, ins, _):
    a = ins[0].t() if node.get("transA", 0) else ins[0]
    b = ins[1].t() if node.get("transB", 0) else ins[1]
    y = node.get("alpha", 1.0) * (a @ b)
    return y + node.get("beta", 1.0) * ins[2] if len(ins) > 2 and ins[2] is not None else y


def _div(node, ins, _):
    a, b = ins
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _clip(node, ins, opset):
    lo = ins[1] if opset >= 11 and len(ins) > 1 else node.get("min")
    hi = ins[2] if opset >= 11 and len(ins) > 2 else node.get("max")
    return torch.clamp(ins[0], lo, hi)


def _cumsum(node, ins, _):
    x, axis = ins[0], int(ins[1])
    if node.get("reverse", 0):
        x = x.flip(axis)
    y = torch.cumsum(x, axis)
    if node.get("exclusive", 0):
        y = y - x
    return y.flip(axis) if node.get("reverse", 0) else y


def _expand(node, ins, _):
    shape = torch.broadcast_shapes(ins[0].shape, tuple(_ints(ins[1])))
    return ins[0].expand(shape)


def _const_of_shape(node, ins, _):
    value = node.get("value")
    fill = torch.zeros(1) if value is None else value  # an attribute: made on the CPU
    return fill.to(ins[0].device).reshape(-1)[0].expand(_ints(ins[0])).clone()


def _cast(node, ins, _):
    return ins[0].to(DTYPES[node["to"]])


def _squeeze(node, ins, opset):
    axes = _axes(node, ins, opset, 13)
    return ins[0].squeeze() if axes is None else ins[0].squeeze(tuple(axes))


def _unsqueeze(node, ins, opset):
    x = ins[0]
    axes = sorted(a % (x.dim() + len(_axes(node, ins, opset, 13)))
                  for a in _axes(node, ins, opset, 13))
    for a in axes:
        x = x.unsqueeze(a)
    return x


def _per_axis(param, x, axis):
    """A per-tensor or per-axis scale/zero point shaped to broadcast against ``x``."""
    if param.dim() == 0 or param.numel() == 1:
        return param.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return param.reshape(shape)


def _quantize(node, ins, _):
    x, axis = ins[0], node.get("axis", 1)
    zp = ins[2] if len(ins) > 2 and ins[2] is not None else torch.zeros((), dtype=torch.uint8)
    info = torch.iinfo(zp.dtype)
    q = torch.round(x / _per_axis(ins[1], x, axis)) + _per_axis(zp, x, axis).float()
    return q.clamp(info.min, info.max).to(zp.dtype)


def _dequantize(node, ins, _):
    x, axis = ins[0], node.get("axis", 1)
    zp = ins[2] if len(ins) > 2 and ins[2] is not None else torch.zeros((), dtype=x.dtype)
    return (x.float() - _per_axis(zp, x, axis).float()) * _per_axis(ins[1], x, axis)


def _unary(fn):
    return lambda node, ins, _: fn(ins[0])


def _binary(fn):
    return lambda node, ins, _: fn(ins[0], ins[1])


OPS = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"), "Gemm": _gemm, "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul),
    "Div": _div, "Pow": _binary(torch.pow), "Mod": lambda n, i, _: (
        torch.fmod if n.get("fmod", 0) else torch.remainder)(i[0], i[1]),
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf), "Sqrt": _unary(torch.sqrt), "Cos": _unary(torch.cos),
    "Sin": _unary(torch.sin), "Exp": _unary(torch.exp), "Not": _unary(torch.logical_not),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Identity": _unary(lambda x: x),
    "HardSwish": _unary(F.hardswish), "HardSigmoid": lambda n, i, _: torch.clamp(
        n.get("alpha", 0.2) * i[0] + n.get("beta", 0.5), 0, 1),
    "Clip": _clip, "Where": lambda n, i, _: torch.where(i[0], i[1], i[2]),
    "Equal": _binary(torch.eq), "Softmax": _softmax, "LayerNormalization": _layer_norm,
    "BatchNormalization": lambda n, i, _: F.batch_norm(
        i[0], i[3].detach(), i[4].detach(), i[1], i[2], False, 0.0, n.get("epsilon", 1e-5)),
    "InstanceNormalization": lambda n, i, _: F.instance_norm(i[0], weight=i[1], bias=i[2],
                                                             eps=n.get("epsilon", 1e-5)),
    "GlobalAveragePool": lambda n, i, _: i[0].mean(tuple(range(2, i[0].dim())), keepdim=True),
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "ReduceL2": _reduce(lambda x, dim, keepdim: torch.linalg.vector_norm(x, 2, dim, keepdim)),
    "Reshape": _reshape, "Flatten": lambda n, i, _: i[0].reshape(
        math.prod(i[0].shape[:n.get("axis", 1)]), -1),
    "Transpose": lambda n, i, _: i[0].permute(n.get("perm", list(range(i[0].dim()))[::-1])),
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": lambda n, i, _: torch.cat(
        i, n["axis"]), "Split": _split, "Slice": _slice, "Gather": _gather,
    "Shape": lambda n, i, _: torch.tensor(i[0].shape[n.get("start", 0):n.get("end")],
                                          dtype=torch.int64, device=i[0].device),
    "Cast": _cast, "ConstantOfShape": _const_of_shape, "Expand": _expand, "CumSum": _cumsum,
    "Range": lambda n, i, _: torch.arange(i[0].item(), i[1].item(), i[2].item(),
                                          dtype=i[0].dtype, device=i[0].device),
    "Pad": _pad, "Resize": _resize, "DepthToSpace": _depth_to_space,
    # what onnxquant's output adds: weight/activation Q/DQ and the inlined log2 function
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize, "Log": _unary(torch.log),
    "Floor": _unary(torch.floor), "Round": _unary(torch.round), "Reciprocal": _unary(
        torch.reciprocal), "Max": _binary(torch.maximum), "Min": _binary(torch.minimum),
    "GreaterOrEqual": _binary(torch.ge), "Greater": _binary(torch.gt), "Less": _binary(torch.lt),
    "GatherElements": lambda n, i, _: torch.gather(
        i[0], n.get("axis", 0), torch.where(i[1] < 0, i[1] + i[0].shape[n.get("axis", 0)], i[1])),
}


def attribute(a: onnx.AttributeProto):
    value = onnx.helper.get_attribute_value(a)
    if isinstance(value, onnx.TensorProto):
        return torch.from_numpy(numpy_helper.to_array(value).copy())
    return value

