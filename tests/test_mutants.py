"""Tests written to kill the mutants that survived ``tools/mutation.py`` (docs/mutation.md).

Each test states a contract of the module it targets (the NumPy reference, the emitted
structure, a config field that must change the output) that the existing tests left open.
Fast and deterministic: tiny graphs from graphs.py, seeded data, NumPy references.
"""

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from onnxquant import QuantConfig, api, calibrate, emit, ranges
from onnxquant import functions as F
from onnxquant import quantizers as Q
from onnxquant.decide import _check_constraints, activation_spec, decide, specs
from onnxquant.emit_qdq import int32_bias, tensor_name
from onnxquant.errors import UserError
from onnxquant.passes import select_sites
from onnxquant.plan import PassContext
from onnxquant.softmax_quantizers import REGISTRY, search_log_step
from onnxquant.spec import QuantSpec
from onnxquant.targets import profile
from graphs import (Builder, calibration, conv_chain_model, log2_nodes, mixed_model, quantize,
                    run_ort, sdpa_model)


# ---- quantizers.py: the NumPy reference -----------------------------------------------------

def test_range_errors_name_the_valid_range():
    with pytest.raises(ValueError, match="2..8"):
        Q.uniform_range(1, False)
    with pytest.raises(ValueError, match="2..8"):
        Q.log2_params(0.0, 1.0, bits=9)
    with pytest.raises(ValueError, match=r"2\^-120, 1"):
        Q.log2_params(0.0, 1.0, eps=1.0)
    for eps in (1.5, Q.MIN_EPS / 2):
        with pytest.raises(ValueError):
            Q.log2_params(0.0, 1.0, eps=eps)
    assert Q.log2_params(0.0, 1.0, bits=2).qmax == 3  # both ends of both ranges are valid
    assert Q.log2_params(0.0, 1.0, bits=8, eps=Q.MIN_EPS).eps == Q.MIN_EPS


def test_uniform_params_default_to_8_bit_asymmetric():
    p = Q.uniform_params(np.array([-1.0, 3.0]))
    assert (p.qmin, p.qmax, p.zero_point.dtype) == (0, 255, np.uint8)


def test_per_channel_asymmetric_uses_each_channels_own_min_and_max():
    w = np.array([[-1.0, 0.5], [0.2, 4.0], [-8.0, -2.0]], np.float32)  # channels on axis 0
    p = Q.uniform_params(w, 8, symmetric=False, axis=0)
    lo = np.minimum(w.min(1), 0).astype(np.float64)
    hi = np.maximum(w.max(1), 0).astype(np.float64)
    np.testing.assert_array_equal(p.scale, ((hi - lo) / 255).astype(np.float32))
    np.testing.assert_array_equal(p.zero_point, np.round(-lo / ((hi - lo) / 255)))


def test_constant_zero_tensor_gets_a_positive_scale_without_invalid_arithmetic():
    with np.errstate(all="raise"):
        for symmetric in (False, True):
            p = Q.uniform_params(np.zeros((3, 2)), 8, symmetric, axis=0)
            assert np.all(p.scale > 0) and not p.zero_point.any()


def test_uniform_dequantize_is_float32_like_dequantize_linear():
    p = Q.uniform_params(np.array([[-1.0, 2.0], [0.5, 3.0]]), 8, axis=1)
    assert Q.uniform_dequantize(np.array([[0, 255], [7, 9]], np.uint8), p).dtype == np.float32


@pytest.mark.parametrize("symmetric, axis", [(False, None), (True, None), (True, 1), (False, 1)])
def test_uniform_fake_quant_passes_every_option(rng, symmetric, axis):
    w = rng.normal(0.3, 1.0, (3, 5))
    p = Q.uniform_params(w, 5, symmetric, axis)
    expected = Q.uniform_dequantize(Q.uniform_quantize(w, p), p)
    np.testing.assert_array_equal(Q.uniform_fake_quant(w, 5, symmetric, axis), expected)
    if not symmetric and axis is None:  # the defaults
        p8 = Q.uniform_params(w)
        np.testing.assert_array_equal(Q.uniform_fake_quant(w),
                                      Q.uniform_dequantize(Q.uniform_quantize(w, p8), p8))


