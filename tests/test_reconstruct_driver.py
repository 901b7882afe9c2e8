"""The --reconstruct driver (reconstruct.py) around its methods: judging codes on held-out
calibration samples (split_feed, _reconstruct_block: the methods never see them, every block
keeps the candidate with the lowest error on them, the errors reported are measured on
them), and which learned activation steps can be written back (fits.learnable_steps, fits.apply)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from onnx import numpy_helper

from graphs import (calibration, conv_chain_model, mixed_model, nodes_by_name, quantize, run_ort,
                    sdpa_model, weight_value)
from onnxquant import QuantConfig, block_runs, fits, quantizers, reconstruct
from onnxquant.config import HOLDOUT_DEFAULTS, PARTS


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 80), fraction=st.floats(0, 0.95))
def test_split_feed_holds_out_an_even_share_or_nothing(n, fraction):
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    fit, held = reconstruct.split_feed({"x": x}, fraction)
    want = int(n * fraction)
    if held is None:
        assert want < reconstruct.MIN_SAMPLES_EACH_SIDE or \
            n - want < reconstruct.MIN_SAMPLES_EACH_SIDE
        assert fit["x"] is x
        return
    f, h = fit["x"][:, 0].astype(int), held["x"][:, 0].astype(int)
    assert len(h) == want and len(f) == n - want
    assert min(len(f), len(h)) >= reconstruct.MIN_SAMPLES_EACH_SIDE
    assert sorted(np.concatenate([f, h]).tolist()) == list(range(n))  # disjoint, complete
    assert np.all(np.diff(f) > 0) and np.all(np.diff(h) > 0)  # order kept
    assert h[0] == 0 and h[-1] == n - 1  # spread over the whole set
    assert np.max(np.diff(h)) <= -(-(n - 1) // (want - 1)) + 1


def _fake_method(seen: list, shift: int = 0):
    """A stand-in method: records the boundary samples it is given and returns the
    round-to-nearest codes moved by ``shift`` steps (clipped to the grid)."""
    def method(task):
        seen.append({k: v.copy() for k, v in task.inputs.items()})
        out = {}
        for layer in task.layers:
            scale, zero = layer.grid()
            p = layer.params
            rtn = np.clip(np.round(layer.stack() / scale) + zero, p.qmin, p.qmax)
            out[layer.site.node] = layer.unstack(np.clip(rtn + shift, p.qmin, p.qmax))
        return out
    return method


def _with_method(monkeypatch, method):
    monkeypatch.setattr(reconstruct, "_method", lambda name: method)


def test_methods_fit_only_the_samples_not_held_out(monkeypatch):
    seen = []
    _with_method(monkeypatch, _fake_method(seen))
    calib = calibration(32, seed=1)
    res = quantize(conv_chain_model(seed=2), calib, weight_bits=3, reconstruct="adaround")
    fit, held = reconstruct.split_feed({"x": calib}, HOLDOUT_DEFAULTS["adaround"])
    np.testing.assert_array_equal(seen[0]["x"], fit["x"])
    assert len(held["x"]) == 8
    note = next(n for n in res.plan.notes if n.startswith("reconstruct adaround"))
    assert "judged on 8 held-out samples (fitted on 24); only 8 to judge on" in note


def test_the_summary_asks_for_more_samples_only_when_few_are_held_out(monkeypatch):
    _with_method(monkeypatch, _fake_method([]))
    res = quantize(conv_chain_model(seed=2), calibration(64, seed=1), weight_bits=3,
                   reconstruct="adaround", num_calib=64)
    note = next(n for n in res.plan.notes if n.startswith("reconstruct adaround"))
    assert "judged on 16 held-out samples (fitted on 48);" in note
    assert "--num-calib" not in note


@pytest.mark.parametrize("name, holdout", [("adaround", 0.0), ("gptq", None)])
def test_holdout_zero_fits_and_judges_every_sample(monkeypatch, name, holdout):
    """Asked for, or GPTQ's default."""
    seen = []
    _with_method(monkeypatch, _fake_method(seen))
    calib = calibration(32, seed=1)
    res = quantize(conv_chain_model(seed=2), calib, weight_bits=3, reconstruct=name,
                   reconstruct_holdout=holdout)
    np.testing.assert_array_equal(seen[0]["x"], calib)
    assert any("judged on the 32 fitted samples" in n for n in res.plan.notes)


def test_block_errors_are_measured_on_the_held_out_samples(monkeypatch):
    """The first block reads the model input: its round-to-nearest error must be the RTN
    model's error at the block's outputs on the held-out samples, computed here apart."""
    _with_method(monkeypatch, _fake_method([]))
    model, calib = conv_chain_model(seed=2), calibration(32, seed=1)
    res = quantize(model, calib, weight_bits=3, reconstruct="adaround")
    first, result = res.plan.blocks[0], res.plan.reconstruction[0]
    assert result.name == first.name
    rtn = quantize(model, calib, weight_bits=3, bias_correction=False)  # the walk's RTN
    _, held = reconstruct.split_feed({"x": calib}, HOLDOUT_DEFAULTS["adaround"])
    names = list(first.outputs)
    want = run_ort(model, {"x": held["x"]}, names)
    got = run_ort(rtn.model, {"x": held["x"]}, names)
    error = sum(np.sum((g - w) ** 2) for g, w in zip(got, want)) / \
        sum(np.sum(w ** 2) for w in want)
    assert result.rtn_error == pytest.approx(float(error), rel=1e-3)


@pytest.mark.parametrize("name, shift", [("adaround", 1), ("adaround", 0), ("brecq", 1),
                                         ("mgrq", 0)])
