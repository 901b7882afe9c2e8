"""passes/fold_shapes.py: run-time Reshape shape arithmetic folded to constants, outputs
bit-identical at every batch size, and left alone where folding would not be safe."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxquant import QuantConfig, api
from passes.fold_shapes import _folded, fold_reshape_shapes

from conftest import BUNDLED

F = onnx.TensorProto.FLOAT


def _model(nodes, inputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", F, None)],
                              list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batch_reshape_model():
    """x[N, 4, 8] -> Reshape(x, [Shape(x)[0], 32]) * 2 (the exporter's dynamic-batch idiom)."""
    consts = [numpy_helper.from_array(np.array([0]), "i0"),
              numpy_helper.from_array(np.array([32]), "c32"),
              numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             helper.make_node("Concat", ["n", "c32"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("Mul", ["r", "two"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 4, 8])], consts)


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_batch_dependent_target_becomes_constant_with_minus_one(rng):
    model = _batch_reshape_model()
    folded, count, note = fold_reshape_shapes(model)
    assert (count, note) == (1, "")
    assert {n.op_type for n in folded.graph.node} == {"Reshape", "Mul"}
    target = next(n.input[1] for n in folded.graph.node if n.op_type == "Reshape")
    init = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    np.testing.assert_array_equal(init[target], [-1, 32])
    for batch in (1, 4, 7):
        x = rng.standard_normal((batch, 4, 8)).astype(np.float32)
        np.testing.assert_array_equal(_run(folded, x), _run(model, x))


def test_input_model_is_not_modified():
    model = _batch_reshape_model()
    before = model.SerializeToString()
    fold_reshape_shapes(model)
    assert model.SerializeToString() == before


def test_two_batch_dependent_dims_are_left_alone(rng):
    """x[N, 1] @ x^T -> [N, N], reshaped to Shape(..): both dims follow the batch."""
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "xt"], ["outer"]),
             helper.make_node("Shape", ["outer"], ["s"]),
             helper.make_node("Reshape", ["outer", "s"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 1])])
    folded, count, _ = fold_reshape_shapes(model)
    assert count == 0 and folded is model


def test_symbolic_dim_after_the_batch_is_refused_with_a_note():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Reshape", ["x", "s"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", "W"])])
    folded, count, note = fold_reshape_shapes(model)
    assert count == 0 and folded is model and "symbolic dim after the batch" in note


@pytest.mark.parametrize("shapes,expected", [
    ([(1, 64, 4), (2, 64, 4), (3, 64, 4)], [-1, 64, 4]),
    ([(4, 16, 20), (8, 16, 20), (12, 16, 20)], [-1, 16, 20]),
    ([(5, 7), (5, 7), (5, 7)], [5, 7]),
    ([(1, 1), (2, 2), (3, 3)], None),
    ([(1, 0), (2, 0), (3, 0)], None),
])
def test_folded_target(shapes, expected):
    got = _folded(shapes)
    assert (got is None) if expected is None else got.tolist() == expected


def test_ort_target_runs_no_shape_arithmetic_on_the_bundled_model(rng):
    """The export computes 36 Reshape targets from Shape ops; the ort output computes none
    and still runs at batch 1 and 3, close to the float model."""
    path = BUNDLED / "mobilevit_xxs.imagenette.onnx"
    calib = rng.standard_normal((4, 3, 128, 128)).astype(np.float32)
    cfg = QuantConfig(target="ort", ort_int8_kinds=("dense",))
    result = api.run(str(path), cfg, calib, progress=False)
    ops = {n.op_type for n in result.model.graph.node}
    assert not ops & {"Shape", "Gather", "Unsqueeze"}
    assert any("Reshape target shapes" in n for n in result.plan.notes)
    original = onnx.load(str(path))
    sess_q = ort.InferenceSession(result.model.SerializeToString(),
                                  providers=["CPUExecutionProvider"])
    sess_f = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 128, 128)).astype(np.float32)
        q, f = sess_q.run(None, {"input": x})[0], sess_f.run(None, {"input": x})[0]
        assert q.shape == f.shape == (batch, 10)
        assert np.abs(q - f).max() < 0.05 * np.abs(f).max()
