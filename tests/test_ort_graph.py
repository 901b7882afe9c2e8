"""The ort target's float-graph rewrites: slow Transposes split into single-axis moves (bit
for bit), timm-style attention fused into onnxruntime's MultiHeadAttention (to float
rounding), and both left alone where the pattern or the check does not hold."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st
from onnx import helper, numpy_helper

from passes.fuse_attention_ort import fuse_attention
from passes.split_transposes import single_axis_move, single_axis_steps, split_transposes

F = onnx.TensorProto.FLOAT


def _model(nodes, x_shape, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, x_shape)],
                              [helper.make_tensor_value_info("y", F, None)], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@settings(max_examples=200, deadline=None)
@given(st.permutations(range(6)))
def test_single_axis_steps_compose_to_the_permutation(perm):
    current = list(range(len(perm)))
    for step in single_axis_steps(perm):
        assert single_axis_move(step)
        current = [current[a] for a in step]
    assert current == list(perm)
    assert len(single_axis_steps(perm)) <= len(perm) - 1


@pytest.mark.parametrize("perm,expected", [([0, 2, 1, 3], True), ([0, 2, 3, 1], True),
                                           ([0, 3, 2, 1], False), ([2, 0, 3, 1, 4], False),
                                           ([1, 0], True), ([0, 1, 2], True)])
def test_single_axis_move(perm, expected):
    assert single_axis_move(perm) == expected


def _transpose_model(perm, shape):
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [helper.make_node("Mul", ["x", "two"], ["m"]),
             helper.make_node("Transpose", ["m"], ["y"], perm=perm)]
    return _model(nodes, ["N"] + shape[1:], [two])


def test_generic_transpose_is_split_and_bit_identical(rng):
    model = _transpose_model([0, 3, 2, 1], [1, 4, 64, 64])
    split, count, note = split_transposes(model)
    assert (count, note) == (1, "")
    ops = [n.op_type for n in split.graph.node]
    assert ops.count("Transpose") == 2 and "Flatten" in ops
    assert all(single_axis_move(list(n.attribute[0].ints))
               for n in split.graph.node if n.op_type == "Transpose")
    for batch in (1, 3):
        x = rng.standard_normal((batch, 4, 64, 64)).astype(np.float32)
        np.testing.assert_array_equal(_run(split, x), _run(model, x))


@pytest.mark.parametrize("perm,shape", [([0, 2, 1, 3], [1, 4, 64, 64]),  # a single move
                                        ([0, 3, 2, 1], [1, 4, 8, 8])])  # too small
def test_fast_or_small_transposes_are_left_alone(perm, shape):
    model = _transpose_model(perm, shape)
    split, count, _ = split_transposes(model)
    assert count == 0 and split is model


def _attention_model(tokens=16, heads=2, dim=8, perm=(2, 0, 3, 1, 4), scale=0.35, seed=0,
                     divide_scores=False):
    """timm's Attention as exported: packed qkv [B, N, 3C] -> heads -> softmax(q k^T c) v."""
    c = heads * dim
    w = np.random.default_rng(seed).standard_normal((c, 3 * c)).astype(np.float32) / 4
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array([-1, tokens, 3, heads, dim]), "heads_shape"),
             numpy_helper.from_array(np.array([1, 1, 1]), "ones"),
             numpy_helper.from_array(np.array([0]), "axis0"),
             numpy_helper.from_array(np.array(scale, np.float32), "scale"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(1 / scale, np.float32), "inv_scale"),
             numpy_helper.from_array(np.array([-1, tokens, c]), "merged")]
    mk = helper.make_node
    nodes = [mk("MatMul", ["x", "w"], ["qkv"]),
             mk("Reshape", ["qkv", "heads_shape"], ["h5"]),
             mk("Transpose", ["h5"], ["t5"], perm=list(perm)),
             mk("Split", ["t5", "ones"], ["s0", "s1", "s2"], axis=0),
             mk("Squeeze", ["s0", "axis0"], ["q"]), mk("Squeeze", ["s1", "axis0"], ["k"]),
             mk("Squeeze", ["s2", "axis0"], ["v"]),
             mk("Mul", ["q", "one"] if divide_scores else ["q", "scale"], ["qs"]),
             mk("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             mk("MatMul", ["qs", "kt"], ["raw" if divide_scores else "scores"]),
             mk("Softmax", ["scores"], ["p"], axis=-1),
             mk("MatMul", ["p", "v"], ["o"]),
             mk("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
             mk("Reshape", ["ot", "merged"], ["y"])]
    if divide_scores:
        nodes.insert(10, mk("Div", ["raw", "inv_scale"], ["scores"]))
    return _model(nodes, ["N", tokens, c], inits), w


def _numpy_attention(x, w, heads, scale):
    b, n, c = x.shape
    qkv = (x @ w).reshape(b, n, 3, heads, c // heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    s = q @ k.transpose(0, 1, 3, 2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, n, c)


@pytest.mark.parametrize("divide_scores", [False, True])
def test_timm_attention_is_fused_and_matches_numpy(rng, divide_scores):
    model, w = _attention_model(divide_scores=divide_scores)
    fused, count, note = fuse_attention(model)
    assert (count, note) == (1, "")
    ops = {n.op_type for n in fused.graph.node}
    assert "MultiHeadAttention" in ops and not ops & {"Softmax", "Transpose", "Squeeze"}
    mha = next(n for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
    assert attrs["num_heads"] == 2 and attrs["scale"] == pytest.approx(0.35)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 16, 16)).astype(np.float32)
        want = _numpy_attention(x.astype(np.float64), w, 2, 0.35)
        np.testing.assert_allclose(_run(fused, x), want, atol=2e-5)
        np.testing.assert_allclose(_run(model, x), want, atol=2e-5)


def test_other_head_layouts_are_not_fused():
    """k already transposed in the head split: another pattern, left as it is."""
    model, _ = _attention_model(perm=(2, 0, 3, 4, 1))
    next(n for n in model.graph.node if n.output[0] == "kt").attribute[0].ints[:] = [0, 1, 2, 3]
    fused, count, _ = fuse_attention(model)
    assert count == 0 and fused is model


def test_q_and_k_from_different_splits_are_not_fused():
    model, _ = _attention_model()
    nodes = model.graph.node
    squeeze_k = next(n for n in nodes if n.op_type == "Squeeze" and n.output[0] == "k")
    squeeze_k.input[0] = "s2"  # k := v: still runs, no longer q/k/v of one split in order
    fused, count, _ = fuse_attention(model)
    assert count == 0 and fused is model
