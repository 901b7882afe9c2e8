"""Compare ONNX -> PyTorch routes for block reconstruction (docs/blocks.md).

    onnx2torch   onnx2torch.convert(model)            -> torch.fx.GraphModule
    onnx2pytorch onnx2pytorch.ConvertModel(model)     -> nn.Module
    interp       OnnxInterpreter(model) (below)       -> nn.Module running the graph node by
                                                         node in torch (68 op types, a prototype)

On the 12 timm hybrids of models/zoo.py (seeded random weights, exported with
``onnxquant.models.export.zoo_cache`` at 64 px, timm's own size where 64 px does not run)
and the real models in ../shared/assets/real (opset 11 as shipped, and after
``onnx.version_converter.convert_version(m, 13)``), per converter: does it convert (ops it
lacks), max |torch - onnxruntime| on a seeded input, forward time (median of 20, one
thread, torch.inference_mode), whether a backward pass runs and reaches the weights
(fraction of the ONNX float initializer elements whose parameter gets a gradient), and,
for onnxquant's canonical graph (``--forms canonical``) or its quantized output
(``--forms quantized-paper quantized-tensorrt``), how many extracted blocks
(onnxquant.blocks) convert and match onnxruntime on their real boundary values.

Installs nothing; run it in a venv with torch, timm, onnx, onnxruntime, onnx2torch,
onnx2pytorch and this project (docs/blocks.md has the commands):

    python tools/onnx2torch_compare.py --out /tmp/o2t            # all models, raw + canonical
    python tools/onnx2torch_compare.py --models mobilevit_xxs --converters interp
    python tools/onnx2torch_compare.py --summarize /tmp/o2t/results.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper

REAL = Path(__file__).resolve().parents[2] / "shared" / "assets" / "real"
REAL_SHAPES = {"PP-OCRv6_rec_small": (1, 3, 48, 160), "PP-OCRv6_det_small": (1, 3, 128, 128)}
CONVERTERS = ("onnx2torch", "onnx2pytorch", "interp")

# ---- the prototype: interpret the ONNX graph node by node in torch ----------------------

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


def _pad_for(x, node, kernel, value=0.0):
    """Apply ONNX ``pads``/``auto_pad`` explicitly (torch's padding is symmetric only)."""
    n = len(kernel)
    strides, dil = node.get("strides", [1] * n), node.get("dilations", [1] * n)
    auto = node.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pairs = _same_pads(x, kernel, strides, dil, auto == "SAME_UPPER")
    else:
        p = node.get("pads", [0] * 2 * n)
        pairs = list(zip(p[:n], p[n:]))
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
    assert p[:n] == p[n:], "asymmetric ConvTranspose pads"
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d}[n]
    return fn(ins[0], w, ins[2] if len(ins) > 2 else None, node.get("strides", 1), p[:n],
              node.get("output_padding", 0), node.get("group", 1), node.get("dilations", 1))


def _pool(kind):
    def run(node, ins, _):
        kernel = node["kernel_shape"]
        x = _pad_for(ins[0], node, kernel, float("-inf") if kind == "max" else 0.0)
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d}[len(kernel)]
            return fn(x, kernel, node.get("strides", kernel), 0, node.get("dilations", 1),
                      bool(node.get("ceil_mode", 0)))
        pads = node.get("pads", [0] * 2 * len(kernel))
        if any(pads) and not node.get("count_include_pad", 0):  # average over real inputs
            ones = _pad_for(torch.ones_like(ins[0][:1, :1]), node, kernel)
            fn = {1: F.avg_pool1d, 2: F.avg_pool2d}[len(kernel)]
            s = node.get("strides", kernel)
            return fn(x, kernel, s, 0, bool(node.get("ceil_mode", 0))) / fn(ones, kernel, s, 0)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d}[len(kernel)]
        return fn(x, kernel, node.get("strides", kernel), 0, bool(node.get("ceil_mode", 0)))
    return run


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
    kwargs = {"size": sizes} if sizes else {
        "scale_factor": [float(s) for s in scales.tolist()[2:]], "recompute_scale_factor": False}
    if mode == "nearest":
        assert coord == "asymmetric" and node.get("nearest_mode", b"").decode() == "floor", coord
        return F.interpolate(x, mode="nearest", **kwargs)
    torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.dim() - 2]
    assert mode == "linear" and coord in ("half_pixel", "pytorch_half_pixel", "align_corners")
    return F.interpolate(x, mode=torch_mode, align_corners=coord == "align_corners", **kwargs)


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
    fill = torch.zeros(1) if value is None else value
    return fill.reshape(-1)[0].expand(_ints(ins[0])).clone()


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
                                          dtype=torch.int64),
    "Cast": _cast, "ConstantOfShape": _const_of_shape, "Expand": _expand, "CumSum": _cumsum,
    "Range": lambda n, i, _: torch.arange(i[0].item(), i[1].item(), i[2].item(),
                                          dtype=i[0].dtype),
    "Pad": _pad, "Resize": _resize, "DepthToSpace": _depth_to_space,
    # what onnxquant's output adds: weight/activation Q/DQ and the inlined log2 function
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize, "Log": _unary(torch.log),
    "Floor": _unary(torch.floor), "Round": _unary(torch.round), "Reciprocal": _unary(
        torch.reciprocal), "Max": _binary(torch.maximum), "Min": _binary(torch.minimum),
    "GreaterOrEqual": _binary(torch.ge), "Greater": _binary(torch.gt), "Less": _binary(torch.lt),
    "GatherElements": lambda n, i, _: torch.gather(
        i[0], n.get("axis", 0), torch.where(i[1] < 0, i[1] + i[0].shape[n.get("axis", 0)], i[1])),
}