def test_widen_for_bias_widens_exactly_the_channels_that_need_it():
    w = np.stack([np.full(4, 1e-9), np.full(4, 2e-9), np.linspace(-1, 1, 4)])
    bias = np.array([50.0, 1.0, 0.1])
    act = 1e-3
    p = Q.uniform_params(w, 8, symmetric=True, axis=0)
    q = Q.widen_for_bias(p, bias, act)
    need = np.abs(bias) / (act * Q.INT32_MAX) * (1 + 2.0**-20)
    assert q.scale.dtype == np.float32 and q.scale.shape == (3,)
    np.testing.assert_allclose(q.scale[:2], need[:2], rtol=1e-6)  # channel 1: its own need
    assert q.scale[2] == p.scale[2]
    assert (q.qmin, q.qmax, q.axis) == (p.qmin, p.qmax, p.axis)
    np.testing.assert_array_equal(q.zero_point, p.zero_point)
    codes = Q.uniform_quantize(w, q)  # the widened params are usable as they are
    assert codes.dtype == np.int8 and np.abs(codes).max() <= 127
    # per tensor: one scale, the largest need
    t = Q.widen_for_bias(Q.uniform_params(w[:2], 8, True), bias[:2], act)
    assert t.scale.shape == (1,) and t.scale[0] == pytest.approx(need[0], rel=1e-6)
    # a scale that already fits is kept
    assert Q.widen_for_bias(p, np.array([1e-9, 1e-9, 1e-9]), act).scale.tolist() == \
        p.scale.tolist()


def test_widened_scale_is_the_float64_formula_of_a_float32_bias(rng):
    """ONNX biases are float32; ``|b| / (s_x * INT32_MAX) * (1 + 2^-20)`` is computed in
    float64 and rounded once to float32."""
    bias = rng.uniform(1, 100, 64).astype(np.float32)
    p = Q.uniform_params(np.full((64, 2), 1e-12), 8, symmetric=True, axis=0)
    need = np.abs(bias.astype(np.float64)) / (1e-3 * Q.INT32_MAX) * (1 + 2.0**-20)
    np.testing.assert_array_equal(Q.widen_for_bias(p, bias, 1e-3).scale, need.astype(np.float32))


def test_log2_quantize_compares_in_float32_like_the_onnx_function():
    """A float64 input just below a float32 threshold rounds onto it in float32: the code
    is the one the float32 ONNX op computes."""
    p = Q.log2_params(1e-4, 1.0, 8, eps=2.0**-16)
    thresholds, _ = Q.log2_tables(p)
    t = thresholds[100].astype(np.float64)
    x = np.array([t - t * 2.0**-30])  # float64 below, float32 equal
    assert x[0] < t and np.float32(x[0]) == thresholds[100]
    assert Q.log2_quantize(x, p)[0] == Q.log2_quantize(x.astype(np.float32), p)[0] == 101


def test_log2_tables_end_with_an_infinite_threshold():
    thresholds, levels = Q.log2_tables(Q.log2_params(1e-3, 1.0, 4))
    assert thresholds[-1] == np.inf and thresholds.dtype == levels.dtype == np.float32


# ---- emit.py: every site kind, several sites per kind, NumPy references ---------------------