def test_each_block_keeps_the_candidate_with_the_lowest_held_out_error(monkeypatch, name, shift):
    """Codes one step off everywhere lose to rounding; GPTQ's codes are weighed too."""
    _with_method(monkeypatch, _fake_method([], shift))
    res = quantize(mixed_model(seed=2), calibration(32, seed=1), weight_bits=3,
                   per_channel=True, reconstruct=name)
    want = {reconstruct.RTN, name, "gptq"}
    for r in res.plan.reconstruction:
        assert set(r.candidates) == want
        assert r.kept == min(r.candidates, key=r.candidates.get)
        assert r.error == r.candidates[r.kept] and r.rtn_error == r.candidates[reconstruct.RTN]
        if shift:
            assert r.kept != name
    kept = {r.kept for r in res.plan.reconstruction}
    if shift:  # GPTQ beats rounding at 3 bits on some block of this model
        assert "gptq" in kept


def test_the_kept_codes_are_the_ones_left_in_the_plan(monkeypatch):
    _with_method(monkeypatch, _fake_method([], 1))
    res = quantize(mixed_model(seed=2), calibration(32, seed=1), weight_bits=3,
                   per_channel=True, reconstruct="brecq")
    assert res.plan.reconstruction_check.kept
    blocks = {b.name: b for b in res.plan.blocks}
    sites = {s.node: s for s in res.plan.convs + res.plan.linears}
    for r in res.plan.reconstruction:
        assert r.kept != "brecq"  # one step off: never kept
        block = blocks[r.name]
        for node in [n for n in block.convs + block.linears if n in sites]:
            assert (sites[node].weight_spec.codes is None) == (r.kept == reconstruct.RTN)


def test_holdout_option_is_validated():
    with pytest.raises(ValueError, match="reconstruct_holdout applies to --reconstruct"):
        QuantConfig(reconstruct_holdout=0.25)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"reconstruct_holdout must be in \[0, 1\)"):
            QuantConfig(reconstruct="gptq", reconstruct_holdout=bad)


def test_learnable_steps_are_made_inside_the_block_and_not_read_by_qlinearconv():
    res = quantize(mixed_model(seed=2), calibration(16), target="ort",
                   ort_int8_kinds=("dense", "pointwise", "stem", "linear"))
    for block in res.plan.blocks:
        acts = fits.learnable_steps(res.plan, _block_model(res, block))
        for site, attr, tensor, spec in acts:
            assert attr != "input_spec" or not site.int8_output  # QLinearConv bias sized on it
            assert tensor not in block.inputs and spec is getattr(site, attr)
    every = {t for b in res.plan.blocks
             for *_, t, _ in fits.learnable_steps(res.plan, _block_model(res, b))}
    assert "stem_out" in every and "x" not in every and "stem_act_out" not in every


def _block_model(res, block):
    """A stand-in for the extracted block: nodes whose outputs are the block's tensors."""
    from onnx import helper
    names = set(block.nodes)
    outs = [o for n in res.model.graph.node if n.name in names for o in n.output]
    return helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["i"], [o]) for o in outs], "b", [], []))


def test_apply_writes_a_step_into_every_spec_of_its_tensor_and_restores_the_rest():
    res = quantize(mixed_model(seed=2), calibration(16), target="tensorrt", weight_bits=4)
    specs = fits.activation_specs(res.plan)
    tensor = specs[1][2]
    acts = [(site, attr, t, getattr(site, attr)) for site, attr, t in specs]
    old = {(id(site), attr): spec for site, attr, _, spec in acts}
    step = np.float32(0.0123)
    fits.apply([], fits.Fit({}, {tensor: step}), {}, acts)
    for site, attr, t, _ in acts:
        p = getattr(site, attr).uniform_params()
        if t == tensor:
            assert p.scale[0] == step and p.zero_point == old[id(site), attr].uniform_params(
            ).zero_point
        else:
            assert getattr(site, attr) is old[id(site), attr]
    fits.apply([], fits.Fit({}), {}, acts)
    assert all(getattr(site, attr) is old[id(site), attr] for site, attr, _, _ in acts)


def test_gptq_start_is_fitted_on_every_sample_and_the_method_on_the_rest(monkeypatch):
    """brecq/mgrq start at GPTQ's codes fitted on all calibration samples (held-out ones
    included); the learned rounding itself sees only the fitted ones."""
    seen, starts = [], []
    fake = _fake_method(seen)

    def method(task):
        starts.append(dict(task.start))
        return fake(task)

    model, calib = mixed_model(seed=2), calibration(32, seed=1)
    plain = quantize(model, calib, weight_bits=3, per_channel=True, reconstruct="gptq")
    first = plain.plan.blocks[0]
    want = {s.node: s.weight_spec.codes for s in plain.plan.convs + plain.plan.linears
            if s.node in first.convs + first.linears}
    _with_method(monkeypatch, method)
    quantize(model, calib, weight_bits=3, per_channel=True, reconstruct="brecq")
    assert want and set(starts[0]) == set(want)
    for node, codes in want.items():
        np.testing.assert_array_equal(starts[0][node], codes)
    assert len(seen[0]["x"]) == 24


def test_the_model_check_falls_back_to_plain_gptq_when_it_is_closer_to_float():
    """Per-block choices that add up to a worse model than plain GPTQ's codes give way to
    them (and to rounding when that is better still)."""
    model, calib = conv_chain_model(seed=2), calibration(32, seed=1)
    res = quantize(model, calib, weight_bits=3, per_channel=True, reconstruct="gptq")
    sites = [s for s in res.plan.convs]
    gptq = [(site, "weight_spec", site.weight_spec) for site in sites]
    rounded = [(site, "weight_spec", site.weight_spec.with_(codes=None)) for site in sites]
    for site in sites:  # a poor per-block choice: two steps off everywhere
        spec, p = site.weight_spec, site.weight_spec.params
        site.weight_spec = spec.with_(codes=np.clip(spec.codes.astype(np.int64) + 2, p.qmin,
                                                    p.qmax).astype(spec.codes.dtype))
    check = reconstruct._model_check(model, res.plan, {"x": calib}, rounded, gptq)
    assert check.kept and check.kept_gptq
    assert check.gptq_error < check.error and check.gptq_error < check.rtn_error
    assert all(site.weight_spec is spec for site, _, spec in gptq)
    note = reconstruct.summary("brecq", res.plan.reconstruction, 1.0, check)
    assert "plain GPTQ's codes kept" in note
    won, n = check.wins()
    assert n == 32 and won < n // 2  # two steps off loses on most samples
    assert f"is above theirs ({check.gptq_error:.2e}), lower on {won} of 32 samples" in note
    assert sum(check.sample_errors["gptq"]) == pytest.approx(check.gptq_error)
    assert sum(check.sample_errors["chosen"]) == pytest.approx(check.error)


