"""The decide stage and emission from specs: every config field changes the output, and the
numerics of each emitted form equal a NumPy reference built from the spec (non-square
weights, so a wrong axis cannot hide)."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxquant import QuantConfig, quantizers
from onnxquant.spec import QuantSpec
from graphs import Builder, calibration, log2_nodes, nodes_by_name, producer_of, quantize, run_ort


def _model(seed: int = 0) -> onnx.ModelProto:
    """conv 4->8 (3x3) -> sdpa with non-square q/k/v (8->8 tokens) -> conv 8->6 -> MLP 6->10."""
    b = Builder(seed)
    h = b.sdpa("attn", b.conv("conv_in", "x", 4, 8, k=3))
    y = b.conv("conv_out", h, 8, 6)
    b.add("tok_shape", np.array([0, 6, 16], np.int64))
    b.node(f"[mlp_tokens] mt = Reshape({y}, tok_shape)")
    b.node("[mlp_t] mtt = Transpose<perm=[0,2,1]>(mt)")
    w = b.randn("mlp_w", (6, 10), 0.4)
    b.node(f"[mlp] out = MatMul(mtt, {w})")
    return b.build({"out": "float[N,16,10]"})


def _inits(model) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _dq_of(model, node_name: str, slot: int = 1):
    node = nodes_by_name(model)[node_name]
    dq = producer_of(model, node.input[slot])
    assert dq is not None and dq.op_type == "DequantizeLinear"
    inits = _inits(model)
    return dq, [inits.get(i) for i in dq.input]


@pytest.mark.parametrize("bits", [8, 6])
def test_softmax_bits_and_eps_reach_the_log2_node(bits):
    eps = 2.0**-12
    r = quantize(_model(), calibration(), softmax_bits=bits, log2_eps=eps)
    (node,) = log2_nodes(r.model)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == bits and attrs["eps"] == pytest.approx(eps)
    lo, hi = r.plan.stats[r.plan.attention[0].output]
    expected = quantizers.log2_params(lo, hi, bits, eps)
    assert attrs["scale"] == pytest.approx(expected.scale) and attrs["zero_point"] == expected.zero_point


@pytest.mark.parametrize("bits, symmetric", [(8, False), (4, False), (6, True)])
def test_weight_bits_and_scheme_reach_the_codes(bits, symmetric):
    r = quantize(_model(), calibration(), weight_bits=bits, weight_symmetric=symmetric)
    _, (codes, scale, zero) = _dq_of(r.model, "conv_in")
    qmin, qmax, dtype = quantizers.uniform_range(bits, symmetric)
    if bits <= 4:  # stored as real 4-bit tensors (storage4.py)
        dtype = ml_dtypes.int4 if symmetric else ml_dtypes.uint4
    assert codes.dtype == dtype and codes.min() >= qmin and codes.max() <= qmax
    assert codes.max() == qmax or codes.min() == qmin  # the range is used in full
    assert (zero == 0).all() if symmetric else zero.dtype == dtype


def test_per_channel_uses_the_output_channel_axis_of_non_square_weights():
    r = quantize(_model(), calibration(), per_channel=True, parts=("conv_block", "bridge", "linear"))
    dq, (codes, scale, _) = _dq_of(r.model, "conv_out")
    assert scale.shape == (6,) and onnx.helper.get_attribute_value(dq.attribute[0]) == 0
    dq, (codes, scale, _) = _dq_of(r.model, "mlp")
    assert codes.shape == (6, 10) and scale.shape == (10,)
    assert onnx.helper.get_attribute_value(dq.attribute[0]) == 1
    w = _inits(_model())["mlp_w"]
    p = quantizers.uniform_params(w, 8, axis=1)
    np.testing.assert_array_equal(codes, quantizers.uniform_quantize(w, p))


def test_per_tensor_weights_get_one_scale_each():
    """per_channel=False (--per-tensor): one scale per weight tensor, the codes of a
    whole-tensor range (the default is per channel, so this catches the option ignored)."""
    r = quantize(_model(), calibration(), per_channel=False, parts=("conv_block", "bridge"))
    dq, (codes, scale, _) = _dq_of(r.model, "conv_out")
    assert scale.size == 1
    w = _inits(_model())["conv_out_w"]
    np.testing.assert_array_equal(codes, quantizers.uniform_quantize(
        w, quantizers.uniform_params(w, 8)))


def test_weight_format_folded_writes_cast_sub_mul():
    r = quantize(_model(), calibration(), weight_format="folded")
    ops = [n.op_type for n in r.model.graph.node]
    assert ops.count("DequantizeLinear") == 0 and ops.count("Cast") >= 2


def test_num_calib_limits_the_samples():
    calib = calibration(16)
    calib[8:] *= 10  # the second half would widen every range
    small = quantize(_model(), calib, num_calib=8, batch_size=4)
    large = quantize(_model(), calib, num_calib=16, batch_size=4)
    t = small.plan.attention[0].output
    assert small.plan.stats[t] != large.plan.stats[t]


def test_ranges_take_32_samples_by_default():
    """Without --reconstruct the paper's 32 samples set the ranges (64 only under it)."""
    calib = calibration(64)
    calib[32:] *= 10
    t = quantize(_model(), calib).plan.attention[0].output
    default, n32, n64 = (quantize(_model(), calib, **options).plan.stats[t]
                         for options in ({}, {"num_calib": 32}, {"num_calib": 64}))
    assert default == n32 and default != n64


