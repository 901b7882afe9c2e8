"""Bias correction (bias_correction.py): b' = b + (W - W_hat) E[x] on the calibration samples.

The column means are checked against the explicit im2col of layers.conv_columns; the whole
step against onnxruntime: a layer whose input no other quantized layer changes must come out
with no mean error per output channel on the calibration samples, and without the step it
has one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import graphs
from onnxquant import QuantConfig, bias_correction
from onnxquant.cli import build_parser, config_from_args
from onnxquant.errors import UserError
from onnxquant.layers import Layer, conv_columns

W4 = dict(weight_bits=4, weight_symmetric=True)


def _calib(n: int = 16, seed: int = 1) -> np.ndarray:
    """Inputs with a mean (as after a ReLU), so that E[x] and the shift are not ~0."""
    return graphs.calibration(n, seed=seed) + 0.5


def _run_graph(model: onnx.ModelProto, x: np.ndarray, tensor: str) -> np.ndarray:
    """``tensor`` of ``model`` on ``x`` as its graph computes it, onnxruntime's fusions off:
    they replace DQ(int4) + MatMul + Add by MatMulNBits (ENABLE_ALL) and Q/DQ + Conv by
    its int8 kernel (from BASIC), whose own arithmetic moves the mean by up to ~2e-3 here
    (the runtime's error, not the bias's)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.append(onnx.ValueInfoProto(name=tensor))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(m.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return session.run([tensor], {"x": x})[0]


def _channel_mean_error(float_model, quant_model, tensor: str, x: np.ndarray) -> np.ndarray:
    """Per-channel mean over samples and positions of quantized - float ``tensor``."""
    f = _run_graph(float_model, x, tensor)
    q = _run_graph(quant_model, x, tensor)
    axes = tuple(i for i in range(f.ndim) if i != (1 if f.ndim == 4 else f.ndim - 1))
    return (q - f).mean(axis=axes), np.abs(f).mean()


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_first_layer_has_no_mean_error_after_correction(bits):
    model = graphs.conv_chain_model()
    x = _calib()
    on = graphs.quantize(model, x, weight_bits=bits, weight_symmetric=True,
                         bias_correction=True).model
    off = graphs.quantize(model, x, weight_bits=bits, weight_symmetric=True,
                          bias_correction=False).model
    err_on, scale = _channel_mean_error(model, on, "conv1_out", x)
    err_off, _ = _channel_mean_error(model, off, "conv1_out", x)
    assert np.abs(err_on).max() < 1e-5 * scale
    assert np.abs(err_off).max() > 1e-3 * scale  # there was a mean error to take back


def test_later_layers_and_the_output_lose_mean_error():
    """One pass: later layers are corrected on inputs whose earlier shifts were not applied,
    so their error is not zero, but smaller than without the step (0.58x at the output
    here; a shift of the wrong sign doubles it)."""
    model = graphs.conv_chain_model()
    x = _calib()
    on = graphs.quantize(model, x, **W4, bias_correction=True).model
    off = graphs.quantize(model, x, **W4, bias_correction=False).model
    for tensor in ("conv2_out", model.graph.output[0].name):
        err_on, _ = _channel_mean_error(model, on, tensor, x)
        err_off, _ = _channel_mean_error(model, off, tensor, x)
        assert np.abs(err_on).mean() < 0.75 * np.abs(err_off).mean(), tensor


def test_default_is_on_for_four_bit_weights_rounded_to_nearest():
    assert QuantConfig(weight_bits=4).corrects_bias
    assert not QuantConfig(weight_bits=3).corrects_bias  # measured to cost points there
    assert not QuantConfig(weight_bits=6).corrects_bias
    assert not QuantConfig().corrects_bias
    assert not QuantConfig(weight_bits=4, reconstruct="gptq").corrects_bias
    assert QuantConfig(weight_bits=4, reconstruct="gptq", bias_correction=True).corrects_bias
    assert QuantConfig(bias_correction=True).corrects_bias
    assert not QuantConfig(weight_bits=4, bias_correction=False).corrects_bias
    assert replace(QuantConfig(weight_bits=8), weight_bits=4).corrects_bias  # read, not stored


def test_default_run_corrects_at_four_bits():
    model = graphs.conv_chain_model()
    x = _calib()
    default = graphs.quantize(model, x, **W4)
    assert any(n.startswith("bias correction: 3 of 3") for n in default.plan.notes)
    err, scale = _channel_mean_error(model, default.model, "conv1_out", x)
    assert np.abs(err).max() < 1e-5 * scale
    eight = graphs.quantize(model, x)
    assert not any("bias correction" in n for n in eight.plan.notes)


def _biases(model: onnx.ModelProto) -> dict:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
            if "bias_corrected" in i.name}


