"""log2_body.py: the written file's log2 op gets the BitCast body (opset 26) where its checks
pass, the table body otherwise; outputs match the table-body file."""

import numpy as np
import onnx
import pytest

from onnxquant import QuantConfig, checked_convert, functions, log2_body
from onnxquant.errors import UserError
from onnxquant.opset import model_opset

import graphs


def _body(model: onnx.ModelProto) -> str:
    f = next(f for f in model.functions if f.name == functions.OP_TYPE)
    return "bitcast" if "BitCast" in {n.op_type for n in f.node} else "table"


def _quantize(**config):
    return graphs.quantize(graphs.sdpa_model(), graphs.calibration(), **config)


@pytest.fixture(scope="module")
def both():
    return _quantize(), _quantize(log2_body="table")


def test_default_paper_file_gets_the_bitcast_body_at_opset_26(both):
    fast, table = both
    assert (_body(fast.model), model_opset(fast.model)) == ("bitcast", 26)
    assert (_body(table.model), model_opset(table.model)) == ("table", 17)
    assert any(n.startswith("log2 op: BitCast body") and "opset 17 converted to 26" in n
               for n in fast.plan.notes)
    onnx.checker.check_model(fast.model, full_check=True)


def _ops(model: onnx.ModelProto) -> set:
    return {n.op_type for n in next(f for f in model.functions if f.name == functions.OP_TYPE).node}


def test_softmax_fed_log2_ops_get_the_body_without_clip(both):
    """Every log2 op of a written file reads a Softmax output (never negative): no Clip."""
    fast, _ = both
    assert log2_body.bitcast_variant(fast.model) == "bitcast_nonnegative"
    assert "Clip" not in _ops(fast.model) and "BitCast" in _ops(fast.model)


def test_a_log2_op_fed_by_anything_else_keeps_the_clip(both):
    fast, _ = both
    model = checked_convert.copy_model(fast.model)
    log2 = graphs.log2_nodes(model)[0]
    model.graph.node.append(onnx.helper.make_node("Neg", [log2.input[0]], ["negated"]))
    log2.input[0] = "negated"
    assert log2_body.bitcast_variant(model) == "bitcast"
    functions.install(model, log2_body.bitcast_variant(model))
    assert "Clip" in _ops(model)


def test_bitcast_file_gives_the_table_file_outputs_and_codes(both):
    """Every log2 output bit-identical (the codes), the model outputs within float rounding
    of the opset change."""
    fast, table = both
    feed = {"x": graphs.calibration(4, seed=7)}
    names = [n.output[0] for n in graphs.log2_nodes(table.model)]
    assert names
    outs = [graphs.run_ort(r.model, feed, names + [r.model.graph.output[0].name])
            for r in (fast, table)]
    for a, b in zip(outs[0][:-1], outs[1][:-1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(outs[0][-1], outs[1][-1], rtol=1e-5, atol=1e-6)


def test_tensorrt_target_keeps_the_table_body():
    result = _quantize(target="tensorrt")
    assert _body(result.model) == "table" and model_opset(result.model) == 17


def _broken_bitcast_body(monkeypatch):
    """The bucket shift one bit off: the codes move."""
    real = functions._bitcast_nodes

    def broken(clip=True):
        nodes = real(clip)
        for n in nodes:
            if n.output[0] == "bucket":
                n.attribute[0].t.int32_data[0] = 2 ** (23 - functions.SNAP_BITS + 1)
        return nodes
    monkeypatch.setattr(functions, "_bitcast_nodes", broken)


def test_a_body_one_ulp_off_is_not_shipped(monkeypatch):
    """The codes are compared bit for bit, not within float tolerance."""
    real = functions._bitcast_nodes

    def off_by_an_ulp(clip=True):
        nodes = real(clip)
        gather = next(n for n in nodes if n.output[0] == "y_flat")
        gather.output[0] = "y_exact"
        at = nodes.index(gather) + 1
        nodes[at:at] = [functions._const("ulp", 1 + 2.0**-22, onnx.TensorProto.FLOAT),
                        onnx.helper.make_node("Mul", ["y_exact", "ulp"], ["y_flat"])]
        return nodes
    monkeypatch.setattr(functions, "_bitcast_nodes", off_by_an_ulp)
    assert _body(_quantize().model) == "table"


def test_a_conversion_that_changes_the_outputs_is_not_shipped(monkeypatch):
    real = checked_convert.convert

    def altered(model, version):
        out, why = real(model, version)
        w = next(t for t in out.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                 and onnx.numpy_helper.to_array(t).size > 1)
        w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 3, w.name))
        return out, why
    monkeypatch.setattr(checked_convert, "convert", altered)
    result = _quantize()
    assert _body(result.model) == "table"
    assert ("log2 op kept its table body at opset 17: opset 17 -> 26 changed the outputs "
            "(also with activation quantizers bypassed)") in result.plan.notes


