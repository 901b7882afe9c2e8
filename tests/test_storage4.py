"""storage4.pack_4bit: 4-bit codes stored as INT4/UINT4, outputs bit-identical in onnxruntime."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

import graphs
from onnxquant import api, checked_convert
from onnxquant.storage4 import pack_4bit, packable, random_feed


@pytest.fixture
def in_8bit_containers(monkeypatch):
    """The pipeline packs paper-target weights of <= 4 bits itself (api._pack_4bit); these
    tests pack its unpacked emission by hand."""
    monkeypatch.setattr(api, "_pack_4bit", lambda model, *args: model)

FOUR_BIT = (TensorProto.INT4, TensorProto.UINT4)


def _dq_model(opset: int = 21, gemm_codes: tuple = (0, 15), matmul: bool = True,
              seed: int = 0) -> onnx.ModelProto:
    """x -> Conv(DQ int8 W) -> depthwise Conv(DQ uint8 W) -> Flatten -> MatMul(DQ int8 W,
    axis 1) -> Gemm(DQ uint8 W, per tensor, transB) -> y. ``gemm_codes``: the range of the
    Gemm weight's uint8 codes (and zero point), e.g. (0, 255) for 8-bit codes; without
    ``matmul`` the MatMul is an Identity-like float MatMul-free path (Flatten -> Gemm)."""
    rng = np.random.default_rng(seed)
    lo, hi = gemm_codes
    w = {
        "conv_wq": rng.integers(-8, 8, (8, 4, 3, 3)).astype(np.int8),
        "conv_s": rng.uniform(0.01, 0.1, 8).astype(np.float32),
        "conv_z": rng.integers(-2, 3, 8).astype(np.int8),
        "dw_wq": rng.integers(0, 16, (8, 1, 3, 3)).astype(np.uint8),
        "dw_s": rng.uniform(0.01, 0.1, 8).astype(np.float32),
        "dw_z": np.full(8, 8, np.uint8),
        "mm_wq": rng.integers(-8, 8, (288, 64)).astype(np.int8),
        "mm_s": rng.uniform(0.001, 0.01, 64).astype(np.float32),
        "mm_z": np.zeros(64, np.int8),
        "gemm_wq": rng.integers(lo, hi + 1, (10, 64)).astype(np.uint8),
        "gemm_s": np.float32(0.02),
        "gemm_z": np.uint8((lo + hi + 1) // 2),
        "gemm_b": rng.standard_normal(10).astype(np.float32),
    }
    mm_line = ("[mm_dq] mm_w = DequantizeLinear<axis=1>(mm_wq, mm_s, mm_z)\n"
               "            [mm] m = MatMul(f, mm_w)") if matmul else "[mm] m = Slice(f, lo, hi, ax)"
    if not matmul:  # Slice stands in for the MatMul: 64 of the 288 features
        w = {k: v for k, v in w.items() if not k.startswith("mm_")}
        w.update(lo=np.array([0], np.int64), hi=np.array([64], np.int64),
                 ax=np.array([1], np.int64))
    model = onnx.parser.parse_model(f"""
        <ir_version: 10, opset_import: ["" : {opset}]>
        dq (float[1, 4, 6, 6] x) => (float[1, 10] y) {{
            [conv_dq] conv_w = DequantizeLinear<axis=0>(conv_wq, conv_s, conv_z)
            [conv] c = Conv<pads=[1, 1, 1, 1]>(x, conv_w)
            [dw_dq] dw_w = DequantizeLinear<axis=0>(dw_wq, dw_s, dw_z)
            [dw] d = Conv<group=8, pads=[1, 1, 1, 1]>(c, dw_w)
            [flat] f = Flatten<axis=1>(d)
            {mm_line}
            [gemm_dq] gemm_w = DequantizeLinear(gemm_wq, gemm_s, gemm_z)
            [gemm] y = Gemm<transB=1>(m, gemm_w, gemm_b)
        }}""")
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(a), n) for n, a in w.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def _types(model: onnx.ModelProto) -> dict:
    return {t.name: t.data_type for t in model.graph.initializer}


def _run(model: onnx.ModelProto, optimized: bool = True) -> list:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, random_feed(model, seed=3))


def _bit_identical(a: onnx.ModelProto, b: onnx.ModelProto, optimized: bool = True) -> None:
    for x, y in zip(_run(a, optimized), _run(b, optimized)):
        np.testing.assert_array_equal(x, y)


def _same_values(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    """Bit-identical without graph optimizations (the dequantized weights are the same);
    optimized, within 1e-5 of the largest output: onnxruntime turns DequantizeLinear -> MatMul into
    MatMulNBits, whose 8-bit and 4-bit kernels round differently (checked_convert.differs)."""
    _bit_identical(a, b, optimized=False)
    for x, y in zip(_run(a), _run(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * np.abs(x).max())


def test_conv_depthwise_gemm_packed_bit_identical_optimized():
    model = _dq_model(matmul=False)
    packed, note = pack_4bit(model, "dq")
    assert note == "4-bit weights stored as INT4/UINT4: 3 tensors (opset 21)"
    _bit_identical(model, packed)


def test_conv_depthwise_matmul_gemm_packed():
    model = _dq_model()
    before = model.SerializeToString()
    packed, note = pack_4bit(model, "dq")
    assert model.SerializeToString() == before
    types = _types(packed)
    assert types["conv_wq"] == types["conv_z"] == types["mm_wq"] == types["mm_z"] == TensorProto.INT4
    assert types["dw_wq"] == types["dw_z"] == types["gemm_wq"] == types["gemm_z"] == TensorProto.UINT4
    assert types["conv_s"] == TensorProto.FLOAT
    assert note == "4-bit weights stored as INT4/UINT4: 4 tensors (opset 21)"
    onnx.checker.check_model(packed, full_check=True)
    _same_values(model, packed)


def test_8bit_codes_are_not_packed():
    model = _dq_model(gemm_codes=(0, 255))
    assert sorted(packable(model.graph)) == ["conv_wq", "dw_wq", "mm_wq"]
    packed, note = pack_4bit(model, "dq")
    assert _types(packed)["gemm_wq"] == _types(packed)["gemm_z"] == TensorProto.UINT8
    assert note.endswith(": 3 tensors (opset 21)")
    _same_values(model, packed)


def test_all_8bit_returns_input_and_no_note():
    model = _dq_model()
    for t in model.graph.initializer:
        if t.name.endswith("_wq"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2, t.name))
    assert pack_4bit(model, "dq") == (model, None)


def test_codes_read_by_another_op_are_not_packed():
    model = _dq_model()
    model.graph.node.append(onnx.helper.make_node("Cast", ["mm_wq"], ["mm_codes_f"], to=1))
    model.graph.output.append(onnx.helper.make_tensor_value_info("mm_codes_f", 1, [288, 64]))
    assert "mm_wq" not in packable(model.graph)


def test_zero_point_shared_with_8bit_weight_is_copied():
    """dw_z also serves an 8-bit weight: the 4-bit DequantizeLinear gets a UINT4 copy."""
    model = _dq_model()
    big = np.arange(16, dtype=np.uint8).reshape(8, 2) * 16  # codes up to 240
    model.graph.initializer.append(numpy_helper.from_array(big, "big"))
    model.graph.node.append(onnx.helper.make_node("DequantizeLinear", ["big", "dw_s", "dw_z"],
                                                  ["big_f"], axis=0))
    model.graph.output.append(onnx.helper.make_tensor_value_info("big_f", 1, [8, 2]))
    assert "big" not in packable(model.graph)
    packed, _ = pack_4bit(model, "dq")
    types = _types(packed)
    assert types["big"] == types["dw_z"] == TensorProto.UINT8
    assert types["dw_wq"] == types["dw_z_4bit"] == TensorProto.UINT4
    assert next(n for n in packed.graph.node if n.name == "dw_dq").input[2] == "dw_z_4bit"
    onnx.checker.check_model(packed, full_check=True)
    _same_values(model, packed)


def test_weight_bytes_halve():
    model = _dq_model()
    packed, _ = pack_4bit(model, "dq")
    codes = sum(numpy_helper.to_array(t).size for t in model.graph.initializer
                if t.name.endswith(("_wq", "_z")))
    saved = model.ByteSize() - packed.ByteSize()
    assert codes // 2 <= saved <= codes // 2 + 64  # 1 byte per 2 codes, a few bytes of headers
    mm = next(t for t in packed.graph.initializer if t.name == "mm_wq")
    assert len(mm.raw_data) == 288 * 64 // 2


def test_opset_17_is_converted_and_verified():
    model = _dq_model(opset=17)
    model.ir_version = 8
    packed, note = pack_4bit(model, "dq")
    assert note == "4-bit weights stored as INT4/UINT4: 4 tensors (opset 17 converted to 21, outputs unchanged)"
    assert {(o.domain, o.version) for o in packed.opset_import} == {("", 21)}
    assert packed.ir_version >= 10
    _same_values(model, packed)


def test_failed_conversion_keeps_8bit(monkeypatch):
    def broken(model, version):
        raise RuntimeError("No Adapter For Foo\nmore text")

    monkeypatch.setattr(checked_convert.version_converter, "convert_version", broken)
    model = _dq_model(opset=17)
    out, note = pack_4bit(model, "dq")
    assert out is model
    assert note == ("4 4-bit weights stay in 8-bit containers: opset 17 -> 21 conversion "
                    "failed (No Adapter For Foo)")


def test_quantized_model_with_log2_function(in_8bit_containers):
    """A real emission at opset 17 (log2 function inside): the function's opset follows."""
    result = graphs.quantize(graphs.mixed_model(), graphs.calibration(), weight_bits=4,
                             per_channel=True, log2_body="table")
    model = result.model
    assert model.functions and any(n.domain == "onnxquant" for n in model.graph.node)
    before = model.SerializeToString()
    packed, note = pack_4bit(model, "mixed")
    assert model.SerializeToString() == before
    assert note.startswith("4-bit weights stored as UINT4: 4 tensors (opset 17 converted")
    assert [o.version for f in packed.functions for o in f.opset_import if o.domain == ""] == [21]
    assert sum(t.data_type in FOUR_BIT for t in packed.graph.initializer) == 8  # codes + zeros
    onnx.checker.check_model(packed, full_check=True)
    feed = {"x": graphs.calibration(2, seed=2)}
    np.testing.assert_array_equal(graphs.run_ort(model, feed)[0], graphs.run_ort(packed, feed)[0])


