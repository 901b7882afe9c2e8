"""Calibration statistics (TensorStats) and the range estimators of ranges.py.

Exact min/max over batches, histogram counts that survive re-binning, and each estimator
on distributions whose answer is known: heavy tails with outliers (clip), uniform (do not).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxquant import quantizers as Q
from onnxquant.calibrate import collect_stats
from onnxquant.config import QuantConfig
from onnxquant.ranges import BINS, METHODS, TensorStats, estimate

import graphs as g

CLIPPING = ("percentile", "mse", "entropy")


def stream(batches, histogram=True, bins=BINS) -> TensorStats:
    stats = TensorStats(histogram, bins)
    for b in batches:
        stats.update(b)
    return stats


def fake_quant_mse(x, rng_, bits, symmetric) -> float:
    """Mean squared error of x through the uniform quantizer emission builds from (lo, hi)."""
    p = Q.uniform_params(np.array(rng_), bits, symmetric)
    return float(np.mean((Q.uniform_dequantize(Q.uniform_quantize(x, p), p) - x) ** 2))


def width(r) -> float:
    return r[1] - r[0]


@pytest.fixture(scope="module", params=["laplace", "normal"])
def heavy(request):
    """10^6 values of Laplace(0, 1) or N(0, 1), and three outliers 200-300 scales out."""
    rng = np.random.default_rng(0)
    x = np.concatenate([getattr(rng, request.param)(0, 1, 1_000_000), [300.0, -200.0, 250.0]])
    x = rng.permutation(x).astype(np.float32)
    return x, stream(np.array_split(x, 7))


def test_min_max_exact_over_batches(rng):
    batches = [rng.standard_normal((3, 4, 5)).astype(np.float32) * s for s in (1, 10, 0.1, 3)]
    batches.append(np.array([np.nan, 2.5, -0.5], np.float32))  # NaN ignored, as np.nanmin
    for histogram in (False, True):
        stats = stream(batches, histogram)
        assert stats.lo == float(min(np.nanmin(b) for b in batches))
        assert stats.hi == float(max(np.nanmax(b) for b in batches))
        assert isinstance(stats.lo, float) and isinstance(stats.hi, float)


def test_behaves_as_the_min_max_pair():
    stats = TensorStats.from_array(np.array([-1.5, 0.25, 4.0], np.float32))
    lo, hi = stats
    assert (lo, hi) == (-1.5, 4.0) and stats[0] == -1.5 and stats[1] == 4.0 and stats[-1] == 4.0
    assert stats == (-1.5, 4.0) and stats != (-1.5, 5.0) and tuple(stats) == (-1.5, 4.0)
    assert np.array_equal(np.array(stats), [-1.5, 4.0])
    assert stats == TensorStats.from_array(np.array([4.0, -1.5, 0.25], np.float32))
    assert stats != TensorStats.from_array(np.array([4.0, -1.5, 0.5], np.float32))  # histogram
    assert TensorStats(histogram=False).edges is None


def test_histogram_counts_every_value(rng):
    batches = [rng.standard_normal(n).astype(np.float32) * s
               for n, s in ((1000, 1), (70_000, 5), (10, 100), (333, 0.01))]
    batches.append(np.array([np.nan, 1.0], np.float32))
    stats = stream(batches)
    assert stats.hist.sum() == sum(b.size for b in batches) - 1
    assert stats.hist.size == BINS and stats.edges.size == BINS + 1
    assert stats.radius >= max(-stats.lo, stats.hi)


def test_regrowing_moves_whole_bins():
    """Counts survive growth (R: 1 -> 3 -> 12, m = 3 then 4) and sit in the final grid's bins."""
    bins, rng = 64, np.random.default_rng(3)
    batches = [np.append(rng.uniform(-a, a, 500), a).astype(np.float32) for a in (1.0, 2.5, 12.0)]
    stats, seen = TensorStats(True, bins), 0
    for b in batches:
        stats.update(b)
        seen += b.size
        assert stats.hist.sum() == seen
    assert stats.radius == 12.0
    huge = stream([np.array([1.5e-38, -1e-38], np.float32), np.array([3e38], np.float32)])
    assert huge.hist.sum() == 3 and huge.radius >= 3e38  # growth by 2e76: both land by 0
    pos = (np.concatenate(batches).astype(np.float64) + 12.0) / (24.0 / bins)
    inner = pos[pos < bins]
    assert np.all(np.abs(inner - np.round(inner)) > 1e-4)  # no value on a final edge
    expected = np.bincount(np.minimum(np.floor(pos), bins - 1).astype(int), minlength=bins)
    assert np.array_equal(stats.hist, expected)


