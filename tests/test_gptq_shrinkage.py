"""GPTQ's Hessian shrunk with the calibration samples as observations (gptq.shrinkage):
the intensity against its formula written out in NumPy, its limits, the sample of each
column (layers.sample_columns), and what it is for: codes that hold on inputs GPTQ did not
see where few samples give many columns."""

import numpy as np
from hypothesis import given, settings, strategies as st
from onnx import helper

from onnxquant import gptq
from onnxquant.layers import Layer


def _reference_rho(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf's intensity per group from every sample's second moment, stacked."""
    out = []
    for xg in x.astype(np.float64):
        n, c = xg.shape[1], xg.shape[0]
        s = xg @ xg.T / n
        var = 0.0
        for i in np.unique(ids):
            xi = xg[:, ids == i]
            var += (xi.shape[1] / n) ** 2 * np.sum((xi @ xi.T / xi.shape[1] - s) ** 2)
        mu = np.trace(s) / c
        out.append(min(1.0, var / np.sum((s - mu * np.eye(c)) ** 2)))
    return np.array(out)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), groups=st.integers(1, 3), cols=st.integers(2, 12),
       counts=st.lists(st.integers(1, 9), min_size=2, max_size=7))
def test_the_intensity_is_ledoit_wolf_over_samples(seed, groups, cols, counts):
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(len(counts)), counts)
    x = rng.standard_normal((groups, cols, len(ids))).astype(np.float32)
    x *= rng.uniform(0.2, 3, (1, cols, 1)).astype(np.float32)  # not isotropic
    rho = gptq.shrinkage(x, gptq.hessian(x) / 2, ids)
    np.testing.assert_allclose(rho, _reference_rho(x, ids), rtol=1e-4, atol=1e-9)
    h, s = gptq.hessian(x, ids), gptq.hessian(x) / 2
    mu = np.trace(s, axis1=1, axis2=2) / cols
    want = 2 * ((1 - rho)[:, None, None] * s + (rho * mu)[:, None, None] * np.eye(cols))
    np.testing.assert_allclose(h, want, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(np.trace(h, axis1=1, axis2=2), 2 * cols * mu, rtol=1e-9)


def test_a_sample_with_fewer_columns_than_inputs_gives_the_same_intensity():
    """Samples of 3 columns for 10 inputs (the Gram route) and of 30 (C x C): both as the
    formula written out."""
    rng = np.random.default_rng(4)
    for per_sample in (3, 30):
        ids = np.repeat(np.arange(5), per_sample)
        x = (rng.standard_normal((2, 10, len(ids))) * rng.uniform(0.2, 3, (1, 10, 1)))
        x = x.astype(np.float32)
        np.testing.assert_allclose(gptq.shrinkage(x, gptq.hessian(x) / 2, ids),
                                   _reference_rho(x, ids), rtol=1e-5)


def test_nothing_to_shrink_with_one_sample_or_samples_that_agree():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 6, 10)).astype(np.float32)
    np.testing.assert_array_equal(gptq.hessian(x, np.zeros(10, int)), gptq.hessian(x))
    same = np.concatenate([x, x, x], axis=2)  # three samples with the same columns
    rho = gptq.shrinkage(same, gptq.hessian(same) / 2, np.repeat(np.arange(3), 10))
    assert rho[0] < 1e-12


def _correlated_samples(rng, samples: int, per_sample: int, mix: np.ndarray) -> tuple:
    """Columns of one sample share its latent input (an image's patches), plus noise."""
    latent = rng.standard_normal((samples, mix.shape[0])) @ mix
    x = np.repeat(latent, per_sample, axis=0) + 0.3 * rng.standard_normal(
        (samples * per_sample, mix.shape[0]))
    return x.T[None].astype(np.float32), np.repeat(np.arange(samples), per_sample)


def _fresh_error(seed: int, samples: int, per_sample: int) -> dict:
    """Output error ||(W - W_q) X||^2 on 400 fresh samples of GPTQ plain, GPTQ shrunk and
    rounding to nearest, each fitted on ``samples`` x ``per_sample`` columns."""
    rng = np.random.default_rng(seed)
    cols, rows = 64, 16
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols)
    w = rng.standard_normal((1, rows, cols))
    x, ids = _correlated_samples(rng, samples, per_sample, mix)
    fresh, _ = _correlated_samples(rng, 400, 1, mix)
    scale = np.max(np.abs(w), axis=2) / 7
    zero = np.zeros_like(scale)
    codes = {"plain": gptq.gptq(w, gptq.hessian(x), scale, zero, -8, 7),
             "shrunk": gptq.gptq(w, gptq.hessian(x, ids), scale, zero, -8, 7),
             "rtn": gptq.quantize_rows(w, scale[..., None], zero[..., None], -8, 7)}
    return {k: float(np.sum(((w - c * scale[..., None]) @ fresh) ** 2))
            for k, c in codes.items()}


def test_few_samples_many_columns_shrinking_keeps_gptq_from_fitting_them():
    """8 images of 16 columns each for 64 inputs: plain GPTQ fits those 8 and does worse
    than rounding on fresh ones (all 5 seeds); shrunk, it is at least as good as rounding
    and clearly better than plain."""
    for seed in range(5):
        e = _fresh_error(seed, samples=8, per_sample=16)
        assert e["plain"] > e["rtn"]
        assert e["shrunk"] < 0.8 * e["plain"]
        assert e["shrunk"] < 1.05 * e["rtn"]


def test_many_samples_shrinking_leaves_gptq_its_gain():
    """1024 samples: H is well estimated, little shrinking (rho about 0.06); GPTQ's gain
    over rounding on fresh inputs stays (within 10 % of plain GPTQ's error; at 256 samples,
    rho about 0.2, it is up to 13 % above plain's, still 25-40 % below rounding's)."""
    for seed in range(3):
        e = _fresh_error(seed, samples=1024, per_sample=2)
        assert e["plain"] < 0.8 * e["rtn"]
        assert e["shrunk"] < min(1.1 * e["plain"], 0.8 * e["rtn"])


def test_columns_know_their_sample():
    """Conv: the image each column comes from, samples that span several images of the
    batch (n x k sample-major); linear: the token row's sample, after subsampling; None
    where the leading axis does not split into the samples."""
    conv = Layer(None, helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
                 np.zeros((2, 3, 3, 3), np.float32), None)
    x = np.zeros((4, 3, 5, 5), np.float32)
    cols, ids = conv.sample_columns(x, limit=40, seed=0, samples=2)
    assert cols.shape[2] == len(ids) == 40
    np.testing.assert_array_equal(ids, np.repeat([0, 1], 20))
    assert conv.sample_columns(x, 40, 0, samples=3)[1] is None
    linear = Layer(None, helper.make_node("MatMul", ["x", "w"], ["y"]),
                   np.zeros((3, 2), np.float32), None)
    tokens = np.arange(6 * 10 * 3, dtype=np.float32).reshape(6, 10, 3)  # [B * k, N, C]
    cols, ids = linear.sample_columns(tokens, limit=25, seed=1, samples=3)
    rows = cols[0, 0] // 3  # the row each column came from (x[..., 0] = 3 * row)
    np.testing.assert_array_equal(ids, rows // 20)
    assert np.all(np.diff(ids) >= 0) and set(ids) == {0, 1, 2}


def test_sampled_columns_follow_the_seed_and_gemm_trans_a():
    """Subsampled columns are the same for the same seed and differ for another (conv and
    linear); Gemm with transA reads its input transposed, rows still the samples."""
    rng = np.random.default_rng(0)
    conv = Layer(None, helper.make_node("Conv", ["x", "w"], ["y"]),
                 np.zeros((2, 3, 1, 1), np.float32), None)
    linear = Layer(None, helper.make_node("MatMul", ["x", "w"], ["y"]),
                   np.zeros((3, 2), np.float32), None)
    for layer, x in ((conv, rng.standard_normal((2, 3, 6, 6))),
                     (linear, rng.standard_normal((4, 9, 3)))):
        a, b, c = (layer.sample_columns(x, 10, seed, 2)[0] for seed in (1, 1, 2))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    gemm = Layer(None, helper.make_node("Gemm", ["x", "w"], ["y"], transA=1),
                 np.zeros((3, 2), np.float32), None)
    x = rng.standard_normal((3, 8)).astype(np.float32)  # [K, M]: M = 8 samples
    cols, ids = gemm.sample_columns(x, 100, 0, 8)
    np.testing.assert_array_equal(cols[0], x)
    np.testing.assert_array_equal(ids, np.arange(8))