def _init(model, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def test_qlinearconv_form_on_every_conv_quantizes_each_own_input_and_int32_bias():
    r = quantize(conv_chain_model(), calibration(), target="ort",
                 ort_int8_kinds=("dense", "pointwise", "stem"))
    assert r.counts["convs"] == 3
    q, prod = r.model, _producers(r.model)
    for site in r.plan.convs:  # conv1 reads x, conv2 act1_out, conv3 act2_out
        conv = next(n for n in q.graph.node if n.name == site.node)
        dq = prod[conv.input[0]]
        assert dq.op_type == "DequantizeLinear" and prod[dq.input[0]].input[0] == site.input
        bias_dq = prod[conv.input[2]]  # the bias is int32 codes at scale s_x * s_w
        codes, scale = _init(q, bias_dq.input[0]), _init(q, bias_dq.input[1])
        assert bias_dq.op_type == "DequantizeLinear" and codes.dtype == np.int32
        s_x = site.input_spec.uniform_params().scale[0]
        s_w = site.weight_spec.uniform_params().scale
        np.testing.assert_array_equal(scale, (np.float32(s_x) * s_w).astype(np.float32))
        b = _init(conv_chain_model(), f"{site.node}_b")
        np.testing.assert_array_equal(codes, np.round(b.astype(np.float64) / scale))
        # deterministic names, derived from what they quantize (never parsed back)
        assert bias_dq.input[0] == f"{site.node}_bias_quantized"
        assert prod[conv.input[1]].input[0] == f"{site.weight}_{site.node}_quantized"
    onnx.checker.check_model(q, full_check=True)


def test_qlinearconv_form_without_bias():
    b = Builder(5)
    w = b.randn("nb_w", (6, 4, 3, 3), 0.2)
    b.node(f"[nb] y = Conv<pads=[1,1,1,1]>(x, {w})")
    model = b.build({"y": "float[N,6,4,4]"})
    r = quantize(model, calibration(), target="ort", ort_int8_kinds=("stem",))
    conv = next(n for n in r.model.graph.node if n.name == "nb")
    assert len(conv.input) == 2 and _producers(r.model)[conv.input[0]].op_type == "DequantizeLinear"
    (y,), (yf,) = run_ort(r.model, {"x": calibration()}), run_ort(model, {"x": calibration()})
    assert np.abs(y - yf).max() / np.abs(yf).max() < 0.05


def test_explicit_codes_reach_a_qlinearconv_weight():
    cfg = QuantConfig(target="ort", ort_int8_kinds=("dense",))
    model = conv_chain_model()
    graph, plan = api.analyze(model, cfg)
    plan.stats = {t: (-3.0, 3.0) for t in plan.calibration_tensors()}
    decide(graph, plan, cfg)
    site = next(c for c in plan.convs if c.node == "conv2")
    w = _init(model, "conv2_w")
    p = site.weight_spec.uniform_params(w)
    codes = Q.uniform_quantize(w, p)
    codes = np.where(codes < p.qmax, codes + 1, codes).astype(np.int8)  # learned rounding, say
    site.weight_spec = site.weight_spec.with_(codes=codes)
    emit.emit(graph, plan)
    out = api._finish(graph, model)
    conv = next(n for n in out.graph.node if n.name == "conv2")
    np.testing.assert_array_equal(_init(out, _producers(out)[conv.input[1]].input[0]), codes)


def _blocks_model():
    """stem -> 3 x (conv + skip Add) -> 3 x attention -> head Gemm; skip of res1 is a
    Sigmoid that no conv reads (its own Q/DQ), the others are conv inputs (shared Q/DQ)."""
    b = Builder(6)
    h = b.relu("act", b.conv("stem", "x", 4, 8, k=3))
    b.node(f"[sig] s = Sigmoid({h})")
    b.node(f"[res1] r1 = Add({b.conv('body1', h, 8, 8)}, s)")
    b.node(f"[res2] r2 = Add({b.conv('body2', 'r1', 8, 8)}, r1)")
    b.node(f"[res3] r3 = Add({b.conv('body3', 'r2', 8, 8)}, r2)")
    h = b.sdpa("a3", b.sdpa("a2", b.sdpa("a1", "r3", variant="mul"), variant="mul"), variant="mul")
    return b.build({b.head("head", h, 8): "float[N,10]"})


def test_every_site_after_an_excluded_one_is_emitted_and_counted():
    model = _blocks_model()
    r = quantize(model, calibration(), target="tensorrt",
                 exclude=("stem", "body1", "a1_softmax", "a1_q_proj"))
    # 4 - 2 convs; 9 - 1 MatMul projections + the Gemm; 3 - 1 Softmax; res2, res3
    assert r.counts == {"convs": 2, "linears": 9, "softmax": 2, "residuals": 2}
    q, prod = r.model, _producers(r.model)
    assert len(log2_nodes(q)) == 2
    for add in ("res2", "res3"):
        node = next(n for n in q.graph.node if n.name == add)
        assert prod[node.input[1]].op_type == "DequantizeLinear"
    onnx.checker.check_model(q, full_check=True)
    (y,), (yf,) = run_ort(q, {"x": calibration()}), run_ort(model, {"x": calibration()})
    assert np.abs(y - yf).max() < 0.1


def test_a_skip_that_no_conv_reads_gets_its_own_symmetric_qdq():
    r = quantize(_blocks_model(), calibration(), target="tensorrt")
    q, prod = r.model, _producers(r.model)
    add = next(n for n in q.graph.node if n.name == "res1")
    dq = prod[add.input[1]]
    ql = prod[dq.input[0]]
    assert (dq.op_type, ql.op_type, ql.input[0]) == ("DequantizeLinear", "QuantizeLinear", "s")
    lo, hi = r.plan.stats["s"]
    assert _init(q, ql.input[1]) == pytest.approx(max(-lo, hi) / 127, rel=1e-6)
    assert r.counts["residuals"] == 3


def test_uniform_softmax_qdq_feeds_the_attention_product():
    r = quantize(_blocks_model(), calibration(), parts=("softmax",), softmax_quantizer="uniform",
                 exclude=("a1_softmax",))
    assert r.counts["softmax"] == 2
    q, prod = r.model, _producers(r.model)
    for block, quantized in (("a1", False), ("a2", True), ("a3", True)):
        av = next(n for n in q.graph.node if n.name == f"{block}_av")
        src = prod[av.input[0]]
        assert (src.op_type == "DequantizeLinear") == quantized, block
        if quantized:
            assert prod[src.input[0]].input[0] == f"{block}_p"


def test_log2_output_keeps_the_softmax_type_and_shape():
    q = quantize(onnx.shape_inference.infer_shapes(sdpa_model()), calibration()).model
    (node,) = log2_nodes(q)
    infos = {v.name: v for v in q.graph.value_info}
    t = infos[node.output[0]].type.tensor_type
    assert t.elem_type == 1 and [d.dim_value for d in t.shape.dim][-2:] == [16, 16]
    assert node.output[0] == "attn_p_log2qdq" and node.name == "attn_softmax_log2qdq"


def test_dynamic_int8_matmuls_match_the_numpy_reference():
    """x -> DynamicQuantizeLinear -> MatMulInteger(W int8) -> Cast -> Mul(s_x * s_w)."""
    model = sdpa_model()
    r = quantize(model, calibration(), target="ort", ort_int8_kinds=("linear",),
                 exclude=("attn_q_proj",))
    assert r.counts["linears"] == 2
    q = r.model
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("DynamicQuantizeLinear") == 2
    t, k, v = run_ort(q, {"x": calibration()}, ["attn_t", "attn_k", "attn_v"])
    lo, hi = min(float(t.min()), 0.0), max(float(t.max()), 0.0)
    s_x = np.float32((hi - lo) / 255)
    z_x = np.clip(np.round(-lo / s_x), 0, 255)
    tq = np.clip(np.round(t / s_x) + z_x, 0, 255)
    for name, got in (("attn_wk", k), ("attn_wv", v)):
        w = _init(model, name)
        p = Q.uniform_params(w, 8, symmetric=True)
        acc = (tq - z_x).astype(np.int64) @ Q.uniform_quantize(w, p).astype(np.int64)
        expected = acc.astype(np.float32) * np.float32(s_x * p.scale[0])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


# ---- emit_qdq.py: node builders --------------------------------------------------------------

def _new_names(float_model, quant_model) -> set:
    """Node, output and initializer names the quantization added."""
    def names(m):
        return ({n.name for n in m.graph.node} | {o for n in m.graph.node for o in n.output}
                | {i.name for i in m.graph.initializer})
    return names(quant_model) - names(float_model)


def _scheme(base: str, suffixes: str) -> set:
    return {f"{base}_{s}" for s in suffixes.split()}


@pytest.mark.parametrize("options, expected", [
    ({}, _scheme("conv2_w", "quantized scale zero_point DequantizeLinear dequantized")),
    ({"weight_format": "folded"},
     _scheme("conv2_w", "quantized Cast codes_float zero_point_float Sub centered scale Mul "
                        "dequantized")),
    ({"target": "ort", "ort_int8_kinds": ("dense",)},
     _scheme("conv2_w_conv2", "quantized scale zero_point DequantizeLinear dequantized")
     | _scheme("conv2_bias", "quantized scale zero_point DequantizeLinear dequantized")
     | _scheme("act1_out", "act_scale act_zero_point QuantizeLinear quantized "
                           "DequantizeLinear qdq")
     | _scheme("conv2_out", "act_scale act_zero_point QuantizeLinear quantized "
                            "DequantizeLinear qdq")),
])
def test_inserted_names_follow_one_scheme(options, expected):
    """``{what it quantizes}_{role}``: deterministic, readable in Netron and engine logs."""
    model = conv_chain_model()
    r = quantize(model, calibration(), exclude=("conv1", "conv3"), **options)
    assert _new_names(model, r.model) == expected


def test_dynamic_matmul_and_implicit_zero_names_follow_the_scheme():
    model = sdpa_model()
    r = quantize(model, calibration(), target="ort", ort_int8_kinds=("linear",),
                 exclude=("attn_q_proj", "attn_v_proj"), parts=("linear",))
    assert _new_names(model, r.model) == _scheme(
        "attn_k_proj", "DynQuant x_quantized x_scale x_zero w_quantized w_zero_point "
                       "MatMulInteger acc Cast acc_float scale_Mul w_scale out_scale Mul")
    b = Builder(0, opset=21)  # symmetric int8 at opset 21: no zero point
    model = b.build({b.conv("conv", "x", 4, 4): "float[N,4,4,4]"})
    new = _new_names(model, quantize(model, calibration(), target="tensorrt").model)
    assert new >= _scheme("x", "act_scale QuantizeLinear quantized DequantizeLinear qdq")
    assert "x_act_zero_point" not in new


def test_dequantized_weights_are_typed_float():
    for fmt in ("qdq", "folded"):
        q = quantize(conv_chain_model(), calibration(), weight_format=fmt).model
        types = {v.name: v.type.tensor_type.elem_type for v in q.graph.value_info}
        assert types["conv2_w_dequantized"] == 1, fmt


def test_tensor_name_is_unique_before_anything_is_inserted():
    graph = gs.import_onnx(conv_chain_model())
    names = [tensor_name(graph, "conv1", "out") for _ in range(3)]  # conv1_out exists
    assert names == ["conv1_out_1", "conv1_out_2", "conv1_out_3"]


def test_int32_bias_codes_saturate_at_both_ends():
    graph = gs.import_onnx(conv_chain_model())
    b = np.array([1e6, -1e6, 0.5], np.float32)
    out = int32_bias(graph, "bias", b, 1e-3, np.array([1e-9, 1e-9, 1e-3], np.float32))
    codes = out.inputs[0].inputs[0].values
    assert codes.dtype == np.int32 and codes.tolist() == [2**31 - 1, -(2**31), 500_000]


# ---- functions.py: the ONNX body of the log2 op ---------------------------------------------

def _log2_op_model(p: Q.Log2Params) -> onnx.ModelProto:
    node = onnx.helper.make_node(F.OP_TYPE, ["x"], ["y"], domain=F.DOMAIN, name="q",
                                 **F.log2_node_attrs(p))
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", 1, [None])],
        [onnx.helper.make_tensor_value_info("y", 1, [None])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    F.install(model)
    return model


@pytest.mark.parametrize("bits", [3, 8])
def test_log2_function_saturates_outside_the_calibrated_range(bits):
    """Above the calibrated max: the top level (2^bits codes, no more); below eps: code 0."""
    p = Q.log2_params(1e-3, 0.25, bits, eps=2.0**-12)
    x = np.array([0.3, 1.0, 10.0, 1e6, 0.25, 1e-3, 1e-9, 0.0], np.float32)
    y = run_ort(_log2_op_model(p), {"x": x})[0]
    np.testing.assert_array_equal(y, Q.log2_fake_quant(x, p))
    _, levels = Q.log2_tables(p)
    assert y[:3].tolist() == [levels[-1]] * 3 and y[-1] == levels[0]


def test_install_adds_the_op_beside_other_functions():
    model = _log2_op_model(Q.log2_params(1e-3, 1.0))
    del model.functions[:]
    other = onnx.helper.make_function("other.domain", F.OP_TYPE, ["X"], ["Y"],
                                      [onnx.helper.make_node("Identity", ["X"], ["Y"])],
                                      [onnx.helper.make_opsetid("", 17)])
    model.functions.append(other)  # same name, another domain: not ours
    F.install(model)
    assert [(f.domain, f.name) for f in model.functions] == [("other.domain", F.OP_TYPE),
                                                           (F.DOMAIN, F.OP_TYPE)]


def test_log2_function_refuses_old_opsets_naming_the_minimum():
    with pytest.raises(ValueError, match=f">= {F.MIN_BODY_OPSET}, got 12"):
        F.log2_function(12)


# ---- spec.py ---------------------------------------------------------------------------------

def test_spec_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="'cubic'"):
        QuantSpec(kind="cubic")
    with pytest.raises(ValueError, match="'int4'"):
        QuantSpec(fmt="int4")


def test_spec_describe_names_every_scheme():
    assert QuantSpec().describe() == "uint asymmetric 8-bit per-tensor"
    assert QuantSpec(bits=6, symmetric=True).describe() == "int symmetric 6-bit per-tensor"


def test_spec_quantize_rounds_to_nearest_unless_codes_are_given(rng):
    w = rng.normal(size=(4, 3))
    spec = QuantSpec(bits=6, symmetric=True, axis=0)
    expected = Q.uniform_quantize(w, Q.uniform_params(w, 6, True, 0))
    np.testing.assert_array_equal(spec.quantize(w), expected)
    codes = np.ones((4, 3), np.int8)
    assert spec.with_(codes=codes).quantize(w) is codes


# ---- softmax_quantizers.py -------------------------------------------------------------------

def _softmax_sample(n_rows=300, seed=0):
    logits = np.random.default_rng(seed).normal(0, 4, (n_rows, 64))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32).ravel()


