"""The log2 quantize/dequantize op as a model-local ONNX function.

    x -> onnxquant.Log2QuantDequant(bits, scale, zero_point, eps) -> x_hat

Declared in ``ModelProto.functions`` with a body of standard ops, so stock
onnxruntime and ``onnx.checker`` run and accept it with no extra library, and
``onnx.inliner`` can flatten it (every attribute is set on the node: the inliner
mishandles defaults declared in a FunctionProto, DESIGN.md §3). The node also
carries ``plugin_namespace``/``plugin_version`` so that TensorRT (>= 10.7) uses
the registered plugin of the same name instead of inlining the body.

The body computes exactly ``quantizers.log2_quantize``/``log2_dequantize``, in float32:

    tables (from the attributes only; folded once by the runtime):
        k = 0 .. 2^bits - 1 (float64);  levels = float(exp((k - z) s ln2))
        thresholds = float(exp(((k + 0.5) - z) s ln2)), NaN for the last code
    per element:
        xm = Max(x, eps);  c = Clip(Floor(Log(xm) / (s ln2) + z), 0, 2^bits - 1)
        q  = c + (xm >= thresholds[c])      # the float32 log estimate is off by < 1 code;
                                            # a comparison with NaN is false (x = +inf)
        y  = levels[q]

Floor of the estimate lands on the true code or one below it as long as the float32 log
error stays under half a code (it is ~1e-5 of one), and the single table comparison fixes
that, so the codes are exact whatever the runtime's Log rounds to. 12 elementwise ops, no
float64 transcendentals (onnxruntime's float64 Log is 8x slower than float32, not vectorized);
the lookups run on a flat view with GatherElements (Gather: 2.9 ms per 1M lookups on this
CPU, GatherElements 0.45 ms).
"""

from __future__ import annotations

import onnx
from onnx import FunctionProto, NodeProto, TensorProto, helper

from .quantizers import LN2, Log2Params

DOMAIN = "onnxquant"
DOMAIN_VERSION = 1
OP_TYPE = "Log2QuantDequant"
PLUGIN_VERSION = "1"
ATTRIBUTES = ("bits", "scale", "zero_point", "eps", "plugin_namespace", "plugin_version")
MIN_BODY_OPSET = 13  # Constant(value_float), GreaterOrEqual: 12; models below 13 are converted


def _const_ref(out: str, attr: str, kind: str) -> NodeProto:
    """Constant whose value is the function attribute ``attr``."""
    node = helper.make_node("Constant", [], [out])
    value_attr, attr_type = {
        "int": ("value_int", onnx.AttributeProto.INT),
        "float": ("value_float", onnx.AttributeProto.FLOAT),
    }[kind]
    node.attribute.append(helper.make_attribute_ref(value_attr, attr_type))
    node.attribute[0].ref_attr_name = attr
    return node


def _const(out: str, value: float, dtype: int = TensorProto.DOUBLE, dims=()) -> NodeProto:
    tensor = helper.make_tensor(out, dtype, list(dims), [value])
    return helper.make_node("Constant", [], [out], value=tensor)


def _cast(inp: str, out: str, to: int = TensorProto.DOUBLE) -> NodeProto:
    return helper.make_node("Cast", [inp], [out], to=to)


def _table_nodes() -> list:
    """levels / thresholds (float32, length 2^bits) and the scalars the hot path needs."""
    mk, f32 = helper.make_node, TensorProto.FLOAT
    return [
        _const_ref("s32", "scale", "float"), _cast("s32", "s"),
        _const_ref("z64", "zero_point", "int"), _cast("z64", "z"),
        _const_ref("b64", "bits", "int"), _cast("b64", "b"),
        _const("ln2", LN2), _const("two", 2.0), _const("one", 1.0), _const("zero", 0.0),
        _const("half", 0.5), _const("nan", float("nan"), f32),
        mk("Mul", ["s", "ln2"], ["s_ln2"]),
        mk("Pow", ["two", "b"], ["levels_n"]),
        mk("Sub", ["levels_n", "one"], ["qmax"]),
        mk("Range", ["zero", "levels_n", "one"], ["k"]),
        mk("Sub", ["k", "z"], ["kz"]), mk("Mul", ["kz", "s_ln2"], ["lv_log"]),
        mk("Exp", ["lv_log"], ["lv64"]), _cast("lv64", "levels", f32),
        mk("Add", ["k", "half"], ["kh"]), mk("Sub", ["kh", "z"], ["khz"]),
        mk("Mul", ["khz", "s_ln2"], ["th_log"]), mk("Exp", ["th_log"], ["th64"]),
        _cast("th64", "th32", f32), mk("Equal", ["k", "qmax"], ["is_last"]),
        mk("Where", ["is_last", "nan", "th32"], ["thresholds"]),
        mk("Reciprocal", ["s_ln2"], ["inv64"]), _cast("inv64", "inv", f32),
        _cast("z", "zf", f32), _cast("qmax", "qmaxf", f32), _const("zerof", 0.0, f32),
        _const_ref("eps", "eps", "float"),
    ]


def log2_function(opset: int = 17) -> FunctionProto:
    """The FunctionProto to append to ``ModelProto.functions`` (once per model).

    The body imports the model's own default-domain opset (onnxruntime refuses a function
    whose imports differ from the model's); its ops keep their meaning from 13 to 23.
    """
    if opset < MIN_BODY_OPSET:
        raise ValueError(f"the log2 function needs opset >= {MIN_BODY_OPSET}, got {opset}")
    mk = helper.make_node
    nodes = _table_nodes() + [
        # flat view: GatherElements on 1-D indices is 6x faster than Gather in onnxruntime
        mk("Shape", ["X"], ["x_shape"]),
        _const("flat", -1, TensorProto.INT64, [1]),
        mk("Reshape", ["X", "flat"], ["x_flat"]),
        mk("Max", ["x_flat", "eps"], ["xm"]),
        mk("Log", ["xm"], ["lx"]),
        mk("Mul", ["lx", "inv"], ["t0"]),
        mk("Add", ["t0", "zf"], ["t"]),
        mk("Floor", ["t"], ["tf"]),
        mk("Clip", ["tf", "zerof", "qmaxf"], ["cf"]),
        _cast("cf", "c", TensorProto.INT64),
        mk("GatherElements", ["thresholds", "c"], ["next_threshold"], axis=0),
        mk("GreaterOrEqual", ["xm", "next_threshold"], ["up_bool"]),
        _cast("up_bool", "up", TensorProto.INT64),
        mk("Add", ["c", "up"], ["q"]),
        mk("GatherElements", ["levels", "q"], ["y_flat"], axis=0),
        mk("Reshape", ["y_flat", "x_shape"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, ["X"], ["Y"], nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES),
    )


def log2_node_attrs(p: Log2Params) -> dict:
    """All attributes of a Log2QuantDequant node, set explicitly (see module docstring)."""
    return {
        "bits": int(p.bits), "scale": float(p.scale), "zero_point": int(p.zero_point),
        "eps": float(p.eps), "plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION,
    }


def params_from_attrs(attrs: dict) -> Log2Params:
    return Log2Params(float(attrs["scale"]), int(attrs["zero_point"]), int(attrs["bits"]),
                      float(attrs["eps"]))


def install(model: onnx.ModelProto) -> None:
    """Declare the function and its domain in ``model`` (idempotent)."""
    if not any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions):
        from .opset import model_opset

        model.functions.append(log2_function(model_opset(model)))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
