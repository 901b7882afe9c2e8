"""The log2 quantize/dequantize op as a model-local ONNX function.

    x -> onnxquant.Log2QuantDequant(bits, scale, zero_point, eps) -> x_hat

Declared in ``ModelProto.functions`` with a body of standard ops, so stock
onnxruntime and ``onnx.checker`` run and accept it with no extra library, and
``onnx.inliner`` can flatten it (every attribute is set on the node: the inliner
mishandles defaults declared in a FunctionProto, DESIGN.md §3). The node also
carries ``plugin_namespace``/``plugin_version`` so that TensorRT (>= 10.7) uses
the registered plugin of the same name instead of inlining the body.

The body computes exactly ``quantizers.log2_quantize``/``log2_dequantize``:

    q     = Clip(Round(Log(Max(double(x), eps)) * 1/(s ln2)) + z, 0, 2^bits - 1)
    x_hat = float(Exp((q - z) * s ln2))
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
BODY_OPSET = 17


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


def _const(out: str, value: float) -> NodeProto:
    tensor = helper.make_tensor(out, TensorProto.DOUBLE, [], [value])
    return helper.make_node("Constant", [], [out], value=tensor)


def _cast(inp: str, out: str, to: int = TensorProto.DOUBLE) -> NodeProto:
    return helper.make_node("Cast", [inp], [out], to=to)


def log2_function() -> FunctionProto:
    """The FunctionProto to append to ``ModelProto.functions`` (once per model)."""
    mk = helper.make_node
    nodes = [
        _const_ref("s32", "scale", "float"), _cast("s32", "s"),
        _const_ref("z64", "zero_point", "int"), _cast("z64", "z"),
        _const_ref("b64", "bits", "int"), _cast("b64", "b"),
        _const_ref("e32", "eps", "float"), _cast("e32", "e"),
        _const("ln2", LN2), _const("two", 2.0), _const("one", 1.0), _const("zero", 0.0),
        mk("Mul", ["s", "ln2"], ["s_ln2"]),
        mk("Reciprocal", ["s_ln2"], ["inv"]),
        mk("Pow", ["two", "b"], ["levels"]),
        mk("Sub", ["levels", "one"], ["qmax"]),
        _cast("X", "xd"),
        mk("Max", ["xd", "e"], ["xm"]),
        mk("Log", ["xm"], ["lx"]),
        mk("Mul", ["lx", "inv"], ["t"]),
        mk("Round", ["t"], ["r"]),
        mk("Add", ["r", "z"], ["rz"]),
        mk("Clip", ["rz", "zero", "qmax"], ["q"]),
        mk("Sub", ["q", "z"], ["qz"]),
        mk("Mul", ["qz", "s_ln2"], ["el"]),
        mk("Exp", ["el"], ["yd"]),
        _cast("yd", "Y", TensorProto.FLOAT),
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, ["X"], ["Y"], nodes,
        opset_imports=[helper.make_opsetid("", BODY_OPSET)],
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
        model.functions.append(log2_function())
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
