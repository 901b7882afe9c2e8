"""Tiny hybrid graphs in ONNX text format, and the NumPy reference the pass tests compare to.

Every graph takes one image ``x: float[N, C, 4, 4]`` (16 tokens) so that calibration works;
weights are seeded ``np.random.default_rng`` draws attached with ``numpy_helper``. Node
names are the role of the node (``attn_qk``, ``attn_softmax``, ``conv_in``, ...).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxquant
from onnxquant import QuantConfig, quantizers
from onnxquant.config import DEFAULT_LOG2_EPS
from onnxquant.functions import DOMAIN, OP_TYPE

HW, TOKENS = 4, 16
SDPA_VARIANTS = ("plain", "mul", "div", "add_bias", "levit")


class Builder:
    """Accumulates text-format node lines and their seeded initializers."""

    def __init__(self, seed: int = 0, channels: int = 4, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.channels, self.opset = channels, opset
        self.lines, self.weights, self.extra_inputs, self.constants = [], {}, [], []

    def add(self, name: str, array) -> str:
        self.weights[name] = np.asarray(array)
        return name

    def randn(self, name: str, shape, scale: float = 1.0) -> str:
        return self.add(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def node(self, line: str) -> None:
        self.lines.append(line)

    def constant(self, name: str, shape, scale: float = 1.0) -> str:
        """A seeded tensor produced by a ``Constant`` node (named ``{name}_constant``)."""
        value = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.constants.append(helper.make_node("Constant", [], [name], name=f"{name}_constant",
                                               value=numpy_helper.from_array(value, name)))
        return name

    def conv(self, name: str, inp: str, cin: int, cout: int, k: int = 1, group: int = 1,
             weight: str | None = None) -> str:
        """Conv with a 'same' padding and a bias; ``weight`` overrides the initializer."""
        fan_in = cin // group * k * k
        w = weight or self.randn(f"{name}_w", (cout, cin // group, k, k), fan_in**-0.5)
        b = self.randn(f"{name}_b", (cout,), 0.1)
        p = k // 2
        self.node(f"[{name}] {name}_out = Conv<group={group}, pads=[{p},{p},{p},{p}]>"
                  f"({inp}, {w}, {b})")
        return f"{name}_out"

    def relu(self, name: str, inp: str) -> str:
        self.node(f"[{name}] {name}_out = Relu({inp})")
        return f"{name}_out"

    def sdpa(self, p: str, inp: str, ch: int = 8, variant: str = "plain") -> str:
        """image -> tokens -> MatMul(q, kT) -> [variant] -> Softmax -> MatMul(., v) -> image."""
        self.add(f"{p}_tok_shape", np.array([0, ch, TOKENS], np.int64))
        self.add(f"{p}_img_shape", np.array([0, ch, HW, HW], np.int64))
        self.node(f"[{p}_to_tokens] {p}_r = Reshape({inp}, {p}_tok_shape)")
        self.node(f"[{p}_tokens] {p}_t = Transpose<perm=[0,2,1]>({p}_r)")
        for proj in "qkv":
            w = self.randn(f"{p}_w{proj}", (ch, ch), ch**-0.5)
            self.node(f"[{p}_{proj}_proj] {p}_{proj} = MatMul({p}_t, {w})")
        self.node(f"[{p}_k_t] {p}_kt = Transpose<perm=[0,2,1]>({p}_k)")
        self.node(f"[{p}_qk] {p}_s = MatMul({p}_q, {p}_kt)")
        logits = self._scores(p, f"{p}_s", variant, ch)
        self.node(f"[{p}_softmax] {p}_p = Softmax<axis=-1>({logits})")
        self.node(f"[{p}_av] {p}_o = MatMul({p}_p, {p}_v)")
        self.node(f"[{p}_from_tokens] {p}_ot = Transpose<perm=[0,2,1]>({p}_o)")
        self.node(f"[{p}_to_image] {p}_img = Reshape({p}_ot, {p}_img_shape)")
        return f"{p}_img"

    def _scores(self, p: str, s: str, variant: str, ch: int) -> str:
        if variant == "plain":  # MobileViT v1: scale applied to q before
            return s
        alpha = f"{p}_alpha"
        if variant in ("mul", "levit"):
            self.add(alpha, np.float32(ch**-0.5))
        if variant == "mul":  # EdgeNeXt
            self.node(f"[{p}_scale] {p}_logits = Mul({s}, {alpha})")
        elif variant == "div":
            beta = self.add(f"{p}_beta", np.float32(ch**0.5))
            self.node(f"[{p}_scale] {p}_logits = Div({s}, {beta})")
        elif variant == "add_bias":  # TinyViT
            bias = self.randn(f"{p}_bias_w", (TOKENS, TOKENS))
            self.node(f"[{p}_bias] {p}_logits = Add({s}, {bias})")
        elif variant == "levit":  # EfficientFormer v1 / LeViT: bias gathered from a table, first
            self.node(f"[{p}_scale] {p}_sc = Mul({s}, {alpha})")
            table = self.randn(f"{p}_bias_table", (31,))
            idx = self.rng.integers(0, 31, (TOKENS, TOKENS)).astype(np.int64)
            self.node(f"[{p}_bias_gather] {p}_b = Gather<axis=0>({table}, "
                      f"{self.add(f'{p}_bias_idx', idx)})")
            self.node(f"[{p}_bias] {p}_logits = Add({p}_b, {p}_sc)")
        else:
            raise ValueError(variant)
        return f"{p}_logits"

    def talking_heads(self, p: str, inp: str, ch: int = 8, heads: int = 2) -> str:
        """EfficientFormer v2: MatMul -> Mul -> Add -> Conv1x1 -> Softmax -> Conv1x1 -> MatMul."""
        d = ch // heads
        qkv = self.conv(f"{p}_qkv", inp, ch, 3 * ch)
        self.add(f"{p}_split", np.array([ch, ch, ch], np.int64))
        self.add(f"{p}_heads_shape", np.array([0, heads, d, TOKENS], np.int64))
        self.add(f"{p}_img_shape", np.array([0, ch, HW, HW], np.int64))
        self.node(f"[{p}_split_qkv] {p}_q, {p}_k, {p}_v = Split<axis=1>({qkv}, {p}_split)")
        for t in "qkv":
            self.node(f"[{p}_{t}_heads] {p}_{t}h = Reshape({p}_{t}, {p}_heads_shape)")
        self.node(f"[{p}_q_t] {p}_qt = Transpose<perm=[0,1,3,2]>({p}_qh)")
        self.node(f"[{p}_v_t] {p}_vt = Transpose<perm=[0,1,3,2]>({p}_vh)")
        self.node(f"[{p}_qk] {p}_s = MatMul({p}_qt, {p}_kh)")
        alpha = self.add(f"{p}_alpha", np.float32(d**-0.5))
        self.node(f"[{p}_scale] {p}_sc = Mul({p}_s, {alpha})")
        bias = self.randn(f"{p}_bias_w", (heads, TOKENS, TOKENS))
        self.node(f"[{p}_bias] {p}_sb = Add({p}_sc, {bias})")
        pre = self.conv(f"{p}_th_pre", f"{p}_sb", heads, heads)
        self.node(f"[{p}_softmax] {p}_p = Softmax<axis=-1>({pre})")
        post = self.conv(f"{p}_th_post", f"{p}_p", heads, heads)
        self.node(f"[{p}_av] {p}_o = MatMul({post}, {p}_vt)")
        self.node(f"[{p}_o_t] {p}_ot = Transpose<perm=[0,1,3,2]>({p}_o)")
        self.node(f"[{p}_merge] {p}_img = Reshape({p}_ot, {p}_img_shape)")
        return f"{p}_img"

    def separable(self, p: str, inp: str, ch: int = 8) -> str:
        """MobileViT v2: Conv1x1 -> Split -> Softmax(-1) -> Mul -> ReduceSum, * ReLU(value)."""
        qkv = self.conv(f"{p}_qkv", inp, ch, 1 + 2 * ch)
        self.add(f"{p}_split", np.array([1, ch, ch], np.int64))
        self.add(f"{p}_axes", np.array([-1], np.int64))
        self.node(f"[{p}_split_qkv] {p}_query, {p}_key, {p}_value = "
                  f"Split<axis=1>({qkv}, {p}_split)")
        self.node(f"[{p}_softmax] {p}_scores = Softmax<axis=-1>({p}_query)")
        self.node(f"[{p}_weigh] {p}_ctx = Mul({p}_key, {p}_scores)")
        self.node(f"[{p}_reduce] {p}_ctxv = ReduceSum<keepdims=1>({p}_ctx, {p}_axes)")
        self.node(f"[{p}_relu] {p}_vr = Relu({p}_value)")
        self.node(f"[{p}_apply] {p}_out = Mul({p}_vr, {p}_ctxv)")
        return self.conv(f"{p}_proj", f"{p}_out", ch, ch)

    def head(self, p: str, inp: str, ch: int, classes: int = 10) -> str:
        """Classifier: GlobalAveragePool -> Flatten -> Gemm -> Softmax (the graph output)."""
        w = self.randn(f"{p}_fc_w", (classes, ch), ch**-0.5)
        b = self.randn(f"{p}_fc_b", (classes,), 0.1)
        self.node(f"[{p}_pool] {p}_g = GlobalAveragePool({inp})")
        self.node(f"[{p}_flatten] {p}_f = Flatten({p}_g)")
        self.node(f"[{p}_fc] {p}_logits = Gemm<transB=1>({p}_f, {w}, {b})")
        self.node(f"[{p}_softmax] probs = Softmax<axis=-1>({p}_logits)")
        return "probs"

    def build(self, outputs: dict, domains: str = "") -> onnx.ModelProto:
        """``outputs``: name -> text type, e.g. {"y": "float[N,4,4,4]"}."""
        inputs = [f"float[N,{self.channels},{HW},{HW}] x", *self.extra_inputs]
        outs = ", ".join(f"{t} {n}" for n, t in outputs.items())
        body = "\n    ".join(self.lines)
        opsets = f'"" : {self.opset}{domains}'
        model = onnx.parser.parse_model(
            f"<ir_version: 8, opset_import: [{opsets}]>\n"
            f"tiny ({', '.join(inputs)}) => ({outs}) {{\n    {body}\n}}")
        model.graph.initializer.extend(numpy_helper.from_array(a, n)
                                       for n, a in self.weights.items())
        nodes = self.constants + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.checker.check_model(model, full_check=True)
        return model


def sdpa_model(variant: str = "plain", head: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x -> conv_in (3x3) -> sdpa attention -> conv_out (1x1) [-> classifier head]."""
    b = Builder(seed)
    h = b.sdpa("attn", b.conv("conv_in", "x", 4, 8, k=3), variant=variant)
    y = b.conv("conv_out", h, 8, 4)
    if head:
        return b.build({b.head("head", y, 4): "float[N,10]"})
    return b.build({y: "float[N,4,4,4]"})


