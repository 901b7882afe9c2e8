"""Learned rounding in torch (reconstruct_torch.py, torch_quant.py) and the torch executor
it runs blocks with (torch_graph.py): the executor against onnxruntime on extracted blocks,
the rounding against its definition, every method against round-to-nearest through the
driver, determinism, and the codes the driver emits against the torch forward."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")

from graphs import Builder, calibration, mixed_model, quantize, sdpa_model  # noqa: E402
from onnxquant import QuantConfig, analyze, block_runs, blocks, quantizers  # noqa: E402
from onnxquant import fits, reconstruct, reconstruct_torch  # noqa: E402
from onnxquant.layers import Layer  # noqa: E402
from onnxquant.spec import QuantSpec  # noqa: E402
from onnxquant.torch_graph import GraphModule  # noqa: E402
from onnxquant.torch_quant import Rounding, block_hooks  # noqa: E402

pytestmark = pytest.mark.torch
# tools/mutation.py asks for 1: autograd on a pool of threads hangs in a forked child
torch.set_num_threads(int(os.environ.get("ONNXQUANT_TEST_TORCH_THREADS", "2")))
BUNDLED = "models/reference/mobilevit_xxs.imagenette.onnx"


def _blocks_and_values(model, x):
    import onnx_graphsurgeon as gs

    graph, plan = analyze(model)
    canonical = gs.export_onnx(graph, do_type_check=False)
    outputs = tuple({t for b in plan.blocks for t in b.outputs})
    every = blocks.Block("conv_block", "all", inputs=outputs)
    feed = {canonical.graph.input[0].name: x}
    values = {**feed, **blocks.block_inputs(canonical, every, feed)}
    types = blocks.value_types(canonical)
    return [blocks.extract(canonical, b, types) for b in plan.blocks], values


@pytest.mark.parametrize("make", [mixed_model, lambda: sdpa_model("levit", head=True), "bundled"])
def test_torch_graph_matches_onnxruntime_on_extracted_blocks(make):
    from conftest import ROOT

    if make == "bundled":
        import onnx

        model, x = onnx.load(ROOT / BUNDLED), np.random.default_rng(0).random((2, 3, 128, 128))
    else:
        model, x = make(), calibration(4, seed=2)
    extracted, values = _blocks_and_values(model, x.astype(np.float32))
    assert extracted
    for block in extracted:
        feed = {i.name: values[i.name] for i in block.graph.input}
        want = block_runs.run(block, feed)
        with torch.no_grad():
            got = GraphModule(block).run({k: torch.from_numpy(v) for k, v in feed.items()})
        for name, w in want.items():
            np.testing.assert_allclose(got[name].numpy(), w, rtol=0,
                                       atol=1e-4 * max(float(np.abs(w).max()), 1.0))



def test_torch_graph_drops_a_value_after_its_last_reader_and_keeps_what_is_asked():
    """x -> a -> b -> c -> d (Relu): when c is made, a (read by b only) is gone, unless
    asked for; kept and output values come back."""
    import weakref

    from onnx import TensorProto, helper

    names = ["x", "a", "b", "c", "d"]
    graph = helper.make_graph(
        [helper.make_node("Relu", [i], [o], name=o) for i, o in zip(names, names[1:])], "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [2, 3])])
    gm = GraphModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    seen = {}

    def remember(v):
        seen["a"] = weakref.ref(v)
        return v

    def check(v):
        seen["a alive when c is made"] = seen["a"]() is not None
        return v

    x = torch.randn(2, 3)
    for keep, alive in [((), False), (("a",), True)]:
        with torch.no_grad():
            out = gm.run({"x": x}, hooks={"a": remember, "c": check}, keep=keep)
        assert seen["a alive when c is made"] is alive
        assert set(out) == {"d", *keep}
        torch.testing.assert_close(out["d"], x.relu())
    with torch.no_grad():  # no outputs, only what is kept (_LocalTargets, layer inputs)
        assert set(gm.run({"x": x}, [], keep=("b",))) == {"b"}


def _layer(seed, rows, cols, bits, symmetric, block=None):
    """A MatMul layer ([in, out] weight) with its min-max grid per output column, or per
    ``block`` input rows of each column."""
    b = Builder(seed)
    w = (np.random.default_rng(seed).standard_normal((cols, rows)) * 0.3).astype(np.float32)
    b.add("w", w)
    b.node("[mm] y = MatMul(x, w)")
    node = next(n for n in _onnx_nodes(b, cols, rows) if n.name == "mm")
    spec = QuantSpec(bits=bits, symmetric=symmetric, axis=1 if block is None else 0,
                     block_size=block)

    class Site:
        weight_spec, node_name, node = spec, "mm", "mm"

    return Layer(Site(), node, w, spec.uniform_params(w))


def _onnx_nodes(b, cols, rows):
    import onnx

    text = (f"<ir_version: 8, opset_import: [\"\" : 17]> g (float[N,{cols}] x) "
            f"=> (float[N,{rows}] y) {{ {b.lines[0]} }}")
    return onnx.parser.parse_model(text).graph.node


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), bits=st.integers(2, 8), symmetric=st.booleans(),
       block=st.sampled_from([None, 3]))
def test_rounding_starts_at_the_weight_and_codes_stay_on_the_grid(seed, bits, symmetric, block):
    layer = _layer(seed, 5, 7, bits, symmetric, block)
    r = Rounding(layer, "cpu")
    with torch.no_grad():
        r.v.add_(torch.randn(r.v.shape, generator=torch.Generator().manual_seed(seed)) * 5)
    codes = r.numpy_codes()
    p = layer.params
    assert codes.dtype == p.zero_point.dtype and codes.min() >= p.qmin and codes.max() <= p.qmax
    # hard weight = what DequantizeLinear of the codes computes
    np.testing.assert_array_equal(r.hard().detach().numpy(),
                                  quantizers.uniform_dequantize(codes, p))
    fresh = Rounding(layer, "cpu")  # h(V) = fractional part: W_soft = W, hard = RTN (ties aside)
    scale, zero = p.expanded(layer.weight.shape)
    inside = np.abs(layer.weight / scale + zero - (p.qmin + p.qmax) / 2) \
        <= (p.qmax - p.qmin) / 2  # not clipped by the grid
    np.testing.assert_allclose(fresh.soft().detach().numpy()[inside], layer.weight[inside],
                               atol=1e-5)
    rtn = quantizers.uniform_quantize(layer.weight, p)
    assert np.mean(fresh.numpy_codes() == rtn) > 0.95


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), bits=st.integers(2, 8), shift=st.integers(-2, 2),
       block=st.sampled_from([None, 3]))
def test_rounding_started_at_given_codes_decides_them(seed, bits, shift, block):
    """Started at codes up to two steps from round-to-nearest (GPTQ's may be): the hard
    codes are those codes, and the other choice lies on the float weight's side."""
    layer = _layer(seed, 5, 7, bits, True, block)
    p = layer.params
    start = np.clip(quantizers.uniform_quantize(layer.weight, p).astype(np.int64) + shift,
                    p.qmin, p.qmax)
    r = Rounding(layer, "cpu", layer.stack(start))
    np.testing.assert_array_equal(r.numpy_codes(), start)
    w_steps = layer.stack(layer.weight) / layer.grid()[0]
    other = r.base + (r.h() <= 0.5).float()  # the code the rounding can still move to
    rel = layer.stack(start) - layer.grid()[1]
    side = np.sign(other.numpy() - rel)
    assert np.all(side[w_steps < rel] == -1) and np.all(side[w_steps >= rel] == 1)


def test_the_rounding_regularizer_makes_h_binary():
    """beta annealed 20 -> 2: h ends at 0/1; held at 20 the regularizer barely acts."""
    layer = _layer(3, 16, 32, 4, True)
    cols = torch.randn(1, 32, 1024, generator=torch.Generator().manual_seed(0))
    cols = torch.matmul(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)), cols)

    def undecided(beta):
        r = reconstruct_torch.fit_layer(layer, cols, 200, torch.Generator().manual_seed(0), beta)
        h = r.h().detach()
        return float(((h > 0.01) & (h < 0.99)).float().mean())

    annealed, held = undecided(reconstruct_torch.BETA), undecided((20.0, 20.0))
    assert annealed < 0.05
    assert held > annealed + 0.05


