"""The torch executor's ops (torch_ops.py) one node at a time against onnxruntime, on the
attribute variants exporters write: every block the torch methods step through is built
from these (mutation testing found most of them executed by no test: docs/mutation.md)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from graphs import run_ort  # noqa: E402
from onnxquant.torch_graph import GraphModule  # noqa: E402

pytestmark = pytest.mark.torch
F32 = TensorProto.FLOAT


def _model(op: str, shapes: dict, consts: dict, attrs: dict, opset: int, outputs: int = 1):
    """One ``op`` node: float inputs of ``shapes`` (graph inputs), ``consts`` as
    initializers (an empty name: an omitted optional input), in the given order."""
    names = list(shapes) + list(consts)
    order = attrs.pop("_order", names)
    node = helper.make_node(op, order, [f"y{i}" for i in range(outputs)], **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info(n, F32, s) for n, s in shapes.items()],
        [helper.make_tensor_value_info(f"y{i}", F32, None) for i in range(outputs)],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in consts.items() if n])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _check(model, shapes: dict, seed: int = 0, atol: float = 1e-5):
    rng = np.random.default_rng(seed)
    feed = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    want = run_ort(model, feed)
    with torch.no_grad():
        got = GraphModule(model).run({k: torch.from_numpy(v) for k, v in feed.items()})
    for i, w in enumerate(want):
        g = got[f"y{i}"].numpy()
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol)


I64 = np.int64
X4 = {"x": [2, 4, 7, 6]}
CASES = {
    "pad-constant": ("Pad", X4, {"p": np.array([0, 1, 2, 0, 0, 0, 1, 3], I64),
                                 "v": np.float32(0.5)}, {}, 17),
    "pad-reflect": ("Pad", X4, {"p": np.array([0, 0, 2, 1, 0, 0, 1, 2], I64)},
                    {"mode": "reflect"}, 17),
    "pad-edge": ("Pad", X4, {"p": np.array([0, 0, 1, 3, 0, 0, 2, 0], I64)}, {"mode": "edge"}, 17),
    "pad-negative": ("Pad", X4, {"p": np.array([0, 0, -1, 1, 0, 0, 2, -2], I64)}, {}, 17),
    "pad-axes-opset-18": ("Pad", X4, {"p": np.array([2, 1, 0, 3], I64), "": None,
                                      "ax": np.array([-1, 1], I64)},
                          {"mode": "reflect", "_order": ["x", "p", "", "ax"]}, 18),
    "pad-opset-11-axes-all": ("Pad", X4, {"p": np.array([1, 0, 0, 1, 0, 1, 1, 0], I64)}, {}, 11),
    "resize-nearest-asymmetric": ("Resize", X4, {"": None, "s": np.array([1, 1, 2, 2], np.float32)},
                                  {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                   "nearest_mode": "floor", "_order": ["x", "", "s"]}, 13),
    **{f"resize-nearest-{coord}-{rounding}-{how}": (
        "Resize", X4, {"": None, **({"s": np.array([1, 1, 1.5, 2.5], np.float32)} if how == "scales"
                                    else {"z": np.array([2, 4, 13, 5], I64)})},
        {"mode": "nearest", "coordinate_transformation_mode": coord, "nearest_mode": rounding,
         "_order": ["x", "", "s"] if how == "scales" else ["x", "", "", "z"]}, 13)
       for coord in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                     "tf_half_pixel_for_nn")
       for rounding in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
       for how in ("scales", "sizes")},
    "resize-nearest-defaults": ("Resize", X4, {"": None, "s": np.array([1, 1, 2, 2], np.float32)},
                                {"_order": ["x", "", "s"]}, 13),
    "resize-linear-half-pixel": ("Resize", X4, {"": None, "s": np.array([1, 1, 2, 2], np.float32)},
                                 {"mode": "linear", "_order": ["x", "", "s"]}, 13),
    "resize-linear-align-sizes": ("Resize", X4, {"": None,
                                                 "z": np.array([2, 4, 13, 11], I64)},
                                  {"mode": "linear", "coordinate_transformation_mode": "align_corners",
                                   "_order": ["x", "", "", "z"]}, 13),
    "conv-transpose-stride-2": ("ConvTranspose", X4, {"w": np.float32(np.random.default_rng(1)
                                                                      .standard_normal((4, 3, 3, 3)))},
                                {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 0]}, 17),
    "conv-transpose-groups": ("ConvTranspose", X4, {"w": np.float32(np.random.default_rng(2)
                                                                    .standard_normal((4, 2, 2, 2))),
                                                    "b": np.float32([0.1, -0.2, 0.3, 0.4])},
                              {"strides": [2, 2], "group": 2}, 17),
    "depth-to-space-dcr": ("DepthToSpace", X4, {}, {"blocksize": 2}, 17),
    "depth-to-space-crd": ("DepthToSpace", X4, {}, {"blocksize": 2, "mode": "CRD"}, 17),
    "slice-negative-step": ("Slice", X4, {"st": np.array([-1, 5], I64), "en": np.array([-8, 0], I64),
                                          "ax": np.array([2, 3], I64), "sp": np.array([-2, -1], I64)},
                            {}, 17),
    "slice-clamped-ends": ("Slice", X4, {"st": np.array([1, -3], I64),
                                         "en": np.array([100, 2**62], I64),
                                         "ax": np.array([1, -1], I64), "sp": np.array([2, 1], I64)},
                           {}, 17),
    "split-sizes": ("Split", X4, {"sp": np.array([2, 4, 1], I64)}, {"axis": 2, "_outputs": 3}, 17),
    "split-equal-opset-11": ("Split", X4, {}, {"axis": 3, "_outputs": 3}, 11),
    "maxpool-pads-ceil": ("MaxPool", X4, {}, {"kernel_shape": [3, 2], "strides": [2, 2],
                                            "pads": [1, 0, 1, 1], "ceil_mode": 1}, 17),
    "maxpool-same-lower": ("MaxPool", X4, {}, {"kernel_shape": [2, 3], "strides": [2, 2],
                                             "auto_pad": "SAME_LOWER"}, 17),
    "maxpool-ceil": ("MaxPool", X4, {}, {"kernel_shape": [3, 3], "strides": [2, 2],
                                       "ceil_mode": 1}, 17),
    "avgpool-ceil": ("AveragePool", X4, {}, {"kernel_shape": [3, 3], "strides": [2, 2],
                                           "ceil_mode": 1}, 17),
    "avgpool-exclude-pad": ("AveragePool", X4, {}, {"kernel_shape": [3, 3], "strides": [2, 2],
                                                  "pads": [1, 1, 1, 1]}, 17),
    "avgpool-include-pad": ("AveragePool", X4, {}, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                                  "count_include_pad": 1}, 17),
    "avgpool-same-upper": ("AveragePool", X4, {}, {"kernel_shape": [2, 2], "strides": [2, 2],
                                                 "auto_pad": "SAME_UPPER"}, 17),
    "softmax-axis-1-opset-11": ("Softmax", X4, {}, {"axis": 1}, 11),
    "softmax-axis-1": ("Softmax", X4, {}, {"axis": 1}, 13),
    "reduce-mean-attr": ("ReduceMean", X4, {}, {"axes": [1, 3], "keepdims": 0}, 13),
    "reduce-mean-input": ("ReduceMean", X4, {"ax": np.array([-1], I64)}, {}, 18),
    "reduce-sum-all-keep": ("ReduceSum", X4, {}, {"keepdims": 1}, 13),
    "reduce-sum-axes": ("ReduceSum", X4, {"ax": np.array([0, 2], I64)}, {"keepdims": 0}, 13),
    "clip-min-max": ("Clip", X4, {"lo": np.float32(-0.5), "hi": np.float32(0.7)}, {}, 13),
    "clip-opset-6-attributes": ("Clip", X4, {}, {"min": -0.3, "max": 0.4}, 6),
    "clip-max-only": ("Clip", X4, {"": None, "hi": np.float32(0.2)}, {"_order": ["x", "", "hi"]},
                      13),
    "cumsum-exclusive-reverse": ("CumSum", X4, {"ax": np.array(2, I64)},
                                 {"exclusive": 1, "reverse": 1}, 17),
    "gemm-trans-alpha-beta": ("Gemm", {"a": [5, 3], "b": [4, 5]}, {"c": np.float32([[1.0]])},
                              {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, 17),
    "layer-norm-axis-1": ("LayerNormalization", {"x": [2, 3, 4]},
                          {"g": np.float32(np.arange(12).reshape(3, 4) / 10),
                           "b": np.float32(np.ones((3, 4)))}, {"axis": 1, "epsilon": 1e-3}, 17),
    "layer-norm-last": ("LayerNormalization", {"x": [2, 3, 4]},
                        {"g": np.float32([1, 2, 3, 4]), "b": np.float32([0, 1, 0, 1])}, {}, 17),
    "expand": ("Expand", {"x": [3, 1]}, {"s": np.array([2, 3, 4], I64)}, {}, 17),
    "conv-1d-pads-dilation": ("Conv", {"x": [2, 4, 11]},
                              {"w": np.float32(np.random.default_rng(3).standard_normal((3, 4, 3)))},
                              {"pads": [2, 1], "dilations": [2], "strides": [2]}, 17),
    "conv-same-upper-stride-2": ("Conv", X4, {"w": np.float32(np.random.default_rng(4)
                                                              .standard_normal((2, 4, 3, 2)))},
                                 {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 17),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_agrees_with_onnxruntime(case):
    op, shapes, consts, attrs, opset = CASES[case]
    attrs = dict(attrs)
    outputs = attrs.pop("_outputs", 1)
    _check(_model(op, shapes, dict(consts), attrs, opset, outputs), shapes)


@pytest.mark.parametrize("signed, axis", [(False, 1), (True, 0), (True, None)])
def test_quantize_dequantize_per_axis_and_per_tensor(signed, axis):
    dtype = np.int8 if signed else np.uint8
    channels = {None: 1, 0: 2, 1: 4}[axis]
    scale = np.float32(np.linspace(0.05, 0.2, channels))
    zero = np.asarray(np.linspace(-3 if signed else 100, 5 if signed else 130, channels), dtype)
    if axis is None:
        scale, zero = scale[0], zero[0]
    extra = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **extra),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y0"], **extra)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", F32, [2, 4, 3])],
                              [helper.make_tensor_value_info("y0", F32, None)],
                              [numpy_helper.from_array(scale, "s"),
                               numpy_helper.from_array(zero, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _check(model, {"x": [2, 4, 3]}, atol=1e-6)


def test_constant_of_shape_fills_with_its_value_attribute():
    value = numpy_helper.from_array(np.array([0.75], np.float32), "value")
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["c"], value=value),
             helper.make_node("Add", ["x", "c"], ["y0"])]
    graph = helper.make_graph(nodes, "cos", [helper.make_tensor_value_info("x", F32, [2, 3])],
                              [helper.make_tensor_value_info("y0", F32, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _check(model, {"x": [2, 3]})
