"""The opset matrix: the same models at opsets 11..23, quantized with every recipe.

    model (opset N) -> onnx.version_converter -> opset M (float outputs checked unchanged)
                    -> onnxquant.quantize(recipe) -> full checker, onnxruntime, close to float

Models: a tiny hybrid graph (conv stem, sdpa attention, conv, classifier Softmax head),
written at opset 11 and converted up to every opset of ``OPSETS``; the bundled
mobilevit_xxs (opset 17) at ``BIG_OPSETS``; the real PP-OCRv6 recognizer (opset 11,
paddle2onnx, CTC head) at opset 11 only (its cells take 2-8 s each). An opset the installed
onnxruntime cannot run, or a conversion that fails or changes the float outputs, skips its
cells and says why (neither is onnxquant's doing: e.g. the converter has no adapter taking
LayerNormalization below opset 17).

"Close to float" is relative to what the recipe costs the model (``fuzz_graphs.error_bound``:
3x the output error of the same model with NumPy fake-quantized weights, + 0.05): PP-OCR's
per-tensor uint8 conv weights alone move its CTC probabilities by 53 %, per channel by 13 %.
"""

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, version_converter

import fuzz_graphs as fg
import graphs
from conftest import BUNDLED, need_shared

OPSETS = (11, 13, 14, 15, 17, 18, 19, 21, 23)
BIG_OPSETS = (11, 13, 17, 21)
RECIPES = ("paper", "paper_per_channel", "ort_fixed", "tensorrt")
MOBILEVIT = BUNDLED / "mobilevit_xxs.imagenette.onnx"


def tiny_hybrid() -> onnx.ModelProto:
    """stem 3x3 + Relu -> conv 1x1 -> sdpa (Mul scale) -> conv 1x1 -> Gemm -> Softmax, at
    opset 11 (the converter only has adapters upwards for some ops, e.g. Relu 14 -> 13)."""
    b = graphs.Builder(seed=3, opset=11)
    h = b.relu("stem_act", b.conv("stem", "x", 4, 8, k=3))
    h = b.sdpa("attn", b.conv("conv_in", h, 8, 8), variant="mul")
    return b.build({b.head("head", b.conv("conv_out", h, 8, 8), 8): "float[N,10]"})


@functools.lru_cache(maxsize=None)
def source(name: str) -> tuple:
    """(model, calibration array) of ``name``; skips if the file is missing."""
    if name == "tiny":
        return tiny_hybrid(), graphs.calibration(8, 4)
    if name == "mobilevit_xxs":
        if not MOBILEVIT.exists():
            pytest.skip(f"{MOBILEVIT} not found")
        rng = np.random.default_rng(0)
        return onnx.load(MOBILEVIT), rng.uniform(-2, 2, (4, 3, 128, 128)).astype(np.float32)
    path = need_shared("real", "PP-OCRv6_rec_small.onnx")
    rng = np.random.default_rng(0)
    return onnx.load(path), rng.uniform(-1, 1, (4, 3, 48, 320)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def runtime_supports(opset: int) -> str | None:
    """None if onnxruntime runs a model of this opset, else why not."""
    ids = [helper.make_opsetid("", opset)]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                                [x], [y]), opset_imports=ids)
    model.ir_version = helper.find_min_ir_version_for(ids)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        return f"onnxruntime {ort.__version__} does not run opset {opset}: {str(exc)[:120]}"
    return None


@functools.lru_cache(maxsize=None)
def at_opset(name: str, opset: int) -> tuple:
    """(model converted to ``opset``, float outputs on the calibration input) or a skip reason."""
    model, calib = source(name)
    reason = runtime_supports(opset)
    if reason:
        return None, reason
    native = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset == native:
        return model, None
    try:
        converted = version_converter.convert_version(model, opset)
        converted.ir_version = max(helper.find_min_ir_version_for(list(converted.opset_import)),
                                   converted.ir_version)
        onnx.checker.check_model(converted, full_check=True)
        y, y_conv = fg.run(model, calib), fg.run(converted, calib)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare C++ errors
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        return None, f"onnx.version_converter {name} {native} -> {opset} failed: {line}"
    for a, b in zip(y, y_conv):
        if not np.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max()))):
            return None, (f"onnx.version_converter {name} {native} -> {opset} changed the "
                          "float outputs")
    return converted, None


def _cells():
    cells = [("tiny", opset, recipe) for opset in OPSETS for recipe in RECIPES]
    cells += [("mobilevit_xxs", opset, recipe) for opset in BIG_OPSETS for recipe in RECIPES]
    cells += [("ppocr_rec", 11, recipe) for recipe in RECIPES]
    return [pytest.param(*cell, id=f"{cell[0]}-opset{cell[1]}-{cell[2]}") for cell in cells]


@functools.lru_cache(maxsize=None)
def float_outputs(name: str, opset: int) -> list:
    return fg.run(at_opset(name, opset)[0], source(name)[1])


@functools.lru_cache(maxsize=None)
def bound(name: str, opset: int, reference: tuple) -> float:
    """fuzz_graphs.error_bound, once per reference scheme (ort and tensorrt share one)."""
    recipe = next(r for r, v in fg.REFERENCE.items() if v == reference)
    return fg.error_bound(at_opset(name, opset)[0], source(name)[1], recipe,
                          float_outputs(name, opset))


@pytest.mark.parametrize("name, opset, recipe", _cells())
def test_recipe_at_opset(name, opset, recipe):
    model, reason = at_opset(name, opset)
    if model is None:
        pytest.skip(reason)
    _, calib = source(name)
    before = model.SerializeToString()
    out = fg.onnxquant.quantize(model, fg.RECIPES[recipe], calibration=calib)
    assert model.SerializeToString() == before, "the input model was modified"
    onnx.checker.check_model(out, full_check=True)
    y, yq = float_outputs(name, opset), fg.run(out, calib)
    assert fg.softmax_count(out) == fg.softmax_count(model)
    err, limit = fg.relative_error(y, yq), bound(name, opset, fg.REFERENCE[recipe])
    print(f"{name} opset {opset} {recipe}: relative error {err:.4f}, bound {limit:.4f}")
    assert err <= limit, f"relative output error {err:.3g} > bound {limit:.3g}"