def test_zeros_first_then_values():
    stats = stream([np.zeros(10, np.float32), np.array([0.0, 2.0, -1.0], np.float32)], bins=8)
    assert stats.hist.tolist() == [0, 0, 1, 0, 11, 0, 0, 1]  # [-2,2]: zeros in [0, 0.5)
    assert stream([np.zeros(5, np.float32)]).hist.sum() == 5
    for method in METHODS:
        assert estimate(stream([np.zeros(5, np.float32)]), method) == (0.0, 0.0)


def test_collect_stats_histograms_keep_min_max():
    model, calib = g.sdpa_model(), g.calibration()
    cfg = QuantConfig(batch_size=3)
    tensors = [n.output[0] for n in model.graph.node if n.op_type in ("Softmax", "Conv")]
    plain = collect_stats(model, tensors, calib, cfg, progress=False)
    full = collect_stats(model, tensors, calib, cfg, progress=False, histograms=True)
    values = dict(zip(tensors, g.run_ort(model, {"x": calib}, tensors)))
    for t in tensors:
        assert plain[t].hist is None and tuple(plain[t]) == tuple(full[t])
        assert plain[t] == (float(values[t].min()), float(values[t].max()))
        assert full[t].hist.sum() == values[t].size


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", CLIPPING)
def test_outliers_are_clipped(heavy, method, symmetric):
    x, stats = heavy
    minmax = estimate(stats, "minmax", 8, symmetric)
    found = estimate(stats, method, 8, symmetric)
    assert width(found) < 0.5 * width(minmax)
    if method == "mse":
        error, reference = (fake_quant_mse(x, r, 8, symmetric) for r in (found, minmax))
        assert error < 0.5 * reference


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_error_is_the_lowest_at_4_bits(heavy, symmetric):
    x, stats = heavy
    errors = {m: fake_quant_mse(x, estimate(stats, m, 4, symmetric), 4, symmetric) for m in METHODS}
    assert errors["mse"] <= 1.02 * min(errors.values())
    assert errors["mse"] < 0.25 * errors["minmax"]


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_bits_change_the_range(heavy, method):
    _, stats = heavy
    for symmetric in (False, True):
        r4, r8 = (estimate(stats, method, b, symmetric) for b in (4, 8))
        assert width(r4) < 0.5 * width(r8)  # fewer levels: rounding costs more, clip more


def test_relu_spike_at_zero_does_not_collapse_entropy():
    """Half the values exactly 0 (ReLU): KL must not shrink the window to spread that spike."""
    x = np.maximum(np.random.default_rng(5).standard_normal(400_000), 0).astype(np.float32)
    stats = TensorStats.from_array(x)
    for symmetric in (False, True):
        assert estimate(stats, "entropy", 8, symmetric)[1] > 0.6 * stats.hi


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_grid_is_the_emitted_quantizer(bits):
    """The search scores exactly the grid uniform_params will emit for its range."""
    from onnxquant.ranges import _grid

    rng = np.random.default_rng(6)
    g0, g1 = -rng.uniform(0, 3, 50), rng.uniform(0.1, 5, 50)
    for symmetric in (False, True):
        s, a, b = _grid(g0, g1, bits, symmetric)
        for i in range(50):
            p = Q.uniform_params(np.array([g0[i], g1[i]]), bits, symmetric)
            z = float(p.zero_point[0])
            assert s[i] == pytest.approx(float(p.scale[0]), rel=1e-6)
            assert (a[i], b[i]) == pytest.approx(((p.qmin - z) * s[i], (p.qmax - z) * s[i]))


