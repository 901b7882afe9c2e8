"""find_blocks: conv roles on graphs where the answer is obvious, weights found through
Identity/Constant, dynamic weights skipped; and the weight schemes emit writes for them."""

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import graphs as g
from onnxquant import QuantConfig, quantizers
from onnxquant.passes import find_attention, find_blocks
from onnxquant.plan import PassContext

X = g.calibration(4, seed=2)  # test inputs, not the calibration batch


def _blocks(model):
    """(find_blocks' count, {conv: role}, plan) after find_attention, as in the pipeline."""
    ctx = PassContext(QuantConfig())
    graph = gs.import_onnx(model)
    find_attention.run(graph, ctx)
    count = find_blocks.run(graph, ctx)
    return count, {c.node: c.role for c in ctx.plan.convs}, ctx.plan


def _assert_weight_only_numerics(model, res, feeds, convs):
    got = g.run_ort(res.model, feeds)
    ref = g.reference(model, feeds, convs, {}, [o.name for o in model.graph.output])
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_pure_conv_chain_is_all_conv_block():
    model = g.conv_chain_model()
    count, roles, plan = _blocks(model)
    assert count == 3 and roles == dict.fromkeys(["conv1", "conv2", "conv3"], "conv_block")
    res = g.quantize(model, per_channel=False)  # no Softmax: weight-only, no calibration needed
    assert any("has no Softmax" in note for note in res.plan.notes)
    assert res.counts == {"convs": 3, "linears": 0, "softmax": 0}
    onnx.checker.check_model(res.model, full_check=True)
    _assert_weight_only_numerics(model, res, {"x": X}, list(roles))


ROLES = {
    "sdpa": (g.sdpa_model, {"conv_in": "bridge", "conv_out": "bridge"}),
    "mixed": (g.mixed_model, {"stem": "conv_block", "conv_in": "bridge",
                              "conv_out": "bridge", "tail": "conv_block"}),
    "talking_heads": (g.talking_heads_model, {
        "conv_in": "conv_block", "attn_qkv": "bridge", "attn_th_pre": "transformer",
        "attn_th_post": "transformer", "conv_out": "bridge"}),
    "separable": (g.separable_model, {"conv_in": "conv_block", "attn_qkv": "bridge",
                                      "attn_proj": "bridge", "conv_out": "conv_block"}),
}


@pytest.mark.parametrize("case", ROLES)
def test_roles_around_attention(case):
    build, expected = ROLES[case]
    count, roles, _ = _blocks(build())
    assert count == len(expected) and roles == expected


def _sandwich(n_between: int):
    """conv_in -> attention a1 -> n x (Conv, Relu) -> attention a2 -> conv_out."""
    b = g.Builder(5)
    h = b.sdpa("a1", b.conv("conv_in", "x", 4, 8, k=3))
    for i in range(n_between):
        h = b.relu(f"act{i}", b.conv(f"mid{i}", h, 8, 8, k=1 + 2 * (i % 2)))
    h = b.sdpa("a2", h)
    return b.build({b.conv("conv_out", h, 8, 4): "float[N,4,4,4]"})


@pytest.mark.parametrize("n, middle", [
    (1, ["transformer"]),
    (2, ["transformer"] * 2),
    (3, ["transformer"] * 3),  # SANDWICH_CONVS = 3: MobileViT v2 qkv/out-proj/MLP convs
    (4, ["bridge", "conv_block", "conv_block", "bridge"]),  # a conv stage between two stacks
])
def test_convs_between_two_attentions_join_within_the_sandwich_limit(n, middle):
    assert find_blocks.SANDWICH_CONVS == 3
    count, roles, plan = _blocks(_sandwich(n))
    assert len(plan.attention) == 2 and count == n + 2
    assert (roles.pop("conv_in"), roles.pop("conv_out")) == ("bridge", "bridge")
    assert [roles[f"mid{i}"] for i in range(n)] == middle


def _indirect_weights_model():
    """conv2 and conv3 share one initializer, conv3 through Identity (torch de-duplication);
    conv4's weight is a Constant node."""
    b = g.Builder(4)
    h = b.relu("act1", b.conv("conv1", "x", 4, 8, k=3))
    shared = b.randn("shared_w", (8, 8, 3, 3), 72**-0.5)
    h = b.relu("act2", b.conv("conv2", h, 8, 8, k=3, weight=shared))
    b.node("[dedup] conv3_w = Identity(shared_w)")
    h = b.relu("act3", b.conv("conv3", h, 8, 8, k=3, weight="conv3_w"))
    w4 = b.constant("conv4_w", (4, 8, 1, 1), 8**-0.5)
    return b.build({b.conv("conv4", h, 8, 4, weight=w4): "float[N,4,4,4]"})