def _residual_model() -> onnx.ModelProto:
    b = Builder(4)
    h = b.relu("act", b.conv("conv_in", "x", 4, 8, k=3))
    y = b.conv("conv_res", h, 8, 8)
    b.node(f"[res_add] res = Add({y}, {h})")
    return b.build({b.conv("conv_out", "res", 8, 4): "float[N,4,4,4]"})


@pytest.mark.parametrize("build", [_model, _residual_model])
def test_tensorrt_activation_scales_follow_the_calibrated_range(build):
    """Each activation Q/DQ (conv and linear inputs, residual skips) uses the range of the
    tensor it quantizes: s = max|x| / 127."""
    r = quantize(build(), calibration(), target="tensorrt")
    inits = _inits(r.model)
    checked = 0
    for q in (n for n in r.model.graph.node if n.op_type == "QuantizeLinear"):
        lo, hi = r.plan.stats[q.input[0]]
        assert inits[q.input[1]] == pytest.approx(max(-lo, hi) / 127, rel=1e-6), q.input[0]
        checked += 1
    log2 = {a.output for a in r.plan.attention if a.quantize}
    assert checked == len([t for t in r.plan.calibration_tensors() if t not in log2])
    if build is _residual_model:
        assert r.counts["residuals"] == 1


def test_ort_qlinearconv_matches_the_numpy_reference():
    """Weight, input, bias and output quantization of the QLinearConv form, in NumPy."""
    b = Builder(3)
    model = b.build({b.relu("act", b.conv("conv", "x", 4, 6, k=3)): "float[N,6,4,4]"})
    r = quantize(model, calibration(), target="ort", ort_int8_kinds=("stem",))
    site = r.plan.convs[0]
    x = calibration(seed=2)
    inits = _inits(model)
    w, bias = inits["conv_w"], inits["conv_b"]
    p_in, p_out = site.input_spec.uniform_params(), site.output_spec.uniform_params()
    p_w = site.weight_spec.uniform_params(w)
    def fq(v, p):
        return quantizers.uniform_dequantize(quantizers.uniform_quantize(v, p), p)

    xq, wq = fq(x, p_in), fq(w, p_w)
    bias_scale = p_in.scale[0].astype(np.float64) * p_w.scale.astype(np.float64)
    bq = np.round(bias / bias_scale) * bias_scale
    b2 = Builder(3)
    ref_model = b2.build({b2.conv("conv", "x", 4, 6, k=3): "float[N,6,4,4]"})
    for init in ref_model.graph.initializer:
        if init.name == "conv_w":
            init.CopyFrom(numpy_helper.from_array(wq.astype(np.float32), "conv_w"))
        if init.name == "conv_b":
            init.CopyFrom(numpy_helper.from_array(bq.astype(np.float32), "conv_b"))
    (y_ref,) = run_ort(ref_model, {"x": xq.astype(np.float32)})
    y_ref = np.maximum(fq(y_ref, p_out), 0)
    (y,) = run_ort(r.model, {"x": x})
    step = p_out.scale[0]
    assert np.abs(y - y_ref).max() <= step * 1.01  # at most one output code apart


def test_explicit_codes_in_a_spec_are_written_as_given():
    """Learned rounding: a strategy sets codes; emission writes exactly those."""
    from onnxquant import api

    model = _model()
    graph, plan = api.analyze(model, QuantConfig(parts=("conv_block", "bridge")))
    plan.stats = {}
    from onnxquant.decide import decide

    decide(graph, plan, QuantConfig(parts=("conv_block", "bridge")))
    site = next(c for c in plan.convs if c.node == "conv_in")
    w = _inits(model)["conv_in_w"]
    p = site.weight_spec.uniform_params(w)
    codes = quantizers.uniform_quantize(w, p)
    codes = np.where(codes < p.qmax, codes + 1, codes).astype(codes.dtype)  # round up, say
    site.weight_spec = site.weight_spec.with_(codes=codes)
    from onnxquant import emit

    emit.emit(graph, plan)
    out = api._finish(graph, model)
    _, (written, _, _) = _dq_of(out, "conv_in")
    np.testing.assert_array_equal(written, codes)


def test_spec_describe_and_validation():
    assert QuantSpec(bits=4, symmetric=True, axis=0).describe() == "int symmetric 4-bit per-channel"
    assert QuantSpec(kind="log2", bits=6).describe() == "log2 6-bit"
    with pytest.raises(ValueError):
        QuantSpec(fmt="int4")