@pytest.mark.parametrize("chosen, gptq, why", [
    ([1.0, 1.0, 1.0, 5.0], [2.0, 2.0, 2.0, 1.0], "is above theirs (7.00e+00), lower on 3 of 4"),
    ([1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 2.5, 2.5], "is below theirs (9.00e+00) in total but lower "
                                                 "on only 2 of 4 samples; keeping it needs 4 of "
                                                 "4 (a one-sided sign test at 15%)"),
    ([1.0, 3.0], [2.0, 2.5], "lower on only 1 of 2 samples; keeping it needs more than 2 "
                             "samples to tell them apart"),
])
def test_the_summary_says_why_plain_gptq_was_kept(chosen, gptq, why):
    """The two reasons ``_kept`` prefers plain GPTQ: a higher total, or a lower total that
    only a few samples make."""
    per_sample = {"chosen": np.array(chosen), "gptq": np.array(gptq),
                  reconstruct.RTN: np.full(len(chosen), 9.0)}
    assert reconstruct._kept(per_sample) == "gptq"
    check = reconstruct.ModelCheck(9.0 * len(chosen), float(sum(chosen)), True,
                                   float(sum(gptq)), True,
                                   {k: v.tolist() for k, v in per_sample.items()})
    note = reconstruct.summary("mgrq", [reconstruct.BlockResult("b", 1, 2.0, 1.0)], 1.0, check)
    assert "plain GPTQ's codes kept" in note and why in note, note


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 12), gptq=st.booleans(), data=st.data())
def test_the_model_check_keeps_the_lowest_total_and_the_choice_only_where_it_wins_most(
        n, gptq, data):
    """Lowest total error wins (ties: the earlier candidate), except that the per-block
    choice must also be lower than plain GPTQ on more samples than a coin gives with
    probability above WINS_ALPHA (counted here over all 2^n sign patterns): a lower total
    led by a few samples does not displace GPTQ's codes."""
    errs = st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 8.0]), min_size=n, max_size=n)
    names = ["chosen"] + (["gptq"] if gptq else []) + [reconstruct.RTN]
    per_sample = {k: np.array(data.draw(errs)) for k in names}
    kept = reconstruct._kept(per_sample)
    totals = {k: e.sum() for k, e in per_sample.items()}
    wins = np.sum(per_sample["chosen"] < per_sample["gptq"]) if gptq else n
    sure = _chance_of_at_least(wins, n) <= reconstruct.WINS_ALPHA
    eligible = [k for k in names if k != "chosen" or not gptq or sure]
    assert kept in eligible
    assert totals[kept] == min(totals[k] for k in eligible)
    assert all(totals[k] > totals[kept] for k in eligible[:eligible.index(kept)])
    if gptq and not sure:
        assert kept != "chosen"


def _chance_of_at_least(k: int, n: int) -> float:
    """P(a fair coin comes up heads on k or more of n tosses), by counting the patterns."""
    return sum(bin(p).count("1") >= k for p in range(2 ** n)) / 2 ** n


@pytest.mark.parametrize("n", range(0, 17))
def test_wins_needed_is_the_sign_tests_threshold(n):
    need = reconstruct.wins_needed(n)
    assert _chance_of_at_least(need, n) <= reconstruct.WINS_ALPHA or need == n + 1
    assert _chance_of_at_least(need - 1, n) > reconstruct.WINS_ALPHA
    assert {8: 6, 16: 11}.get(n, need) == need  # 32 samples hold out 8, 64 hold out 16


def test_a_lower_total_led_by_one_sample_gives_way_to_plain_gptq():
    """The recognizer at W4A8 (layer-wise AdaRound): lower in total, on 4 of 8 samples."""
    chosen = np.array([6.3, 12.7, 14.1, 15.5, 0.007, 0.8, 3.7, 4.6])  # x 1e-3, measured
    plain = np.array([11.0, 13.1, 22.1, 15.3, 0.015, 0.0, 1.6, 0.1])
    assert chosen.sum() < plain.sum()
    rtn = np.full(8, 100.0)
    assert reconstruct._kept({"chosen": chosen, "gptq": plain, reconstruct.RTN: rtn}) == "gptq"
    chosen[7] = 0.05  # 5 of 8: brecq and qdrop on the recognizer, 9-10 lines worse than GPTQ
    assert reconstruct._kept({"chosen": chosen, "gptq": plain, reconstruct.RTN: rtn}) == "gptq"
    chosen[6] = 1.0  # 6 of 8
    assert reconstruct._kept({"chosen": chosen, "gptq": plain, reconstruct.RTN: rtn}) == "chosen"


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_sample_errors_are_each_samples_share_of_the_relative_error(n, k, seed):
    """Per-sample shares add up to relative_error; sample i's share moves only with its own
    rows (n x k rows, sample-major); a tensor without a sample axis is split evenly."""
    rng = np.random.default_rng(seed)
    want = {"y": rng.standard_normal((n * k, 4)), "z": rng.standard_normal((n, 2)),
            "s": np.asarray(rng.standard_normal())}
    got = {key: v + rng.standard_normal(v.shape) for key, v in want.items()}
    shares = block_runs.sample_errors(got, want, n)
    assert shares.shape == (n,)
    assert shares.sum() == pytest.approx(block_runs.relative_error(got, want), rel=1e-9)
    moved = dict(got, y=got["y"].copy())
    moved["y"][(n - 1) * k:] += 10.0  # the last sample's rows only
    after = block_runs.sample_errors(moved, want, n)
    np.testing.assert_allclose(after[:-1], shares[:-1], rtol=1e-12)
    assert after[-1] > shares[-1]
    if n > 1:
        even = block_runs.sample_errors({"s": got["s"]}, want, n)
        np.testing.assert_allclose(even, even[0])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), k=st.integers(1, 4), data=st.data())