def _attr(a: onnx.AttributeProto):
    value = onnx.helper.get_attribute_value(a)
    if isinstance(value, onnx.TensorProto):
        return torch.from_numpy(numpy_helper.to_array(value).copy())
    return value


def _resolve(name: str, alias: dict) -> str:
    """The initializer behind an Identity chain (torch.onnx de-duplicates equal tensors)."""
    while name in alias:
        name = alias[name]
    return name


class OnnxInterpreter(torch.nn.Module):
    """Run an ONNX graph in torch, node by node. Float initializers become trainable
    parameters (the weights reconstruction learns); BatchNormalization statistics and
    everything else are buffers."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        missing = sorted({n.op_type for n in model.graph.node if n.op_type not in OPS and n.op_type != "Constant"})
        if missing:
            raise NotImplementedError(f"ops not implemented: {', '.join(missing)}")
        self.params, self.names = torch.nn.ParameterList(), {}
        alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
        stats = {_resolve(t, alias) for n in model.graph.node
                 if n.op_type == "BatchNormalization" for t in n.input[3:5]}
        for init in model.graph.initializer:
            value = torch.from_numpy(numpy_helper.to_array(init).copy())
            if value.is_floating_point() and init.name not in stats:
                self.names[init.name] = ("p", len(self.params))
                self.params.append(torch.nn.Parameter(value))
            else:
                self.names[init.name] = ("b", f"buf{len(self.names)}")
                self.register_buffer(f"buf{len(self.names) - 1}", value)
        self.nodes = []
        for node in model.graph.node:
            attrs = {a.name: _attr(a) for a in node.attribute}
            attrs["_n_outputs"] = len(node.output)
            if node.op_type == "Constant":
                self.register_buffer(f"const{len(self.nodes)}", next(
                    v if torch.is_tensor(v) else torch.tensor(v) for k, v in attrs.items()
                    if k != "_n_outputs"))
            self.nodes.append((node.op_type, list(node.input), list(node.output), attrs))
        self.inputs = [i.name for i in model.graph.input if i.name not in self.names]
        self.outputs = [o.name for o in model.graph.output]

    def _value(self, name):
        kind, key = self.names[name]
        return self.params[key] if kind == "p" else getattr(self, key)

    def forward(self, *args):
        env = dict(zip(self.inputs, args))
        for k, (op, ins, outs, attrs) in enumerate(self.nodes):
            if op == "Constant":
                env[outs[0]] = getattr(self, f"const{k}")
                continue
            values = [None if not t else env[t] if t in env else self._value(t) for t in ins]
            result = OPS[op](attrs, values, self.opset)
            for name, value in zip(outs, result if isinstance(result, list) else [result]):
                env[name] = value
        out = [env[o] for o in self.outputs]
        return out[0] if len(out) == 1 else out


# ---- the harness -----------------------------------------------------------------------------

def unsupported(model: onnx.ModelProto, converter: str) -> list:
    """Op types of ``model`` the converter has no mapping for (static check)."""
    ops = sorted({(n.domain or "", n.op_type) for n in model.graph.node})
    opset = {o.domain or "": o.version for o in model.opset_import}
    if converter == "interp":
        return [op for _, op in ops if op not in OPS and op != "Constant"]
    if converter == "onnx2torch":
        from onnx2torch.node_converters.registry import get_converter

        lacking = []
        for domain, op in ops:
            try:
                get_converter(op, opset.get(domain, 1), domain)
            except NotImplementedError:
                lacking.append(op)
        return lacking
    import inspect

    from onnx2pytorch.convert import operations

    source = inspect.getsource(operations)
    return [op for _, op in ops if f'"{op}"' not in source]


def convert(model: onnx.ModelProto, converter: str) -> torch.nn.Module:
    """The converter's module for a copy of ``model`` (onnx2pytorch edits the model it
    converts: PP-OCRv6_rec's BatchNormalization inputs)."""
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    model = fresh
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if converter == "onnx2torch":
            import onnx2torch

            return onnx2torch.convert(model)
        if converter == "onnx2pytorch":
            from onnx2pytorch import ConvertModel

            return ConvertModel(model, experimental=True)
        return OnnxInterpreter(model)


