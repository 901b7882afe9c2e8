"""Run extracted blocks in onnxruntime, float or with the plan's specs emitted into them.

Shared by the strategies that score or rebuild one block at a time (search.py for
``--auto``, reconstruct.py for ``--reconstruct``): a block is extracted once from the
canonical float graph (blocks.extract), the specs of the sites inside it are emitted into a
copy, and the copy runs on boundary values held in a dict (tensor name -> array).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from . import emit, emit_qdq, functions
from .plan import Plan

# positions per sample (H x W) above which a run over the calibration samples holds too
# much at once: GPTQ's layer inputs and bias correction take fewer samples per run there
BIG_POSITIONS = 32768


def subplan(plan: Plan, nodes: set, sites: set | None = None) -> Plan:
    """The plan restricted to the sites inside ``nodes`` (specs shared, not copied);
    ``sites``: further restrict conv/linear sites to these node names."""
    keep = nodes if sites is None else nodes & set(sites)
    return Plan(attention=[a for a in plan.attention if a.softmax in nodes],
                convs=[c for c in plan.convs if c.node in keep],
                linears=[s for s in plan.linears if s.node in keep],
                residuals=[r for r in plan.residuals if r.node in nodes], stats=plan.stats)


def emitted(block: gs.Graph, plan: Plan, read_later: frozenset = frozenset()) -> onnx.ModelProto:
    """A copy of the float block graph with ``plan``'s specs emitted into it; the outputs
    in ``read_later`` (read by later blocks) as those blocks read them
    (``_requantize_leaving_outputs``)."""
    graph = block.copy()
    emit.emit(graph, plan)
    _requantize_leaving_outputs(graph, plan, read_later)
    model = gs.export_onnx(graph, do_type_check=False)
    if functions.has_log2_ops(model):
        functions.install(model)
    return model


def _requantize_leaving_outputs(graph: gs.Graph, plan: Plan, read_later: frozenset) -> None:
    """An int8 conv's output Q/DQ (the ort profile's QLinearConv) sits on its readers
    (emit.py). Where the output leaves the block its readers are in later blocks, so the
    emitted block would hand them the float output; the whole emitted model hands them the
    requantized one. Give such a block output that Q/DQ, under the output's own name (a
    model output nothing reads stays float, as in the emitted model)."""
    specs = {s.output: s.output_spec for s in plan.convs
             if s.weight_spec is not None and s.output_spec is not None}
    for i, t in enumerate(graph.outputs):
        if t.name not in specs or t.name not in read_later or not t.inputs:
            continue
        name = t.name
        t.name = emit_qdq.tensor_name(graph, name, "float")
        out = emit_qdq.quant_dequant(graph, t, specs[name].uniform_params())
        out.name = name
        graph.outputs[i] = out


def last_reads(blocks: list) -> dict:
    """Tensor -> index of the last block in ``blocks`` that reads it."""
    last = {}
    for i, block in enumerate(blocks):
        for t in block.inputs:
            last[t] = i
    return last


def read_after(run: list, i: int, last: dict) -> frozenset:
    """The outputs of the blocks ``run`` (the last one is block ``i``) that a block after
    ``i`` reads (``last``: ``last_reads`` of all blocks): those ``emitted`` requantizes."""
    return frozenset(t for b in run for t in b.outputs if last.get(t, -1) > i)


def with_outputs(model: onnx.ModelProto, names: list) -> onnx.ModelProto:
    """``model`` with extra graph outputs (intermediate tensors it computes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output} | {i.name for i in out.graph.input}
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return out


BATCH = "N"


def free_batch(model: onnx.ModelProto) -> int | None:
    """Make the leading dim of every graph input, output and value_info symbolic, in place,
    when the graph inputs fix a batch size; returns that size, or None (nothing changed).

    A model exported for batch 1 still runs any batch where its ops do not bake the batch
    in (Reshape to 0 or -1, Shape-derived shapes): the block strategies run all calibration
    samples at once and only the graph's declared shapes stand in their way. Relaxing a
    declared dim never makes a valid run fail."""
    fixed = {i.type.tensor_type.shape.dim[0].dim_value for i in model.graph.input
             if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_value}
    if not fixed:
        return None
    for info in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        dims = info.type.tensor_type.shape.dim
        if dims and dims[0].dim_value:
            dims[0].dim_param = BATCH  # clears dim_value (a oneof)
    return fixed.pop()


def run(model: onnx.ModelProto, values: dict, outputs: list | None = None) -> dict:
    """Run ``model`` on the boundary ``values`` it needs; returns its outputs by name
    (``outputs``: those only; a graph input asked for is passed through)."""
    return runner(model, outputs)(values)


