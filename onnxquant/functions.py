"""The log2 quantize/dequantize op as a model-local ONNX function.

    x -> onnxquant.Log2QuantDequant(bits, scale, zero_point, eps) -> x_hat

Declared in ``ModelProto.functions`` with a body of standard ops, so stock
onnxruntime and ``onnx.checker`` run and accept it with no extra library, and
``onnx.inliner`` can flatten it (every attribute is set on the node: the inliner
mishandles defaults declared in a FunctionProto, DESIGN.md §3). The node also
carries ``plugin_namespace``/``plugin_version`` so that TensorRT (>= 10.7) uses
the registered plugin of the same name instead of inlining the body.

Both bodies compute exactly ``quantizers.log2_quantize``/``log2_dequantize``, in float32,
from tables the runtime folds once (they depend on the attributes only):

    k = 0 .. 2^bits - 1 (float64);  levels = float(exp((k - z) s ln2))
    thresholds = float(snap(exp(((k + 0.5) - z) s ln2))), NaN for the last code
    (snap: to 10 mantissa bits, ``quantizers.snap_mantissa``)

"table" body (any opset >= 13; what TensorRT's parser reads when no plugin is registered):

    xm = Max(x, eps);  c = Clip(Floor(Log(xm) / (s ln2) + z), 0, 2^bits - 1)
    q  = c + (xm >= thresholds[c])      # the float32 log estimate is off by < 1 code;
                                        # a comparison with NaN is false (x = +inf)
    y  = levels[q]

Floor of the estimate lands on the true code or one below it as long as the float32 log
error plus the snap stays under half a code (1e-5 + 0.18 of one at the smallest step), and
the single table comparison fixes that. 12 elementwise ops, no float64 transcendentals
(onnxruntime's float64 Log is 8x slower than float32, not vectorized); the lookups run on a
flat view with GatherElements (Gather: 2.9 ms per 1M lookups on this CPU, GatherElements
0.45 ms).

"bitcast" body (opset >= 26, BitCast): every threshold is the first float32 of a bucket of
2^13 consecutive bit patterns (10 mantissa bits), so the code is a function of the bucket:

    i = BitCast(Clip(x, eps, thresholds[-2]), int32) / 2^13
    y = bucket_levels[i]                # every bucket from float 0 to the top code's

"bitcast_nonnegative" body: the same without the Clip, on a table over every non-negative
bit pattern (2^18 buckets, 1 MB; +inf and NaN get the top code). Exact for inputs >= 0 and
-0; a negative input would read the table from its end (GatherElements' negative indices)
and get a wrong code, so it is only installed where every log2 op reads a Softmax output
(log2_body.py), 12-18 % cheaper than with the Clip.

Three or four elementwise ops and one lookup instead of twelve, no Log (3 ns per element
in onnxruntime, its slowest elementwise op): 2.7-4x cheaper on onnxruntime CPU
(docs/log2_body.md). The bucket tables are built from the attributes and folded at load
like the others, with integer ops whose temporaries cover only eps's bucket to top's
(``_bucket_table``); starting a table at float 0 saves subtracting eps's bucket from every
element (11 % of the op's time on mobilevit_s).
"""

from __future__ import annotations

import onnx
from onnx import FunctionProto, NodeProto, TensorProto, helper

from .quantizers import LN2, SNAP_BITS, Log2Params

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
        mk("Mul", ["khz", "s_ln2"], ["th_log"]), mk("Exp", ["th_log"], ["th_raw"]),
        *_snap_nodes("th_raw", "th64"),
        _cast("th64", "th32", f32), mk("Equal", ["k", "qmax"], ["is_last"]),
        mk("Where", ["is_last", "nan", "th32"], ["thresholds"]),
        mk("Reciprocal", ["s_ln2"], ["inv64"]), _cast("inv64", "inv", f32),
        _cast("z", "zf", f32), _cast("qmax", "qmaxf", f32), _const("zerof", 0.0, f32),
        _const_ref("eps", "eps", "float"),
    ]