def mixed_model(seed: int = 0) -> onnx.ModelProto:
    """stem (conv_block) -> conv_in (bridge) -> sdpa -> conv_out (bridge) -> tail (conv_block)."""
    b = Builder(seed)
    h = b.relu("stem_act", b.conv("stem", "x", 4, 8, k=3))
    h = b.sdpa("attn", b.conv("conv_in", h, 8, 8), variant="mul")
    h = b.relu("out_act", b.conv("conv_out", h, 8, 8))
    return b.build({b.conv("tail", h, 8, 4, k=3): "float[N,4,4,4]"})


def talking_heads_model(seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed)
    h = b.talking_heads("attn", b.conv("conv_in", "x", 4, 8, k=3))
    return b.build({b.conv("conv_out", h, 8, 4): "float[N,4,4,4]"})


def separable_model(seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed)
    h = b.separable("attn", b.conv("conv_in", "x", 4, 8, k=3))
    return b.build({b.conv("conv_out", h, 8, 4, k=3): "float[N,4,4,4]"})


def head_model(seed: int = 0) -> onnx.ModelProto:
    """A pure CNN classifier: its only Softmax is the graph output."""
    b = Builder(seed)
    h = b.relu("act", b.conv("stem", "x", 4, 8, k=3))
    return b.build({b.head("head", h, 8): "float[N,10]"})