def test_one_sample_per_run_gives_the_same_biases(monkeypatch):
    """Full-resolution inputs run one sample at a time (chunk_for): the sums are the same."""
    model, x = graphs.conv_chain_model(), _calib()
    chunked = _biases(graphs.quantize(model, x, **W4).model)
    monkeypatch.setattr(bias_correction, "BIG_POSITIONS", 0)
    assert bias_correction.chunk_for({"x": x}) == 1
    single = _biases(graphs.quantize(model, x, **W4).model)
    assert chunked.keys() == single.keys() and len(chunked) == 3
    for name, value in chunked.items():
        np.testing.assert_allclose(single[name], value, rtol=1e-5, atol=1e-7)


def test_chunk_for_takes_one_sample_of_a_large_image_and_chunks_otherwise():
    big = int(np.sqrt(bias_correction.BIG_POSITIONS)) + 1
    assert bias_correction.chunk_for({"x": np.zeros((2, 3, big, big), np.float32)}) == 1
    assert bias_correction.chunk_for({"x": np.zeros((2, 3, 8, 8), np.float32)}) == \
        bias_correction.CHUNK
    tokens = np.zeros((2, 2 * bias_correction.BIG_POSITIONS, 1), np.float32)  # rank 3
    assert bias_correction.chunk_for({"x": tokens}) == bias_correction.CHUNK


@pytest.mark.parametrize("flag,value", [("auto", None), ("yes", True), ("no", False)])
def test_cli_maps_bias_correction(flag, value):
    args = build_parser("quantize").parse_args(["in.onnx", "out.onnx", "--bias-correction", flag])
    assert config_from_args(args).bias_correction is value


def test_without_replayable_samples_it_is_skipped_or_refused():
    model = graphs.conv_chain_model()
    result = graphs.quantize(model, None, **W4)
    assert any(n.startswith("bias correction skipped: no calibration data")
               for n in result.plan.notes)
    with pytest.raises(UserError, match="bias correction needs the calibration samples"):
        graphs.quantize(model, None, **W4, bias_correction=True)


def test_conv_without_bias_gets_one():
    model = graphs.conv_chain_model()
    conv = next(n for n in model.graph.node if n.name == "conv1")
    del conv.input[2]
    x = _calib()
    out = graphs.quantize(model, x, **W4).model
    assert len(graphs.nodes_by_name(out)["conv1"].input) == 3
    err, scale = _channel_mean_error(model, out, "conv1_out", x)
    assert np.abs(err).max() < 1e-5 * scale