class _Stats(tuple):
    """(lo, hi) carrying the sample the AdaLog search needs (TensorStats has none yet:
    docs/mutation.md, "Found on the way")."""
    sample = None


def _best_log_step(x, lo, hi, bits, eps):
    """Brute-force reference of the AdaLog search: the candidate step (1/8..2 octaves, 25
    geometric steps) with the smallest MSE on ``x``, None where the min-max grid is as good."""
    def mse(p):
        return float(np.mean((Q.log2_fake_quant(x, p) - x) ** 2))

    errors = {float(Q.log2_params(lo, hi, bits, eps, step=float(s)).scale):
              mse(Q.log2_params(lo, hi, bits, eps, step=float(s)))
              for s in np.geomspace(0.125, 2.0, 25)}
    step = min(errors, key=errors.get)
    return None if mse(Q.log2_params(lo, hi, bits, eps)) <= errors[step] else step


@pytest.mark.parametrize("bits, eps", [(4, 2.0**-12), (8, 2.0**-12), (4, 1e-2), (5, 1e-2)])
def test_adalog_search_returns_the_best_candidate_step(bits, eps):
    x = _softmax_sample()
    lo, hi = float(x.min()), float(x.max())
    assert search_log_step(x, lo, hi, bits, eps) == _best_log_step(x, lo, hi, bits, eps)
    assert search_log_step(x[:0], lo, hi, bits, eps) is None


