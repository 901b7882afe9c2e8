"""GPTQ's float target (gptq.float_target, reconstruct.FLOAT_TARGET): the regression against
its least-squares definition, the shrinkage of its cross moment, the float values the walk
hands it, and the reconstructed model against plain GPTQ on held-out inputs."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from graphs import LOW_BIT_CASES, calibration, conv_chain_model, output_error, quantize, run_ort
from onnxquant import gptq, reconstruct
from onnxquant.layers import conv_columns


def _inputs(seed, groups=2, cols=6, n=300, samples=1):
    """(w [G, R, C], x [G, C, n], x_float, sample of each column): x_float = x plus a drift
    that is linear in x plus noise, like an upstream layer's rounding error."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((groups, 4, cols))
    # correlated columns, but well conditioned: H is a float32 product, and a near-singular
    # mixing (a plain Gaussian matrix) leaves the fit 1e-3 off its float64 optimum
    mixing = np.eye(cols) + 0.3 * rng.standard_normal((groups, cols, cols)) / np.sqrt(cols)
    x = np.matmul(mixing, rng.standard_normal((groups, cols, n)))
    drift = 0.2 * np.matmul(rng.standard_normal((groups, cols, cols)), x)
    x_float = x + drift + 0.05 * rng.standard_normal(x.shape)
    return w, x, x_float, np.repeat(np.arange(samples), -(-n // samples))[:n]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), groups=st.integers(1, 3), cols=st.integers(1, 10))
def test_float_target_is_the_least_squares_fit_of_the_float_output(seed, groups, cols):
    """One sample (no shrinkage) and no damping: W* = argmin ||W x_float - W* x||^2."""
    w, x, x_float, samples = _inputs(seed, groups, cols)
    got = gptq.float_target(w, x, x_float, gptq.hessian(x), samples, damp=0.0)
    for g in range(groups):  # lstsq: x^T W*^T = x_float^T W^T
        want = np.linalg.lstsq(x[g].T, x_float[g].T @ w[g].T, rcond=None)[0].T
        # compared by the loss: H and D are float32 products, so ill-conditioned x moves W*
        # along flat ways
        loss = [np.sum((w[g] @ x_float[g] - v @ x[g]) ** 2) for v in (got[g], want, w[g])]
        assert loss[0] <= loss[1] * (1 + 1e-3) + 1e-9
        assert loss[0] <= loss[2]


def test_float_target_is_the_weight_where_the_inputs_agree():
    w, x, _, samples = _inputs(0, samples=5)
    h = gptq.hessian(x, samples)
    np.testing.assert_array_equal(gptq.float_target(w, x, x, h, samples), w)


def test_damping_pulls_the_target_back_toward_the_weight():
    w, x, x_float, samples = _inputs(1)
    h = gptq.hessian(x)
    moves = [np.linalg.norm(gptq.float_target(w, x, x_float, h, samples, damp=d) - w)
             for d in (0.0, 0.1, 10.0)]
    assert moves[0] > moves[1] > moves[2] > 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), samples=st.integers(8, 16))
def test_cross_shrinkage_is_zero_when_every_sample_agrees_and_near_one_for_noise(seed, samples):
    """Samples with the same columns: nothing to shrink. A drift unrelated to x: each
    sample's D_i is noise around 0, and the intensity is about 1 - 1/samples."""
    rng = np.random.default_rng(seed)
    x1 = rng.standard_normal((1, 12, 40))
    dx1 = 0.3 * rng.standard_normal((1, 12, 12)) @ x1
    x, dx = np.tile(x1, samples), np.tile(dx1, samples)  # the same columns in every sample
    ids = np.repeat(np.arange(samples), 40)
    d = dx @ np.swapaxes(x, 1, 2) / x.shape[2]
    assert gptq.cross_shrinkage(x, dx, d, ids)[0] == pytest.approx(0.0, abs=1e-12)
    noise = rng.standard_normal(x.shape)
    d = noise @ np.swapaxes(x, 1, 2) / x.shape[2]
    rho = gptq.cross_shrinkage(x, noise, d, ids)[0]
    assert 0.5 < rho <= 1.0


def _cross_shrinkage_by_definition(x, dx, samples):
    n, ids = x.shape[2], np.asarray(samples)
    d = dx @ np.swapaxes(x, 1, 2) / n
    var = 0.0
    for i in np.unique(ids):
        xi, dxi = x[:, :, ids == i], dx[:, :, ids == i]
        di = dxi @ np.swapaxes(xi, 1, 2) / xi.shape[2]
        var = var + (xi.shape[2] / n) ** 2 * np.sum((di - d) ** 2, axis=(1, 2))
    return np.clip(var / np.sum(d ** 2, axis=(1, 2)), 0, 1), d


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), groups=st.integers(1, 3), cols=st.integers(1, 8),
       counts=st.lists(st.integers(1, 6), min_size=2, max_size=6), equal=st.booleans(),
       batched=st.booleans())