def test_weight_through_identity_and_constant_is_quantized():
    model = _indirect_weights_model()
    count, roles, plan = _blocks(model)
    assert count == 4 and set(roles) == {"conv1", "conv2", "conv3", "conv4"}
    assert {c.node: c.kernel for c in plan.convs}["conv4"] == (1, 1)
    res = g.quantize(model, per_channel=False)
    q = res.model
    assert res.counts["convs"] == 4
    assert not [n.op_type for n in q.graph.node if n.op_type in ("Identity", "Constant")]
    codes = {c: g.weight_dq(q, c)[1] for c in roles}
    assert all(v.dtype == np.uint8 for v in codes.values())
    np.testing.assert_array_equal(codes["conv2"], codes["conv3"])
    onnx.checker.check_model(q, full_check=True)
    _assert_weight_only_numerics(model, res, {"x": X}, list(roles))


def test_weight_shared_through_identity_is_stored_once():
    _, _, plan = _blocks(_indirect_weights_model())
    assert {c.node: c.weight for c in plan.convs}["conv3"] == "shared_w"
    q = g.quantize(_indirect_weights_model()).model
    assert len([n for n in q.graph.node if n.op_type == "DequantizeLinear"]) == 3


def test_dynamic_weight_is_skipped_with_a_note():
    b = g.Builder(6)
    b.extra_inputs.append("float[8,8,3,3] w_dyn")
    h = b.relu("act1", b.conv("conv1", "x", 4, 8, k=3))
    h = b.relu("act2", b.conv("conv_dyn", h, 8, 8, k=3, weight="w_dyn"))
    model = b.build({b.conv("conv3", h, 8, 4): "float[N,4,4,4]"})
    count, roles, plan = _blocks(model)
    assert count == 2 and set(roles) == {"conv1", "conv3"}
    assert any("conv_dyn" in note and "not constant" in note for note in plan.notes)
    res = g.quantize(model, per_channel=False)
    assert g.nodes_by_name(res.model)["conv_dyn"].input[1] == "w_dyn"
    feeds = {"x": X, "w_dyn": np.random.default_rng(7).standard_normal((8, 8, 3, 3),
                                                                       np.float32) / 8}
    _assert_weight_only_numerics(model, res, feeds, ["conv1", "conv3"])


WEIGHT_SCHEMES = [  # config -> (codes dtype, per channel, bits, symmetric)
    ({"per_channel": False}, np.uint8, False, 8, False),  # the paper's exact recipe
    ({"per_channel": False, "weight_symmetric": True}, np.int8, False, 8, True),
    ({}, np.uint8, True, 8, False),  # the default
    ({"weight_symmetric": True}, np.int8, True, 8, True),
    # stored as UINT4 (storage4.py); the reference has the float biases
    ({"weight_bits": 4, "per_channel": False, "bias_correction": False}, ml_dtypes.uint4, False,
     4, False),
]


@pytest.mark.parametrize("config, dtype, per_channel, bits, symmetric", WEIGHT_SCHEMES)
def test_weight_schemes(config, dtype, per_channel, bits, symmetric):
    model, calib = g.mixed_model(), g.calibration()
    q = g.quantize(model, calib, **config).model
    onnx.checker.check_model(q, full_check=True)
    qmin, qmax, _ = quantizers.uniform_range(bits, symmetric)
    for conv in ("stem", "conv_in", "conv_out", "tail"):
        dq, codes, scale, zero = g.weight_dq(q, conv)
        assert codes.dtype == dtype and zero.dtype == dtype
        lo, hi = int(codes.min()), int(codes.max())
        assert qmin <= lo and hi <= qmax and qmax in (hi, -lo)  # min-max: an end code is used
        cout = codes.shape[0]
        assert scale.shape == ((cout,) if per_channel else ())
        assert g.attr(dq, "axis") == (0 if per_channel else None)
        if symmetric:
            assert not zero.any()
    axis = 0 if per_channel else None

    def weight_fq(w):
        return quantizers.uniform_fake_quant(w, bits, symmetric, axis)

    params = g.log2_params_from(model, calib, ["attn_p"])
    got, = g.run_ort(q, {"x": X})
    ref, = g.reference(model, {"x": X}, ["stem", "conv_in", "conv_out", "tail"], params,
                       ["tail_out"], weight_fq)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