def test_adalog_search_finds_a_step_where_the_grid_is_coarse():
    x = _softmax_sample()
    lo, hi = float(x.min()), float(x.max())
    assert search_log_step(x, lo, hi, 4, 2.0**-12) is not None  # 4 bits: searched step wins
    assert search_log_step(x, lo, hi, 8, 2.0**-12) is None  # 8 bits: min-max grid is finer


def test_softmax_quantizer_specs_carry_bits_range_step_and_estimator():
    x = _softmax_sample()
    stats = _Stats((0.01, float(x.max())))
    stats.sample = x
    uniform = REGISTRY["uniform"].spec(stats, 6, 2.0**-12, False)
    assert (uniform.kind, uniform.bits, uniform.range, uniform.estimator) == \
        ("uniform", 6, (0.0, float(x.max())), "minmax")
    ada = REGISTRY["adalog"].spec(stats, 4, 2.0**-12, False)
    step = search_log_step(x, 0.01, float(x.max()), 4, 2.0**-12)
    assert step is not None and ada.step == step and ada.estimator == f"step {step:g}"
    assert (ada.kind, ada.bits, ada.eps, ada.range) == ("log2", 4, 2.0**-12, (0.01, float(x.max())))
    sqrt2 = REGISTRY["log_sqrt2"].spec(stats, 4, 2.0**-12, False)
    assert (sqrt2.step, sqrt2.estimator) == (0.5, "step 0.5")
    assert REGISTRY["log2"].spec(stats, 4, 2.0**-12, False).estimator == "minmax"


