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