def test_folded_weights_are_left_alone():
    result = graphs.quantize(graphs.conv_chain_model(), graphs.calibration(), weight_bits=4,
                             weight_format="folded")
    out, note = pack_4bit(result.model, "chain")
    assert out is result.model
    assert note.startswith("3 folded 4-bit weights (Cast -> Sub -> Mul) left in 8-bit containers")


@settings(max_examples=20, deadline=None)
@given(signed=st.booleans(), rows=st.integers(1, 7), cols=st.integers(1, 9),
       seed=st.integers(0, 2**31))
def test_round_trip_of_codes(signed, rows, cols, seed):
    """Odd element counts too (the last byte holds one code): the packed tensor reads back
    as the same codes and DequantizeLinear gives the same floats."""
    rng = np.random.default_rng(seed)
    dtype, lo, hi = (np.int8, -8, 7) if signed else (np.uint8, 0, 15)
    codes = rng.integers(lo, hi + 1, (rows, cols)).astype(dtype)
    zero = rng.integers(lo, hi + 1, cols).astype(dtype)
    model = onnx.parser.parse_model(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        rt (float[{cols}] x) => (float[{rows}, {cols}] y) {{
            w = DequantizeLinear<axis=1>(w_q, s, z)
            y = Add(w, x)
        }}""")
    model.graph.initializer.extend([numpy_helper.from_array(codes, "w_q"),
                                    numpy_helper.from_array(np.full(cols, 0.5, np.float32), "s"),
                                    numpy_helper.from_array(zero, "z")])
    packed, _ = pack_4bit(model, "rt")
    w_q = next(t for t in packed.graph.initializer if t.name == "w_q")
    assert w_q.data_type == (TensorProto.INT4 if signed else TensorProto.UINT4)
    assert len(w_q.raw_data) == (rows * cols + 1) // 2
    np.testing.assert_array_equal(numpy_helper.to_array(w_q).astype(np.int8), codes)
    _bit_identical(model, packed)


@pytest.mark.parametrize("bits", [2, 3])
def test_fewer_bits_pack_too(bits, in_8bit_containers):
    result = graphs.quantize(graphs.conv_chain_model(), graphs.calibration(), weight_bits=bits,
                             per_channel=True, weight_symmetric=True)
    packed, note = pack_4bit(result.model, "chain")
    assert note.startswith("4-bit weights stored as INT4: 3 tensors")


def _pool_model(opset: int, scale: float = 1.0) -> onnx.ModelProto:
    """x -> AveragePool -> activation Q/DQ (int8, ``scale``) -> Conv(DQ 4-bit W) -> y: the
    recognizer's pooling (kernel 3x2), whose onnxruntime kernels at opsets 11-18 and 19+
    round differently."""
    model = onnx.parser.parse_model(f"""
        <ir_version: 7, opset_import: ["" : {opset}]>
        pool (float[1, 64, 3, 80] x) => (float[1, 8, 1, 40] y) {{
            p = AveragePool<kernel_shape=[3, 2], strides=[3, 2]>(x)
            q = QuantizeLinear(p, s, z)
            d = DequantizeLinear(q, s, z)
            w = DequantizeLinear<axis=0>(wq, ws)
            y = Conv(d, w)
        }}""")
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([
        numpy_helper.from_array(np.float32(scale), "s"), numpy_helper.from_array(np.int8(0), "z"),
        numpy_helper.from_array(rng.integers(-8, 8, (8, 64, 1, 1)).astype(np.int8), "wq"),
        numpy_helper.from_array(np.full(8, 0.05, np.float32), "ws")])
    return model


def _pooled(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.output.append(onnx.ValueInfoProto(name="p"))
    return checked_convert.quiet_session(model, False).run(["p"], feed)[0]


def _code_boundary_model():
    """(opset-13 model, feed) whose conversion to 21 moves one activation code: the
    quantizer's step puts a rounding boundary between the two kernels' results for one
    pooled value, so the converted outputs differ by a whole step there."""
    model = _pool_model(13)
    feed = random_feed(model)
    a, b = _pooled(model, feed), _pooled(checked_convert.convert(model, 21)[0], feed)
    differ = np.flatnonzero(a != b)
    if not differ.size:
        pytest.skip("onnxruntime's AveragePool-13 and -21 kernels round alike here")
    gap = np.abs(a.astype(np.float64) - b) / np.abs(a)
    for j in sorted(differ, key=lambda j: -gap.flat[j])[:20]:  # widest relative gap first
        boundary = (float(a.flat[j]) + float(b.flat[j])) / 2  # between the two results
        model = _pool_model(13, abs(boundary) / 50.5)  # ... at code 50.5
        if checked_convert.differs(model, checked_convert.convert(model, 21)[0], "moved", feed, exact=False):
            return model, feed
    pytest.skip("no pooled value's rounding moves a code here")


def test_rounding_moved_activation_code_still_packs():
    """The recognizer at 3 bits stayed in 8-bit containers: 1-ulp kernel differences moved
    activation codes and the output check failed although every op computed the same."""
    model, feed = _code_boundary_model()
    packed, note = pack_4bit(model, "pool", feed)
    assert _types(packed)["wq"] == TensorProto.INT4
    assert note == ("4-bit weights stored as INT4: 1 tensor (opset 13 converted to 21; float "
                    "rounding moved activation codes (opset 13 -> 21): outputs agree with the "
                    "activation quantizers bypassed)")


def test_conversion_that_changes_an_op_still_refused(monkeypatch):
    """The bypass does not hide a real change: a converter that altered the pooling."""
    model, feed = _code_boundary_model()
    convert = checked_convert.convert

    def altered(m, version):
        out, why = convert(m, version)
        pool = next(n for n in out.graph.node if n.op_type == "AveragePool")
        pool.attribute[0].CopyFrom(onnx.helper.make_attribute("kernel_shape", [3, 1]))
        pool.attribute[1].CopyFrom(onnx.helper.make_attribute("strides", [3, 1]))
        pool.output[0] = "p_wide"
        out.graph.node.insert(list(out.graph.node).index(pool) + 1, onnx.helper.make_node(
            "MaxPool", ["p_wide"], ["p"], kernel_shape=[1, 2], strides=[1, 2]))
        return out, why

    monkeypatch.setattr(checked_convert, "convert", altered)
    out, note = pack_4bit(model, "pool", feed)
    assert out is model
    assert note == ("1 4-bit weights stay in 8-bit containers: opset 13 -> 21 changed the "
                    "outputs (also with activation quantizers bypassed)")


def test_bypass_activation_quantizers_is_the_float_twin():
    """Activation Q/DQ pairs and log2 ops pass their input through; weight DQs stay."""
    result = graphs.quantize(graphs.mixed_model(), graphs.calibration(), weight_bits=4,
                             per_channel=True, target="tensorrt")
    model = result.model
    bare = checked_convert.bypass_activation_quantizers(model)
    assert not any(n.domain == "onnxquant" or n.op_type == "QuantizeLinear" for n in bare.graph.node)
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] in {t.name for t in model.graph.initializer}]
    assert weight_dqs and all(n in bare.graph.node for n in weight_dqs)
    assert model.SerializeToString() != bare.SerializeToString()
    feed = {"x": graphs.calibration(2, seed=2)}
    twin = graphs.run_ort(bare, feed)[0]
    quantized = graphs.run_ort(model, feed)[0]
    pooled_model, pool_feed = _pool_model(13, 0.05), random_feed(_pool_model(13))
    assert not np.array_equal(twin, quantized)  # the activation quantizers did something
    w = numpy_helper.to_array(next(t for t in pooled_model.graph.initializer if t.name == "wq"))
    pooled = _pooled(pooled_model, pool_feed)
    want = np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float32) * 0.05, pooled)
    got = graphs.run_ort(checked_convert.bypass_activation_quantizers(pooled_model), pool_feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _with_block_wise_matmul(block_size: int) -> onnx.ModelProto:
    """_dq_model with a second MatMul whose int8 codes dequantize block-wise along K,
    after the per-channel ones in initializer order."""
    model = _dq_model()
    rng = np.random.default_rng(5)
    k = 64
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.integers(-8, 8, (k, 10)).astype(np.int8), "bw_wq"),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, (k // block_size, 10)).astype(np.float32),
                                "bw_s")])
    model.graph.node.extend([
        onnx.helper.make_node("DequantizeLinear", ["bw_wq", "bw_s"], ["bw_w"], axis=0,
                              block_size=block_size),
        onnx.helper.make_node("MatMul", ["m", "bw_w"], ["bw_y"])])
    model.graph.output.append(onnx.helper.make_tensor_value_info("bw_y", 1, [1, 10]))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("block_size", [1, 16])
def test_block_wise_only_packs_only_block_wise_codes(block_size):
    """TensorRT's INT4 is block-wise weight-only: per-channel 4-bit codes (its int8 convs,
    the MatMul with axis=1) stay INT8."""
    model = _with_block_wise_matmul(block_size)
    assert packable(model.graph, block_wise_only=True) == ["bw_wq"]
    assert set(packable(model.graph)) == {"conv_wq", "dw_wq", "mm_wq", "gemm_wq", "bw_wq"}
    packed, note = pack_4bit(model, "dq", block_wise_only=True)
    assert note == "4-bit weights stored as INT4: 1 tensor (opset 21)"
    types = _types(packed)
    assert types["bw_wq"] == TensorProto.INT4 and types["mm_wq"] == TensorProto.INT8
    _same_values(model, packed)


def test_codes_that_are_a_graph_output_are_not_packed():
    model = _dq_model()
    model.graph.output.append(onnx.helper.make_tensor_value_info("conv_wq", TensorProto.INT8,
                                                                 [8, 4, 3, 3]))
    assert "conv_wq" not in packable(model.graph)
    assert {"dw_wq", "mm_wq", "gemm_wq"} <= set(packable(model.graph))


def test_stale_8bit_types_of_packed_codes_are_dropped():
    """Codes listed as graph inputs (IR < 4 style) and in value_info with their 8-bit type:
    the packed model keeps no stale INT8/UINT8 declaration of them."""
    model = _dq_model()
    for name, dtype, shape in [("conv_wq", TensorProto.INT8, [8, 4, 3, 3]),
                               ("dw_wq", TensorProto.UINT8, [8, 1, 3, 3])]:
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, dtype, shape))
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, dtype, shape))
    packed, note = pack_4bit(model, "dq")
    assert note.startswith("4-bit weights stored as INT4/UINT4: 4 tensors")
    declared = [v.name for v in [*packed.graph.input, *packed.graph.value_info]]
    assert "conv_wq" not in declared and "dw_wq" not in declared
    assert [v.name for v in packed.graph.input] == ["x"]
    onnx.checker.check_model(packed, full_check=True)


def test_a_copied_zero_point_gets_a_free_name():
    """dw_z is shared with an 8-bit weight and ``dw_z_4bit`` is taken: the copy is
    ``dw_z_4bit_1``."""
    model = _dq_model()
    big = np.arange(16, dtype=np.uint8).reshape(8, 2) * 16
    model.graph.initializer.extend([numpy_helper.from_array(big, "big"),
                                    numpy_helper.from_array(np.float32(1.0), "dw_z_4bit")])
    model.graph.node.append(onnx.helper.make_node("DequantizeLinear", ["big", "dw_s", "dw_z"],
                                                  ["big_f"], axis=0))
    model.graph.node.append(onnx.helper.make_node("Mul", ["big_f", "dw_z_4bit"], ["big_g"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("big_g", 1, [8, 2]))
    packed, _ = pack_4bit(model, "dq")
    types = _types(packed)
    assert types["dw_z_4bit"] == TensorProto.FLOAT and types["dw_z_4bit_1"] == TensorProto.UINT4
    assert next(n for n in packed.graph.node if n.name == "dw_dq").input[2] == "dw_z_4bit_1"
    _same_values(model, packed)


def _if_reading(name: str, depth: int) -> onnx.NodeProto:
    """An If whose branch (``depth`` Ifs deep) outputs Identity(``name``), an outer value."""
    def branch(level: int, tag: str) -> onnx.GraphProto:
        out = f"{tag}_out{level}"
        if level == depth:
            node = onnx.helper.make_node("Identity", [name], [out])
        else:
            node = _nested(level + 1, out)
        return onnx.helper.make_graph([node], f"{tag}{level}", [],
                                      [onnx.helper.make_tensor_value_info(out, 3, None)])

    def _nested(level: int, out: str) -> onnx.NodeProto:
        return onnx.helper.make_node("If", ["cond"], [out], then_branch=branch(level, "t"),
                                     else_branch=branch(level, "e"))
    return _nested(1, "if_out")


@pytest.mark.parametrize("depth", [1, 2])
def test_codes_read_inside_a_subgraph_are_not_packed(depth):
    """A branch (or a branch's branch) reads the codes by name: they are not only a
    DequantizeLinear's input, so they stay 8-bit."""
    model = _dq_model()
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(_if_reading("mm_wq", depth))
    model.graph.output.append(onnx.helper.make_tensor_value_info("if_out", 3, None))
    assert "mm_wq" not in packable(model.graph)
    assert {"conv_wq", "dw_wq", "gemm_wq"} <= set(packable(model.graph))


def test_a_model_at_opset_21_with_an_old_ir_version_gets_ir_10():
    """INT4 needs IR 10: the packed copy's IR version is raised, the model's is not."""
    model = _dq_model()
    model.ir_version = 9
    packed, note = pack_4bit(model, "dq")
    assert note.startswith("4-bit weights stored as INT4/UINT4")
    assert packed.ir_version >= 10 and model.ir_version == 9
    _same_values(model, packed)


def test_a_cast_of_a_float_initializer_is_not_a_folded_weight():
    model = _dq_model()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "ones"))
    model.graph.node.append(onnx.helper.make_node("Cast", ["ones"], ["ones_h"], to=10))
    model.graph.output.append(onnx.helper.make_tensor_value_info("ones_h", 10, [3]))
    packed, note = pack_4bit(model, "dq")
    assert note == "4-bit weights stored as INT4/UINT4: 4 tensors (opset 21)"