def test_cross_shrinkage_matches_its_definition(seed, groups, cols, counts, equal, batched):
    """Equal column counts per sample (batched, or looped above BATCHED_ELEMENTS) and
    unequal ones give the definition's intensity."""
    counts = [counts[0]] * len(counts) if equal else counts
    ids = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((groups, cols, len(ids))).astype(np.float32)
    dx = (0.3 * x + rng.standard_normal(x.shape)).astype(np.float32)
    want, d = _cross_shrinkage_by_definition(x.astype(np.float64), dx.astype(np.float64), ids)
    limit = gptq.BATCHED_ELEMENTS
    try:
        gptq.BATCHED_ELEMENTS = limit if batched else 0
        got = gptq.cross_shrinkage(x, dx, d, ids)
    finally:
        gptq.BATCHED_ELEMENTS = limit
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_drift_the_samples_disagree_on_barely_moves_the_weight():
    """x_f - x unrelated to x: the one-sample fit (no shrinkage) moves W by the noise it
    fits; over 32 samples the shrinkage takes most of that back."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 12, 32 * 20))
    x_float = x + rng.standard_normal(x.shape)
    w = rng.standard_normal((1, 4, 12))
    h = gptq.hessian(x)
    one = np.zeros(x.shape[2], np.int64)
    many = np.repeat(np.arange(32), 20)
    unshrunk = np.linalg.norm(gptq.float_target(w, x, x_float, h, one) - w)
    shrunk = np.linalg.norm(gptq.float_target(w, x, x_float, h, many) - w)
    assert shrunk < 0.25 * unshrunk


def test_one_sample_is_not_shrunk():
    w, x, x_float, samples = _inputs(2)
    d = (x_float - x) @ np.swapaxes(x, 1, 2) / x.shape[2]
    assert np.all(gptq.cross_shrinkage(x, x_float - x, d, samples) == 0)


@pytest.mark.parametrize("make, options", LOW_BIT_CASES)
def test_the_float_target_beats_plain_gptq_on_held_out_inputs(monkeypatch, make, options):
    model = make(seed=2)
    calib, held_out = calibration(64, seed=1), calibration(64, seed=2)
    with_target = quantize(model, calib, reconstruct="gptq", **options)
    monkeypatch.setattr(reconstruct, "FLOAT_TARGET", False)
    plain = quantize(model, calib, reconstruct="gptq", **options)
    assert output_error(model, with_target.model, held_out) < \
        output_error(model, plain.model, held_out)


def test_gptq_is_given_the_float_models_and_the_quantized_models_layer_inputs(monkeypatch):
    """The walk's float values are the float model's own: each layer's x_float columns are
    the float model's input of that layer; x is the one in the model quantized so far."""
    model, calib = conv_chain_model(seed=2), calibration(16, seed=1)
    seen = []
    real = gptq.float_target

    def recording(w, x, x_float, h, samples, **kw):
        seen.append((x, x_float))
        return real(w, x, x_float, h, samples, **kw)

    monkeypatch.setattr(gptq, "float_target", recording)
    quantize(model, calib, weight_bits=3, per_channel=True, reconstruct="gptq")
    assert len(seen) == 3  # conv1, conv2, conv3
    act1, act2 = run_ort(model, {"x": calib}, ["act1_out", "act2_out"])
    for (x, x_float), value, k in zip(seen[1:], (act1, act2), (3, 1)):
        attrs = {"pads": [k // 2] * 4}
        want = conv_columns(value, attrs, (8, 8, k, k), gptq.MAX_SAMPLES)
        np.testing.assert_allclose(x_float, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(x, x_float, atol=1e-3)  # the quantized model's drifted
    np.testing.assert_array_equal(seen[0][0], seen[0][1])  # conv1 reads the image


@pytest.mark.parametrize("samples, float_target, keeps", [
    (reconstruct.MIN_TARGET_SAMPLES, True, True),
    (reconstruct.MIN_TARGET_SAMPLES - 1, True, False),  # too few for the target: no copy
    (reconstruct.MIN_TARGET_SAMPLES, False, False),
])
def test_plain_gptq_keeps_no_float_copy_of_the_boundary_values(monkeypatch, samples,
                                                               float_target, keeps):
    """The walk holds the float model's boundary values only where something reads them."""
    walks = []
    real = reconstruct._Walk

    def recording(*args, **kwargs):
        walks.append(real(*args, **kwargs))
        return walks[-1]

    monkeypatch.setattr(reconstruct, "_Walk", recording)
    monkeypatch.setattr(reconstruct, "FLOAT_TARGET", float_target)
    quantize(conv_chain_model(seed=2), calibration(samples, seed=1), weight_bits=3,
             per_channel=True, reconstruct="gptq")
    assert (walks[0].fa is not None) == keeps and (walks[0].f is not None) == keeps


@pytest.mark.parametrize("samples, says", [
    (reconstruct.MIN_TARGET_SAMPLES, "3 of 3 layers"),
    (reconstruct.MIN_TARGET_SAMPLES - 1, "0 of 3 layers; 3 with fewer than"),
])
def test_the_summary_says_which_layers_had_the_float_target(samples, says):
    res = quantize(conv_chain_model(seed=2), calibration(samples, seed=1), weight_bits=3,
                   per_channel=True, reconstruct="gptq")
    note = next(n for n in res.plan.notes if n.startswith("GPTQ's float target"))
    assert says in note
