"""The log2 op as a model-local function: accepted by onnx.checker, run by stock onnxruntime,
codes equal to the NumPy reference exactly."""

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxquant import functions as F
from onnxquant import quantizers as Q


BODIES = [(17, "table"), (26, "table"), (26, "bitcast"),
          (26, "bitcast_nonnegative")]  # (model opset, body)


def _inputs_for(body, x):
    """The nonnegative body is exact on inputs >= 0 (and -0): the outputs of a Softmax."""
    return x[~(x < 0)] if body == "bitcast_nonnegative" else x


def _model(p: Q.Log2Params, opset: int = 17, body: str = "table") -> onnx.ModelProto:
    node = helper.make_node(F.OP_TYPE, ["x"], ["y"], domain=F.DOMAIN, name="log2",
                            **F.log2_node_attrs(p))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [None])],
                              [helper.make_tensor_value_info("y", 1, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    F.install(model, body)
    return model


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _softmax_like(rng, n):
    logits = rng.normal(0, 4, (n // 64, 64))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32).ravel()


@pytest.mark.parametrize("opset,body", BODIES)
@pytest.mark.parametrize("bits,eps,step", [(8, 2.0**-16, None), (8, 1e-8, None),
                                           (6, 2.0**-12, None), (4, 2.0**-8, None),
                                           (8, 2.0**-120, None), (3, 2.0**-16, 0.5),
                                           (2, 2.0**-16, 1.0)])
def test_function_equals_reference_exactly(rng, bits, eps, step, opset, body):
    x = np.concatenate([rng.random(200_000, np.float32), _softmax_like(rng, 200_000),
                        np.array([0.0, -0.0, -1.0, 1.0, eps, np.float32(eps) / 2, 1e-38],
                                 np.float32)])
    p = Q.log2_params(float(x.min()), float(x.max()), bits, eps, step)
    thresholds = Q.log2_tables(p)[0][:-1]  # every rounding boundary and its float neighbours
    x = np.concatenate([x, thresholds, np.nextafter(thresholds, np.float32(0)),
                        np.nextafter(thresholds, np.float32(1)),
                        np.array([np.inf, 3e38, 7.0], np.float32)])
    x = _inputs_for(body, x)
    model = _model(p, opset, body)
    onnx.checker.check_model(model, full_check=True)
    y = _run(model, x)
    np.testing.assert_array_equal(y, Q.log2_fake_quant(x, p))
    assert y[-3] == y[-2] == y[-1] == Q.log2_tables(p)[1][-1]  # above the range: top level
    # the codes, recovered exactly from the dequantized values: 2^(s(q - z)) is injective
    assert len(np.unique(y)) == len(np.unique(Q.log2_quantize(x, p)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.integers(2, 8), eps_exp=st.floats(-120, -1), lo_exp=st.floats(-40, 0),
       span=st.floats(0, 40), step=st.sampled_from([None, None, 0.5, 1.0, 0.1]),
       seed=st.integers(0, 2**16))
def test_both_bodies_equal_the_reference_for_any_grid(bits, eps_exp, lo_exp, span, step, seed):
    """Property: for any calibrated grid (bits, eps, range, fixed step), both bodies give the
    reference's values on random inputs, every boundary and its float neighbours."""
    p = Q.log2_params(2.0**lo_exp, 2.0 ** min(lo_exp + span, 0), bits, 2.0**eps_exp, step)
    t = Q.log2_tables(p)[0][:-1]
    rng = np.random.default_rng(seed)
    x = np.concatenate([2.0 ** rng.uniform(eps_exp - 2, 1, 2000), t, np.nextafter(t, 0),
                        np.nextafter(t, 2), [0.0, -1.0, np.inf]]).astype(np.float32)
    for opset, body in ((17, "table"), (26, "bitcast"), (26, "bitcast_nonnegative")):
        xb = _inputs_for(body, x)
        np.testing.assert_array_equal(_run(_model(p, opset, body), xb), Q.log2_fake_quant(xb, p),
                                      err_msg=body)


def test_nonnegative_body_edges():
    """-0 and the smallest floats get eps's code, +inf and NaN the top code (the
    reference's: NaN sorts above every boundary), as every other non-negative pattern."""
    p = Q.log2_params(2.0**-16, 1.0, 8)
    x = np.array([-0.0, 0.0, 1e-45, 2.0**-126, np.inf, np.nan, 3e38], np.float32)
    y = _run(_model(p, 26, "bitcast_nonnegative"), x)
    np.testing.assert_array_equal(y, Q.log2_fake_quant(x, p))
    levels = Q.log2_tables(p)[1]
    assert y[0] == y[3] == levels[Q.log2_quantize(np.float32(p.eps), p)]
    assert y[4] == y[5] == y[6] == levels[-1]


def test_boundaries_start_lookup_buckets():
    """Every rounding boundary has SNAP_BITS mantissa bits, so it is the first float32 of a
    bitcast-body bucket, and sits within 2^-(SNAP_BITS+1) (relative) of the paper's
    log-domain midpoint 2^(s (k + 1/2 - z))."""
    for p in (Q.log2_params(2.0**-16, 1.0, 8), Q.log2_params(1e-3, 0.3, 4, 2.0**-30),
              Q.log2_params(0.25, 0.25, 8)):
        t = Q.log2_tables(p)[0][:-1]
        assert np.all(t.view(np.int32) % 2 ** (23 - Q.SNAP_BITS) == 0)
        assert np.all(np.diff(t) > 0)
        k = np.arange(len(t))
        mid = 2.0 ** (p.scale * (k + 0.5 - p.zero_point))
        assert np.abs(t / mid - 1).max() <= 2.0 ** -(Q.SNAP_BITS + 1) * (1 + 1e-6)


def test_bitcast_body_needs_opset_26():
    with pytest.raises(ValueError, match="bitcast body needs opset >= 26"):
        F.log2_function(25, "bitcast")
    with pytest.raises(ValueError, match="body must be one of"):
        F.log2_function(26, "fast")


@pytest.mark.parametrize("opset,body", BODIES)
def test_inlined_function_runs_the_same(rng, opset, body):
    x = _softmax_like(rng, 64 * 100)
    p = Q.log2_params(float(x.min()), float(x.max()), 8)
    model = _model(p, opset, body)
    inlined = onnx.inliner.inline_local_functions(model)
    assert not inlined.functions
    assert F.OP_TYPE not in {n.op_type for n in inlined.graph.node}
    np.testing.assert_array_equal(_run(inlined, x), _run(model, x))


def test_install_is_idempotent():
    model = _model(Q.log2_params(1e-4, 1.0))
    F.install(model)
    assert len(model.functions) == 1
    assert sum(o.domain == F.DOMAIN for o in model.opset_import) == 1
    model.opset_import[0].version = 26
    F.install(model, "bitcast")  # a body swap replaces the declaration
    assert len(model.functions) == 1
    assert "BitCast" in {n.op_type for n in model.functions[0].node}


def test_node_attributes_round_trip():
    p = Q.log2_params(1e-5, 0.9, 7, 2.0**-14)
    attrs = F.log2_node_attrs(p)
    assert set(attrs) == set(F.ATTRIBUTES)
    assert F.params_from_attrs(attrs) == p