def median_time(fn, runs: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _first(out):
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out


def gradient_reach(module: torch.nn.Module, x: torch.Tensor, model: onnx.ModelProto) -> dict:
    """Backward of sum(output^2): does it run, and what share of the ONNX float weight
    elements (BatchNormalization statistics excluded) sit in parameters that receive a
    gradient (capped at 1: a converter may add parameters of its own)."""
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    stats = {_resolve(t, alias) for n in model.graph.node
             if n.op_type == "BatchNormalization" for t in n.input[3:5]}
    weights = sum(int(np.prod(i.dims)) for i in model.graph.initializer
                  if i.data_type in (1, 10, 11, 16) and i.name not in stats)
    for p in module.parameters():
        p.requires_grad_(True)
        p.grad = None
    out = _first(module(x))
    (out.float() ** 2).sum().backward()
    reached = sum(p.numel() for p in module.parameters() if p.grad is not None)
    params = sum(p.numel() for p in module.parameters())
    return {"backward": True, "params": params, "weights": weights,
            "reached": round(min(1.0, reached / max(weights, 1)), 3)}


def block_coverage(model: onnx.ModelProto, blocks: list, x: np.ndarray, converters: list) -> dict:
    """Per converter: how many blocks (onnxquant.blocks.extract of the canonical graph)
    convert and match onnxruntime within 1e-4 of their output's max |value|."""
    from onnxquant.blocks import Block, block_inputs, extract, value_types

    every = Block("conv_block", "all", inputs=tuple({t for b in blocks for t in b.outputs}))
    values = {model.graph.input[0].name: x, **block_inputs(model, every, {model.graph.input[0].name: x})}
    types = value_types(model)
    counts = {c: 0 for c in converters}
    failures = {c: {} for c in converters}
    for b in blocks:
        sub = extract(model, b, types)
        args = [torch.from_numpy(np.ascontiguousarray(values[i.name])) for i in sub.graph.input]
        for c in converters:
            try:
                with torch.inference_mode():
                    out = convert(sub, c).eval()(*args)
                out = out if isinstance(out, (list, tuple)) else [out]
                ok = all(np.abs(np.asarray(o, np.float64) - values[t]).max()
                         <= 1e-4 * np.abs(values[t]).max() + 1e-6
                         for o, t in zip(out, b.outputs))
                counts[c] += ok
                if not ok:
                    failures[c]["wrong numerics"] = failures[c].get("wrong numerics", 0) + 1
            except Exception as err:  # noqa: BLE001 - counted per kind of error
                key = f"{type(err).__name__}: {str(err).splitlines()[0][:60]}" if str(err) else type(err).__name__
                failures[c][key] = failures[c].get(key, 0) + 1
    return {c: {"ok": counts[c], "blocks": len(blocks), "failures": failures[c]} for c in converters}


def measure(model: onnx.ModelProto, x: np.ndarray, converter: str, runs: int, ref) -> dict:
    row = {"unsupported": unsupported(model, converter)}
    t = time.perf_counter()
    try:
        module = convert(model, converter).eval()
    except Exception as err:  # noqa: BLE001 - recorded, not raised: this is the comparison
        row["error"] = f"convert: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    row["convert_s"] = round(time.perf_counter() - t, 2)
    xt = torch.from_numpy(x)
    try:
        with torch.inference_mode():
            out = _first(module(xt)).float().numpy()
            row["forward_ms"] = round(1e3 * median_time(lambda: module(xt), runs), 2)
    except Exception as err:  # noqa: BLE001
        row["error"] = f"forward: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    if out.shape != ref.shape:
        row["error"] = f"output shape {out.shape} vs {ref.shape}"
        return row
    row["max_abs"] = float(np.abs(out - ref).max())
    row["rel"] = float(row["max_abs"] / max(float(np.abs(ref).max()), 1e-30))
    try:
        row.update(gradient_reach(module, xt, model))
    except Exception as err:  # noqa: BLE001
        row["backward"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return row


def ort_reference(model: onnx.ModelProto, x: np.ndarray, runs: int):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    out = session.run(None, feed)[0]
    return out, round(1e3 * median_time(lambda: session.run(None, feed), runs), 2)


def zoo_models(size: int, names=None) -> list:
    """(label, path, input shape) of the zoo exports, exporting once into the zoo cache."""
    from onnxquant.models import zoo
    from onnxquant.models.export import zoo_cache

    found = []
    for name in names or zoo.names():
        try:
            path, side = zoo_cache(name, input_size=size), size
        except Exception:  # noqa: BLE001 - fixed-size models (EfficientFormer v1): timm's size
            path, side = zoo_cache(name), zoo.get(name).input_size
        found.append((name, path, (1, 3, side, side)))
    return found


def real_models(names=None) -> list:
    """(label, ModelProto loader, shape): as shipped (opset 11) and converted to 13."""
    from onnx import version_converter

    found = []
    for stem, shape in REAL_SHAPES.items():
        path = REAL / f"{stem}.onnx"
        if not path.exists() or (names and stem not in names):
            continue
        found.append((f"{stem} (opset 11)", path, shape))
        found.append((f"{stem} (opset 13)",
                      lambda p=path: version_converter.convert_version(onnx.load(p), 13), shape))
    return found


def canonical(model: onnx.ModelProto):
    """(graph, block map) as onnxquant makes them: Identity/Dropout/no-op Cast bypassed,
    inference BatchNormalization folded into its Conv; blocks are extracted from this."""
    import onnx_graphsurgeon as gs

    import onnxquant

    graph, plan = onnxquant.analyze(model)
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    return out, plan.blocks


def static_shapes(model: onnx.ModelProto, shape) -> onnx.ModelProto:
    """Fix the input to ``shape`` and infer every tensor's shape, propagating Shape values:
    onnx2torch sizes nn.LayerNorm from the inferred shape of its input."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, shape):
        dim.Clear()
        dim.dim_value = size
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def quantized(model: onnx.ModelProto, target: str, shape):
    """(onnxquant output with its model-local functions inlined, blocks of its float
    graph): the form block reconstruction starts from. Calibration: 4 seeded images."""
    from onnx import inliner

    import onnxquant

    calib = np.random.default_rng(1).standard_normal((4, *shape[1:])).astype(np.float32)
    quant = onnxquant.quantize(model, onnxquant.QuantConfig(target=target), calibration=calib)
    upgraded, _ = onnxquant.opset.upgrade(model, "model")
    return inliner.inline_local_functions(quant), canonical(upgraded)[1]


def _form(model, form: str, shape):
    if form == "canonical":
        return canonical(model)
    if form.startswith("quantized-"):
        return quantized(model, form.split("-", 1)[1], shape)
    return model, []


def run_all(models: list, converters: list, runs: int, forms: list, with_blocks=True) -> list:
    rows = []
    for (name, source, shape), form in [(m, f) for m in models for f in forms]:
        model = source() if callable(source) else onnx.load(str(source))
        model, blocks = _form(model, form, shape)
        model = static_shapes(model, shape)
        label = f"{name} [{form}]"
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        ref, ort_ms = ort_reference(model, x, runs)
        row = {"model": label, "shape": list(shape), "nodes": len(model.graph.node),
               "ops": len({n.op_type for n in model.graph.node}), "ort_ms": ort_ms,
               "ref_max": float(np.abs(ref).max())}
        for converter in converters:
            try:
                row[converter] = measure(model, x, converter, runs, ref)
            except Exception:  # noqa: BLE001 - a crash of one converter is a result too
                row[converter] = {"error": traceback.format_exc().splitlines()[-1][:160]}
        if blocks and with_blocks:
            row["blocks"] = block_coverage(model, blocks, x, converters)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _cell(r: dict) -> str:
    if "error" in r:
        lacking = f" (lacks {', '.join(r['unsupported'])})" if r.get("unsupported") else ""
        return f"fails{lacking}: {r['error'][:70]}"
    grad = (f"grad {r['reached']:.0%}" if r.get("backward") is True
            else f"no backward ({str(r.get('backward'))[:40]})")
    return f"{r['rel']:.0e} rel / {r['forward_ms']:.1f} ms / {grad}"


def table(rows: list, converters: list) -> str:
    """Markdown: per model, per converter 'max rel diff / forward ms / gradient reach
    [/ extracted blocks that convert and match]'."""
    head = "| model | nodes | ops | onnxruntime ms | " + " | ".join(converters) + " |"
    lines = [head, "|" + "---|" * (4 + len(converters))]
    for row in rows:
        blocks = row.get("blocks", {})
        cells = [_cell(row[c]) + (f" / blocks {blocks[c]['ok']}/{blocks[c]['blocks']}"
                                  if c in blocks else "") for c in converters]
        lines.append(f"| {row['model']} | {row['nodes']} | {row['ops']} | {row['ort_ms']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


REASONS = (  # error text -> what it means, for the summary tables
    ("onnx::Conv_", "weight behind Identity"), ("conv_dw.bias", "weight behind Identity"),
    ("missing 2 required positional", "weight behind Identity"),
    ("takes 2 positional arguments", "weight behind Identity"),
    ("normalized_shape", "LayerNorm needs static shapes"), ("SAME_UPPER", "no auto_pad SAME_UPPER"),
    ("training_mode", "BatchNorm training_mode attr"), ("Converter is not implemented", "no Q/DQ"),
    ("IndexError", "IndexError on Q/DQ graph"))


def _short(r: dict) -> str:
    if "error" in r:
        return "fails: " + next((why for key, why in REASONS if key in r["error"]), r["error"][:40])
    return f"ok {r['rel']:.0e}" if r["rel"] < 1e-3 else f"wrong output (rel {r['rel']:.0e})"


def summary(rows: list, converters: list) -> str:
    """Compact tables: whole models (raw | canonical or quantized) and, per model, blocks
    that match / gradient reach / forward ms (median of the timed runs, one thread)."""
    models = list(dict.fromkeys(r["model"].rsplit(" [", 1)[0] for r in rows))
    forms = list(dict.fromkeys(r["model"].rsplit(" [", 1)[1][:-1] for r in rows))
    by = {(r["model"].rsplit(" [", 1)[0], r["model"].rsplit(" [", 1)[1][:-1]): r for r in rows}
    head = "| model | " + " | ".join(f"{c} {f}" for c in converters for f in forms) + " |"
    lines = [head, "|---|" + "---|" * (len(converters) * len(forms))]
    for m in models:
        cells = [_short(by[m, f][c]) if (m, f) in by else "" for c in converters for f in forms]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| model [form] | blocks matching: " + " / ".join(converters) +
              " | gradient reach | forward ms: onnxruntime / " + " / ".join(converters) + " |",
              "|---|---|---|---|"]
    for r in rows:
        if "blocks" not in r:
            continue
        blocks = " / ".join(f"{r['blocks'][c]['ok']}/{r['blocks'][c]['blocks']}" for c in converters)
        grad = " / ".join(f"{r[c]['reached']:.0%}" if r[c].get("backward") is True else "-"
                          for c in converters)
        ms = " / ".join(f"{r[c]['forward_ms']:.0f}" if "forward_ms" in r[c] else "-"
                        for c in converters)
        lines.append(f"| {r['model']} | {blocks} | {grad} | {r['ort_ms']:.1f} / {ms} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="zoo names or real model stems (default: all)")
    parser.add_argument("--converters", nargs="*", default=list(CONVERTERS), choices=CONVERTERS)
    parser.add_argument("--size", type=int, default=64, help="zoo export side (default 64)")
    parser.add_argument("--runs", type=int, default=20, help="timed forward passes (median)")
    parser.add_argument("--no-blocks", action="store_true",
                        help="skip converting every extracted block of the canonical graph")
    parser.add_argument("--no-real", action="store_true", help="skip ../shared/assets/real")
    parser.add_argument("--forms", nargs="*", default=["raw", "canonical"],
                        choices=["raw", "canonical", "quantized-paper", "quantized-tensorrt"],
                        help="the exported graph as it is, onnxquant's canonical graph (what "
                        "blocks are extracted from), onnxquant's output for a target")
    parser.add_argument("--out", type=Path,
                        help="folder for results.json, table.md and summary.md")
    parser.add_argument("--summarize", type=Path, nargs="*",
                        help="only print the summary tables of these results.json files")
    args = parser.parse_args(argv)
    if args.summarize:
        rows = [r for path in args.summarize for r in json.loads(path.read_text())]
        print(summary(rows, args.converters))
        return 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from onnxquant.models import zoo

    zoo_names = [n for n in (args.models or zoo.names()) if n in zoo.names(True)]
    models = zoo_models(args.size, zoo_names) if zoo_names or not args.models else []
    if not args.no_real:
        models += real_models([n for n in args.models or [] if n not in zoo_names] or None)
    rows = run_all(models, args.converters, args.runs, args.forms, not args.no_blocks)
    md = table(rows, args.converters)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
        (args.out / "table.md").write_text(md + "\n")
        (args.out / "summary.md").write_text(summary(rows, args.converters) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