def test_percentile_of_a_uniform_sample():
    x = np.random.default_rng(1).uniform(-1, 1, 1_000_000).astype(np.float32)
    stats = TensorStats.from_array(x)
    lo, hi = estimate(stats, "percentile", symmetric=False, percentile=99.0)
    assert lo == pytest.approx(-0.99, abs=2e-3) and hi == pytest.approx(0.99, abs=2e-3)
    lo, hi = estimate(stats, "percentile", symmetric=True, percentile=90.0)
    assert -lo == hi == pytest.approx(0.90, abs=2e-3)


@pytest.mark.parametrize("p", [90.0, 99.0, 99.5])  # exact in binary: no 1-value fuzz
def test_percentile_is_the_tightest_bin_edge(p):
    """The returned edge keeps >= p % of the values, and one bin further in would not."""
    x = np.random.default_rng(7).standard_normal(200_000).astype(np.float32)
    stats = TensorStats.from_array(x)
    w, keep, cut = stats.edges[1] - stats.edges[0], x.size * p / 100, x.size * (100 - p) / 200
    count = np.count_nonzero
    _, t = estimate(stats, "percentile", symmetric=True, percentile=p)
    assert count(np.abs(x) <= t) >= keep > count(np.abs(x) <= t - w)
    lo, hi = estimate(stats, "percentile", symmetric=False, percentile=p)
    assert count(x < lo) <= cut < count(x < lo + w)
    assert count(x > hi) <= cut < count(x > hi - w)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_uniform_is_not_clipped(method, symmetric):
    x = np.random.default_rng(2).uniform(-1, 3, 500_000).astype(np.float32)
    stats = stream(np.array_split(x, 3))
    assert width(estimate(stats, method, 8, symmetric)) >= 0.97 * width(estimate(stats, "minmax"))


def test_mse_model_matches_fake_quant(heavy):
    """The histogram's closed-form expected error is the sample's, for ranges of all sizes."""
    from onnxquant.ranges import MSE_BINS, _expected_error, _occupied

    x, stats = heavy
    left, w, counts = _occupied(stats, MSE_BINS)
    for symmetric in (False, True):
        for t in (3.0, 20.0, 300.0):
            for bits in (4, 8):
                model = _expected_error(left, w, counts, np.array([-t]), np.array([t]), bits,
                                        symmetric)[0]
                assert model == pytest.approx(fake_quant_mse(x, (-t, t), bits, symmetric), rel=0.05)


def test_positive_tensor_keeps_zero_and_bad_arguments():
    x = np.random.default_rng(4).exponential(1.0, 100_000).astype(np.float32) + 0.5
    stats = TensorStats.from_array(x)
    for method in METHODS:
        lo, hi = estimate(stats, method)
        assert lo == 0.0 and 0.5 < hi <= stats.hi
    with pytest.raises(ValueError, match="histograms=True"):
        estimate(TensorStats.from_array(x, histogram=False), "mse")
    assert estimate(TensorStats.from_array(x, histogram=False), "minmax") == (0.0, stats.hi)
    with pytest.raises(ValueError, match="unknown range method"):
        estimate(stats, "kl")
    with pytest.raises(ValueError, match="bits"):
        estimate(stats, "mse", bits=9)


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32, allow_subnormal=False)
scaled = st.tuples(hnp.arrays(np.float32, st.integers(1, 300), elements=finite),
                   st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
batch = scaled.map(lambda xs: (xs[0] * np.float32(xs[1])).astype(np.float32))


@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(batch, min_size=1, max_size=4), st.sampled_from(METHODS),
                  st.integers(2, 8), st.booleans(), st.floats(50.0, 100.0), st.integers(1, 6))
def test_any_range_holds_zero_and_stays_in_the_data(batches, method, bits, symmetric, pct,
                                                    bins_log2):
    stats = stream(batches, bins=2 * 4**bins_log2)
    data = np.concatenate(batches)
    assert stats.hist.sum() == data.size
    assert (stats.lo, stats.hi) == (float(data.min()), float(data.max()))
    lo, hi = estimate(stats, method, bits, symmetric, pct)
    assert min(float(data.min()), 0.0) <= lo <= 0.0 <= hi <= max(float(data.max()), 0.0)