def _note(res, method):
    return next(n for n in res.plan.notes if n.startswith(f"reconstruct {method}"))


@pytest.mark.parametrize("method", reconstruct_torch.METHODS)
def test_each_method_is_no_worse_than_round_to_nearest(method):
    model, calib = mixed_model(seed=2), calibration(16, seed=1)
    res = quantize(model, calib, weight_bits=4, per_channel=True, weight_symmetric=True,
                   reconstruct=method, reconstruct_iters=50)
    assert _note(res, method)
    blocks = res.plan.reconstruction
    assert blocks and all(r.error <= r.rtn_error for r in blocks)
    if method != "qdrop":  # QDrop trains for robustness, not the calibration error itself
        assert any(r.error < r.rtn_error for r in blocks)
    check = res.plan.reconstruction_check
    assert check.kept and min(check.error, check.gptq_error) <= check.rtn_error


@pytest.mark.parametrize("method", ["qdrop", "mgrq"])
def test_same_seed_same_bytes(method):
    model, calib = mixed_model(seed=4), calibration(16, seed=1)
    cfg = dict(weight_bits=3, per_channel=True, reconstruct=method, reconstruct_iters=20)
    a, b = quantize(model, calib, **cfg), quantize(model, calib, **cfg)
    assert a.model.SerializeToString() == b.model.SerializeToString()