# ---- decide.py -------------------------------------------------------------------------------

def test_linear_weight_axis_is_the_output_channel_of_matmul_and_gemm():
    b = Builder(2)
    h = b.relu("act", b.conv("stem", "x", 4, 8))
    b.node(f"[pool] g = GlobalAveragePool({h})")
    b.node("[flat] f = Flatten(g)")
    wt = b.randn("wt", (5, 8), 0.3)  # Gemm transB=1: [N, K], output channels on axis 0
    b.node(f"[gemm_t] yt = Gemm<transB=1>(f, {wt})")
    w = b.randn("w", (8, 3), 0.3)  # Gemm transB=0: [K, N], axis 1
    b.node(f"[gemm] y = Gemm(f, {w})")
    wm = b.randn("wm", (8, 6), 0.3)  # MatMul: [K, N], axis 1
    b.node(f"[mm] ym = MatMul(f, {wm})")
    model = b.build({"yt": "float[N,5]", "y": "float[N,3]", "ym": "float[N,6]"})
    r = quantize(model, calibration(), per_channel=True, parts=("linear",))
    axes = {s.node: s.weight_spec.axis for s in r.plan.linears}
    assert axes == {"gemm_t": 0, "gemm": 1, "mm": 1}
    per_tensor = quantize(model, calibration(), parts=("linear", "conv_block"), per_channel=False)
    assert all(s.weight_spec.axis is None for s in per_tensor.plan.linears + per_tensor.plan.convs)