def _linear_model(kind: str) -> onnx.ModelProto:
    """x -> Flatten -> a linear layer with a constant [64, 10] weight -> y -> Softmax -> p:
    Gemm (beta 0.5, C), MatMul + Add of a vector, or a MatMul alone."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 10)) / 8).astype(np.float32)
    b = (rng.standard_normal(10) / 10).astype(np.float32)
    flat = helper.make_node("Flatten", ["x"], ["f"], name="flatten")
    if kind == "gemm":
        nodes = [flat, helper.make_node("Gemm", ["f", "w", "b"], ["y"], name="fc", beta=0.5)]
    elif kind == "matmul_add":
        nodes = [flat, helper.make_node("MatMul", ["f", "w"], ["m"], name="fc"),
                 helper.make_node("Add", ["m", "b"], ["y"], name="fc_add")]
    else:
        nodes = [flat, helper.make_node("MatMul", ["f", "w"], ["y"], name="fc")]
    nodes.append(helper.make_node("Softmax", ["y"], ["p"], name="softmax"))
    inits = [onnx.numpy_helper.from_array(w, "w")]
    if kind != "matmul":
        inits.append(onnx.numpy_helper.from_array(b, "b"))
    graph = helper.make_graph(
        nodes, "linear",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 4, 4])],
        [helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["gemm", "matmul_add"])
def test_linear_layers_bias_is_moved(kind):
    model = _linear_model(kind)
    x = _calib()
    cfg = dict(W4, parts=frozenset({"linear"}))
    on = graphs.quantize(model, x, **cfg).model
    off = graphs.quantize(model, x, **cfg, bias_correction=False).model
    err_on, scale = _channel_mean_error(model, on, "y", x)
    err_off, _ = _channel_mean_error(model, off, "y", x)
    assert np.abs(err_on).max() < 1e-5 * scale
    assert np.abs(err_off).max() > 1e-3 * scale


def test_matmul_without_a_bias_add_is_left_and_counted():
    model = _linear_model("matmul")
    result = graphs.quantize(model, _calib(), **W4, parts=frozenset({"linear"}))
    note = next(n for n in result.plan.notes if n.startswith("bias correction"))
    assert "0 of 1" in note and "1 without a constant bias" in note


def test_fixed_batch_model_runs_one_sample_at_a_time():
    """A model exported for batch 1 with the batch baked into a Reshape."""
    model = graphs.conv_chain_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    out_name = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Reshape", [out_name, "shape"], ["flat"],
                                             name="flatten"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(
        np.array([1, -1], np.int64), "shape"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT,
                                                            [1, 64]))
    x = _calib(4)
    out = graphs.quantize(model, x, **W4).model
    errs = [_channel_mean_error(model, out, "conv1_out", x[i:i + 1])[0] for i in range(4)]
    assert np.abs(np.mean(errs, axis=0)).max() < 1e-4


conv_attrs = st.fixed_dictionaries({
    "k": st.integers(1, 3), "stride": st.integers(1, 2), "dilation": st.integers(1, 2),
    "pad": st.integers(0, 2), "group": st.sampled_from([1, 2, 4]),
    "hw": st.integers(3, 7), "seed": st.integers(0, 2**16)})


@settings(max_examples=40, deadline=None)
@given(conv_attrs)
def test_conv_column_sum_is_the_im2col_mean(a):
    cin, cout = 4, 8
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=a["group"],
                            kernel_shape=[a["k"], a["k"]], strides=[a["stride"]] * 2,
                            dilations=[a["dilation"]] * 2, pads=[a["pad"], 0, 0, a["pad"]])
    w = np.zeros((cout, cin // a["group"], a["k"], a["k"]), np.float32)
    span = a["dilation"] * (a["k"] - 1) + 1
    x = np.random.default_rng(a["seed"]).standard_normal(
        (3, cin, a["hw"] + span, a["hw"] + span)).astype(np.float32)
    layer = Layer(None, node, w, None)
    total, count = layer.column_sum(x)
    attrs = {at.name: helper.get_attribute_value(at) for at in node.attribute}
    cols = conv_columns(x, attrs, w.shape, limit=10**9)
    assert count == cols.shape[2]
    np.testing.assert_allclose(total / count, cols.mean(axis=2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trans_a", [0, 1])
def test_linear_column_sum_is_the_row_mean(trans_a):
    x = np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transA=trans_a)
    layer = Layer(None, node, np.zeros((5 if not trans_a else 6, 2), np.float32), None)
    total, count = layer.column_sum(x)
    rows = x.T if trans_a else x
    assert count == len(rows)
    np.testing.assert_allclose(total[0] / count, rows.astype(np.float64).mean(axis=0), rtol=1e-9)


def test_layer_reading_quantized_activations_is_corrected_on_them():
    """W4A8 (target tensorrt): the layer reads DQ(Q(x)); its mean output must be float W on
    those very inputs, W E[DQ(Q(x))] + b, per channel."""
    model = graphs.conv_chain_model()
    x = _calib()
    out = graphs.quantize(model, x, target="tensorrt", weight_bits=4).model
    conv = graphs.nodes_by_name(out)["conv1"]
    seen = _run_graph(out, x, conv.input[0])  # the DequantizeLinear's output
    assert not np.allclose(seen, x)  # the input is quantized
    got = _run_graph(out, x, "conv1_out").mean(axis=(0, 2, 3))
    w = graphs.weight_value(model, "conv1_w")
    b = graphs.weight_value(model, "conv1_b")
    layer = Layer(None, next(n for n in model.graph.node if n.name == "conv1"), w, None)
    total, count = layer.column_sum(seen)
    want = (layer.stack() @ (total / count)[..., None]).reshape(-1) + b
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_after_reconstruct_it_runs_on_the_reconstruct_samples_when_asked():
    """Off by default after --reconstruct; --bias-correction yes corrects the GPTQ codes'
    mean error on the samples GPTQ fitted (all of them here)."""
    model = graphs.conv_chain_model()
    x = _calib(24)
    plain = graphs.quantize(model, x, **W4, reconstruct="gptq")
    assert not any("bias correction" in n for n in plain.plan.notes)
    asked = graphs.quantize(model, x, **W4, reconstruct="gptq", bias_correction=True)
    assert any(n.startswith("bias correction: 3 of 3") and "24 samples" in n
               for n in asked.plan.notes)
    err, scale = _channel_mean_error(model, asked.model, "conv1_out", x)
    assert np.abs(err).max() < 1e-5 * scale
    err_plain, _ = _channel_mean_error(model, plain.model, "conv1_out", x)
    assert np.abs(err_plain).max() > 1e-4 * scale