def conv_chain_model(seed: int = 0) -> onnx.ModelProto:
    b = Builder(seed)
    h = b.relu("act1", b.conv("conv1", "x", 4, 8, k=3))
    h = b.relu("act2", b.conv("conv2", h, 8, 8, k=3))
    return b.build({b.conv("conv3", h, 8, 4): "float[N,4,4,4]"})


# ---- running and the NumPy reference -------------------------------------------------------

def calibration(n: int = 8, channels: int = 4, seed: int = 1) -> np.ndarray:
    """Seeded N x C x 4 x 4 float32 images (seed 1: calibration; tests use seed 2)."""
    return np.random.default_rng(seed).standard_normal((n, channels, HW, HW)).astype(np.float32)


def quantize(model: onnx.ModelProto, calib=None, **config) -> onnxquant.Result:
    """``onnxquant.run`` on a copy: run() adds its opset to the caller's model (test_passes)."""
    return onnxquant.run(_copy(model), QuantConfig(**config), calibration=calib, progress=False)


def run_ort(model: onnx.ModelProto, feeds: dict, outputs: list | None = None) -> list:
    """Run ``model`` on CPU; ``outputs`` may name intermediate tensors."""
    if outputs is not None:
        model = _copy(model)
        del model.graph.output[:]
        model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def output_error(model: onnx.ModelProto, quant: onnx.ModelProto, x: np.ndarray) -> float:
    """sum (y_q - y)^2 / sum y^2 of the first output on ``x``."""
    (y,), (yq,) = run_ort(model, {"x": x}), run_ort(quant, {"x": x})
    return float(np.sum((y - yq) ** 2) / np.sum(y ** 2))


