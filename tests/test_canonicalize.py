"""Canonicalization (passes/canonicalize.py, fold_batchnorm.py) and opset conversion (opset.py).

Each test builds a tiny graph with what an exporter leaves behind, checks the match the
passes make through it, and the quantized output against the float model in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxquant
from onnxquant import opset
from onnxquant.errors import UserError
from graphs import Builder, calibration, log2_nodes, quantize, run_ort


def _sdpa_with(between: str, opset_version: int = 17, seed: int = 0) -> onnx.ModelProto:
    """sdpa attention with ``between`` (Identity / Dropout / Cast) after its Softmax."""
    b = Builder(seed, opset=opset_version)
    h = b.conv("conv_in", "x", 4, 8, k=3)
    model = b.build({b.conv("conv_out", b.sdpa("attn", h), 8, 4): "float[N,4,4,4]"})
    av = next(n for n in model.graph.node if n.name == "attn_av")
    extra = {"Identity": {}, "Dropout": {}, "Cast": {"to": onnx.TensorProto.FLOAT}}[between]
    node = helper.make_node(between, ["attn_p"], ["attn_p_between"], name=f"between_{between}",
                            **extra)
    av.input[0] = "attn_p_between"
    model.graph.node.insert(list(model.graph.node).index(av), node)
    onnx.checker.check_model(model, full_check=True)
    return model


def _rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize("between", ["Identity", "Dropout", "Cast"])
def test_attention_is_found_through_exporter_leftovers(between):
    model = _sdpa_with(between)
    result = quantize(model, calibration())
    assert len(result.plan.attention) == 1
    assert result.plan.canonical["bypassed"] == 1
    assert len(log2_nodes(result.model)) == 1
    assert not any(n.op_type == between for n in result.model.graph.node)
    x = calibration(seed=2)
    (y,), (yq,) = run_ort(model, {"x": x}), run_ort(result.model, {"x": x})
    assert _rel_err(y, yq) < 0.05


def test_identity_producing_a_graph_output_is_kept():
    b = Builder(0)
    y = b.conv("conv", "x", 4, 4)
    b.node(f"[out_identity] y = Identity({y})")
    model = b.build({"y": "float[N,4,4,4]"})
    result = quantize(model)
    assert [n.op_type for n in result.model.graph.node].count("Identity") == 1
    assert result.model.graph.output[0].name == "y"


def test_dropout_in_training_mode_is_not_bypassed():
    b = Builder(0, opset=17)
    b.add("ratio", np.float32(0.5))
    b.add("training", np.bool_(True))
    y = b.conv("conv", "x", 4, 4)
    b.node(f"[drop] d = Dropout({y}, ratio, training)")
    model = b.build({b.conv("conv2", "d", 4, 4): "float[N,4,4,4]"})
    result = quantize(model)
    assert result.plan.canonical["bypassed"] == 0
    assert any(n.op_type == "Dropout" for n in result.model.graph.node)


def _conv_bn_model(seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed)
    rng = np.random.default_rng(seed)
    y = b.conv("conv", "x", 4, 6, k=3)
    b.add("bn_scale", rng.uniform(0.1, 8.0, 6).astype(np.float32))  # per-channel gains
    b.add("bn_bias", rng.standard_normal(6).astype(np.float32))
    b.add("bn_mean", rng.standard_normal(6).astype(np.float32))
    b.add("bn_var", rng.uniform(0.01, 2.0, 6).astype(np.float32))
    b.node(f"[bn] z = BatchNormalization<epsilon=0.001>({y}, bn_scale, bn_bias, bn_mean, bn_var)")
    return b.build({b.conv("conv2", "z", 6, 4): "float[N,4,4,4]"})


def test_batchnorm_is_folded_into_the_conv_exactly():
    model = _conv_bn_model()
    result = quantize(model, parts=("conv_block",), weight_bits=8, per_channel=True)
    assert result.plan.canonical["bn_folded"] == 1
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node)
    x = calibration(seed=2)
    (y,), (yq,) = run_ort(model, {"x": x}), run_ort(result.model, {"x": x})
    assert _rel_err(y, yq) < 0.02
    kept = quantize(model, parts=("conv_block",), fold_batchnorm=False)
    assert any(n.op_type == "BatchNormalization" for n in kept.model.graph.node)


@pytest.mark.parametrize("options, folded", [
    ({"per_channel": False}, 0),  # per-tensor weights: BN gains would crush one grid
    ({}, 1),
    ({"target": "tensorrt"}, 1),
    ({"target": "ort", "ort_int8_kinds": ("dense",)}, 1),
    ({"fold_batchnorm": True}, 1),
    ({"fold_batchnorm": False}, 0),
])
def test_batchnorm_is_folded_where_weights_are_per_channel(options, folded):
    result = quantize(_conv_bn_model(), calibration(), **options)
    assert result.plan.canonical["bn_folded"] == folded
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("BatchNormalization") == 1 - folded


def test_unnamed_and_duplicate_nodes_get_unique_names():
    model = _sdpa_with("Identity")
    for node in model.graph.node:
        if node.name in ("conv_in", "attn_qk"):
            node.name = ""
        elif node.name == "conv_out":
            node.name = "attn_av"
    result = quantize(model, calibration(), target="tensorrt")
    names = [n.name for n in result.model.graph.node]
    assert all(names) and len(names) == len(set(names))
    assert len(result.plan.attention) == 1


def test_inserted_names_never_collide_with_existing_ones():
    """A tensor already named like an inserted one (``<w>_quantized``) is not shadowed."""
    model = _sdpa_with("Identity")
    model.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32),
                                                           "conv_in_w_quantized"))
    b_name = "attn_p_log2qdq"
    ident = helper.make_node("Identity", ["attn_p"], [b_name], name="attn_p_log2qdq")
    model.graph.node.append(ident)
    model.graph.output.append(helper.make_tensor_value_info(b_name, onnx.TensorProto.FLOAT,
                                                                  ["N", 16, 16]))
    result = quantize(model, calibration())
    onnx.checker.check_model(result.model, full_check=True)
    outs = [o.name for o in result.model.graph.output]
    assert b_name in outs and sum(n.op_type == "Softmax" for n in result.model.graph.node) == 1
    x = calibration(seed=2)
    y, p = run_ort(model, {"x": x})[:2]
    yq, pq = run_ort(result.model, {"x": x})[:2]
    assert _rel_err(p, pq) < 0.1  # the extra output still carries the probabilities
    assert _rel_err(y, yq) < 0.05


@pytest.mark.parametrize("version", [11, 12])
def test_old_opsets_are_converted_and_checked(version):
    old = _sdpa_with("Identity", opset_version=version)
    result = quantize(old, calibration(), per_channel=True, log2_body="table")
    assert opset.model_opset(result.model) == opset.MIN_OPSET
    assert any("converted to 13" in n for n in result.plan.notes)
    onnx.checker.check_model(result.model, full_check=True)
    x = calibration(seed=2)
    assert _rel_err(run_ort(old, {"x": x})[0], run_ort(result.model, {"x": x})[0]) < 0.05


@pytest.mark.parametrize("version", [13, 15, 18, 21])
def test_newer_opsets_keep_their_own_version(version):
    model = _sdpa_with("Identity", opset_version=min(version, 17))
    if version > 17:
        model = onnx.version_converter.convert_version(model, version)
    result = quantize(model, calibration(), target="tensorrt")
    assert opset.model_opset(result.model) == version
    (fn,) = [f for f in result.model.functions if f.domain == "onnxquant"]
    assert [(o.domain, o.version) for o in fn.opset_import] == [("", version)]
    onnx.checker.check_model(result.model, full_check=True)


def test_a_conversion_that_changes_outputs_is_refused(monkeypatch):
    model = _sdpa_with("Identity", opset_version=11)
    convert = onnx.version_converter.convert_version

    def broken(m, v):
        out = convert(m, v)
        w = next(i for i in out.graph.initializer if i.name == "conv_in_w")
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2, w.name))
        return out

    monkeypatch.setattr(opset.version_converter, "convert_version", broken)
    with pytest.raises(UserError, match="changed the float outputs"):
        quantize(model, calibration())


def test_half_precision_models_are_refused_with_the_fix():
    model = _sdpa_with("Identity")
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    with pytest.raises(UserError, match="float32 export"):
        onnxquant.analyze(model)


def test_non_finite_weight_stays_float_with_a_note():
    model = _sdpa_with("Identity")
    w = next(i for i in model.graph.initializer if i.name == "conv_out_w")
    arr = numpy_helper.to_array(w).copy()
    arr.flat[0] = np.nan
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    result = quantize(model, calibration(), per_channel=True)
    assert any("NaN/Inf" in n for n in result.plan.notes)
    conv_out = next(c for c in result.plan.convs if c.node == "conv_out")
    assert not conv_out.quantize and sum(c.quantize for c in result.plan.convs) == 1


def test_nan_calibration_data_is_refused():
    calib = calibration()
    calib[:] = np.nan
    with pytest.raises(UserError, match="NaN or Inf"):
        quantize(_sdpa_with("Identity"), calib)


def test_qlinearconv_bias_never_saturates():
    """A channel with near-zero weights and a large bias: int8 conv output stays close."""
    b = Builder(0)
    y = b.conv("conv", "x", 4, 4, k=3)
    model = b.build({y: "float[N,4,4,4]"})
    w = next(i for i in model.graph.initializer if i.name == "conv_w")
    arr = numpy_helper.to_array(w).copy()
    arr[0] = 1e-12
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    bias = next(i for i in model.graph.initializer if i.name == "conv_b")
    bias.CopyFrom(numpy_helper.from_array(np.array([3.0, 0.1, -0.1, 0.2], np.float32), bias.name))
    result = quantize(model, calibration(), target="ort", ort_int8_kinds=("dense", "stem"))
    assert result.plan.convs[0].int8_output
    x = calibration(seed=2)
    (yf,), (yq,) = run_ort(model, {"x": x}), run_ort(result.model, {"x": x})
    np.testing.assert_allclose(yq[:, 0], yf[:, 0], atol=0.05)


def test_last_axis_softmax_of_unknown_rank_survives_the_opset_11_conversion():
    """The Softmax 11 -> 13 adapter wraps a Softmax of unknown rank in Flatten/Reshape; the
    rank measured on a calibration batch keeps it a plain last-axis Softmax."""
    model = _sdpa_with("Identity", opset_version=11)
    sm = next(n for n in model.graph.node if n.op_type == "Softmax")
    sm.attribute[0].i = 2  # the last axis of the [N, 16, 16] scores, spelled positively
    # Squeeze without axes on [N, 16, 16]: shape inference cannot know the rank (N may be 1)
    squeeze = helper.make_node("Squeeze", [sm.input[0]], ["scores_any_rank"], name="squeeze")
    sm.input[0] = "scores_any_rank"
    model.graph.node.insert(list(model.graph.node).index(sm), squeeze)
    result = quantize(model, calibration())
    assert len(result.plan.attention) == 1 and len(log2_nodes(result.model)) == 1
    assert not any(n.op_type == "Flatten" for n in result.model.graph.node)
