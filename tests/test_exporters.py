"""Other exporters than the zoo's (docs/exporters.md, tools/zoo_exporters.py).

The torch tier exports three representative models (one per attention topology: sdpa,
talking heads + sdpa, separable) with torch's dynamo exporter (opset 18) at 64 px and
checks that onnxquant finds the same attention blocks as in the TorchScript (opset 17)
export, and that the paper and tensorrt recipes give valid, runnable models, the same as from
the TorchScript export. Exports are cached by ``zoo_cache``: measured on 2 shared cores (load
~9), 91 s for the first run (three dynamo exports), 31 s once cached.
"""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxquant
from onnxquant.models import get
from onnxquant.models.export import DYNAMO_OPSET, OPSET, ExportError, export

MODELS = ("mobilevit_xxs", "efficientformerv2_s0", "mobilevitv2_050")
SIZE = 64
RECIPES = {"paper": onnxquant.QuantConfig(), "tensorrt": onnxquant.QuantConfig(target="tensorrt")}


def test_unknown_exporter_is_one_line_error(tmp_path):
    with pytest.raises(ExportError, match="unknown exporter 'jit'; choose from torchscript"):
        export("mobilevit_xxs", tmp_path / "m.onnx", exporter="jit")
    assert not any(tmp_path.iterdir())


def _exports(name: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    pytest.importorskip("timm", reason="timm not installed (pip install onnxquant[torch])")
    pytest.importorskip("torch", reason="torch not installed (pip install onnxquant[torch])")
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript "
                                             "(pip install onnxscript)")
    from onnxquant.models.export import zoo_cache

    ts = onnx.load(str(zoo_cache(name, SIZE)))
    dyn = onnx.load(str(zoo_cache(name, SIZE, exporter="dynamo")))
    return ts, dyn


@pytest.fixture(scope="module", params=MODELS)
def exports(request):
    ts, dyn = _exports(request.param)
    return request.param, ts, dyn


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _attention(model: onnx.ModelProto) -> tuple[collections.Counter, dict]:
    _, plan = onnxquant.analyze(model)
    return collections.Counter(s.pattern for s in plan.attention), plan.role_counts()


@pytest.mark.torch
def test_dynamo_export_finds_the_same_attention(exports):
    name, ts, dyn = exports
    assert (_opset(ts), _opset(dyn)) == (OPSET, DYNAMO_OPSET)
    meta = {p.key: p.value for p in dyn.metadata_props}
    assert (meta["exporter"], meta["opset"]) == ("dynamo", str(DYNAMO_OPSET))
    assert "exporter" not in {p.key for p in ts.metadata_props}  # default export unchanged
    (ts_patterns, ts_roles), (dyn_patterns, dyn_roles) = _attention(ts), _attention(dyn)
    assert sum(dyn_patterns.values()) == sum(ts_patterns.values()) == get(name).softmax
    assert dyn_patterns == ts_patterns
    assert dyn_roles == ts_roles


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.torch
@pytest.mark.parametrize("recipe", RECIPES)
def test_dynamo_export_quantizes_like_torchscript(exports, recipe):
    """Valid, runnable output; and the same quantized model as from the TorchScript export:
    measured 0-1.2e-6 relative difference between the two quantized outputs, while
    quantization itself moves the logits by 0.4-49 % (random init, N(0,1) input)."""
    name, ts, dyn = exports
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    calib = np.random.default_rng(1).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32)
    result = onnxquant.run(dyn, RECIPES[recipe], calibration=calib, progress=False)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.counts["softmax"] == get(name).softmax  # one log2 op per attention block
    out, ref = _run(result.model, x), _run(dyn, x)
    assert out.shape == ref.shape and np.isfinite(out).all()
    assert _rel(out, ref) > 1e-3  # something was quantized
    from_ts = _run(onnxquant.quantize(ts, RECIPES[recipe], calibration=calib), x)
    assert _rel(out, from_ts) < 1e-4


# ---------------------------------------------------------------- the tool, on tiny graphs

def _tool():
    import importlib
    import sys
    from pathlib import Path

    tools = str(Path(__file__).resolve().parents[1] / "tools")
    sys.path.insert(0, tools)
    try:
        return importlib.import_module("zoo_exporters")
    finally:
        sys.path.remove(tools)


def _tiny(*ops: str) -> onnx.ModelProto:
    """input [2, 4] -> ops in a chain -> output, at opset 17."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, prev = [], [], "input"
    for i, op in enumerate(ops):
        inputs = [prev]
        if op == "LayerNormalization":
            inits.append(numpy_helper.from_array(np.ones(4, np.float32), f"g{i}"))
            inputs.append(f"g{i}")
        nodes.append(helper.make_node(op, inputs, [f"t{i}"], name=f"n{i}"))
        prev = f"t{i}"
    nodes[-1].output[0] = "out"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("input", "out")]
    graph = helper.make_graph(nodes, "tiny", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tool_names_what_blocks_a_down_conversion():
    tool = _tool()
    model = _tiny("Identity", "Softmax")
    assert tool.newer_ops(model, 15) == {"Identity": 16}
    assert tool.blockers(model, 15) == ["Identity: No Adapter From Version $16 for Identity",
                                        "converts once Identity is bypassed"]
    bypassed = tool._bypass_identity(model)
    assert [n.op_type for n in bypassed.graph.node] == ["Softmax"]
    assert [n.op_type for n in model.graph.node] == ["Identity", "Softmax"]  # not modified
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run_any(bypassed, x), _run_any(model, x))
    blocked = tool.blockers(_tiny("LayerNormalization", "Identity"), 13)
    assert blocked == ["LayerNormalization: No Previous Version of LayerNormalization exists"]
    assert tool._blocker(blocked[0]) == "LayerNormalization (no previous version)"


def _run_any(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_tool_flags_missing_log2_ops_as_silent_failures():
    tool = _tool()
    ok = {"ok": True, "rel_err": 0.01, "top1": 1.0}
    cell = {"inspect": {"attention": 9},
            "recipes": {"paper": {**ok, "log2": 0}, "ort": {**ok, "log2": 0},
                        "tensorrt": {**ok, "log2": 9}}}
    assert tool.recipe_issue(cell, "paper").startswith("silent: 0 log2 ops inserted for 9")
    assert tool.recipe_issue(cell, "ort") is None  # ort leaves Softmax in float
    assert tool.recipe_issue(cell, "tensorrt") is None
    assert tool.has_error(cell)