def test_rows_take_samples_of_boundary_values(n, k, data):
    """The walk slices fitted and held-out samples out of the all-sample values: float
    values by sample (n x k rows, sample-major), batch-dependent integers (``ints``)
    recomputed for the samples taken, every other integer value passed whole, even one
    whose entries are multiples of n (a spatial size equal to the batch)."""
    idx = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1))))
    x = np.arange(n * k * 3, dtype=np.float32).reshape(n * k, 3)
    values = {"x": x, "shape": np.array([n * k, n, 3], np.int64),
              "grid": np.array([n, n], np.int64), "scalar": np.float32(2.0)}
    ints = {"shape": (np.array([k, n, 3]), np.array([k, 0, 0]))}
    got = block_runs.take(values, idx, n, ints)
    want = x.reshape(n, k, 3)[idx].reshape(-1, 3)
    np.testing.assert_array_equal(got["x"], want)
    assert got["shape"].tolist() == [len(idx) * k, n, 3]
    assert got["shape"].dtype == np.int64
    assert got["grid"].tolist() == [n, n] and got["scalar"] == 2.0
    assert values["shape"].tolist() == [n * k, n, 3]  # the input is not modified


def _batch_baked_model():
    """x [N, 8, 8, 8] -> Shape (N, 8, 8, 8) and a reshape target [N * 4, -1] built from it,
    the grid 8 beside the batch: what TinyViT's windows export to at 64 px."""
    from onnx import TensorProto, helper

    const = helper.make_tensor("four", TensorProto.INT64, [1], [4])
    rest = helper.make_tensor("minus1", TensorProto.INT64, [1], [-1])
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
             helper.make_node("Mul", ["batch", "four"], ["windows"]),
             helper.make_node("Concat", ["windows", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"]),
             helper.make_node("Shape", ["w"], ["weight_shape"]),
             helper.make_node("Gather", ["shape", "zero_scalar"], ["batch_scalar"], axis=0)]
    graph = helper.make_graph(
        nodes, "baked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("weight_shape", TensorProto.INT64, [2])],
        [const, rest, helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
         helper.make_tensor("one", TensorProto.INT64, [1], [1]),
         helper.make_tensor("zero_scalar", TensorProto.INT64, [], [0]),
         helper.make_tensor("w", TensorProto.FLOAT, [8, 8], [0.0] * 64)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_batch_ints_finds_the_batch_by_running_not_by_value():
    """Shape vectors that hold the batch are found by running on 1 and 2 samples, and
    rescaled entry by entry: [8, 8, 8, 8] for 6 of 8 samples is [6, 8, 8, 8], not
    [6, 6, 6, 6]; integers that do not move with the batch are not listed."""
    from onnxquant import blocks

    model = _batch_baked_model()
    x = np.zeros((8, 8, 8, 8), np.float32)
    ints = block_runs.batch_ints(model, {"x": x}, blocks.value_types(model))
    assert set(ints) == {"shape", "batch", "windows", "target", "batch_scalar"}
    names = ["shape", "target", "weight_shape", "batch_scalar"]
    values = block_runs.run(block_runs.with_outputs(model, names), {"x": x}, names)
    got = block_runs.take(values, np.arange(6), 8, ints)
    assert got["shape"].tolist() == [6, 8, 8, 8]
    assert got["target"].tolist() == [24, -1]
    assert got["weight_shape"].tolist() == [8, 8]
    assert got["batch_scalar"].shape == () and got["batch_scalar"] == 6
    want = block_runs.run(block_runs.with_outputs(model, names), {"x": x[:6]}, names[:2])
    assert all(got[k].tolist() == want[k].tolist() for k in want)


def test_batch_ints_is_empty_for_a_model_that_runs_at_one_batch_only():
    from onnxquant import blocks

    model = _batch_baked_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    x = np.zeros((8, 8, 8, 8), np.float32)
    assert block_runs.batch_ints(model, {"x": x}, blocks.value_types(model)) == {}


@pytest.mark.parametrize("name, holdout", [("adaround", None), ("mgrq", 0.25)])
def test_the_model_check_weighs_plain_gptq(monkeypatch, name, holdout):
    """The fallback the torch methods' model check weighs is ``--reconstruct gptq``'s own
    codes (its walk, all samples, whatever share the method holds out), not each block's
    GPTQ candidate: those are fitted on inputs that the method's earlier choices (here
    rounding, shift 0) produce."""
    model, calib = mixed_model(seed=2), calibration(32, seed=1)
    plain = quantize(model, calib, weight_bits=3, per_channel=True, reconstruct="gptq")
    assert not plain.plan.reconstruction_check.kept_gptq  # gptq has no such candidate
    want = {s.node: s.weight_spec.codes for s in plain.plan.convs + plain.plan.linears
            if s.weight_spec is not None}
    weighed = []
    check = reconstruct._model_check

    def spy(canonical, plan, feed, original, gptq=None):
        weighed.append({site.node: spec.codes for site, attr, spec in gptq
                        if attr == "weight_spec" and spec is not None})
        return check(canonical, plan, feed, original, gptq)

    monkeypatch.setattr(reconstruct, "_model_check", spy)
    _with_method(monkeypatch, _fake_method([], 0))
    res = quantize(model, calib, weight_bits=3, per_channel=True, reconstruct=name,
                   reconstruct_holdout=holdout)
    assert set(weighed[0]) == set(want)
    for node, codes in want.items():
        if codes is None:
            assert weighed[0][node] is None
        else:
            np.testing.assert_array_equal(weighed[0][node], codes)
    kept = {r.kept for r in res.plan.reconstruction}
    assert reconstruct.RTN in kept or name in kept  # the chain differs from plain GPTQ's


def test_full_resolution_layer_inputs_take_whole_samples_and_rescale_the_batch(monkeypatch):
    """Above BIG_INPUT positions per sample, GPTQ's layer-input runs use the first few
    samples of the block's boundary values, taken as the walk takes them: a 4-D map and
    a token matrix (k rows per sample) by sample, a reshape target that holds the batch
    recomputed; before, a value under 3 dimensions passed whole (the run then mixed 4
    samples with 8)."""
    n, k = 8, 3
    side = int(np.ceil(np.sqrt(reconstruct.BIG_INPUT)))
    inputs = {"map": np.zeros((n, 1, side, side), np.float32),
              "tokens": np.arange(n * k * 2, dtype=np.float32).reshape(n * k, 2),
              "target": np.array([n * 4, -1], np.int64)}
    floats = dict(inputs, map=inputs["map"] + 1, tokens=inputs["tokens"] + 1)
    monkeypatch.setattr(reconstruct, "MIN_TARGET_SAMPLES", 1)  # the float target at any count
    task = reconstruct.BlockTask("b", "transformer", None, inputs, [], None,
                                 batch_ints={"target": (np.array([4, -1]), np.array([4, 0]))},
                                 float_inputs=floats)
    got, got_float, m = reconstruct._layer_input_samples(task)
    assert got["map"].shape[0] == m
    assert reconstruct.MIN_SAMPLES <= m < n
    assert got["tokens"].shape == (m * k, 2)
    np.testing.assert_array_equal(got["tokens"], inputs["tokens"][:m * k])
    assert got["target"].tolist() == [m * 4, -1]
    # the float values (GPTQ's float target) are taken the same way, sample for sample
    np.testing.assert_array_equal(got_float["tokens"], floats["tokens"][:m * k])
    np.testing.assert_array_equal(got_float["map"], floats["map"][:m])
    assert got_float["target"].tolist() == [m * 4, -1]
    few = {"map": inputs["map"][:2], "target": np.array([8, -1], np.int64)}
    got, got_float, m = reconstruct._layer_input_samples(reconstruct.BlockTask(
        "b", "transformer", None, few, [], None, batch_ints=task.batch_ints))
    assert m == 2 and got["map"].shape[0] == 2 and got["target"].tolist() == [8, -1]
    assert got_float is None  # no float values: plain GPTQ
    small = dict(inputs, map=np.zeros((n, 1, 4, 4), np.float32))
    got, got_float, m = reconstruct._layer_input_samples(reconstruct.BlockTask(
        "b", "transformer", None, small, [], None, samples=n, float_inputs=floats))
    assert got is small and got_float is floats and m == n
    # fewer samples than MIN_TARGET_SAMPLES in the run: plain GPTQ
    monkeypatch.setattr(reconstruct, "MIN_TARGET_SAMPLES", n + 1)
    for values in (small, inputs):
        got, got_float, m = reconstruct._layer_input_samples(reconstruct.BlockTask(
            "b", "transformer", None, values, [], None, samples=n, float_inputs=floats,
            batch_ints=task.batch_ints))
        assert got_float is None and m <= n


def test_walk_holds_fitted_and_held_out_samples_as_views_of_one_copy():
    """The walk keeps one copy of each boundary value: its fitted and held-out samples
    (split_feed's, in order) are views of it, before and after a block."""
    import onnx_graphsurgeon as gs

    from onnxquant import analyze, blocks

    graph, plan = analyze(conv_chain_model(seed=2))
    canonical = gs.export_onnx(graph, do_type_check=False)
    calib = calibration(32, seed=1)
    walk = reconstruct._Walk(canonical, plan, {"x": calib},
                             reconstruct.split_indices(32, 0.25))
    fit, held = reconstruct.split_feed({"x": calib}, 0.25)
    block = plan.blocks[0]
    model = blocks.extract(canonical, block, walk.types)
    for name in ["x", block.outputs[0]]:
        if name != "x":
            walk.advance(0, model, gs.import_onnx(model))
        for got, samples in [(walk.q, fit), (walk.h, held)]:
            want = samples if name == "x" else block_runs.run(model, samples)
            np.testing.assert_array_equal(got[name], want[name])
            assert np.shares_memory(got[name], walk.a[name])
        # the float values: every sample (fa, in the walk's order: fitted, then held out),
        # the fitted ones (f) a view of them
        ordered = {"x": np.concatenate([fit["x"], held["x"]])}
        want = ordered if name == "x" else block_runs.run(model, ordered)
        np.testing.assert_array_equal(walk.fa[name], want[name])
        np.testing.assert_array_equal(walk.f[name], fit[name] if name == "x" else
                                      block_runs.run(model, fit)[name])
        assert np.shares_memory(walk.f[name], walk.fa[name])


def test_without_the_judge_every_block_keeps_the_methods_codes(monkeypatch):
    """JUDGE = False (tools/mgrq_ablation.py --no-judge): a method whose codes are worse
    than rounding on every block (shifted 3 steps) still has them written, and no
    whole-model check runs; with the judge the same codes are never kept."""
    model, calib = conv_chain_model(seed=2), calibration(16, seed=1)
    _with_method(monkeypatch, _fake_method([], 3))
    judged = quantize(model, calib, weight_bits=4, reconstruct="adaround")
    assert "adaround" not in {r.kept for r in judged.plan.reconstruction}
    monkeypatch.setattr(reconstruct, "JUDGE", False)
    raw = quantize(model, calib, weight_bits=4, reconstruct="adaround")
    assert {r.kept for r in raw.plan.reconstruction} == {"adaround"}
    assert raw.plan.reconstruction_check is None
    feed = {"x": calib[:4]}
    assert np.abs(run_ort(raw.model, feed)[0] - run_ort(judged.model, feed)[0]).max() > 0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40))
def test_chunks_cover_every_layer_once_in_order(n):
    """Small blocks: one layer per run; larger: at most RUNS_PER_BLOCK runs."""
    layers = list(range(n))
    chunks = reconstruct._chunks(layers)
    assert [layer for chunk in chunks for layer in chunk] == layers
    if n <= reconstruct.SEQUENTIAL_LAYERS:
        assert all(len(c) == 1 for c in chunks)
    else:
        assert len(chunks) <= reconstruct.RUNS_PER_BLOCK


def test_layers_reading_one_tensor_share_one_block_run(monkeypatch):
    """Q, K and V read the same tokens: rounding one cannot change what the next sees, so
    their Hessians come from one run of the block, not three (and their float inputs,
    GPTQ's float target, from one run of the float block)."""
    runs = []
    run = block_runs.run

    def counting(m, values, outputs=None):
        runs.append(outputs)
        return run(m, values, outputs)

    monkeypatch.setattr(block_runs, "run", counting)
    res = quantize(sdpa_model(), calibration(reconstruct.MIN_TARGET_SAMPLES),
                   weight_bits=4, reconstruct="gptq", target="tensorrt")
    assert {r.name: r.layers for r in res.plan.reconstruction}["transformer_1"] == 3
    assert runs.count(["attn_t"]) == 1 + reconstruct.FLOAT_TARGET


def _recording_method(tasks: list):
    """Records (task, each layer's min-max grid)."""
    def method(task):
        tasks.append((task, [quantizers.uniform_params(
            l.weight, l.site.weight_spec.bits, symmetric=l.params.qmin < 0, axis=0)
            for l in task.layers]))
        return _fake_method([])(task)
    return method


def test_each_method_is_told_its_block_and_the_clipped_grid_at_4_bits(monkeypatch):
    """The task names the block it is for (progress, error messages) and its kind; at 4
    bits or fewer the layers' grids are MSE-clipped (an outlier no longer stretches every
    step), at 5 bits they are the plain range."""
    model = conv_chain_model(seed=2)
    for t in model.graph.initializer:
        if t.dims and len(t.dims) == 4:
            w = numpy_helper.to_array(t).copy()
            w.flat[0] = 8 * np.abs(w).max()  # one outlier in channel 0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
            break
    for bits, clipped in [(reconstruct.CLIP_BITS, True), (reconstruct.CLIP_BITS + 1, False)]:
        tasks = []
        _with_method(monkeypatch, _recording_method(tasks))
        res = quantize(model, calibration(16, seed=1), weight_bits=bits, reconstruct="adaround")
        blocks = {b.name: b.kind for b in res.plan.blocks}
        assert [t.name for t, _ in tasks] == [r.name for r in res.plan.reconstruction]
        assert all(t.kind == blocks[t.name] for t, _ in tasks)
        layer, plain = tasks[0][0].layers[0], tasks[0][1][0]
        smaller = np.asarray(layer.params.scale) < np.asarray(plain.scale)
        assert smaller.any() == clipped
        assert np.all(np.asarray(layer.params.scale) <= np.asarray(plain.scale))


def test_judged_on_says_how_many_samples_judged():
    fit = {"x": np.zeros((24, 3))}
    assert reconstruct._judged_on(fit, None, 0.0) == "the 24 fitted samples"
    assert reconstruct._judged_on(fit, None, 0.25) == \
        "the 24 fitted samples (too few to hold any out)"
    assert reconstruct._judged_on(fit, {"x": np.zeros((8, 3))}, 0.25) == (
        "8 held-out samples (fitted on 24); only 8 to judge on: more calibration samples "
        "(--num-calib) make each block's choice surer")
    assert reconstruct._judged_on(fit, {"x": np.zeros((16, 3))}, 0.25) == \
        "16 held-out samples (fitted on 24)"


def _result(name, rtn, error, kept):
    return reconstruct.BlockResult(name, 2, rtn, error, kept)


def test_summary_counts_the_codes_each_block_kept():
    results = [_result("a", 1e-2, 5e-3, "gptq"), _result("b", 1e-2, 1e-2, reconstruct.RTN),
               _result("c", 2e-2, 1e-3, "gptq"), _result("d", 1e-2, 9e-3, "")]
    check = reconstruct.ModelCheck(3e-2, 1e-2, True)
    note = reconstruct.summary("brecq", results, 12.34, check, "the 32 fitted samples", "cpu")
    assert note.startswith("reconstruct brecq: 8 layers in 4 blocks, 3 blocks improved; codes "
                           "kept per block: gptq 2, round to nearest 1, brecq 1; ")
    assert "largest gains c 2.0e-02->1.0e-03, a 1.0e-02->5.0e-03, d 1.0e-02->9.0e-03" in note
    assert note.endswith("; model output error 3.00e-02 -> 1.00e-02; judged on the 32 fitted "
                         "samples; 12.3 s on cpu")
    check = reconstruct.ModelCheck(3e-2, 1e-2, True, 2e-2, False,
                                   {"chosen": [0.0, 1.0, 0.0], "gptq": [1.0, 0.5, 0.5]})
    note = reconstruct.summary("brecq", results, 1.0, check)
    assert ("; model output error 3.00e-02 -> 1.00e-02, plain GPTQ's 2.00e-02 (the choice's "
            "lower on 2 of 3 samples); judged on") in note


def test_why_plain_gptq_names_both_errors_when_the_choice_is_above():
    check = reconstruct.ModelCheck(4e-2, 3e-2, True, 2e-2, True,
                                   {"chosen": [2.0, 1.0, 0.0], "gptq": [1.0, 1.5, 0.5]})
    assert reconstruct._why_gptq(check) == (
        "the per-block choice's model output error (3.00e-02) is above theirs (2.00e-02), "
        "lower on 2 of 3 samples")


def test_the_reconstruct_note_gives_the_time_it_took(monkeypatch):
    import re
    import time

    _with_method(monkeypatch, _fake_method([]))
    start = time.perf_counter()
    res = quantize(conv_chain_model(seed=2), calibration(16, seed=1), weight_bits=4,
                   reconstruct="adaround")
    took = time.perf_counter() - start
    note = next(n for n in res.plan.notes if n.startswith("reconstruct adaround"))
    seconds = float(re.search(r"; ([0-9.]+) s on \w+$", note).group(1))
    assert 0 < seconds <= took + 0.1


def _conv_then_batch_reshape():
    """x [N, 4, 4, 4] -> Conv -> Reshape to [N * 8, 16] (the batch baked into the target
    from Shape, as exporters write it) -> MatMul -> y."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    arrays = {"w": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
              "m": rng.standard_normal((16, 16)).astype(np.float32),
              "zero": np.array([0], np.int64), "one": np.array([1], np.int64),
              "eight": np.array([8], np.int64), "sixteen": np.array([16], np.int64)}
    inits = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c"], ["shape"]),
             helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
             helper.make_node("Mul", ["batch", "eight"], ["rows"]),
             helper.make_node("Concat", ["rows", "sixteen"], ["target"], axis=0),
             helper.make_node("Reshape", ["c", "target"], ["r"]),
             helper.make_node("MatMul", ["r", "m"], ["y"], name="mm")]
    return helper.make_model(helper.make_graph(
        nodes, "baked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("name", ["adaround", "mgrq"])
def test_held_out_samples_of_a_model_with_the_batch_in_its_shapes(monkeypatch, name):
    """A reshape target holding the batch is recomputed for the fitted and held-out
    samples (24 and 8 of 32), so every block runs on both, and the result runs."""
    _with_method(monkeypatch, _fake_method([]))
    model, calib = _conv_then_batch_reshape(), calibration(32, seed=1)
    res = quantize(model, calib, weight_bits=4, reconstruct=name)
    assert any("judged on 8 held-out samples (fitted on 24)" in n for n in res.plan.notes)
    got, want = run_ort(res.model, {"x": calib})[0], run_ort(model, {"x": calib})[0]
    assert got.shape == want.shape == (32 * 8, 16)
    assert np.abs(got - want).max() < 0.2 * np.abs(want).max()


def test_relative_error_weighs_each_squared_term():
    rng = np.random.default_rng(0)
    want = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    got = {k: v + rng.standard_normal(v.shape) for k, v in want.items()}
    weights = {k: rng.uniform(0, 2, v.shape) for k, v in want.items()}
    num = sum(np.sum(weights[k] * (got[k] - want[k]) ** 2) for k in want)
    den = sum(np.sum(weights[k] * want[k] ** 2) for k in want)
    assert block_runs.relative_error(got, want, weights) == pytest.approx(num / den, rel=1e-12)
    plain = sum(np.sum((got[k] - want[k]) ** 2) for k in want) / sum(np.sum(want[k] ** 2)
                                                                    for k in want)
    assert block_runs.relative_error(got, want) == pytest.approx(plain, rel=1e-12)


def test_take_counts_the_samples_itself_and_integers_alone_are_one_sample():
    values = {"x": np.arange(12, dtype=np.float32).reshape(6, 2), "shape": np.array([6, 2])}
    got = block_runs.take(values, slice(0, 2))
    np.testing.assert_array_equal(got["x"], values["x"][:2])
    assert block_runs.sample_count({"shape": np.array([6, 2])}) == 1
    assert block_runs.sample_count({}) == 1


def test_free_batch_relaxes_a_fixed_batch_everywhere():
    """A model exported at batch 1: the leading dim of inputs, outputs and value_info
    becomes symbolic (the other dims stay), and the batch it had is returned."""
    from onnx import TensorProto, helper

    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"]),
         helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0, axes=[1, 2, 3])], "b1",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, [1])],
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 3, 8, 8])]),
        opset_imports=[helper.make_opsetid("", 17)])
    assert block_runs.free_batch(model) == 1
    for info in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        dims = info.type.tensor_type.shape.dim
        assert dims[0].dim_param == block_runs.BATCH
        assert [d.dim_value for d in dims[1:]] == ([3, 8, 8] if info.name != "m" else [])
    out = block_runs.run(model, {"x": np.ones((4, 3, 8, 8), np.float32)})
    assert out["y"].shape == (4, 3, 8, 8) and out["m"].shape == (4,)
    assert block_runs.free_batch(model) is None  # nothing fixed any more


def test_with_outputs_adds_only_what_the_model_does_not_give_already():
    model = mixed_model(seed=2)
    names = [model.graph.output[0].name, "x", model.graph.node[-2].output[0]]
    out = block_runs.with_outputs(model, names)
    got = [o.name for o in out.graph.output]
    assert got == [model.graph.output[0].name, model.graph.node[-2].output[0]]
    assert len(model.graph.output) == 1  # the input model is not changed
    x = calibration(2, seed=1)
    values = block_runs.run(out, {"x": x}, names)
    assert list(values) == names and values["x"] is x  # an input asked for passes through


def test_subplan_keeps_the_sites_inside_the_block():
    """A block's plan: its attention (by Softmax), convs, linears and residuals; ``sites``
    narrows the convs and linears (GPTQ's runs quantize only the layers already done)."""
    from onnxquant import analyze

    _, plan = analyze(mixed_model(seed=2), QuantConfig(target="tensorrt"))
    block = next(b for b in plan.blocks if b.kind == "transformer")
    nodes = set(block.nodes)
    sub = block_runs.subplan(plan, nodes)
    assert sub.attention and all(a.softmax in nodes for a in sub.attention)
    assert {a.softmax for a in sub.attention} == {a.softmax for a in plan.attention
                                                  if a.softmax in nodes}
    assert {s.node for s in sub.linears} == {s.node for s in plan.linears if s.node in nodes}
    assert sub.linears and {s.node for s in sub.convs} == {s.node for s in plan.convs
                                                           if s.node in nodes}
    assert {r.node for r in sub.residuals} == {r.node for r in plan.residuals if r.node in nodes}
    first = sub.linears[0].node
    narrowed = block_runs.subplan(plan, nodes, {first})
    assert [s.node for s in narrowed.linears] == [first] and not narrowed.convs
    assert len(narrowed.attention) == len(sub.attention)


def test_the_bias_widened_grid_of_an_int8_conv_is_not_clipped(monkeypatch):
    """QLinearConv's weight scale is widened so its int32 bias fits (ort int8 convs):
    reconstruction keeps that grid at 4 bits, where weight-only layers get clipped ones."""
    config = dict(weight_bits=4, target="ort", ort_int8_kinds=("dense", "pointwise", "stem"))
    model, calib = mixed_model(seed=2), calibration(16, seed=1)
    plain = quantize(model, calib, **config)
    decided = {s.node: s.weight_spec.uniform_params() for s in plain.plan.convs}
    seen = {}

    def method(task):
        seen.update({l.site.node: (getattr(l.site, "int8_output", False), l.params)
                     for l in task.layers})
        return {}

    _with_method(monkeypatch, method)
    quantize(model, calib, reconstruct="adaround", **config)
    int8 = {node: p for node, (out, p) in seen.items() if out}
    nodes = nodes_by_name(model)
    assert set(int8) == set(decided)
    for node, p in int8.items():
        np.testing.assert_array_equal(p.scale, decided[node].scale)
    assert any(not np.array_equal(quantizers.clipped_params(p, w).scale, p.scale)
               for p, w in [(int8[n], weight_value(model, nodes[n].input[1])) for n in int8])


def test_the_walk_hands_each_block_what_the_emitted_model_computes(monkeypatch):
    """The ort profile's int8 convs requantize their outputs (QLinearConv); where such an
    output leaves a block, the next block must get the requantized value, as in the whole
    emitted model: the last block, run on the inputs the walk gave it, gives the model's
    output."""
    import onnx_graphsurgeon as gs

    seen = []

    def method(task):
        seen.append((task, dict(task.inputs)))  # the walk drops values no later block reads
        return reconstruct.run_gptq(task)

    monkeypatch.setattr(reconstruct, "_method", lambda name: method)
    calib = calibration(16, seed=1)
    res = quantize(mixed_model(seed=2), calib, weight_bits=4, target="ort",  # the walk's
                   ort_int8_kinds=("dense", "pointwise", "stem"), reconstruct="gptq",
                   bias_correction=False)  # biases, not the emitted model's corrected ones
    assert any(s.output_spec is not None for s in res.plan.convs)
    last, inputs = seen[-1]
    name = res.model.graph.output[0].name
    got = block_runs.run(block_runs.emitted(gs.import_onnx(last.model), last.plan), inputs)[name]
    want = run_ort(res.model, {"x": calib})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_a_weight_two_layers_share_keeps_rounding_to_nearest(monkeypatch):
    """Codes chosen for one reader would be wrong for the other: a shared weight is not
    handed to the method, the others are."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), n)
             for n in ("shared", "own")]
    nodes = [helper.make_node("Conv", ["x", "shared"], ["a"], name="first"),
             helper.make_node("Conv", ["a", "shared"], ["b"], name="second"),
             helper.make_node("Conv", ["b", "own"], ["y"], name="third")]
    model = helper.make_model(helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    handed = []

    def method(task):
        handed.extend(layer.site.node for layer in task.layers)
        return reconstruct.run_gptq(task)

    _with_method(monkeypatch, method)
    res = quantize(model, calibration(16, seed=1), weight_bits=4, reconstruct="gptq")
    assert handed == ["third"]
    sites = {s.node: s for s in res.plan.convs}
    assert sites["first"].weight_spec.codes is None and sites["second"].weight_spec.codes is None


@pytest.mark.parametrize("judge", [True, False])
def test_a_block_the_torch_executor_cannot_run_keeps_gptq_or_rounding(monkeypatch, judge):
    """An op (or op form) torch_graph lacks in one block: that block chooses between GPTQ's
    codes and rounding, the others run the method, and the summary names the block."""
    def method(task):
        if task.name == "bridge_1":
            raise NotImplementedError("ops not implemented: FancyOp\nmore")
        return _fake_method([], 0)(task)

    _with_method(monkeypatch, method)
    monkeypatch.setattr(reconstruct, "JUDGE", judge)
    res = quantize(mixed_model(seed=2), calibration(32, seed=1), weight_bits=4,
                   reconstruct="brecq")
    results = {r.name: r for r in res.plan.reconstruction}
    assert results["bridge_1"].unsupported == "ops not implemented: FancyOp"
    assert set(results["bridge_1"].candidates) == {reconstruct.RTN, "gptq"}
    assert all(not r.unsupported and "brecq" in r.candidates
               for name, r in results.items() if name != "bridge_1")
    note = next(n for n in res.plan.notes if n.startswith("reconstruct brecq"))
    assert ("; 1 block without brecq (bridge_1: ops not implemented: FancyOp), GPTQ's codes "
            "or rounding kept there; ") in note


@pytest.mark.parametrize("method", ["gptq", "brecq"])
def test_gptq_shrinks_each_hessian_over_the_calibration_samples(monkeypatch, method):
    """Every layer's H is shrunk with the calibration samples as its observations
    (gptq.shrinkage): all 64 taken by default, as GPTQ's codes are fitted on every sample
    (brecq's start too, 16 of them held out from brecq itself), conv (one image per sample)
    and linear (the sample's tokens) alike."""
    from onnxquant import gptq

    seen = []
    real = gptq.hessian

    def hessian(x, samples=None):
        seen.append(samples)
        return real(x, samples)

    monkeypatch.setattr(gptq, "hessian", hessian)
    if method != "gptq":
        _with_method(monkeypatch, _fake_method([]))
    quantize(sdpa_model(head=True, seed=2), calibration(80, seed=1), weight_bits=4,
             per_channel=True, parts=frozenset(PARTS),
             reconstruct=method)  # 64 of the 80 by default (QuantConfig.calib_samples)
    assert len(seen) >= 4  # conv_in, q/k/v, conv_out, the head
    for samples in seen:
        assert samples is not None and sorted(set(samples.tolist())) == list(range(64))
