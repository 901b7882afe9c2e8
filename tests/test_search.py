"""--auto (search.py): choices are made per layer from block errors, respect the target's
constraints, and never make the block error worse than the target's default recipe."""

import numpy as np
import pytest

from graphs import calibration, mixed_model, quantize, run_ort


def _err(model, quant, x):
    (y,), (yq,) = run_ort(model, {"x": x}), run_ort(quant, {"x": x})
    return float(np.sum((y - yq) ** 2) / np.sum(y ** 2))


@pytest.mark.parametrize("target, bits", [("tensorrt", 4), ("paper", 3), ("ort", 8)])
def test_auto_is_no_worse_than_the_default_and_records_its_choices(target, bits):
    model = mixed_model(seed=3)
    x = calibration(16)
    options = {"tensorrt": {"weight_bits": bits, "act_bits": bits}, "paper": {"weight_bits": bits},
               "ort": {"ort_int8_kinds": ("dense", "pointwise", "stem", "linear")}}[target]
    plain = quantize(model, x, target=target, **options)
    auto = quantize(model, x, target=target, auto=True, **options)
    assert auto.plan.choices and any(n.startswith("auto:") for n in auto.plan.notes)
    assert _err(model, auto.model, x) <= _err(model, plain.model, x) * 1.001
    for choice in auto.plan.choices:
        assert choice.chosen in choice.errors
        assert choice.errors[choice.chosen] == min(choice.errors.values())
    if target == "tensorrt":  # symmetric only: no asymmetric weight was even tried
        assert not any(k.startswith("asym") for c in auto.plan.choices for k in c.errors)
        assert all(s.weight_spec.symmetric for s in auto.plan.convs if s.weight_spec)


def test_auto_needs_replayable_calibration():
    from onnxquant.errors import UserError

    class Reader:
        def __init__(self):
            self.batches = [{"x": calibration(4)}]

        def get_next(self):
            return self.batches.pop() if self.batches else None

    with pytest.raises(UserError, match="--auto"):
        quantize(mixed_model(), Reader(), target="tensorrt", auto=True)


def test_a_run_is_scored_on_what_later_blocks_read(monkeypatch):
    """Target ort: an int8 conv's output that leaves its block is requantized by its
    readers (QLinearConv). A run's error counts that rounding, as the emitted model does:
    it equals the relative error of the float-emitted run with those outputs put through
    the NumPy uniform quantizer of their output spec."""
    import onnx_graphsurgeon as gs

    from onnxquant import block_runs, quantizers, search

    made = []
    real_init = search._Search.__init__

    def init(self, *args):
        real_init(self, *args)
        made.append(self)

    monkeypatch.setattr(search._Search, "__init__", init)
    quantize(mixed_model(seed=2), calibration(16, seed=1), target="ort", auto=True,
             ort_int8_kinds=("dense", "pointwise", "stem"))
    (work,) = made
    specs = {s.output: s.output_spec for s in work.plan.convs if s.output_spec is not None}
    requantized = 0
    for i, block in enumerate(work.plan.blocks):
        if not (block.convs or block.linears):
            continue
        later = block_runs.read_after([block], i, work.last) & set(specs)
        requantized += len(later)
        plan = block_runs.subplan(work.plan, set(block.nodes))
        got = block_runs.run(block_runs.emitted(gs.import_onnx(
            search.blockmap.extract(work.model, [block], work.types)), plan), work.values)
        for t in later:
            p = specs[t].uniform_params()
            got[t] = quantizers.uniform_dequantize(quantizers.uniform_quantize(got[t], p), p)
        want = block_runs.relative_error(got, work.values)
        assert work.error([block]) == pytest.approx(want, rel=1e-4)
    assert requantized  # the case is there: an int8 output read by a later block