def test_emitted_codes_and_steps_give_the_torch_forward(monkeypatch):
    """The block with the returned codes and learned activation steps, emitted and run in
    onnxruntime, equals the torch executor with those codes' weights and the block's
    activation specs (log2 included)."""
    seen = []

    def method(task):
        fit = reconstruct_torch.brecq(task)
        acts = fits.learnable_steps(task.plan, task.model)
        seen.append((task, fit, acts, {k: v for k, v in task.inputs.items()}))
        return fit

    monkeypatch.setattr(reconstruct, "_method", lambda name: method)
    model, calib = mixed_model(seed=2), calibration(16, seed=1)
    quantize(model, calib, target="tensorrt", weight_bits=4, reconstruct="brecq",
             reconstruct_iters=20)
    import onnx_graphsurgeon as gs

    assert any(t.plan.attention for t, *_ in seen)
    assert any(fit.steps for _, fit, _, _ in seen)
    for task, fit, acts, inputs in seen:
        rounded = {layer.site.node: None for layer in task.layers}
        fits.apply(task.layers, fit, rounded, acts)
        for tensor, step in fit.steps.items():  # the learned step is the one emitted
            specs = [spec for site, attr, t, spec in acts if t == tensor]
            assert specs and all(getattr(site, attr).uniform_params().scale[0] == step
                                 for site, attr, t, _ in acts if t == tensor)
        emitted = block_runs.emitted(gs.import_onnx(task.model), task.plan)
        want = block_runs.run(emitted, inputs)
        hooks, input_hooks, _ = block_hooks(task.plan, task.model, "cpu")
        weights = {layer.node.input[1]: torch.from_numpy(quantizers.uniform_dequantize(
            fit.codes[layer.site.node], layer.params)) for layer in task.layers}
        with torch.no_grad():
            got = GraphModule(task.model).run({k: torch.from_numpy(v) for k, v in inputs.items()},
                                              weights=weights, hooks=hooks, input_hooks=input_hooks)
        for name, w in want.items():  # an activation code at a rounding tie may differ
            close = np.abs(got[name].numpy() - w) <= 1e-4 * max(float(np.abs(w).max()), 1.0)
            assert close.mean() > 0.99, name


def test_config_accepts_the_torch_methods():
    for method in reconstruct_torch.METHODS:
        assert QuantConfig(reconstruct=method, reconstruct_iters=5).reconstruct == method


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6),
       shape=st.sampled_from([(3, 5, 4, 4), (2, 7, 3), (6, 2), (4, 1, 3)]),
       offset=st.floats(-10, 10))
def test_local_moments_are_mean_and_unbiased_std(seed, shape, offset):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64) + offset
    dims = [d for d in range(t.ndim) if d != 1]
    mean, std = reconstruct_torch._moments(t, dims)
    want_std, want_mean = torch.std_mean(t, dim=dims)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(std, want_std, rtol=1e-6, atol=1e-9)


def test_samples_per_step_shrink_on_full_resolution_maps():
    def Task(**shapes):  # noqa: N802 - a BlockTask with only its inputs
        return reconstruct.BlockTask("b", "conv_block", None,
                                     {k: np.zeros(s, np.float32) for k, s in shapes.items()},
                                     [], None)

    size = reconstruct_torch._batch_size
    assert size(Task(x=(32, 16, 64, 64))) == reconstruct_torch.MIN_BATCH  # 4096 positions
    assert size(Task(x=(32, 64, 32, 32))) == 8  # 1024 positions: 8 samples per step
    assert size(Task(x=(32, 64, 16, 16), shape=(4,))) == reconstruct_torch.BATCH
    assert size(Task(tokens=(512, 16, 64))) == reconstruct_torch.BATCH  # [B * P, N, C]
    assert size(Task(tokens=(32, 3136, 96))) == reconstruct_torch.MIN_BATCH  # [B, 56*56, C]
    assert size(Task(seq=(32, 96, 3136))) == reconstruct_torch.MIN_BATCH  # [B, C, L]
    assert size(Task(tokens=(32, 1024, 96))) == 8


@pytest.mark.parametrize("term", ["moments", "mse"])
def test_local_term_is_zero_at_float_and_grows_with_the_error(monkeypatch, term):
    """Both local terms vanish when every layer output equals float's; the per-layer MSE
    is the mean of the layers' relative squared errors."""
    class Layer:
        def __init__(self, name, op):
            self.node = type("N", (), {"output": [name], "op_type": op})()

    layers = [Layer("a", "Conv"), Layer("b", "MatMul")]
    g = torch.Generator().manual_seed(0)
    want = {"a": torch.randn(2, 3, 4, 4, generator=g), "b": torch.randn(2, 5, 6, generator=g)}
    noise = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in want.items()}
    monkeypatch.setattr(reconstruct_torch, "LOCAL_TERM", term)
    assert float(reconstruct_torch._local(want, want, layers)) == pytest.approx(0, abs=1e-6)
    got = float(reconstruct_torch._local({k: want[k] + noise[k] for k in want}, want, layers))
    assert got > 0
    if term == "mse":
        rel = [float((noise[k] ** 2).sum() / (want[k] ** 2).sum()) for k in want]
        assert got == pytest.approx(np.mean(rel), rel=1e-5)
    else:  # the module docstring's formula, per output channel: axis 1 of a Conv, last else
        def moments_term(q, f, axis):
            dims = tuple(d for d in range(q.ndim) if d != axis)
            mq, sq, mf, sf = q.mean(dims), q.std(dims, ddof=1), f.mean(dims), f.std(dims, ddof=1)
            return ((mq - mf) ** 2 + (sq - sf) ** 2).sum() / (mf ** 2 + sf ** 2).sum()

        q = {k: (want[k] + noise[k]).double().numpy() for k in want}
        f = {k: want[k].double().numpy() for k in want}
        ref = np.mean([moments_term(q["a"], f["a"], 1), moments_term(q["b"], f["b"], 2)])
        assert got == pytest.approx(ref, rel=1e-4)


