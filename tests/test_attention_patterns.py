"""find_attention on every topology of DESIGN.md §2, and what emit makes of each match.

Each case asserts the match (count, pattern, nodes), the structure after ``onnxquant.run``
(one log2 node right after the Softmax, DequantizeLinear on every conv weight), and the
numerics in onnxruntime: (a) equal to the float graph with the NumPy fake quantizers
substituted, (b) close to the float graph within a first-order error budget.
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import graphs as g
from onnxquant import QuantConfig, quantizers
from onnxquant.passes import find_attention
from onnxquant.plan import PassContext

SDPA_NODES = {
    "plain": ("attn_qk", "attn_softmax", "attn_av"),  # MobileViT v1, FastViT-SA, MNv4
    "mul": ("attn_qk", "attn_scale", "attn_softmax", "attn_av"),  # EdgeNeXt
    "div": ("attn_qk", "attn_scale", "attn_softmax", "attn_av"),
    "add_bias": ("attn_qk", "attn_bias", "attn_softmax", "attn_av"),  # TinyViT
    "levit": ("attn_qk", "attn_scale", "attn_bias", "attn_softmax", "attn_av"),
}
TALKING_HEADS_NODES = ("attn_qk", "attn_scale", "attn_bias", "attn_th_pre", "attn_softmax",
                       "attn_th_post", "attn_av")
SEPARABLE_NODES = ("attn_qkv", "attn_split_qkv", "attn_softmax", "attn_weigh", "attn_reduce")

# name -> (builder, pattern, Softmax output, its consumer's output, number of convs)
CASES = {f"sdpa_{v}": (lambda v=v: g.sdpa_model(v), "sdpa", "attn_p", "attn_o", 2)
         for v in SDPA_NODES}
CASES.update({
    "talking_heads": (g.talking_heads_model, "talking_heads", "attn_p", "attn_th_post_out", 5),
    "separable": (g.separable_model, "separable", "attn_scores", "attn_ctx", 4),
    "sdpa_and_head": (lambda: g.sdpa_model("levit", head=True), "sdpa", "attn_p", "attn_o", 2),
})
X = g.calibration(4, seed=2)  # test inputs, not the calibration batch


def _find(model):
    ctx = PassContext(QuantConfig())
    count = find_attention.run(gs.import_onnx(model), ctx)
    return count, ctx.plan


@pytest.mark.parametrize("variant", SDPA_NODES)
def test_sdpa_variants_match_once(variant):
    count, plan = _find(g.sdpa_model(variant))
    assert count == len(plan.attention) == 1 and not plan.unmatched_softmax
    site = plan.attention[0]
    assert (site.pattern, site.softmax, site.output) == ("sdpa", "attn_softmax", "attn_p")
    assert site.nodes == SDPA_NODES[variant]


def test_talking_heads_and_separable_match():
    count, plan = _find(g.talking_heads_model())
    assert count == 1 and plan.attention[0].pattern == "talking_heads"
    assert plan.attention[0].nodes == TALKING_HEADS_NODES
    count, plan = _find(g.separable_model())
    assert count == 1 and plan.attention[0].pattern == "separable"
    assert plan.attention[0].nodes == SEPARABLE_NODES
    assert plan.attention[0].output == "attn_scores"


@pytest.mark.parametrize("case", CASES)
def test_quantized_structure_and_numerics(case):
    build, pattern, probs, consumer, n_convs = CASES[case]
    model, calib = build(), g.calibration()
    res = g.quantize(model, calib, per_channel=False)  # the paper's exact recipe
    q = res.model
    assert [a.pattern for a in res.plan.attention] == [pattern]
    assert res.counts == {"convs": n_convs, "linears": 0, "softmax": 1}
    onnx.checker.check_model(q, full_check=True)

    node = g.assert_log2_after(model, q, "attn_softmax")
    assert len(g.log2_nodes(q)) == 1
    params = g.log2_params_from(model, calib, [probs])
    assert g.attr(node, "zero_point") == params[probs].zero_point
    assert g.attr(node, "scale") == pytest.approx(params[probs].scale, rel=1e-7)
    assert (g.attr(node, "bits"), g.attr(node, "eps")) == (8, params[probs].eps)
    convs = [n.name for n in q.graph.node if n.op_type == "Conv"]
    assert len(convs) == n_convs
    for conv in convs:
        dq, codes, scale, zero = g.weight_dq(q, conv)
        assert codes.dtype == np.uint8 and zero.dtype == np.uint8 and scale.shape == ()

    outputs = [o.name for o in model.graph.output] + [consumer]
    got = g.run_ort(q, {"x": X}, outputs)
    ref = g.reference(model, {"x": X}, convs, params, outputs)
    flt = g.run_ort(model, {"x": X}, outputs)
    budget = g.error_budget([params[probs].scale], n_convs)
    for name, a, b, f in zip(outputs, got, ref, flt):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
        err = np.abs(a - f).max() / np.abs(f).max()
        assert 0 < err <= budget, (name, err, budget)


def test_sdpa_and_head_keeps_the_head_in_float():
    model = g.sdpa_model("levit", head=True)
    count, plan = _find(model)
    assert count == 1 and plan.unmatched_softmax[0][0] == "head_softmax"
    q = g.quantize(model, g.calibration()).model
    head = g.nodes_by_name(q)["head_softmax"]
    assert head.op_type == "Softmax" and list(head.output) == ["probs"]
    assert g.consumers(q, "probs") == [] and [o.name for o in q.graph.output] == ["probs"]
    assert [n.input[0] for n in g.log2_nodes(q)] == ["attn_p"]


def _linear_head_model():
    """A classifier exported as MatMul + Add (no Gemm): MatMul -> Add -> Softmax -> output."""
    b = g.Builder(3)
    b.relu("act", b.conv("stem", "x", 4, 8, k=3))
    w, bias = b.randn("fc_w", (8, 10)), b.randn("fc_b", (10,))
    b.node("[pool] pooled = GlobalAveragePool(act_out)")
    b.node("[flatten] flat = Flatten(pooled)")
    b.node(f"[fc] scores = MatMul(flat, {w})")
    b.node(f"[fc_bias] logits = Add(scores, {bias})")
    b.node("[head_softmax] probs = Softmax<axis=-1>(logits)")
    return b.build({"probs": "float[N,10]"})


@pytest.mark.parametrize("build", [g.head_model, _linear_head_model], ids=["gemm", "matmul_add"])
def test_classifier_softmax_is_not_attention(build):
    model = build()
    count, plan = _find(model)
    assert count == 0 and not plan.attention
    assert [name for name, _ in plan.unmatched_softmax] == ["head_softmax"]
    res = g.quantize(model, per_channel=False)  # nothing needs calibration: weight-only convs
    assert any("classifier head" in note for note in res.plan.notes)
    assert res.counts == {"convs": 1, "linears": 0, "softmax": 0} and not g.log2_nodes(res.model)
    assert g.producer_of(res.model, "probs").name == "head_softmax"
    got, = g.run_ort(res.model, {"x": X})
    ref, = g.reference(model, {"x": X}, ["stem"], {}, ["probs"])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_log2_node_gives_the_numpy_codes():
    """The ONNX function reproduces quantizers.log2_fake_quant on the Softmax output itself."""
    model, calib = g.sdpa_model("mul"), g.calibration()
    q = g.quantize(model, calib, parts={"softmax"}).model
    node, = g.log2_nodes(q)
    probs, after = g.run_ort(q, {"x": X}, ["attn_p", node.output[0]])
    p = g.log2_params_from(model, calib, ["attn_p"])["attn_p"]
    codes = np.round(np.log2(after.astype(np.float64)) / p.scale) + p.zero_point
    np.testing.assert_array_equal(codes, quantizers.log2_quantize(probs, p))
    np.testing.assert_allclose(after, quantizers.log2_fake_quant(probs, p), rtol=1e-6)
    assert 0 <= codes.min() and codes.max() <= 255 and len(np.unique(codes)) > 16
