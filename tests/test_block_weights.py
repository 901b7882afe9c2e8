"""Block-wise weight scales (``weight_block_size``): one scale per block of B input channels
of each output channel of a MatMul/Gemm weight, DequantizeLinear-21 ``block_size``.

The NumPy reference is plain per-channel quantization of each block on its own; GPTQ on a
block grid must stay on that grid; the emitted model must dequantize exactly as the reference
in onnxruntime, store INT4, and run the linear layers weight-only on every target.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import graphs
from onnxquant import QuantConfig, gptq, opset, quantizers

LINEARS = ("attn_q_proj", "attn_k_proj", "attn_v_proj", "head_fc")
ALL_PARTS = frozenset({"conv_block", "transformer", "bridge", "softmax", "linear"})


def _blocks(w: np.ndarray, axis: int, size: int) -> list:
    return [np.take(w, np.arange(i, min(i + size, w.shape[axis])), axis=axis)
            for i in range(0, w.shape[axis], size)]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), rows=st.integers(1, 40), cols=st.integers(1, 9),
       axis=st.sampled_from([0, 1]), size=st.integers(2, 45), bits=st.integers(2, 8),
       symmetric=st.booleans())
def test_block_params_are_each_blocks_per_channel_params(seed, rows, cols, axis, size, bits,
                                                         symmetric):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    p = quantizers.uniform_params(w, bits, symmetric, axis=axis, block_size=size)
    assert p.scale.shape == tuple(-(-d // size) if i == axis else d for i, d in enumerate(w.shape))
    for b, block in enumerate(_blocks(w, axis, size)):
        ref = quantizers.uniform_params(block, bits, symmetric, axis=1 - axis)
        np.testing.assert_array_equal(np.take(p.scale, b, axis=axis), ref.scale)
        np.testing.assert_array_equal(np.take(p.zero_point, b, axis=axis), ref.zero_point)
    codes = quantizers.uniform_quantize(w, p)
    s, _ = p.expanded(w.shape)
    err = np.abs(quantizers.uniform_dequantize(codes, p).astype(np.float64) - w)
    assert np.all(err <= s / 2 * (1 + 1e-5) + 1e-7)  # min-max: nothing clips


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), rows=st.integers(1, 20), size=st.integers(2, 25),
       symmetric=st.booleans())
def test_clipping_per_block_is_clipping_each_block(seed, rows, size, symmetric):
    w = np.random.default_rng(seed).standard_normal((rows, 5)) * np.array([1, 3, 0.1, 10, 1])
    p = quantizers.clipped_params(
        quantizers.uniform_params(w, 4, symmetric, axis=0, block_size=size), w)
    for b, block in enumerate(_blocks(w, 0, size)):
        ref = quantizers.clipped_params(quantizers.uniform_params(block, 4, symmetric, axis=1),
                                        block)
        np.testing.assert_array_equal(p.scale[b], ref.scale)
        np.testing.assert_array_equal(p.zero_point[b], ref.zero_point)


def _stack_problem(seed: int, rows: int = 6, cols: int = 24, size: int = 8):
    """One linear layer as a GPTQ stack [1, R, C] with a block grid [1, R, C]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)) * rng.uniform(0.1, 3, cols)  # blocks differ in range
    p = quantizers.uniform_params(w, 4, True, axis=1, block_size=size)
    s, z = (np.broadcast_to(a, w.shape)[None] for a in p.expanded(w.shape))
    x = rng.standard_normal((cols, 200)) + rng.standard_normal((1, 200))  # correlated inputs
    return w[None], gptq.hessian(x[None]), s, z, p


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_gptq_on_a_block_grid_with_diagonal_h_rounds_to_nearest(seed):
    w, _, s, z, p = _stack_problem(seed)
    h = np.diag(np.random.default_rng(seed).uniform(0.5, 2, w.shape[2]))[None]
    codes = gptq.gptq(w, h, s, z, p.qmin, p.qmax, damp=0.0)
    np.testing.assert_array_equal(codes, gptq.quantize_rows(w, s, z, p.qmin, p.qmax))


def test_gptq_on_a_block_grid_beats_rounding_and_stays_on_it():
    wins = 0
    for seed in range(20):
        w, h, s, z, p = _stack_problem(seed)
        codes = gptq.gptq(w, h, s, z, p.qmin, p.qmax)
        assert codes.min() >= p.qmin and codes.max() <= p.qmax
        rtn = gptq.quantize_rows(w, s, z, p.qmin, p.qmax)
        err = gptq.layer_error(w, (codes - z) * s, h)
        assert err <= 1.5 * gptq.layer_error(w, (rtn - z) * s, h)
        wins += err < gptq.layer_error(w, (rtn - z) * s, h)
    assert wins >= 17


def _dq_of(model: onnx.ModelProto, node: str) -> onnx.NodeProto:
    producers = {o: n for n in model.graph.node for o in n.output}
    return producers[graphs.nodes_by_name(model)[node].input[1]]