# low-bit recipes on which a reconstruction must beat its baseline on held-out inputs
LOW_BIT_CASES = [
    (conv_chain_model, {"weight_bits": 3, "per_channel": True, "weight_symmetric": True}),
    (mixed_model, {"weight_bits": 3, "per_channel": True}),
    (mixed_model, {"target": "tensorrt", "weight_bits": 4, "act_bits": 8}),
]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def weight_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    """Value of ``name``: an initializer, a Constant node's value, or either behind Identity."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    while name not in inits:
        node = producers[name]
        if node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        assert node.op_type == "Identity", node.op_type
        name = node.input[0]
    return numpy_helper.to_array(inits[name])


def log2_params_from(model: onnx.ModelProto, calibration: np.ndarray, tensors: list,
                     bits: int = 8, eps: float = DEFAULT_LOG2_EPS) -> dict:
    """Calibrated log2 parameters per tensor: min/max over ``calibration`` in onnxruntime."""
    values = run_ort(model, {"x": calibration}, tensors) if tensors else []
    return {t: quantizers.log2_params(v.min(), v.max(), bits, eps)
            for t, v in zip(tensors, values)}


def reference(float_model: onnx.ModelProto, feeds: dict, convs: list, log2: dict,
              outputs: list, weight_fq=quantizers.uniform_fake_quant) -> list:
    """Outputs of ``float_model`` on ``feeds`` with NumPy fake quantization substituted.

    Conv ``convs`` get ``weight_fq(W)`` as a float initializer; each Softmax output in
    ``log2`` (name -> Log2Params) is computed (stage 1), passed through
    ``quantizers.log2_fake_quant`` in NumPy and fed back as a graph input (stage 2).
    """
    ref = _copy(float_model)
    for node in ref.graph.node:
        if node.name in convs:
            w = weight_fq(weight_value(ref, node.input[1]))
            ref.graph.initializer.append(numpy_helper.from_array(w, f"{node.name}_ref_w"))
            node.input[1] = f"{node.name}_ref_w"
    probs = run_ort(ref, feeds, list(log2)) if log2 else []
    feeds = dict(feeds)
    for (name, params), p in zip(log2.items(), probs):
        feeds[name] = quantizers.log2_fake_quant(p, params)
        producer = next(n for n in ref.graph.node if name in n.output)
        producer.output[list(producer.output).index(name)] = f"{name}_ref_raw"
        ref.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return run_ort(ref, feeds, outputs)


def error_budget(log2_scales, n_uniform: int, bits: int = 8) -> float:
    """First-order bound on max|quantized - float| / max|float| at the graph output.

    log2: inside the calibrated range a probability p comes back as p * 2^(s d), |d| <= 1/2,
    so it moves by at most 2^(s/2) - 1 relative, and so does the non-negative weighted sum
    over tokens that consumes it. Uniform weights: the step is at most 2 max|W| / (2^b - 1)
    (range widened to 0) or max|W| / (2^(b-1) - 1) (symmetric), so |W - W_hat| <= max|W| /
    (2^b - 2) per conv, and likewise for an activation in front of a conv: ``n_uniform``
    such tensors. Layer errors add at first order. Measured on these graphs: 0.3-0.75 of
    this budget (largest for sdpa_add_bias, s = 0.063, output error 2.2%).
    """
    return sum(2 ** (s / 2) - 1 for s in log2_scales) + n_uniform / (2**bits - 2)


# ---- structure of a quantized model --------------------------------------------------------

def nodes_by_name(model: onnx.ModelProto) -> dict:
    return {n.name: n for n in model.graph.node}


def consumers(model: onnx.ModelProto, tensor: str) -> list:
    """(node name, input slot) of every use of ``tensor``, sorted."""
    return sorted((n.name, i) for n in model.graph.node for i, t in enumerate(n.input)
                  if t == tensor)


def producer_of(model: onnx.ModelProto, tensor: str):
    return next((n for n in model.graph.node if tensor in n.output), None)


def log2_nodes(model: onnx.ModelProto) -> list:
    return [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]


def assert_log2_after(float_model, quant_model, softmax: str) -> onnx.NodeProto:
    """The log2 node reads the Softmax output alone and feeds exactly its former consumers."""
    sm = nodes_by_name(quant_model)[softmax]
    uses = consumers(quant_model, sm.output[0])
    assert len(uses) == 1, uses
    node = nodes_by_name(quant_model)[uses[0][0]]
    assert (node.op_type, node.domain, list(node.input)) == (OP_TYPE, DOMAIN, [sm.output[0]])
    assert consumers(quant_model, node.output[0]) == consumers(float_model, sm.output[0])
    assert {a.name for a in node.attribute} == {"bits", "scale", "zero_point", "eps",
                                                 "plugin_namespace", "plugin_version"}
    return node


def weight_dq(model: onnx.ModelProto, conv: str):
    """(DequantizeLinear node, codes, scale, zero point) feeding the weight of ``conv``."""
    node = nodes_by_name(model)[conv]
    dq = producer_of(model, node.input[1])
    assert dq is not None and dq.op_type == "DequantizeLinear", (conv, dq)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    codes, scale = inits[dq.input[0]], inits[dq.input[1]]
    return dq, codes, scale, inits[dq.input[2]]


def attr(node: onnx.NodeProto, name: str):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)
