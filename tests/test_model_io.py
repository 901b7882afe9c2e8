"""Loading and saving: external data stays inside the model's folder, writes are atomic."""

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxquant
from onnxquant.errors import UserError
from onnxquant.model_io import load_model, save_model


def _conv_model(rng) -> onnx.ModelProto:
    w = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, [1, 8, 8, 8])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_external_data_model_loads_and_quantizes(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save_model(_conv_model(rng), path, save_as_external_data=True, location="m.data",
                    size_threshold=0)
    model = load_model(path)
    out = onnxquant.quantize(model)
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "Conv"]


def test_external_data_outside_folder_is_refused(tmp_path, rng):
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save_model(_conv_model(rng), tmp_path / "evil.onnx", save_as_external_data=True,
                    location="secret.data", size_threshold=0)
    model = onnx.load(tmp_path / "evil.onnx", load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../secret.data"
    onnx.save_model(model, inner / "evil.onnx")
    with pytest.raises(UserError, match="outside the model's folder"):
        load_model(inner / "evil.onnx")


def test_missing_external_data_file(tmp_path, rng):
    onnx.save_model(_conv_model(rng), tmp_path / "m.onnx", save_as_external_data=True,
                    location="m.data", size_threshold=0)
    os.unlink(tmp_path / "m.data")
    with pytest.raises(UserError, match="missing"):
        load_model(tmp_path / "m.onnx")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, rng):
    dst = tmp_path / "out.onnx"
    save_model(_conv_model(rng), dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert onnx.load(dst).graph.node[0].op_type == "Conv"


def test_failed_save_leaves_nothing(tmp_path, monkeypatch, rng):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(UserError, match="out.onnx: cannot write the output"):
        save_model(_conv_model(rng), tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_large_model_path_uses_external_data_end_to_end(tmp_path, rng, monkeypatch):
    """The > 2 GB code paths (external data for calibration and output), forced by a tiny
    threshold: protobuf cannot even size a message past 2 GB, so nothing may serialize it."""
    from onnxquant import model_io

    monkeypatch.setattr(model_io, "EXTERNAL_THRESHOLD", 0)
    graph = onnx.parser.parse_graph("""
        g (float[1, 4] x) => (float[1, 512] y) {
            a = MatMul (x, k)
            s = Softmax <axis = -1> (a)
            y = MatMul (s, w)
        }""")
    graph.initializer.extend([
        numpy_helper.from_array(rng.normal(size=(4, 512)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "in.onnx"
    onnx.save_model(model, src)
    q = onnxquant.quantize(load_model(src), calibration=rng.random((4, 1, 4), np.float32)[0])
    assert model_io.is_large(q)
    dst = save_model(q, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").exists()
    assert all(t.raw_data or t.float_data for t in q.graph.initializer)  # q left intact
    save_model(q, tmp_path / "out.onnx")  # overwriting an existing output + data works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx", "out.onnx.data"]
    ops = [n.op_type for n in onnx.load(dst).graph.node]
    assert ops == ["MatMul", "Softmax", "Log2QuantDequant", "MatMul"]