@pytest.mark.parametrize("size", [3, 4, 8])
def test_block_wise_linears_dequantize_as_the_reference_in_onnxruntime(size):
    model = graphs.sdpa_model(head=True)
    calib = graphs.calibration()
    result = graphs.quantize(model, calib, weight_bits=4, parts=ALL_PARTS, weight_block_size=size)
    out = result.model
    assert opset.model_opset(out) >= 21
    assert any("stored as UINT4" in n for n in result.plan.notes), result.plan.notes
    for name in LINEARS:
        dq = _dq_of(out, name)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        node = graphs.nodes_by_name(model)[name]
        w = graphs.weight_value(model, node.input[1])
        k_axis = 1 if node.op_type == "Gemm" else 0  # head_fc: Gemm transB=1, W [N, K]
        assert attrs == {"axis": k_axis, "block_size": size}
        p = quantizers.uniform_params(w, 4, False, axis=k_axis, block_size=size)
        expected = quantizers.uniform_dequantize(quantizers.uniform_quantize(w, p), p)
        got = graphs.run_ort(out, {"x": calib[:2]}, [dq.output[0]])[0]
        np.testing.assert_array_equal(got, expected)


def test_blocks_halve_the_linear_weight_error_of_per_channel():
    """Finer grids: the dequantized linear weights lie closer to the float ones."""
    model, calib = graphs.sdpa_model(head=True), graphs.calibration()
    errors = {}
    for size in (None, 2):
        out = graphs.quantize(model, calib, weight_bits=4, parts=ALL_PARTS,
                              weight_block_size=size).model
        errors[size] = sum(
            float(np.sum((graphs.run_ort(out, {"x": calib[:1]}, [_dq_of(out, n).output[0]])[0]
                          - graphs.weight_value(model, graphs.nodes_by_name(model)[n].input[1]))
                         ** 2)) for n in LINEARS)
    assert errors[2] < 0.5 * errors[None], errors


def test_tensorrt_block_wise_linears_are_int4_weight_only():
    model, calib = graphs.sdpa_model(head=True), graphs.calibration()
    out = graphs.quantize(model, calib, target="tensorrt", weight_bits=4,
                          weight_block_size=4).model
    producers = {o: n for n in out.graph.node for o in n.output}
    inits = {i.name: i for i in out.graph.initializer}
    for name in LINEARS:
        node = graphs.nodes_by_name(out)[name]
        assert producers[node.input[0]].op_type != "DequantizeLinear", name  # float input
        dq = _dq_of(out, name)
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT4
        assert not numpy_helper.to_array(inits[dq.input[2]]).astype(np.int8).any()
    conv_codes = inits[_dq_of(out, "conv_in").input[0]]
    assert conv_codes.data_type == onnx.TensorProto.INT8  # int8 conv kernels keep INT8


def test_per_channel_models_keep_their_opset():
    out = graphs.quantize(graphs.sdpa_model(head=True), graphs.calibration(), weight_bits=4,
                          parts=ALL_PARTS).model
    assert all(not any(a.name == "block_size" for a in n.attribute) for n in out.graph.node)


@pytest.mark.parametrize("options, message", [
    ({"weight_block_size": 1, "parts": ALL_PARTS}, ">= 2"),
    ({"weight_block_size": 32}, "add 'linear'"),
    ({"weight_block_size": 32, "target": "ort"}, "targets 'paper' and 'tensorrt'"),
    ({"weight_block_size": 32, "parts": ALL_PARTS, "weight_format": "folded"}, "'qdq'"),
    ({"weight_block_size": 32, "parts": ALL_PARTS, "per_channel": False}, "per-channel"),
    ({"weight_block_size": 32, "target": "tensorrt"}, "INT4 only"),
])
def test_block_size_that_would_be_ignored_or_unbuildable_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**options)


def test_gptq_through_the_driver_keeps_the_block_grid_and_beats_rounding():
    model, calib = graphs.sdpa_model(head=True), graphs.calibration(16)
    opts = dict(weight_bits=3, parts=ALL_PARTS, weight_block_size=4)
    rtn = graphs.quantize(model, calib, **opts).model
    fitted = graphs.quantize(model, calib, reconstruct="gptq", **opts).model
    x = graphs.calibration(16, seed=1)
    want = graphs.run_ort(model, {"x": x})[0]

    def error(m):
        return float(np.linalg.norm(graphs.run_ort(m, {"x": x})[0] - want))

    for name in LINEARS:
        assert {a.name for a in _dq_of(fitted, name).attribute} == {"axis", "block_size"}
    assert error(fitted) < error(rtn)


@pytest.mark.parametrize("target, extra", [("tensorrt", {}), ("paper", {"parts": ALL_PARTS})])
def test_auto_search_keeps_the_blocks_and_tensorrt_symmetric(target, extra):
    """--auto searches only the scheme of block-wise weights (per-tensor has no blocks), and
    TensorRT's INT4 weight-only weights stay symmetric (it rejects zero points)."""
    model, calib = graphs.sdpa_model(head=True), graphs.calibration(16)
    result = graphs.quantize(model, calib, target=target, weight_bits=4, weight_block_size=4,
                             auto=True, **extra)
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    for name in LINEARS:
        dq = _dq_of(result.model, name)
        assert {a.name for a in dq.attribute} == {"axis", "block_size"}
        if target == "tensorrt":
            assert not inits[dq.input[2]].astype(np.int8).any()
