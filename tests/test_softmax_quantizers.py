"""The Softmax quantizer registry: parameters per quantizer, exact codes of the one log op
at every opset, and the uniform baseline as standard Q/DQ."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnxquant import functions as F
from onnxquant import quantizers as Q
from onnxquant.softmax_quantizers import REGISTRY, search_log_step
from graphs import calibration, log2_nodes, quantize, sdpa_model

OPSETS = (13, 15, 17, 18, 19, 21, 23)


def _softmax_like(rng, n):
    logits = rng.normal(0, 4, (n // 64, 64))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32).ravel()


def _op_model(p: Q.Log2Params, opset: int) -> onnx.ModelProto:
    node = helper.make_node(F.OP_TYPE, ["x"], ["y"], domain=F.DOMAIN, name="q",
                            **F.log2_node_attrs(p))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [None])],
                              [helper.make_tensor_value_info("y", 1, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    F.install(model)
    return model


def test_log_sqrt2_grid_is_half_octaves_topped_at_the_max():
    p = Q.log2_params(1e-6, 0.8, bits=4, eps=2.0**-20, step=0.5)
    _, levels = Q.log2_tables(p)
    np.testing.assert_allclose(np.log2(levels[1:] / levels[:-1]), 0.5, rtol=1e-5)
    assert abs(np.log2(levels[-1]) - np.log2(0.8)) <= 0.25 + 1e-6  # nearest half octave


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("step,bits", [(None, 8), (0.5, 8), (0.5, 4), (0.3, 6), (1.0, 3)])
def test_every_log_quantizer_has_exact_codes_at_every_opset(rng, opset, step, bits):
    x = np.concatenate([_softmax_like(rng, 64 * 400), np.array([0, 1e-9, 1], np.float32)])
    p = Q.log2_params(float(x.min()), float(x.max()), bits, 2.0**-16, step=step)
    model = _op_model(p, opset)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], Q.log2_fake_quant(x, p))


def test_adalog_search_beats_or_matches_the_minmax_grid(rng):
    x = _softmax_like(rng, 64 * 200)
    lo, hi = float(x.min()), float(x.max())

    def mse(p):
        return float(np.mean((Q.log2_fake_quant(x, p) - x) ** 2))

    minmax = Q.log2_params(lo, hi, 4, 2.0**-16)
    step = search_log_step(x, lo, hi, 4, 2.0**-16)
    searched = minmax if step is None else Q.log2_params(lo, hi, 4, 2.0**-16, step=step)
    assert mse(searched) <= mse(minmax)
    assert search_log_step(None, lo, hi, 4, 2.0**-16) is None  # no sample: min-max grid


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("target", ["paper", "tensorrt"])
def test_each_quantizer_builds_a_valid_close_model(name, target):
    model = sdpa_model("mul")
    parts = ("softmax",) if target == "paper" else None  # paper: the Softmax alone
    r = quantize(model, calibration(), softmax_quantizer=name, target=target, parts=parts)
    onnx.checker.check_model(r.model, full_check=True)
    spec = r.plan.attention[0].spec
    if name == "uniform":
        assert not log2_nodes(r.model) and spec.kind == "uniform"
        assert spec.symmetric == (target == "tensorrt")
    else:
        assert len(log2_nodes(r.model)) == 1 and spec.kind == "log2"
    if name == "log_sqrt2":
        (node,) = log2_nodes(r.model)
        scale = next(a.f for a in node.attribute if a.name == "scale")
        assert scale == pytest.approx(0.5)
    from graphs import run_ort

    x = calibration()  # the calibrated range: the quantizer, not min-max coverage, is judged
    (y,), (yq,) = run_ort(model, {"x": x}), run_ort(r.model, {"x": x})
    # 8-bit grids: log2 min-max steps 1/16 octave (~2 % per value); log_sqrt2 half an
    # octave (up to 19 %); uniform zeroes the small probabilities (measured 11-17 %)
    bound = {"log2": 0.05, "adalog": 0.05}.get(name, 0.3) + (0.15 if target == "tensorrt" else 0)
    assert np.abs(y - yq).max() / np.abs(y).max() < bound


def test_uniform_softmax_quantizer_matches_numpy_codes():
    """onnxruntime's QuantizeLinear rounds like the NumPy reference on softmax values."""
    rng = np.random.default_rng(0)
    x = _softmax_like(rng, 64 * 2000)
    p = Q.uniform_params(np.array([0.0, float(x.max())]), 8)
    scale = helper.make_tensor("s", 1, [], [float(p.scale[0])])
    zero = helper.make_tensor("z", onnx.TensorProto.UINT8, [], [int(p.zero_point[0])])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [None])],
                              [helper.make_tensor_value_info("q", 2, [None])], [scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], Q.uniform_quantize(x, p))


@pytest.mark.tensorrt
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_tensorrt_engine_builds_for_every_softmax_quantizer(name, tmp_path):
    """Log quantizers: one plugin layer serves them all; uniform: TensorRT's own Q/DQ."""
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")):
        pytest.skip("neither tensorrt nor tensorrt_rtx imports")
    from onnxquant import tensorrt as qt
    from graphs import mixed_model

    r = quantize(mixed_model(), calibration(), softmax_quantizer=name, target="tensorrt")
    path = tmp_path / "m.onnx"
    onnx.save(r.model, path)
    report = qt.build_engine(str(path), str(tmp_path / "m.engine"))
    assert report.plugin_layers == (0 if name == "uniform" else 1)
    assert len(report.int8_eligible) == 4


def test_adalog_searches_its_step_on_calibration_samples():
    """Calibration keeps a sample of the attention probabilities for adalog; at 4 bits the
    searched step beats the min-max grid on this model (error measured ~2.5x lower)."""
    from graphs import run_ort

    model = sdpa_model("mul")
    x = calibration()
    errors = {}
    for name in ("log2", "adalog"):
        r = quantize(model, x, softmax_quantizer=name, softmax_bits=4, parts=("softmax",))
        (y,), (yq,) = run_ort(model, {"x": x}), run_ort(r.model, {"x": x})
        errors[name] = float(np.sum((y - yq) ** 2) / np.sum(y ** 2))
        if name == "adalog":
            assert r.plan.attention[0].spec.step is not None
            assert r.plan.stats[r.plan.attention[0].output].sample is not None
    assert errors["adalog"] < errors["log2"]