def test_specs_list_every_role_of_every_site():
    r = quantize(mixed_model(), calibration(), target="ort", ort_int8_kinds=("dense",))
    roles = sorted((getattr(s, "node", None) or s.softmax, role) for s, role, _ in specs(r.plan))
    assert ("tail", "weight") in roles and ("tail", "input") in roles
    assert ("tail", "output") in roles
    t = quantize(mixed_model(), calibration(), target="tensorrt")
    roles = {(getattr(s, "node", None) or s.softmax, role) for s, role, _ in specs(t.plan)}
    assert ("attn_softmax", "output") in roles


def test_a_strategy_breaking_the_tensorrt_constraints_fails_loudly():
    r = quantize(mixed_model(), calibration(), target="tensorrt")
    prof = profile(r.config or QuantConfig(target="tensorrt"))
    site = next(c for c in r.plan.convs if c.weight_spec is not None)
    good = site.weight_spec
    site.weight_spec = good.with_(symmetric=False)
    with pytest.raises(AssertionError, match="not symmetric"):
        _check_constraints(prof, r.plan)
    p = good.uniform_params(np.ones((2, 2, 1, 1), np.float32))
    site.weight_spec = good.with_(params=dataclasses.replace(p, zero_point=p.zero_point + 1))
    with pytest.raises(AssertionError, match="zero point"):
        _check_constraints(prof, r.plan)


def test_int8_conv_weight_scale_is_widened_for_a_large_bias():
    b = Builder(4)
    w = np.random.default_rng(0).normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)
    w[0] = 1e-9  # a dead channel with a large bias: its bias code would saturate int32
    b.add("big_w", w)
    b.add("big_b", np.array([50.0, 0.1, 0.1, 0.1], np.float32))
    b.node("[big] y = Conv<pads=[1,1,1,1]>(x, big_w, big_b)")
    r = quantize(b.build({"y": "float[N,4,4,4]"}), calibration(), target="ort",
                 ort_int8_kinds=("stem",))
    site = r.plan.convs[0]
    s_x = site.input_spec.uniform_params().scale[0]
    s_w = site.weight_spec.uniform_params().scale
    assert site.weight_spec.params is not None
    assert 50.0 / (float(s_x) * float(s_w[0])) <= Q.INT32_MAX


def test_activation_spec_takes_its_range_from_the_calibration_method(rng):
    x = rng.standard_normal(20000) ** 3  # heavy tails: every estimator clips differently
    stats = {"t": ranges.TensorStats.from_array(x)}
    minmax = activation_spec(stats, "t", symmetric=False)
    assert minmax.range == (float(x.min()), float(x.max())) and minmax.estimator == "minmax"
    for method in ("percentile", "mse"):
        spec = activation_spec(stats, "t", True, bits=6, method=method)
        lo, hi = ranges.estimate(stats["t"], method, 6, True)
        assert spec.range == (float(lo), float(hi)) != minmax.range
        assert (spec.estimator, spec.bits, spec.symmetric) == (method, 6, True)


# ---- passes/select_sites.py ------------------------------------------------------------------

FLAGS = ("quantize", "int8_input", "int8_output", "dynamic")


def _flags(site) -> list:
    return [getattr(site, f) for f in FLAGS if hasattr(site, f)]


def _with_nan(model: onnx.ModelProto, weight: str) -> onnx.ModelProto:
    init = next(i for i in model.graph.initializer if i.name == weight)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, weight))
    return model


@pytest.mark.parametrize("options", [
    {"target": "ort", "ort_int8_kinds": ("pointwise", "linear")},
    {"target": "tensorrt"},
    {"parts": ("transformer", "linear")},  # the stem (a bridge) comes first, unquantized
])
def test_a_nan_weight_clears_every_flag_of_its_site_only(options):
    model = _with_nan(_with_nan(_blocks_model(), "body2_w"), "a1_wk")
    graph, plan = api.analyze(model, QuantConfig(**options))
    by_node = {s.node: s for s in plan.convs + plan.linears}
    assert not any(_flags(by_node["body2"])) and not any(_flags(by_node["a1_k_proj"]))
    assert by_node["body3"].quantize and by_node["a1_v_proj"].quantize  # the sites after them
    assert by_node["body3"].int8_input or options.get("target", "paper") == "paper"
    assert sorted(n for n in plan.notes if "NaN/Inf" in n) == [
        "weight 'a1_wk' of 'a1_k_proj' has NaN/Inf: left float",
        "weight 'body2_w' of 'body2' has NaN/Inf: left float"]


