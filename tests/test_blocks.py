"""The block map (onnxquant/blocks.py): a partition of the canonical graph into conv blocks,
bridges and transformer blocks with exact boundaries; extracted blocks run in onnxruntime
and, chained, reproduce the model bit for bit; quantized blocks come out with their Q/DQ."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

import graphs as g
import onnxquant
from conftest import BUNDLED
from onnxquant import QuantConfig
from onnxquant.blocks import Block, block_inputs, extract, value_types

MOBILEVIT = BUNDLED / "mobilevit_xxs.imagenette.onnx"
X = g.calibration(2, seed=2)
TINY = {"mixed": g.mixed_model, "sdpa_head": lambda: g.sdpa_model("levit", head=True),
        "talking_heads": g.talking_heads_model, "separable": g.separable_model,
        "conv_chain": g.conv_chain_model, "cnn_head": g.head_model}


def _exact():
    """No graph optimizations: a block runs the same kernels as inside the whole model."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return opts


def _run(model, feed, outputs=None):
    """Run ``model``; ``outputs`` may name intermediate tensors."""
    missing = [t for t in outputs or () if t not in {o.name for o in model.graph.output}]
    if missing:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
        model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in missing)
    session = ort.InferenceSession(model.SerializeToString(), _exact(),
                                   providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(outputs, {k: v for k, v in feed.items() if k in names})


def _analyzed(model):
    """(canonical float model, plan) as the pipeline sees them."""
    graph, plan = onnxquant.analyze(model)
    return gs.export_onnx(graph.copy(), do_type_check=False), plan


@pytest.fixture(scope="module")
def mobilevit():
    model = onnx.load(str(MOBILEVIT))
    canonical, plan = _analyzed(model)
    x = np.random.default_rng(3).standard_normal((1, 3, 128, 128)).astype(np.float32)
    return model, canonical, plan, {"input": x}


def _cases(mobilevit):
    cases = [(name, *_analyzed(build()), {"x": X}) for name, build in TINY.items()]
    return cases + [("mobilevit_xxs", *mobilevit[1:])]


def test_partition_covers_every_node_once_in_topological_order(mobilevit):
    for name, model, plan, _ in _cases(mobilevit):
        nodes = [n for b in plan.blocks for n in b.nodes]
        assert sorted(nodes) == sorted(n.name for n in model.graph.node), name
        # the concatenation is a valid graph: block by block, every input is already there
        produced = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
        by_name = {n.name: n for n in model.graph.node}
        for b in plan.blocks:
            assert set(b.inputs) <= produced, (name, b.name)
            for n in b.nodes:
                assert all(t in produced or not t for t in by_name[n].input), (name, n)
                produced |= set(by_name[n].output)
        assert [b.name for b in plan.blocks] == [f"{b.kind}_{i}" for i, b in enumerate(plan.blocks)]


def _exact_boundary(model, block):
    """(inputs, outputs) recomputed from the ONNX graph: activations only."""
    inside = set(block.nodes)
    nodes = [n for n in model.graph.node if n.name in inside]
    made = {t for n in nodes for t in n.output}
    inits = {i.name for i in model.graph.initializer}
    const = {t for n in model.graph.node if n.op_type == "Constant" for t in n.output}
    ins = {t for n in nodes for t in n.input if t and t not in made and t not in inits | const}
    outside = {t for n in model.graph.node if n.name not in inside for t in n.input}
    outs = {t for t in made if t in outside | {o.name for o in model.graph.output}}
    return ins, outs - const


def test_boundaries_are_exact(mobilevit):
    for name, model, plan, _ in _cases(mobilevit):
        for b in plan.blocks:
            assert _exact_boundary(model, b) == (set(b.inputs), set(b.outputs)), (name, b.name)


def test_block_kinds_follow_the_conv_roles(mobilevit):
    for name, _, plan, _ in _cases(mobilevit):
        kind = {n: b.kind for b in plan.blocks for n in b.nodes}
        assert all(kind[c.node] == c.role for c in plan.convs), name
        assert all(kind[a.softmax] == "transformer" for a in plan.attention), name
        assert sorted(c for b in plan.blocks for c in b.convs) == sorted(c.node for c in plan.convs)
    _, plan = _analyzed(g.mixed_model())
    assert [(b.kind, b.convs, len(b.attention)) for b in plan.blocks] == [
        ("conv_block", ("stem",), 0), ("bridge", ("conv_in",), 0), ("transformer", (), 1),
        ("bridge", ("conv_out",), 0), ("conv_block", ("tail",), 0)]
    assert plan.blocks[3].nodes == ("conv_out", "out_act")  # a leaving bridge takes its ReLU
    assert plan.blocks[2].linears == ("attn_q_proj", "attn_k_proj", "attn_v_proj")


def test_mobilevit_one_transformer_block_per_attention_layer(mobilevit):
    _, _, plan, _ = mobilevit
    kinds = [b.kind for b in plan.blocks]
    transformer = [b for b in plan.blocks if b.kind == "transformer"]
    assert [len(b.attention) for b in transformer] == [1] * 9  # 2 + 4 + 3 layers
    assert kinds.count("bridge") == 6  # conv3_1x1 entering, conv_fusion leaving, x3
    # the local/fusion convs of each MobileViT block: conv_kxk, conv_1x1 in its first layer
    assert all(len(b.convs) == 2 for b in transformer if "transformer.0/" in b.attention[0])
    head = plan.blocks[-1]
    assert head.kind == "conv_block" and head.outputs == ("logits",) and len(head.linears) == 1


def _chain(model, blocks, feed, types):
    values = dict(feed)
    for b in blocks:
        outs = _run(extract(model, b, types), values, list(b.outputs))
        values.update(zip(b.outputs, outs))
    return values


def test_chained_blocks_reproduce_the_float_model_bit_for_bit(mobilevit):
    for name, model, plan, feed in _cases(mobilevit):
        values = _chain(model, plan.blocks, feed, value_types(model))
        for out, ref in zip(model.graph.output, _run(model, feed)):
            assert np.array_equal(values[out.name], ref), (name, out.name)


def test_a_run_of_blocks_keeps_only_what_later_blocks_read(mobilevit):
    _, model, plan, feed = mobilevit
    first = next(i for i, b in enumerate(plan.blocks) if b.kind == "transformer")
    run = plan.blocks[first - 1:first + 3]  # entering bridge, 2 layers, leaving bridge
    sub = extract(model, run)
    inputs = [i.name for i in sub.graph.input]
    assert inputs == [t for t in dict.fromkeys(t for b in run for t in b.inputs)
                      if t not in {o for b in run for o in b.outputs}]
    assert [o.name for o in sub.graph.output] == list(run[-1].outputs)
    values = block_inputs(model, run, feed, _exact())
    ref = _run(model, feed, list(run[-1].outputs))
    assert all(np.array_equal(a, b) for a, b in zip(_run(sub, values), ref))


def test_block_inputs_takes_graph_inputs_from_the_feed():
    model, plan = _analyzed(g.mixed_model())
    assert block_inputs(model, plan.blocks[0], {"x": X}) == {"x": X}
    values = block_inputs(model, plan.blocks[2], {"x": X})
    assert list(values) == list(plan.blocks[2].inputs) == ["conv_in_out"]


def test_extract_refuses_a_model_that_does_not_match():
    model, plan = _analyzed(g.mixed_model())
    wrong = Block("conv_block", "wrong", inputs=("stem_out",), outputs=("attn_img", "stem_act_out"))
    assert len(extract(model, wrong).graph.node) == 14  # stem_act .. attn_to_image
    wrong = Block("conv_block", "wrong", inputs=(), outputs=("stem_out",))
    with pytest.raises(ValueError, match="not a block input"):
        extract(model, wrong)


def _quantized_blocks_close(model, plan, quant, feed, blocks, rel):
    """Each quantized block equals the quantized model's own tensors on its inputs, and is
    within ``rel`` (of max |float|) of the float block on the same inputs."""
    tq, tf = value_types(quant), value_types(model)
    for b in blocks:
        inputs = block_inputs(quant, b, feed, _exact())
        got = _run(extract(quant, b, tq), inputs, list(b.outputs))
        own = _run(quant, feed, list(b.outputs))
        assert all(np.array_equal(a, c) for a, c in zip(got, own)), b.name
        ref = _run(extract(model, b, tf), inputs, list(b.outputs))
        for a, f in zip(got, ref):
            assert np.abs(a - f).max() <= rel * np.abs(f).max() + 1e-6, b.name


@pytest.mark.parametrize("target", ["paper", "tensorrt"])
def test_quantized_tiny_blocks_run_and_stay_close(target):
    model, plan = _analyzed(g.mixed_model())
    quant = onnxquant.quantize(model, QuantConfig(target=target), calibration=g.calibration())
    assert any(n.op_type == "DequantizeLinear" for n in quant.graph.node)
    _quantized_blocks_close(model, plan, quant, {"x": X}, plan.blocks, 0.05)


def test_quantized_mobilevit_blocks_run_and_stay_close(mobilevit):
    original, model, plan, feed = mobilevit
    calib = np.random.default_rng(1).standard_normal((2, 3, 128, 128)).astype(np.float32)
    quant = onnxquant.quantize(original, QuantConfig(), calibration=calib)
    bridge = next(b for b in plan.blocks if b.kind == "bridge")
    transformer = next(b for b in plan.blocks if b.kind == "transformer")
    sub = extract(quant, transformer)
    assert {n.op_type for n in sub.graph.node} >= {"DequantizeLinear", "Softmax"}
    assert any(n.domain == "onnxquant" for n in sub.graph.node)  # the log2 Q/DQ
    _quantized_blocks_close(model, plan, quant, feed,
                            [plan.blocks[0], bridge, transformer, plan.blocks[-1]], 0.05)


@pytest.mark.torch
@pytest.mark.parametrize("name", __import__("onnxquant.models", fromlist=["zoo"]).zoo.names())
def test_zoo_blocks_cover_follow_roles_and_chain_exactly(name):
    """Every zoo export (64 px where it runs): the partition covers the graph, block kinds
    follow conv roles except for convs off the activation path (EdgeNeXt's positional
    encoding conv reads a grid made from the input's shape), chained blocks are exact."""
    from onnxquant import blocks

    path, side = _zoo_model(name)
    graph, plan = onnxquant.analyze(str(path))
    model = gs.export_onnx(graph.copy(), do_type_check=False)
    assert sorted(n for b in plan.blocks for n in b.nodes) == sorted(n.name for n in graph.nodes)
    topo = blocks._Topology(graph)
    off_path = {n.name for n, data in zip(topo.nodes, topo.data) if not data}
    kind = {n: b.kind for b in plan.blocks for n in b.nodes}
    assert {c.node for c in plan.convs if kind[c.node] != c.role} <= off_path
    assert all(len(b.attention) <= 1 for b in plan.blocks)
    x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
    feed = {model.graph.input[0].name: x}
    values = _chain(model, plan.blocks, feed, value_types(model))
    assert all(np.array_equal(values[o.name], r) for o, r in zip(model.graph.output, _run(model, feed)))


def _zoo_model(name):
    """A zoo export at 64 px where it runs (else its own size), and that size."""
    pytest.importorskip("timm", reason="timm not installed (pip install onnxquant[torch])")
    from onnxquant.models.export import zoo_cache_small

    return zoo_cache_small(name)


@pytest.mark.torch
@pytest.mark.parametrize("name", __import__("onnxquant.models", fromlist=["zoo"]).zoo.names())
def test_zoo_blocks_run_on_the_fitted_and_held_out_samples(name):
    """The reconstruction walk's split (6 fitted, 2 held-out of 8 samples): every block runs
    on either side's boundary values and gives those samples' rows of the all-sample run.
    TinyViT (window grid 8) and EdgeNeXt (168 channels) broke this when shape vectors were
    rescaled wherever an entry was a multiple of the sample count."""
    from onnxquant import block_runs, reconstruct

    path, side = _zoo_model(name)
    graph, plan = onnxquant.analyze(str(path))
    canonical = gs.export_onnx(graph.copy(), do_type_check=False)
    x = np.random.default_rng(0).standard_normal((8, 3, side, side)).astype(np.float32)
    split = reconstruct.split_indices(8, 0.25)
    walk = reconstruct._Walk(canonical, plan, {canonical.graph.input[0].name: x}, split, True)
    fitted = len(split[0])  # walk.a holds the fitted samples, then the held-out ones
    for i, block in enumerate(plan.blocks):
        model = extract(canonical, block, walk.types)
        every = block_runs.run(model, walk.a)
        for idx, values in zip((slice(0, fitted), slice(fitted, 8)), (walk.q, walk.h)):
            got, want = block_runs.run(model, values), block_runs.take(every, idx, 8, walk.ints)
            for k, v in want.items():
                np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-4 * (
                    1 + float(np.abs(v).max())), err_msg=f"{block.name}: {k}")
        walk.advance(i, model, gs.import_onnx(model))


@pytest.mark.torch
def test_gptq_on_few_full_resolution_samples_runs_tinyvit(monkeypatch):
    """Above ``BIG_INPUT`` positions GPTQ's layer inputs come from the first few samples;
    TinyViT's window reshapes hold the batch (``walk.ints``), which the GPTQ walk did not
    look for: with every block counted as full resolution, the first 4 of 8 samples
    crashed its Reshape ("cannot be reshaped to the requested shape")."""
    from onnxquant import gptq, reconstruct

    monkeypatch.setattr(reconstruct, "BIG_INPUT", 1)
    monkeypatch.setattr(gptq, "MAX_SAMPLES", 64)  # 2 x 64 positions: MIN_SAMPLES of them
    path, side = _zoo_model("tiny_vit_5m_224")
    x = np.random.default_rng(0).standard_normal((8, 3, side, side)).astype(np.float32)
    res = onnxquant.run(str(path), QuantConfig(weight_bits=4, reconstruct="gptq"), x,
                        progress=False)
    assert any(r.kept == "gptq" for r in res.plan.reconstruction)