def test_checkpointed_run_gives_the_values_and_gradients_of_a_run_and_saves_less():
    """On a bundled checkpoint's tail from its second block: the same output and input
    gradient, with fewer bytes held for the backward pass outside the parts."""
    import onnx
    import onnx_graphsurgeon as gs
    from conftest import ROOT

    graph, plan = analyze(onnx.load(ROOT / BUNDLED))
    canonical = gs.export_onnx(graph, do_type_check=False)
    types = blocks.value_types(canonical)
    tail = blocks.extract(canonical, plan.blocks[1:], types)
    x = np.random.default_rng(0).random((2, 3, 128, 128), np.float32)
    values = blocks.block_inputs(canonical, plan.blocks[1:], {canonical.graph.input[0].name: x})
    gm = GraphModule(tail)
    results = []
    for run in (gm.run, lambda feed: gm.run_checkpointed(feed, parts=5)):
        feed = {k: torch.from_numpy(v).requires_grad_(v.dtype == np.float32)
                for k, v in values.items() if k in gm.inputs}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = run(feed)[gm.outputs[0]]
        out.square().sum().backward()
        grads = [feed[k].grad for k in sorted(feed) if feed[k].requires_grad]
        results.append((out.detach(), grads, sum(saved)))
    (want, want_grads, plain), (got, got_grads, checkpointed) = results
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    assert checkpointed < plain / 5


@pytest.mark.parametrize("method", ["brecq", "mgrq"])
def test_every_block_steps_on_batches_not_on_all_samples(monkeypatch, method):
    """Past the first block the quantized inputs differ from the float ones; each block
    still steps on batches of its fitted samples (24 here, BATCH 8), as the torch block
    reproduces onnxruntime on any two of them."""
    steps = []
    draw = reconstruct_torch._draw

    def recorded(n, batch, gen, dev):
        idx = draw(n, batch, gen, dev)
        steps.append((n, n if idx is None else len(idx)))  # n 1: the whole set each step
        return idx

    monkeypatch.setattr(reconstruct_torch, "_draw", recorded)
    res = quantize(mixed_model(seed=2), calibration(32, seed=1), weight_bits=4,
                   per_channel=True, weight_symmetric=True, reconstruct=method,
                   reconstruct_iters=3)
    assert len(res.plan.reconstruction) > 1
    assert len(steps) == 3 * len(res.plan.reconstruction)
    assert set(steps) == {(24, reconstruct_torch.BATCH)}


def _recorded_local_targets(monkeypatch) -> list:
    """(targets, idx, got) of every L_local target taken (reconstruct_torch._LocalTargets)."""
    seen = []
    LocalTargets = reconstruct_torch._LocalTargets

    class Recorded(LocalTargets):
        def __init__(self, task, gm, dev, batched):
            super().__init__(task, gm, dev, batched)
            self.task = task

        def take(self, feed, idx):
            got = super().take(feed, idx)
            seen.append((self, idx, got))
            return got

    monkeypatch.setattr(reconstruct_torch, "_LocalTargets", Recorded)
    return seen


def test_mgrq_local_targets_are_the_float_block_layers_on_each_batch(monkeypatch):
    """L_local's targets are computed per batch in torch (no copy over every sample is
    held) and equal onnxruntime's float block layer outputs on the batch's quantized
    input samples."""
    from onnxquant.torch_quant import Samples

    seen = _recorded_local_targets(monkeypatch)
    quantize(mixed_model(seed=2), calibration(32, seed=1), weight_bits=4, per_channel=True,
             weight_symmetric=True, reconstruct="mgrq", reconstruct_iters=2)
    assert len(seen) > 2
    for targets, idx, got in seen:
        assert targets.once is None and idx is not None
        task = targets.task
        ort = reconstruct_torch._float_outputs(task, targets.names)
        want = Samples(ort, "cpu", ints=task.batch_ints).take(idx.cpu())
        for name in targets.names:
            torch.testing.assert_close(got[name].cpu(), want[name], rtol=1e-4, atol=1e-5)


def test_mgrq_runs_each_float_block_on_the_float_inputs_once(monkeypatch):
    """MGRQ's global term and the walk's next step share one onnxruntime run of the float
    block on the float inputs: no (model, values) pair is run twice."""
    import collections

    calls, held = collections.Counter(), []  # held: no id is reused during the run
    run = block_runs.run

    def counted(model, values, *args, **kwargs):
        calls[id(model), id(values)] += 1
        held.append((model, values))
        return run(model, values, *args, **kwargs)

    monkeypatch.setattr(block_runs, "run", counted)
    res = quantize(mixed_model(seed=2), calibration(32, seed=1), weight_bits=4,
                   per_channel=True, weight_symmetric=True, reconstruct="mgrq",
                   reconstruct_iters=2)
    assert len(res.plan.reconstruction) > 1
    assert max(calls.values()) == 1