def test_exclude_clears_every_flag_and_counts_the_sites():
    cfg = QuantConfig(target="ort", ort_int8_kinds=("dense", "pointwise", "linear"),
                      exclude=("body2", "a1_k_proj"))
    graph, plan = api.analyze(_blocks_model(), cfg)
    by_node = {s.node: s for s in plan.convs + plan.linears}
    assert by_node["body3"].int8_output and by_node["a1_v_proj"].dynamic  # what they would be
    assert not any(_flags(by_node["body2"])) and not any(_flags(by_node["a1_k_proj"]))
    assert "kept float by --exclude: 2 node(s)" in plan.notes
    with pytest.raises(UserError, match="^--exclude 'nope' matches no .* 'onnxquant inspect -v'$"):
        api.analyze(_blocks_model(), QuantConfig(exclude=("nope",)))


def test_marks_follow_the_target_profile():
    """tensorrt: static int8 linears (Q/DQ on the input) and residual skips; ort: neither."""
    t = quantize(_blocks_model(), calibration(), target="tensorrt")
    assert all(s.int8_input and s.input_spec is not None for s in t.plan.linears)
    o = quantize(_blocks_model(), calibration(), target="ort", ort_int8_kinds=("pointwise",))
    assert any(c.int8_input for c in o.plan.convs)  # body convs are int8 ...
    assert not any(r.quantize for r in o.plan.residuals)  # ... but ort has no skip Q/DQ


def test_select_sites_is_idempotent_and_keeps_other_notes(caplog):
    cfg = QuantConfig(exclude=("body1",))
    graph, plan = api.analyze(_with_nan(_blocks_model(), "body2_w"), cfg)
    plan.notes.append("a note of another pass")
    ctx = PassContext(cfg, plan)
    with caplog.at_level("INFO", logger="onnxquant"):
        chosen = select_sites.run(graph, ctx)
    assert plan.notes.count("a note of another pass") == 1
    assert sum("NaN/Inf" in n for n in plan.notes) == 1
    assert sum(n.startswith("kept float") for n in plan.notes) == 1
    assert f"select_sites: {chosen} sites to quantize (target paper)" in caplog.messages


# ---- config fields without a test of their own (tools/mutation.py --config-fields) ----------

def test_batch_size_sets_the_calibration_batches():
    calib = np.zeros((10, 4, 4, 4), np.float32)
    cfg = QuantConfig(batch_size=3, num_calib=7)
    sizes = [len(b) for _, b in calibrate.batches(calib, "x", [None, 4, 4, 4], cfg)]
    assert sizes == [3, 3, 1]
    fixed = [len(b) for _, b in calibrate.batches(calib, "x", [2, 4, 4, 4], cfg)]
    assert fixed == [2, 2, 2, 1]  # a fixed batch dimension wins over the option


def test_ort_int8_kinds_choose_the_int8_convs():
    def int8(kinds):
        r = quantize(conv_chain_model(), calibration(), target="ort", ort_int8_kinds=kinds)
        return sorted(c.node for c in r.plan.convs if c.int8_input)

    assert int8(()) == []
    assert int8(("dense",)) == ["conv2"]  # conv1 reads the image (stem), conv3 is 1x1


def test_act_bits_set_the_activation_grid():
    r = quantize(conv_chain_model(), calibration(), target="tensorrt", act_bits=6)
    site = next(c for c in r.plan.convs if c.input_spec is not None)
    p = site.input_spec.uniform_params()
    lo, hi = r.plan.stats[site.input]
    assert (p.qmin, p.qmax) == (-31, 31)
    assert p.scale[0] == pytest.approx(max(-lo, hi) / 31, rel=1e-6)


def test_calib_method_sets_the_activation_ranges():
    r = quantize(conv_chain_model(), calibration(), target="tensorrt", calib_method="percentile")
    for site in (c for c in r.plan.convs if c.input_spec is not None):
        spec = site.input_spec
        assert spec.estimator == "percentile"
        lo, hi = ranges.estimate(r.plan.stats[site.input], "percentile", 8, True)
        assert spec.range == (float(lo), float(hi))


def test_auto_runs_the_per_layer_search():
    r = quantize(conv_chain_model(), calibration(), auto=True)
    assert any(note.startswith("auto:") for note in r.plan.notes)