def _snap_nodes(inp: str, out: str) -> list:
    """float64 ``quantizers.snap_mantissa``: e = floor(log2 t), round(t 2^(B - e)) 2^(e - B).
    An exponent one off (log rounding at t ~ 2^n) lands on the same value: t is then within
    1e-15 of 2^n, which both grids hold."""
    mk = helper.make_node
    return [
        _const("inv_ln2", 1.0 / LN2), _const("snap_bits", float(SNAP_BITS)),
        mk("Log", [inp], ["sn_log"]), mk("Mul", ["sn_log", "inv_ln2"], ["sn_l2"]),
        mk("Floor", ["sn_l2"], ["sn_e"]), mk("Sub", ["snap_bits", "sn_e"], ["sn_up"]),
        mk("Pow", ["two", "sn_up"], ["sn_scale"]), mk("Mul", [inp, "sn_scale"], ["sn_m"]),
        mk("Round", ["sn_m"], ["sn_r"]), mk("Div", ["sn_r", "sn_scale"], [out]),
    ]


def _table_hot_path(x: str, y: str) -> list:
    """Codes and levels of the float32 tensor ``x`` (any shape) -> ``y``: the "table" body."""
    mk = helper.make_node
    return [
        # flat view: GatherElements on 1-D indices is 6x faster than Gather in onnxruntime
        mk("Shape", [x], [f"{x}_shape"]),
        _const(f"{x}_flat_shape", -1, TensorProto.INT64, [1]),
        mk("Reshape", [x, f"{x}_flat_shape"], [f"{x}_flat"]),
        mk("Max", [f"{x}_flat", "eps"], [f"{x}_xm"]),
        mk("Log", [f"{x}_xm"], [f"{x}_lx"]),
        mk("Mul", [f"{x}_lx", "inv"], [f"{x}_t0"]),
        mk("Add", [f"{x}_t0", "zf"], [f"{x}_t"]),
        mk("Floor", [f"{x}_t"], [f"{x}_tf"]),
        mk("Clip", [f"{x}_tf", "zerof", "qmaxf"], [f"{x}_cf"]),
        _cast(f"{x}_cf", f"{x}_c", TensorProto.INT64),
        mk("GatherElements", ["thresholds", f"{x}_c"], [f"{x}_next"], axis=0),
        mk("GreaterOrEqual", [f"{x}_xm", f"{x}_next"], [f"{x}_up_bool"]),
        _cast(f"{x}_up_bool", f"{x}_up", TensorProto.INT64),
        mk("Add", [f"{x}_c", f"{x}_up"], [f"{x}_q"]),
        mk("GatherElements", ["levels", f"{x}_q"], [f"{x}_y"], axis=0),
        mk("Reshape", [f"{x}_y", f"{x}_shape"], [y]),
    ]


def _bitcast_nodes(clip: bool = True) -> list:
    """The "bitcast" body: the bucket table (folded at load), then the hot path: Clip,
    BitCast, Div, lookup. ``clip=False`` ("bitcast_nonnegative"): no Clip, a table over
    every non-negative bit pattern instead (exact for inputs >= 0 and -0, NaN, +inf)."""
    mk, i32, i64 = helper.make_node, TensorProto.INT32, TensorProto.INT64
    shift = 23 - SNAP_BITS
    x = "xc" if clip else "x_flat"
    return [
        _const("bucket", 2**shift, i32), _const("one_i", 1, i32),
        _const("top_index", -2, i64),  # the last threshold: everything above has the top code
        mk("Gather", ["thresholds", "top_index"], ["top_1"], axis=0),
        mk("Max", ["top_1", "eps"], ["top"]),
        mk("BitCast", ["top"], ["top_bits"], to=i32), mk("Div", ["top_bits", "bucket"], ["hi"]),
        mk("BitCast", ["eps"], ["eps_bits"], to=i32), mk("Div", ["eps_bits", "bucket"], ["lo"]),
        *([mk("Add", ["hi", "one_i"], ["n"])] if clip else  # the table ends at top's bucket
          [_const("n", 2 ** (31 - shift), i32)]),  # every non-negative pattern, +inf, NaN
        *_bucket_table("bucket_levels"),
        mk("Shape", ["X"], ["x_shape"]),
        _const("flat", -1, i64, [1]),
        mk("Reshape", ["X", "flat"], ["x_flat"]),
        *([mk("Clip", ["x_flat", "eps", "top"], ["xc"])] if clip else []),
        mk("BitCast", [x], ["x_bits"], to=i32),
        mk("Div", ["x_bits", "bucket"], ["i"]),
        mk("GatherElements", ["bucket_levels", "i"], ["y_flat"], axis=0),
        mk("Reshape", ["y_flat", "x_shape"], ["Y"]),
    ]