def _torch_settings() -> tuple:
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    return (cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled())


def test_cuda_settings_turn_off_tf32_and_turn_on_determinism_and_restore_after():
    before = _torch_settings()
    with reconstruct_torch._cuda_settings(torch.device("cpu")):
        assert _torch_settings() == before
    with reconstruct_torch._cuda_settings(torch.device("cuda")):  # sets flags: no GPU needed
        assert _torch_settings() == (False, False, True, False, True)
    assert _torch_settings() == before


def test_device_auto_follows_torch_and_cuda_without_a_device_is_one_clear_error(monkeypatch):
    from onnxquant.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert reconstruct_torch.device().type == reconstruct_torch.device("cpu").type == "cpu"
    with pytest.raises(UserError, match="--reconstruct-device cuda: torch .* sees no CUDA"):
        reconstruct_torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert reconstruct_torch.device().type == reconstruct_torch.device("cuda").type == "cuda"


@pytest.mark.parametrize("method", ["adaround", "brecq"])
def test_reconstruct_device_reaches_every_method_and_the_summary(monkeypatch, method,
                                                                  rounding_devices):
    """--reconstruct-device cpu is what each block's method asks for its device (not the
    "auto" default), its roundings are made there, and the summary says where."""
    asked, made = [], rounding_devices
    resolve = reconstruct_torch.device

    def device(choice="auto"):
        asked.append(choice)
        return resolve(choice)

    monkeypatch.setattr(reconstruct_torch, "device", device)
    res = quantize(mixed_model(seed=2), calibration(16, seed=1), weight_bits=4,
                   per_channel=True, weight_symmetric=True, reconstruct=method,
                   reconstruct_iters=5, reconstruct_device="cpu")
    assert len(asked) > 2 and set(asked) == {"cpu"}
    assert made and set(made) == {"cpu"}
    assert _note(res, method).endswith(" s on cpu")


def test_iters_and_seed_reach_the_torch_methods(monkeypatch):
    seen = []
    brecq = reconstruct_torch.METHODS["brecq"]

    def spy(task):
        seen.append((task.iters, task.seed))
        return brecq(task)

    monkeypatch.setitem(reconstruct_torch.METHODS, "brecq", spy)
    quantize(mixed_model(seed=2), calibration(16, seed=1), weight_bits=4, per_channel=True,
             weight_symmetric=True, reconstruct="brecq", reconstruct_iters=3, seed=7)
    assert seen and set(seen) == {(3, 7)}


def test_shape_is_made_on_its_input_device():
    """A shape vector meets the device's constants in Concat (Reshape targets): it must be
    made where its input lives (checked on the meta device here, on CUDA in the gpu tier)."""
    from onnxquant.torch_ops import OPS

    x = torch.empty(2, 3, 5, device="meta")
    assert OPS["Shape"]({"start": 1}, [x], 17).device.type == "meta"