def test_a_model_at_opset_26_is_not_converted(monkeypatch):
    def no_conversion(model, version):
        raise AssertionError("converted a model already at 26")
    monkeypatch.setattr(checked_convert, "convert", no_conversion)
    table = _quantize(log2_body="table").model
    table.opset_import[0].version = 26
    functions.install(table)
    fast, note = log2_body.apply_body(table, QuantConfig(), "m", lambda: {"x": graphs.calibration(2)})
    assert _body(fast) == "bitcast" and model_opset(fast) == 26
    assert note == ("log2 op: BitCast body, one lookup per element (opset 26), up to 1 MB of "
                    f"table per op at load ({len(graphs.log2_nodes(fast))} ops); for a runtime "
                    "without opset 26 or less memory: --log2-body table")


def test_note_says_when_float_rounding_moved_codes(monkeypatch):
    """A conversion whose check passed only with the quantizers bypassed is named."""
    real = checked_convert.at_least

    def rounding_moved(model, version, feed, rounding):
        rounding.append(f"opset 17 -> {version}")
        return real(model, version, feed, [])
    monkeypatch.setattr(log2_body, "at_least", rounding_moved)
    table = _quantize(log2_body="table").model
    fast, note = log2_body.apply_body(table, QuantConfig(), "m",
                                      lambda: {"x": graphs.calibration(2)})
    assert _body(fast) == "bitcast"
    assert note == ("log2 op: BitCast body, one lookup per element (opset 17 converted to 26; "
                    "float rounding moved log2 codes (opset change): outputs agree with the "
                    "quantizers bypassed), up to 1 MB of table per op at load "
                    f"({len(graphs.log2_nodes(fast))} ops); for a runtime without opset 26 or "
                    "less memory: --log2-body table")


def test_large_models_keep_the_table_body(monkeypatch):
    monkeypatch.setattr(log2_body, "is_large", lambda model: True)
    result = _quantize()
    assert _body(result.model) == "table"
    assert ("log2 op kept its table body at opset 17: the model needs external data (over "
            "2 GB)") in result.plan.notes


@pytest.mark.parametrize("config, body", [({}, "bitcast"), ({"target": "tensorrt"}, "table"),
                                          ({"log2_body": "table"}, "table"),
                                          ({"target": "tensorrt", "log2_body": "table"}, "table")])
def test_auto_body_is_bitcast_except_on_tensorrt(config, body):
    assert log2_body.chosen_body(QuantConfig(**config)) == body


def test_a_body_that_moves_codes_is_not_shipped(monkeypatch):
    _broken_bitcast_body(monkeypatch)
    result = _quantize()
    assert _body(result.model) == "table" and model_opset(result.model) == 17
    assert ("log2 op kept its table body at opset 17: the BitCast body gives other codes "
            "than the table body") in result.plan.notes


def test_explicit_bitcast_that_fails_its_check_is_an_error(monkeypatch):
    _broken_bitcast_body(monkeypatch)
    with pytest.raises(UserError, match="--log2-body bitcast: the BitCast body gives other "
                                        "codes than the table body; use --log2-body table"):
        _quantize(log2_body="bitcast")


def test_failed_conversion_keeps_the_table_body(monkeypatch):
    from onnxquant import checked_convert

    def broken(model, version):
        raise RuntimeError("No Adapter For Foo\nmore")

    monkeypatch.setattr(checked_convert.version_converter, "convert_version", broken)
    result = _quantize()
    assert _body(result.model) == "table"
    assert ("log2 op kept its table body at opset 17: opset 17 -> 26 conversion failed "
            "(No Adapter For Foo)") in result.plan.notes


def test_no_log2_op_no_conversion():
    result = _quantize(softmax_quantizer="uniform")
    assert model_opset(result.model) == 17
    assert not log2_body.has_log2_ops(result.model)


@pytest.mark.parametrize("config, message", [
    ({"target": "tensorrt", "log2_body": "bitcast"}, "TensorRT's parser has no BitCast"),
    ({"softmax_quantizer": "uniform", "log2_body": "table"}, "applies to the log quantizers"),
    ({"target": "ort", "log2_body": "table"}, "leaves the Softmax float"),
    ({"log2_body": "fast"}, "log2_body must be one of"),
])
def test_log2_body_options_that_cannot_apply_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**config)
