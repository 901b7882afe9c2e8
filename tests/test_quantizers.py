"""Quantizer math alone: codes in range, round-trip bounds, zeros, saturation, constants."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from onnxquant import quantizers as Q


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [None, 0])
def test_uniform_codes_in_range_and_error_bound(rng, bits, symmetric, axis):
    w = rng.normal(0, 0.1, (8, 4, 3, 3)).astype(np.float32)
    p = Q.uniform_params(w, bits, symmetric, axis)
    q = Q.uniform_quantize(w, p)
    assert q.dtype == (np.int8 if symmetric else np.uint8)
    assert q.min() >= p.qmin and q.max() <= p.qmax
    err = np.abs(Q.uniform_dequantize(q, p) - w)
    scale = p.scale if axis is None else p.scale.reshape(-1, 1, 1, 1)
    assert np.all(err <= scale / 2 + 1e-7)  # round to nearest: half a step at most


def test_uniform_matches_paper_formula(rng):
    w = rng.uniform(-0.3, 0.7, 1000)
    p = Q.uniform_params(w, 8)
    s = (w.max() - w.min()) / 255
    assert p.scale[0] == pytest.approx(s, rel=1e-6)
    assert p.zero_point[0] == round(-w.min() / s)
    expected = np.clip(np.round(w / np.float64(p.scale[0])) + p.zero_point[0], 0, 255)
    np.testing.assert_array_equal(Q.uniform_quantize(w, p), expected)


def test_uniform_zero_is_exact_and_positive_tensor_keeps_valid_zero_point():
    w = np.array([0.0, 0.5, 1.0, 2.0], np.float32)  # all >= 0: paper formula would give z = 0
    p = Q.uniform_params(w, 8)
    assert p.zero_point[0] == 0
    assert Q.uniform_fake_quant(w)[0] == 0.0
    w = np.array([-1.0, 0.0, 3.0], np.float32)
    assert Q.uniform_fake_quant(w)[1] == 0.0


def test_uniform_constant_and_zero_tensors():
    for w in (np.zeros((4, 2, 1, 1), np.float32), np.full((4, 2, 1, 1), 0.25, np.float32)):
        out = Q.uniform_fake_quant(w, axis=0)
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, w, atol=0.25 / 255 + 1e-7)


def test_uniform_saturates_outside_calibrated_range(rng):
    w = rng.normal(size=100)
    p = Q.uniform_params(w, 8)
    q = Q.uniform_quantize(np.array([1e6, -1e6]), p)
    assert list(q) == [255, 0]


def test_per_channel_scales_follow_each_channel():
    w = np.stack([np.full((2, 3, 3), 0.01), np.full((2, 3, 3), 10.0)]).astype(np.float32)
    w[:, 0, 0, 0] *= -1
    p = Q.uniform_params(w, 8, symmetric=True, axis=0)
    np.testing.assert_allclose(p.scale, [0.01 / 127, 10.0 / 127], rtol=1e-6)


def test_bits_out_of_range():
    with pytest.raises(ValueError):
        Q.uniform_params(np.ones(3), 9)
    with pytest.raises(ValueError):
        Q.log2_params(0.0, 1.0, 1)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_log2_codes_in_range_and_relative_error(rng, bits):
    x = softmax(rng.normal(0, 3, (4, 64, 64))).astype(np.float32)
    p = Q.log2_params(x.min(), x.max(), bits, eps=2.0**-16)
    q = Q.log2_quantize(x, p)
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    x_hat = Q.log2_dequantize(q, p)
    inside = x >= 2.0 ** (-p.zero_point * p.scale) * 2 ** (p.scale / 2)
    # log-domain rounding: relative error at most 2^(s/2) - 1 inside the calibrated range,
    # widened by the boundaries' snap to SNAP_BITS mantissa bits (relative 2^-(SNAP_BITS+1))
    rel = np.abs(x_hat[inside] / x[inside] - 1)
    assert rel.max() <= 2 ** (p.scale / 2) * (1 + 2.0 ** -(Q.SNAP_BITS + 1)) - 1 + 1e-6


def test_log2_paper_formula():
    p = Q.log2_params(2.0**-20, 0.5, 8, eps=2.0**-16)
    l_min, l_max = -16.0, -1.0  # min clamped to eps
    s = (l_max - l_min) / 255
    assert p.scale == pytest.approx(s, rel=1e-6)
    assert p.zero_point == round(-l_min / s)
    assert Q.log2_quantize(np.array([0.5]), p)[0] == 255
    assert Q.log2_quantize(np.array([2.0**-16]), p)[0] == 0


def test_log2_zeros_map_to_eps_code_and_dequantize_small():
    p = Q.log2_params(0.0, 1.0, 8, eps=2.0**-16)
    q = Q.log2_quantize(np.zeros(3), p)
    assert np.all(q == 0)
    assert np.all(Q.log2_dequantize(q, p) == pytest.approx(2.0**-16, rel=0.03))


def test_log2_saturates_and_handles_constant_input():
    p = Q.log2_params(0.25, 0.25, 8)  # constant input: one value, still finite parameters
    assert p.scale > 0
    assert Q.log2_fake_quant(np.array([0.25]), p)[0] == pytest.approx(0.25, rel=1e-6)
    q = Q.log2_quantize(np.array([10.0, 1e-30]), Q.log2_params(1e-3, 0.5))
    assert q[0] == 255 and q[1] == 0


def test_log2_one_is_exact_when_calibrated_max_is_one():
    p = Q.log2_params(1e-6, 1.0, 8)
    assert Q.log2_fake_quant(np.array([1.0], np.float32), p)[0] == 1.0


def test_widen_for_bias_keeps_int32_bias_codes_in_range():
    from onnxquant import quantizers

    w = np.stack([np.full((2, 3, 3), 1e-9), np.linspace(-1, 1, 18).reshape(2, 3, 3)])
    bias = np.array([50.0, 0.1])
    p = quantizers.uniform_params(w, 7, symmetric=True, axis=0)
    act_scale = 1e-3
    assert abs(bias[0] / (act_scale * p.scale[0])) > quantizers.INT32_MAX  # would saturate
    q = quantizers.widen_for_bias(p, bias, act_scale)
    codes = bias / (act_scale * q.scale.astype(np.float64))
    assert np.all(np.abs(codes) <= quantizers.INT32_MAX)
    assert q.scale[1] == p.scale[1]  # channels that fit keep their scale
    per_tensor = quantizers.widen_for_bias(quantizers.uniform_params(w, 7, True), bias, act_scale)
    assert np.abs(bias / (act_scale * per_tensor.scale[0])).max() <= quantizers.INT32_MAX


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), bits=st.integers(2, 8), symmetric=st.booleans(),
       per_channel=st.booleans())
def test_clipped_grid_never_has_more_error_than_min_max(seed, bits, symmetric, per_channel):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, (6, 5, 3, 3))  # heavy tails: outliers a clipped grid can give up
    p = Q.uniform_params(w, bits, symmetric, 0 if per_channel else None)
    c = Q.clipped_params(p, w)

    def err(params):
        d = Q.uniform_dequantize(Q.uniform_quantize(w, params), params) - w
        rows = d.reshape(1, -1) if params.axis is None else d.reshape(len(d), -1)
        return np.sum(np.abs(rows) ** Q.CLIP_NORM, axis=1)

    assert np.all(err(c) <= err(p) * (1 + 1e-5) + 1e-12)
    assert c.scale.shape == p.scale.shape and c.zero_point.dtype == p.zero_point.dtype
    if symmetric:
        assert not c.zero_point.any()


def test_clipping_pays_on_heavy_tailed_low_bit_weights():
    w = np.random.default_rng(0).standard_t(3, (16, 64))
    p = Q.uniform_params(w, 3, True, 0)
    c = Q.clipped_params(p, w)
    mse = [np.mean((Q.uniform_dequantize(Q.uniform_quantize(w, g), g) - w) ** 2) for g in (p, c)]
    assert mse[1] < 0.8 * mse[0] and np.all(c.scale <= p.scale * (1 + 1e-6))
