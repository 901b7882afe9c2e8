"""--auto --search-metric fisher (fisher.py): the weights are the squared gradients of the
model's cross entropy against its own prediction, checked by finite differences."""

import numpy as np
import pytest

from graphs import Builder, calibration, mixed_model, quantize

torch = pytest.importorskip("torch", reason="search_metric 'fisher' needs torch")
pytestmark = pytest.mark.torch


def _classifier():
    b = Builder(5)
    h = b.relu("act", b.conv("stem", "x", 4, 8, k=3))
    return b.build({b.head("head", h, 8): "float[N,10]"})


def _ce(model, x, name, value):
    """The loss with tensor ``name`` replaced by ``value`` (in torch, float64 enough here)."""
    from onnxquant.fisher import _loss
    from onnxquant.torch_graph import GraphModule

    module = GraphModule(model)
    hooks = {name: lambda _: torch.from_numpy(value)}
    out = module.run({"x": torch.from_numpy(x)}, hooks=hooks)
    return float(_loss(list(out.values())))


def test_weights_are_squared_gradients_by_finite_differences():
    from onnxquant.fisher import sensitivities

    model, x = _classifier(), calibration(4, seed=3)
    tensor = "act_out"
    w = sensitivities(model, [tensor], {"x": x})[tensor]
    from onnxquant.torch_graph import GraphModule

    base = GraphModule(model).run({"x": torch.from_numpy(x)}, keep=[tensor])[tensor].numpy()
    rng = np.random.default_rng(0)
    for index in [tuple(rng.integers(0, s) for s in base.shape) for _ in range(5)]:
        step = np.zeros_like(base)
        step[index] = 1e-2
        grad = (_ce(model, x, tensor, base + step) - _ce(model, x, tensor, base - step)) / 2e-2
        assert w[index] == pytest.approx(grad**2, rel=0.05, abs=1e-6)


def test_fisher_search_is_no_worse_than_rounding_and_differs_from_mse():
    model, x = mixed_model(seed=3), calibration(16)
    options = {"target": "tensorrt", "weight_bits": 4, "act_bits": 4, "auto": True}
    mse = quantize(model, x, **options)
    fisher = quantize(model, x, search_metric="fisher", **options)
    assert fisher.plan.choices and len(fisher.plan.choices) == len(mse.plan.choices)
    for choice in fisher.plan.choices:
        assert choice.errors[choice.chosen] == min(choice.errors.values())
    assert [c.errors for c in fisher.plan.choices] != [c.errors for c in mse.plan.choices]


def test_search_metric_needs_auto():
    from onnxquant import QuantConfig

    with pytest.raises(ValueError, match="search_metric applies to the --auto"):
        QuantConfig(search_metric="fisher")
