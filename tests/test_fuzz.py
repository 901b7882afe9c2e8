"""Property-based tests: random valid hybrid graphs (tests/fuzz_graphs.py) through every recipe.

Property, for every generated graph and recipe: onnxquant either refuses it with its own
one-line ``UserError``, or returns a model that passes the full checker, runs in
onnxruntime CPU, stays close to the float model on the calibration input, keeps every
Softmax, finds every generated attention block, and leaves the input model untouched.
Anything else (another exception, an invalid or silently wrong output) fails, and
hypothesis shrinks the graph; the failing graph's description is printed with the failure.

One test per recipe and opset group, each with its own fixed seed (reproducible in CI,
different graphs per test, every opset covered): 320 graphs per run. ``tools/fuzz.py`` runs
the same generator over thousands of seeds (NumPy choices instead of hypothesis).
"""

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, note, seed, settings

import fuzz_graphs as fg

OPSET_GROUPS = {"opset11_12": (11, 12), "opset13_16": (13, 14, 15, 16),
                "opset17_19": (17, 18, 19), "opset20_21": (20, 21)}
EXAMPLES = 16  # per recipe and opset group: 5 x 4 x 16 = 320 graphs per run
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _property_test(recipe: str, group: str, index: int):
    @seed(20261201 + index)
    @SETTINGS
    @given(gen=fg.graphs(OPSET_GROUPS[group]))
    def test(gen):
        note(f"recipe {recipe}: {gen.describe()}")
        fg.verify(gen, recipe)

    test.__name__ = f"test_random_graph_{recipe}_{group}"
    test.__doc__ = (f"Random valid graphs at {group} quantized with the {recipe} recipe meet "
                    "the property.")
    return test


for _i, (_recipe, _group) in enumerate((r, g) for r in fg.RECIPES for g in OPSET_GROUPS):
    globals()[f"test_random_graph_{_recipe}_{_group}"] = _property_test(_recipe, _group, _i)


# ---- the generator and the property are not vacuous ---------------------------------------

@pytest.mark.parametrize("seed_", range(0, 40, 4))
def test_generated_graphs_are_valid_and_deterministic(seed_):
    gen = fg.generate(seed_)
    onnx.checker.check_model(gen.model, full_check=True)
    again = fg.generate(seed_)
    assert again.model.SerializeToString() == gen.model.SerializeToString()
    np.testing.assert_array_equal(again.calibration, gen.calibration)


def test_generator_covers_every_feature():
    """Over 200 seeds: every opset, naming mode, block kind and passthrough appears."""
    notes = " ; ".join(fg.generate(s).describe() for s in range(200))
    for opset in fg.OPSETS:
        assert f"opset {opset};" in notes
    for word in ("names=empty", "names=collide", "names=mixed", "sdpa heads=2", "separable",
                 "talking heads", "token MLP", "residual Add", "BatchNormalization",
                 "bias=empty", "shared ", "softmax->Identity", "softmax->Dropout",
                 "softmax->Cast", "transB=0", "transB=1", "CTC-like", "scale=div", "gelu_erf",
                 "hardswish", "hardsigmoid_mul", "sigmoid_mul", " s2 ", "g2 "):
        assert word in notes, word


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The tests below check the property's power, not onnxquant: keep the input intact."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _first_with_attention(start: int) -> fg.Generated:
    return next(g for g in map(fg.generate, range(start, start + 200))
                if g.n_attention and "names=role" in g.notes)


def test_property_rejects_a_dropped_softmax(monkeypatch):
    """A quantizer that replaced an attention Softmax by Identity would fail verify()."""
    gen = _first_with_attention(0)
    real_run = fg.onnxquant.run

    def dropping_run(model, *args, **kwargs):
        result = real_run(_copy(model), *args, **kwargs)
        node = next(n for n in result.model.graph.node if n.op_type == "Softmax")
        node.op_type = "Identity"
        del node.attribute[:]
        return result

    monkeypatch.setattr(fg.onnxquant, "run", dropping_run)
    with pytest.raises(fg.PropertyViolation, match="Softmax count"):
        fg.verify(gen, "paper")


def test_property_rejects_a_garbled_weight(monkeypatch):
    """A quantizer that stored a conv weight reversed would fail the closeness bound."""
    gen = next(g for g in map(fg.generate, range(200)) if "names=role" in g.notes
               and g.n_attention == 0 and "head=none" in g.notes)
    real_run = fg.onnxquant.run

    def garbling_run(model, *args, **kwargs):
        result = real_run(_copy(model), *args, **kwargs)
        for init in result.model.graph.initializer:
            value = onnx.numpy_helper.to_array(init)
            if value.ndim == 4 and value.size > 8:
                init.CopyFrom(onnx.numpy_helper.from_array(value[::-1].copy(), init.name))
        return result

    monkeypatch.setattr(fg.onnxquant, "run", garbling_run)
    with pytest.raises(fg.PropertyViolation, match="relative output error .* > bound"):
        fg.verify(gen, "paper")