def test_the_gpu_out_of_memory_is_one_line_naming_the_block_and_the_ways_out(
        monkeypatch, tmp_path, capsys):
    from conftest import ROOT
    from onnxquant.cli import main

    def full(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(reconstruct_torch, "fit_layer", full)
    out = tmp_path / "q.onnx"
    code = main([str(ROOT / BUNDLED), str(out), "--weight-bits", "4", "--reconstruct",
                 "adaround", "--reconstruct-iters", "1", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in err
    assert "block " in err and "--reconstruct-device cpu" in err and "--num-calib" in err
    assert not out.exists()


def test_beta_is_off_during_the_warm_up_then_anneals_from_the_first_to_the_second():
    beta, iters = (20.0, 2.0), 100
    start = int(reconstruct_torch.WARMUP * iters)
    assert all(reconstruct_torch.beta_at(it, iters, beta) is None for it in range(start))
    got = [reconstruct_torch.beta_at(it, iters, beta) for it in range(start, iters + 1)]
    assert got[0] == pytest.approx(20.0) and got[-1] == pytest.approx(2.0)
    assert reconstruct_torch.beta_at(start + (iters - start) // 2, iters, beta) == \
        pytest.approx(11.0)  # cosine: the middle of the range half-way
    assert all(a >= b for a, b in zip(got, got[1:]))


def test_qdrop_mix_takes_each_element_from_the_float_input_with_probability_drop():
    g = torch.Generator().manual_seed(0)
    q, f = torch.zeros(100, 100), torch.ones(100, 100)
    ints = torch.arange(6)
    out = reconstruct_torch._mix({"x": q, "i": ints, "other": q[:3], "alone": q},
                                 {"x": f, "i": ints + 1, "other": f}, g)
    share = float(out["x"].mean())
    assert abs(share - reconstruct_torch.DROP) < 0.02
    assert set(out["x"].unique().tolist()) == {0.0, 1.0}
    assert out["i"] is ints and out["other"] is not None and out["alone"] is q  # kept whole
    assert torch.equal(out["other"], q[:3])  # shapes differ: the quantized one


@pytest.mark.parametrize("method, mixes", [("qdrop", True), ("brecq", False)])
def test_qdrop_mixes_the_block_inputs_and_brecq_does_not(monkeypatch, method, mixes):
    calls = []
    mix = reconstruct_torch._mix

    def counted(quantized, floats, gen):
        calls.append(len(quantized))
        return mix(quantized, floats, gen)

    monkeypatch.setattr(reconstruct_torch, "_mix", counted)
    quantize(mixed_model(seed=2), calibration(16, seed=1), weight_bits=4, per_channel=True,
             reconstruct=method, reconstruct_iters=2)
    assert bool(calls) == mixes


def test_block_roundings_start_at_the_given_codes_or_at_rounding():
    layer = _layer(3, 5, 7, 4, True)
    p = layer.params
    rtn = quantizers.uniform_quantize(layer.weight, p).astype(np.int64)
    start = np.clip(rtn + 1, p.qmin, p.qmax)
    task = type("Task", (), {"layers": [layer], "start": {}})()
    assert np.mean(reconstruct_torch._roundings(task, "cpu")[0].numpy_codes() == rtn) > 0.95
    task.start = {layer.site.node: start}
    np.testing.assert_array_equal(reconstruct_torch._roundings(task, "cpu")[0].numpy_codes(),
                                  start)


def _tail_task(logits_shift: float = 0.0):
    """A task whose tail is h [N, 4] -> MatMul -> logits [N, 3] (and a second output),
    with the float model's logits from onnxruntime (``logits_shift`` added to them)."""
    import onnx

    rng = np.random.default_rng(0)
    tail = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        tail (float[N, 4] h) => (float[N, 3] logits, float[N, 4] twice) {
            logits = MatMul(h, w)
            twice = Add(h, h)
        }""")
    tail.graph.initializer.append(onnx.numpy_helper.from_array(
        rng.standard_normal((4, 3)).astype(np.float32), "w"))
    h = rng.standard_normal((6, 4)).astype(np.float32)
    logits = block_runs.run(tail, {"h": h})["logits"] + np.float32(logits_shift)

    class Task:
        inputs, batch_ints, name, progress = {"h": h}, {}, "b", None

        def tail(self):
            return tail, {}, lambda name: logits if name == "logits" else None

    return Task(), h, logits


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_mgrq_global_term_is_the_kl_of_float_logits_to_the_tail_on_the_block_output():
    """L_global = KL(softmax(z_f) || softmax(z_q)), mean over the first GLOBAL_BATCH samples
    of the step: z_f the float logits, z_q the float tail on the quantized block output."""
    task, h, logits = _tail_task()
    glob = reconstruct_torch._Global(task, {"h": h}, "cpu")
    assert glob.name == "logits"
    np.testing.assert_allclose(glob.target.numpy(), _log_softmax(logits), atol=1e-6)
    rng = np.random.default_rng(1)
    idx = torch.tensor([1, 3, 4, 5])
    out = h[idx.numpy()] + 0.3 * rng.standard_normal((4, 4)).astype(np.float32)
    got = float(glob.loss({"h": torch.from_numpy(out)}, idx))
    k = reconstruct_torch.GLOBAL_BATCH
    w = _tail_weight(task)
    p = _log_softmax(logits[idx.numpy()[:k]].astype(np.float64))
    z = _log_softmax(out[:k].astype(np.float64) @ w)
    assert got == pytest.approx(float(np.mean((np.exp(p) * (p - z)).sum(-1))), rel=1e-4)
    assert float(glob.loss({"h": torch.from_numpy(h)}, None)) == pytest.approx(0, abs=1e-6)


def _tail_weight(task):
    import onnx

    return onnx.numpy_helper.to_array(task.tail()[0].graph.initializer[0]).astype(np.float64)


def test_mgrq_global_term_refuses_a_tail_that_does_not_reproduce_onnxruntime():
    task, h, logits = _tail_task(logits_shift=0.01 * 3)
    with pytest.raises(ValueError, match="the tail in torch does not reproduce onnxruntime"):
        reconstruct_torch._Global(task, {"h": h}, "cpu")
    task, h, logits = _tail_task(logits_shift=1e-7)  # float rounding: kept
    reconstruct_torch._Global(task, {"h": h}, "cpu")


def test_the_cuda_error_names_how_torch_was_built(monkeypatch):
    from onnxquant.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for version, build in [("12.4", "built for CUDA 12.4"), (None, "a CPU-only build")]:
        monkeypatch.setattr(torch.version, "cuda", version)
        with pytest.raises(UserError) as err:
            reconstruct_torch.device("cuda")
        assert f"({build}) sees no CUDA device" in str(err.value)


def _bundled_model():
    import onnx
    from conftest import ROOT

    return onnx.load(ROOT / BUNDLED)


@pytest.mark.parametrize("case", ["bundled-tensorrt", "mixed-ort-int8"])
def test_the_torch_block_quantizes_activations_where_emission_does(monkeypatch, case):
    """Every block's torch forward with block_hooks (the methods' forward) and the plan's
    weights equals the emitted block in onnxruntime: MobileViT's blocks at W4A8 on
    tensorrt (two attention blocks, residual skips quantized, every conv's input) and the
    ort profile's int8 convs (output Q/DQ)."""
    import onnx_graphsurgeon as gs

    from onnxquant.torch_quant import block_hooks

    checked = []

    def method(task):
        leaving = frozenset(o.name for o in task.model.graph.output)  # as torch quantizes them
        emitted = block_runs.emitted(gs.import_onnx(task.model), task.plan, leaving)
        want = block_runs.run(emitted, task.inputs)
        hooks, input_hooks, by_tensor = block_hooks(task.plan, task.model, "cpu")
        weights = {}
        for layer in task.layers:
            spec = layer.site.weight_spec
            p = spec.uniform_params(layer.weight)
            weights[layer.node.input[1]] = torch.from_numpy(
                quantizers.uniform_dequantize(spec.quantize(layer.weight), p))
        with torch.no_grad():
            got = GraphModule(task.model).run(
                {k: torch.from_numpy(np.asarray(v)) for k, v in task.inputs.items()},
                weights=weights, hooks=hooks, input_hooks=input_hooks)
        for name, w in want.items():  # activation codes at rounding ties may differ
            rel = np.linalg.norm(got[name].numpy() - w) / np.linalg.norm(w)
            assert rel < 6e-3, (task.name, name, rel)  # an activation left out: 1e-2 or more
        checked.append((task.plan, by_tensor))
        return {}

    monkeypatch.setattr(reconstruct, "_method", lambda name: method)
    if case == "bundled-tensorrt":
        x = np.random.default_rng(0).random((8, 3, 128, 128)).astype(np.float32)
        quantize(_bundled_model(), x, target="tensorrt", weight_bits=4, reconstruct="brecq")
        assert sum(bool(p.attention) for p, _ in checked) >= 2
        assert any(p.residuals for p, _ in checked)
    else:
        quantize(mixed_model(seed=2), calibration(16, seed=1), weight_bits=4, target="ort",
                 ort_int8_kinds=("dense", "pointwise", "stem"), reconstruct="brecq")
        assert any(getattr(s, "output_spec", None) is not None for p, _ in checked
                   for s in p.convs)
    assert any(by_tensor for _, by_tensor in checked)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), bits=st.integers(2, 8), symmetric=st.booleans(),
       lo=st.floats(-4, 0.5), width=st.floats(0.5, 8))
def test_activation_fake_quant_is_the_numpy_quantizer(seed, bits, symmetric, lo, width):
    """ActQuant's uniform Q/DQ equals quantizers' reference on values inside and outside
    the calibrated range (clamped at both ends, any zero point)."""
    from onnxquant.torch_quant import ActQuant

    spec = QuantSpec(bits=bits, symmetric=symmetric, range=(lo, lo + width))
    p = spec.uniform_params()
    x = np.random.default_rng(seed).uniform(lo - width, lo + 2 * width, 500).astype(np.float32)
    want = quantizers.uniform_dequantize(quantizers.uniform_quantize(x, p), p)
    got = ActQuant(spec, "cpu")(torch.from_numpy(x)).numpy()
    step = float(p.scale[0])
    off = np.abs(got - want) > 1e-5 * max(1.0, float(np.abs(want).max()))
    assert off.mean() < 0.01  # float32 x / step vs x * (1 / step): rare ties
    assert np.all(np.abs(got - want)[off] <= step * 1.0001)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), bits=st.sampled_from([3, 4, 8]))
