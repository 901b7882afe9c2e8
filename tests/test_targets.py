"""Weight formats, the linear part and the ort target on the real mobilevit_xxs checkpoint:
structure, what onnxruntime makes of it (optimized graph), numerics against float."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxquant
from onnxquant import QuantConfig
from conftest import need_shared

CONV_PARTS = {"conv_block", "transformer", "bridge"}


@pytest.fixture(scope="module")
def model_path():
    return str(need_shared("reference", "mobilevit_xxs.imagenette.onnx"))


@pytest.fixture(scope="module")
def calib():
    return np.random.default_rng(0).random((8, 3, 128, 128), np.float32)


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    path, opt = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    onnx.save(model, path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(opt)
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(opt).graph.node)


def _run(model, x):
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_folded_weights_equal_dequantize_linear_and_fold_at_load(model_path, calib, tmp_path):
    base = dict(per_channel=True, parts=CONV_PARTS)
    qdq = onnxquant.quantize(model_path, QuantConfig(**base), calib)
    folded = onnxquant.quantize(model_path, QuantConfig(weight_format="folded", **base), calib)
    onnx.checker.check_model(folded, full_check=True)
    x = calib[:2]
    np.testing.assert_allclose(_run(folded, x), _run(qdq, x), atol=1e-5)
    assert sum(n.op_type == "Cast" for n in folded.graph.node) == 35
    ops = _optimized_ops(folded, tmp_path)
    assert ops["Cast"] == 0 and ops["DequantizeLinear"] == 0  # all folded by onnxruntime
    assert _optimized_ops(qdq, tmp_path)["DequantizeLinear"] == 35  # never folded


def test_linear_part_quantizes_matmul_and_gemm_weights(model_path, calib):
    result = onnxquant.run(model_path, QuantConfig(parts=CONV_PARTS | {"linear"}), calib,
                           progress=False)
    assert result.counts == {"convs": 35, "linears": 37, "softmax": 0}  # 36 MatMul + head Gemm
    ops = collections.Counter(n.op_type for n in result.model.graph.node)
    assert ops["DequantizeLinear"] == 35 + 37
    x = calib[:2]
    assert np.abs(_run(result.model, x) - _run(model_path, x)).max() < 0.5  # measured 0.06-0.2
    assert result.model.ByteSize() < 0.32 * onnx.load(model_path).ByteSize()


def test_ort_target_fuses_into_int8_kernels(model_path, calib, tmp_path):
    cfg = QuantConfig(target="ort", ort_int8_kinds=("dense", "linear"))
    result = onnxquant.run(model_path, cfg, calib, progress=False)
    onnx.checker.check_model(result.model, full_check=True)
    ops = _optimized_ops(result.model, tmp_path)
    dense = sum(c.kind == "dense" for c in result.plan.convs)
    assert dense == 6
    assert ops["QLinearConv"] == dense  # DQ -> Conv(int32 bias) -> Q fused
    assert ops["DynamicQuantizeMatMul"] == 36  # every transformer linear MatMul
    assert "Log2QuantDequant" not in ops and ops["Conv"] == 35 - dense  # others stay float
    x = calib[:2]
    assert np.abs(_run(result.model, x) - _run(model_path, x)).max() < 0.5  # measured ~0.17


def test_measure_kernels_keeps_only_kinds_that_speed_the_model_up(model_path, monkeypatch):
    from onnxquant import kernel_probe

    # fake timings: dense, depthwise and linear pay, the others do not; mobilevit_xxs has
    # no grouped convs, so that kind is never timed
    gains = {"dense": 0.8, "pointwise": 1.2, "depthwise": 0.9, "stem": 1.0, "linear": 0.9}
    tried = []

    final_gain = [1.2]

    def fake_compare(variants, a, b):
        if len(b) == len(a) + 1:  # greedy step: time(a) / time(b)
            tried.append(b[-1])
            return 1.0 / gains[b[-1]]
        tried.append("final")
        return final_gain[0]

    monkeypatch.setattr(kernel_probe, "_compare", fake_compare)
    model = onnx.load(model_path)
    _, plan = onnxquant.analyze(model, QuantConfig(target="ort", ort_int8_kinds=()))
    present = kernel_probe.present_kinds(plan)

    def choose():
        return kernel_probe.choose_int8_kinds(model, QuantConfig(target="ort"), present, None)

    kinds = choose()
    assert kinds == ("dense", "depthwise", "linear")
    assert tried == ["dense", "pointwise", "depthwise", "stem", "linear", "final"]
    # the choice is cached for this CPU + onnxruntime + model structure: no timing again
    tried.clear()
    assert choose() == kinds
    assert tried == []
    kernel_probe.probe_cache.cache_path().unlink()
    final_gain[0] = 1.01  # the whole placement not measurably faster than none: keep none
    assert choose() == ()


def test_ort_target_measures_by_default(model_path, calib, tmp_path):
    """Whatever this CPU chose, the model holds exactly that placement."""
    result = onnxquant.run(model_path, QuantConfig(target="ort"), calib, progress=False)
    kinds = result.config.ort_int8_kinds
    assert kinds is not None and result.seconds["kernel probe"] > 0
    onnx.checker.check_model(result.model, full_check=True)
    ops = _optimized_ops(result.model, tmp_path)
    assert ops["QLinearConv"] == sum(c.kind in kinds for c in result.plan.convs)
    assert ops["DynamicQuantizeMatMul"] == (36 if "linear" in kinds else 0)


def test_ort_int8_kinds_option_places_qlinearconv(model_path, calib, tmp_path):
    cfg = QuantConfig(target="ort", ort_int8_kinds=("dense", "depthwise"))
    result = onnxquant.run(model_path, cfg, calib, progress=False)
    expected = sum(c.kind in ("dense", "depthwise") for c in result.plan.convs)
    assert expected == 13
    assert _optimized_ops(result.model, tmp_path)["QLinearConv"] == expected
    with pytest.raises(ValueError, match="unknown int8 kinds"):
        QuantConfig(ort_int8_kinds=("sparse",))


@pytest.mark.parametrize("first, later, extra", [
    (1.04, 1.09, True),   # just below the margin: timed again, decided on all pairs
    (1.06, 1.00, True),   # just above: timed again too
    (1.20, 1.00, False),  # clearly faster: decided at once
    (0.90, 1.50, False),  # clearly slower
])
def test_comparisons_near_the_margin_are_timed_again(monkeypatch, first, later, extra):
    from onnxquant import kernel_probe

    calls = []

    def fake_timed(session, feed):  # time(a) / time(b) = first, then later after the batch
        calls.append(session)
        pairs_done = (len(calls) - 2) // 2  # the first two calls size the comparison
        ratio = first if pairs_done < kernel_probe.MIN_PAIRS else later
        return ratio if session == "a" else 1.0

    class Variants:
        feed = {}

        def session(self, kinds):
            return "a" if kinds == () else "b"

    monkeypatch.setattr(kernel_probe, "_timed", fake_timed)
    monkeypatch.setattr(kernel_probe, "TIME_PER_COMPARISON", 0.0)  # MIN_PAIRS pairs
    median = kernel_probe._compare(Variants(), (), ("dense",))
    pairs = (len(calls) - 2) // 2
    n = kernel_probe.MIN_PAIRS
    assert pairs == (n + kernel_probe.EXTRA * n if extra else n)
    assert median == pytest.approx(later if extra else first)