def test_packing_that_changes_the_weights_is_refused_and_logged(monkeypatch, caplog):
    """A packing bug (one code moved) is caught by the exact check, and the refusal is
    the note and the log line."""
    from onnxquant import storage4

    pack = storage4._pack

    def off_by_one(graph, codes):
        pack(graph, codes)
        t = next(t for t in graph.initializer if t.name == "conv_wq")
        a = numpy_helper.to_array(t).astype(np.int8)
        a.flat[0] = 7 if a.flat[0] != 7 else 6
        t.CopyFrom(numpy_helper.from_array(a.astype(ml_dtypes.int4), "conv_wq"))

    monkeypatch.setattr(storage4, "_pack", off_by_one)
    model = _dq_model()
    with caplog.at_level("INFO", logger="onnxquant"):
        out, note = pack_4bit(model, "dq")
    assert out is model
    assert note == "4 4-bit weights stay in 8-bit containers: INT4 weights dequantize differently"
    assert f"dq: {note}" in caplog.messages


def test_the_packed_model_is_also_checked_as_onnxruntime_optimizes_it(monkeypatch, caplog):
    """onnxruntime rewrites DequantizeLinear -> MatMul (MatMulNBits) only with its graph
    optimizations on, as users run it: the check runs that way, and its refusal is the note."""
    from onnxquant import storage4

    seen = []
    check = storage4.differs_beyond_rounding

    def spy(a, b, step, what, feed, rounding, optimized=False):
        seen.append((what, optimized))
        return what if optimized else check(a, b, step, what, feed, rounding, optimized)

    monkeypatch.setattr(storage4, "differs_beyond_rounding", spy)
    model = _dq_model()
    with caplog.at_level("INFO", logger="onnxquant"):
        out, note = pack_4bit(model, "dq")
    assert seen == [("optimized INT4 model gives other outputs", True)]
    assert out is model
    assert note == ("4 4-bit weights stay in 8-bit containers: optimized INT4 model gives "
                    "other outputs")
    assert f"dq: {note}" in caplog.messages


def test_the_packing_note_is_logged(caplog):
    with caplog.at_level("INFO", logger="onnxquant"):
        _, note = pack_4bit(_dq_model(), "dq")
    assert f"dq: {note}" in caplog.messages