def test_log2_fake_quant_is_the_numpy_quantizer_on_its_thresholds_too(seed, bits):
    from onnxquant.torch_quant import ActQuant

    spec = QuantSpec(kind="log2", bits=bits, range=(0.0, 1.0), eps=2.0 ** -16)
    p = spec.log2_params()
    thresholds, _ = quantizers.log2_tables(p)
    x = np.concatenate([np.random.default_rng(seed).uniform(0, 1, 300).astype(np.float32),
                        thresholds[:-1].astype(np.float32)])  # exactly on a boundary
    want = quantizers.log2_fake_quant(x, p)
    got = ActQuant(spec, "cpu")(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)  # x + (y - x): one ulp at most


def test_qdrop_keeps_each_activation_element_float_with_probability_drop():
    from onnxquant.torch_quant import ActQuant

    spec = QuantSpec(bits=4, symmetric=False, range=(0.0, 1.0))
    act = ActQuant(spec, "cpu")
    act.drop, act.generator = 0.5, torch.Generator().manual_seed(0)
    x = torch.rand(200, 100, generator=torch.Generator().manual_seed(1))
    q = ActQuant(spec, "cpu")(x)
    got = act(x)
    kept = got == x
    assert abs(float(kept.float().mean()) - 0.5) < 0.02
    assert torch.equal(got[~kept], q[~kept])