def _bucket_table(out: str) -> list:
    """``out[i]``: the level of every float32 whose bits / 2^13 is i, for i < n.

    Each threshold is the first float of a bucket, so the code of bucket i (from eps's,
    ``lo``, to top's, ``hi``) is the number of thresholds at or below its first float, and
    at least eps's: a running sum of how many thresholds start in each bucket, those at or
    below eps counted in eps's. Buckets below eps's have eps's code, those above top's the
    top code: one Pad repeats the end values. Integer ops, and every temporary covers only
    lo..hi: onnxruntime's constant folding holds them all at once and the process keeps that
    memory after loading (running the table body on every bucket's first float instead took
    about 12 MB per log2 node; now the table itself is all that stays).
    """
    mk, i32, i64 = helper.make_node, TensorProto.INT32, TensorProto.INT64
    return [
        _const("all_but_last", -1, i64, [1]), _const("start", 0, i64, [1]),
        _const("flat_1", -1, i64, [1]), _const("zero_i", 0, i32),
        mk("Slice", ["thresholds", "start", "all_but_last"], ["bounds"]),
        mk("BitCast", ["bounds"], ["bounds_bits"], to=i32),
        mk("Div", ["bounds_bits", "bucket"], ["bounds_bucket"]),
        mk("Sub", ["bounds_bucket", "lo"], ["above_lo"]),
        mk("LessOrEqual", ["bounds", "eps"], ["below_eps"]),
        mk("Where", ["below_eps", "zero_i", "above_lo"], ["counted_at"]),
        mk("Sub", ["hi", "lo"], ["span_1"]), mk("Add", ["span_1", "one_i"], ["span"]),
        mk("Reshape", ["span", "flat_1"], ["span_v"]), mk("Cast", ["span_v"], ["span_64"], to=i64),
        mk("ConstantOfShape", ["span_64"], ["zeros"],
           value=helper.make_tensor("", i32, [1], [0])),
        mk("Shape", ["bounds"], ["n_bounds"]),
        mk("Expand", ["one_i", "n_bounds"], ["ones"]),
        mk("ScatterElements", ["zeros", "counted_at", "ones"], ["counts"], axis=0,
           reduction="add"),
        mk("CumSum", ["counts", "zero_i"], ["codes"]),
        mk("GatherElements", ["levels", "codes"], ["lo_to_hi"], axis=0),
        # below lo: eps's code, above hi: the top code (Pad "edge" repeats the end values)
        mk("Sub", ["n", "hi"], ["n_above_1"]), mk("Sub", ["n_above_1", "one_i"], ["n_above"]),
        mk("Reshape", ["lo", "flat_1"], ["lo_v"]),
        mk("Reshape", ["n_above", "flat_1"], ["above_v"]),
        mk("Concat", ["lo_v", "above_v"], ["pads_32"], axis=0),
        mk("Cast", ["pads_32"], ["pads"], to=i64),
        mk("Pad", ["lo_to_hi", "pads"], [out], mode="edge"),
    ]


BODIES = ("table", "bitcast", "bitcast_nonnegative")
BITCAST_OPSET = 26  # BitCast


def log2_function(opset: int = 17, body: str = "table") -> FunctionProto:
    """The FunctionProto to append to ``ModelProto.functions`` (once per model).

    The body imports the model's own default-domain opset (onnxruntime refuses a function
    whose imports differ from the model's); the table body's ops keep their meaning from 13
    to 26, the bitcast body needs 26.
    """
    if body not in BODIES:
        raise ValueError(f"body must be one of {BODIES}, got {body!r}")
    least = MIN_BODY_OPSET if body == "table" else BITCAST_OPSET
    if opset < least:
        raise ValueError(f"the log2 function's {body} body needs opset >= {least}, got {opset}")
    hot = {"table": lambda: _table_hot_path("X", "Y"), "bitcast": _bitcast_nodes,
           "bitcast_nonnegative": lambda: _bitcast_nodes(clip=False)}[body]
    nodes = _table_nodes() + hot()
    for i, node in enumerate(nodes):  # names that profiles and inlined graphs show
        node.name = f"{body}_{i}_{node.op_type}"
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


def is_log2(node: NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def has_log2_ops(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s main graph holds a log2 op (and so needs the function)."""
    return any(is_log2(n) for n in model.graph.node)


def install(model: onnx.ModelProto, body: str = "table") -> None:
    """Declare the function (with ``body``, at the model's opset) and its domain in
    ``model``; an existing declaration is replaced (so that a body can be swapped)."""
    from .opset import model_opset

    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del model.functions[:]
    model.functions.extend(kept)
    model.functions.append(log2_function(model_opset(model), body))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