def runner(model: onnx.ModelProto, outputs: list | None = None):
    """``run`` as a function of the values, one session for many calls (chunks of the
    calibration samples)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    names = [o.name for o in session.get_outputs()] if outputs is None else list(outputs)

    def run_on(values: dict) -> dict:
        feed = {name: values[name] for name in inputs}
        computed = [n for n in names if n not in feed]
        got = dict(zip(computed, session.run(computed, feed))) if computed else {}
        return {n: feed[n] if n in feed else got[n] for n in names}
    return run_on


def relative_error(got: dict, want: dict, weights: dict | None = None) -> float:
    """sum ||got - want||^2 / sum ||want||^2 over the tensors of ``got``; with ``weights``
    (per element, e.g. Fisher g^2: fisher.py) each squared term is weighted."""
    def weight(k):
        return weights[k] if weights else 1

    num = sum(float(np.sum(weight(k) * (g - want[k]) ** 2)) for k, g in got.items())
    den = sum(float(np.sum(weight(k) * want[k] ** 2)) for k in got)
    return num / max(den, 1e-30)


def sample_errors(got: dict, want: dict, n: int) -> np.ndarray:
    """Each of ``n`` samples' share of ``relative_error(got, want)``: its squared error
    over the tensors of ``got`` divided by the total sum ||want||^2, so the shares add up
    to the relative error. A tensor whose leading dim is not a multiple of ``n`` (no
    sample axis) is split evenly."""
    num = np.zeros(n)
    for k, g in got.items():
        sq = (np.asarray(g, np.float64) - want[k]) ** 2
        if sq.ndim and sq.shape[0] % n == 0:
            num += sq.reshape(n, -1).sum(axis=1)
        else:
            num += sq.sum() / n
    den = sum(float(np.sum(np.asarray(want[k], np.float64) ** 2)) for k in got)
    return num / max(den, 1e-30)


def _floating(v) -> bool:
    dtype = v.dtype
    return dtype.is_floating_point if hasattr(dtype, "is_floating_point") else \
        np.issubdtype(dtype, np.floating)


def sample_count(values: dict) -> int:
    """Samples in boundary ``values``: the gcd of the float values' leading dims (a value
    may hold n x k rows, sample-major: MobileViT's [B * patches, tokens, C])."""
    dims = [int(v.shape[0]) for v in values.values() if _floating(v) and v.ndim]
    return int(np.gcd.reduce(dims)) if dims else 1


def rows(v, idx, n: int, per_sample=None):
    """Samples ``idx`` of a boundary value (NumPy array or torch tensor) holding ``n``
    samples along dim 0, or n x k rows, sample-major. An integer value that depends on the
    number of samples (``per_sample``: its ``batch_ints`` entry; exporters bake the batch
    into Concat'ed Reshape targets: [B, C, -1], [B * nW, 49, C]) is recomputed for
    ``len(idx)`` samples. Anything else is passed whole. A ``slice`` of samples gives views
    of the float values, not copies (the walk's fitted and held-out samples, reconstruct.py)."""
    b = len(range(*idx.indices(n))) if isinstance(idx, slice) else len(idx)
    if _floating(v) and v.ndim and v.shape[0] % n == 0:
        k = v.shape[0] // n
        return v.reshape(n, k, *v.shape[1:])[idx].reshape(b * k, *v.shape[1:])
    if per_sample is not None:
        one, step = per_sample
        out = one + (b - 1) * step
        return v.new_tensor(out) if hasattr(v, "new_tensor") else out.astype(v.dtype)
    return v


def take(values: dict, idx, n: int | None = None, ints: dict | None = None) -> dict:
    """``rows`` of every boundary value (``n``: default ``sample_count``; ``ints``:
    ``batch_ints`` of the model the values come from)."""
    n = n or sample_count(values)
    ints = ints or {}
    return {k: rows(v, idx, n, ints.get(k)) for k, v in values.items()}


def batch_ints(model: onnx.ModelProto, feed: dict, types: dict) -> dict:
    """The integer values of ``model`` (scalars, shape vectors) that change with the number
    of samples, as name -> (value for 1 sample, change per added sample): the model run on
    the first sample and on the first two of ``feed`` (its graph inputs). An exported batch
    lands in shape vectors next to sizes that can equal it (TinyViT at 64 px: a window
    grid of 8 beside a batch of 8), so it is found by running, not by value. Empty where
    the model does not run on 1 and 2 samples (a fixed batch: nothing to rescale)."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16}
    names = [o for node in model.graph.node for o in node.output if o and (
        o not in types or types[o].type.tensor_type.elem_type not in floats)]
    try:
        one, two = (run(with_outputs(model, names), {k: v[:b] for k, v in feed.items()},
                        names) for b in (1, 2))
    except Exception:  # noqa: BLE001 - a model that only runs at its own batch
        return {}
    return {k: (one[k], two[k] - one[k]) for k in names
            if np.issubdtype(one[k].dtype, np.integer) and one[k].ndim <= 1
            and one[k].shape == two[k].shape and np.any(one[k] != two[k])}