def test_rounding_h_stays_in_0_1_and_hard_weights_carry_no_gradient():
    layer = _layer(1, 5, 7, 4, True)
    r = Rounding(layer, "cpu")
    with torch.no_grad():
        r.v.copy_(torch.linspace(-50, 50, r.v.numel()).reshape(r.v.shape))
    h = r.h().detach()
    assert float(h.min()) == 0.0 and float(h.max()) == 1.0
    hard = r.weight(soft=False)
    assert not hard.requires_grad and torch.equal(hard, r.hard())
    assert r.weight(soft=True).requires_grad


def test_samples_rescale_the_batch_in_shape_values():
    from onnxquant.torch_quant import Samples

    values = {"x": np.zeros((8, 3), np.float32), "target": np.array([32, -1], np.int64)}
    s = Samples(values, "cpu", ints={"target": (np.array([4, -1]), np.array([4, 0]))})
    got = s.take(torch.arange(3))
    assert got["x"].shape == (3, 3) and got["target"].tolist() == [12, -1]


def test_mgrq_local_targets_of_a_block_that_steps_on_all_samples(monkeypatch):
    """Where a block cannot step on batches, L_local's targets are onnxruntime's float
    layer outputs on all the fitted samples, computed once."""
    seen = _recorded_local_targets(monkeypatch)
    monkeypatch.setattr(reconstruct_torch, "_batchable", lambda *args: False)
    quantize(mixed_model(seed=2), calibration(16, seed=1), weight_bits=4, per_channel=True,
             weight_symmetric=True, reconstruct="mgrq", reconstruct_iters=2)
    assert seen
    for targets, idx, got in seen:
        assert targets.once is not None and idx is None
        ort = reconstruct_torch._float_outputs(targets.task, targets.names)
        for name in targets.names:
            np.testing.assert_allclose(got[name].cpu().numpy(), ort[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop", "mgrq"])
def test_each_method_runs_on_its_default_budget(monkeypatch, method):
    """No --reconstruct-iters: the method's own entry of ITERS (shrunk here to 2 steps)."""
    budgets = []
    beta_at = reconstruct_torch.beta_at

    def recorded(it, iters, beta=reconstruct_torch.BETA):
        budgets.append(iters)
        return beta_at(it, iters, beta)

    for name in reconstruct_torch.ITERS:
        monkeypatch.setitem(reconstruct_torch.ITERS, name, 2 if name == method else 10**6)
    monkeypatch.setattr(reconstruct_torch, "beta_at", recorded)
    quantize(mixed_model(seed=2), calibration(16, seed=1), weight_bits=4, per_channel=True,
             reconstruct=method)
    assert budgets and set(budgets) == {2}


def test_mgrq_supervises_every_block_but_the_last_through_the_rest_of_the_model(monkeypatch):
    """The walk hands MGRQ the float inputs and the tail: L_global is on for every block
    with a model after it (brecq never builds it)."""
    built = []
    make = reconstruct_torch._global_or_none

    def recorded(task, dev):
        glob = make(task, dev)
        built.append((task.name, glob is not None))
        return glob

    monkeypatch.setattr(reconstruct_torch, "_global_or_none", recorded)
    res = quantize(mixed_model(seed=2), calibration(16, seed=1), weight_bits=4,
                   per_channel=True, reconstruct="mgrq", reconstruct_iters=2)
    last = res.plan.blocks[-1].name
    assert built and all(on == (name != last) for name, on in built)
    built.clear()
    quantize(mixed_model(seed=2), calibration(16, seed=1), weight_bits=4, per_channel=True,
             reconstruct="brecq", reconstruct_iters=2)
    assert not built


@pytest.mark.parametrize("method", ["brecq", "mgrq"])
def test_a_model_with_an_op_torch_lacks_still_reconstructs(method):
    """Einsum (not in torch_ops.OPS) inside a block: that block keeps GPTQ's codes or
    rounding, MGRQ's tail through it is off, the rest is learned; no traceback."""
    import onnx

    b = Builder(0)
    h = b.conv("c1", "x", 4, 8, k=3)
    b.node(f'[ein] e = Einsum<equation="nchw->nchw">({h})')
    h = b.relu("act", b.conv("c2", "e", 8, 8))
    model = b.build({b.conv("c3", h, 8, 4, k=3): "float[N,4,4,4]"})
    from onnxquant.torch_ops import OPS

    assert "Einsum" not in OPS
    res = quantize(model, calibration(16, seed=1), weight_bits=4, per_channel=True,
                   reconstruct=method, reconstruct_iters=2)
    skipped = [r for r in res.plan.reconstruction if r.unsupported]
    assert skipped and all("Einsum" in r.unsupported for r in skipped)
    assert any(method in r.candidates for r in res.plan.reconstruction)
    note = next(n for n in res.plan.notes if n.startswith(f"reconstruct {method}"))
    assert f"without {method} (" in note
    onnx.checker.check_model(res.model)
