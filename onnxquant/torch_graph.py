"""A differentiable executor of an ONNX (block) model in torch, for reconstruction.

    feed {name: tensor} -> node by node (torch_ops.OPS) -> {output name: tensor}
                 ^ weights: initializer name -> tensor or callable (learned W_hat)
                 ^ hooks: tensor name -> fn (fake-quant of a produced tensor, all readers)
                 ^ input_hooks: (node name, input index) -> fn (fake-quant seen by one reader)

The graph is interpreted node by node, so every intermediate tensor can be read back
(``keep``) or replaced on the way, and gradients reach whatever the caller substitutes.
A value is dropped after its last reader (unless asked for), so a run holds the live
values only, as onnxruntime does, plus what autograd saves for the backward pass: on
MGRQ's global term the tail is most of the model.
Initializers are buffers (``trainable=True``: float ones become parameters, BatchNorm
statistics excepted, for tools/onnx2torch_compare.py's gradient check). An input hook
applied through the same function object to the same tensor runs once per ``run`` and is
shared by its readers, as emission shares one Q/DQ per tensor (emit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.utils.checkpoint import checkpoint

from .torch_ops import OPS, attribute


def resolve(name: str, alias: dict) -> str:
    """The initializer behind an Identity chain (torch.onnx de-duplicates equal tensors)."""
    while name in alias:
        name = alias[name]
    return name


def missing_ops(model: onnx.ModelProto) -> list:
    """Op types of ``model`` this executor cannot run."""
    return sorted({n.op_type for n in model.graph.node
                   if n.op_type not in OPS and n.op_type != "Constant"})


class GraphModule(torch.nn.Module):
    """Run an ONNX graph in torch, node by node."""

    def __init__(self, model: onnx.ModelProto, trainable: bool = False):
        super().__init__()
        self.opset = next((o.version for o in model.opset_import
                           if o.domain in ("", "ai.onnx")), 13)
        missing = missing_ops(model)
        if missing:
            raise NotImplementedError(f"ops not implemented: {', '.join(missing)}")
        self.params, self.names = torch.nn.ParameterList(), {}
        alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
        stats = {resolve(t, alias) for n in model.graph.node
                 if n.op_type == "BatchNormalization" for t in n.input[3:5]}
        for init in model.graph.initializer:
            value = torch.from_numpy(numpy_helper.to_array(init).copy())
            if trainable and value.is_floating_point() and init.name not in stats:
                self.names[init.name] = ("p", len(self.params))
                self.params.append(torch.nn.Parameter(value))
            else:
                self.names[init.name] = ("b", f"buf{len(self.names)}")
                self.register_buffer(f"buf{len(self.names) - 1}", value)
        self.nodes = []
        for node in model.graph.node:
            attrs = {a.name: attribute(a) for a in node.attribute}
            attrs["_n_outputs"] = len(node.output)
            if node.op_type == "Constant":
                self.register_buffer(f"const{len(self.nodes)}", next(
                    v if torch.is_tensor(v) else torch.tensor(v) for k, v in attrs.items()
                    if k != "_n_outputs"))
            self.nodes.append((node.op_type, node.name, list(node.input), list(node.output),
                               attrs))
        self.inputs = [i.name for i in model.graph.input if i.name not in self.names]
        self.outputs = [o.name for o in model.graph.output]
        self.dead_after = _dead_after(self.nodes)

    def initializer(self, name: str) -> torch.Tensor:
        kind, key = self.names[name]
        return self.params[key] if kind == "p" else getattr(self, key)

    def run(self, feed: dict, outputs=None, weights=None, hooks=None, input_hooks=None,
            keep=()) -> dict:
        """Values of ``outputs`` (None: the graph's; [] none) and of the tensors in ``keep``."""
        quant = _Quant(weights or {}, hooks or {}, input_hooks or {})
        outputs = self.outputs if outputs is None else outputs
        wanted = set(outputs) | set(keep)
        env = {name: quant.hooks[name](feed[name]) if name in quant.hooks else feed[name]
               for name in self.inputs}
        for k in range(len(self.nodes)):
            self._step(k, env, wanted, quant)
        return {t: env[t] for t in list(outputs) + list(keep)}

    def run_checkpointed(self, feed: dict, outputs=None, parts: int | None = None) -> dict:
        """``run`` of the float graph (no weights, no hooks) in ``parts`` consecutive runs of
        nodes (default about sqrt(nodes)), each under activation checkpointing: autograd
        keeps the values live between parts, and recomputes one part's saved tensors at a
        time in the backward pass (one more forward). MGRQ's global term runs the rest of
        the model with gradients this way."""
        wanted = set(outputs or self.outputs)
        parts = parts or max(1, round(len(self.nodes) ** 0.5))
        bounds = np.linspace(0, len(self.nodes), parts + 1).round().astype(int)
        env = {name: feed[name] for name in self.inputs}

        def part(start: int, stop: int, live: dict) -> dict:
            live = dict(live)
            for k in range(start, stop):
                self._step(k, live, wanted)
            return live

        for start, stop in zip(bounds[:-1], bounds[1:]):
            if start < stop:
                env = checkpoint(part, int(start), int(stop), env, use_reentrant=False)
        return {t: env[t] for t in (outputs or self.outputs)}

    def _step(self, k: int, env: dict, wanted: set, quant: _Quant | None = None) -> None:
        """Run node ``k`` into ``env`` (float, or with ``quant``'s weights and hooks); drop
        the values it is the last reader of."""
        quant = quant or _FLOAT
        op, name, ins, outs, attrs = self.nodes[k]
        if op == "Constant":
            env[outs[0]] = getattr(self, f"const{k}")
            return
        values = [self._value(t, env, quant.weights) for t in ins]
        for i, t in enumerate(ins):
            fn = quant.input_hooks.get((name, i))
            if fn is not None:
                seen = quant.shared.setdefault(t, {})
                if fn not in seen:
                    seen[fn] = fn(values[i])
                values[i] = seen[fn]
        result = OPS[op](attrs, values, self.opset)
        for out, value in zip(outs, result if isinstance(result, list) else [result]):
            env[out] = quant.hooks[out](value) if out in quant.hooks else value
        for t in self.dead_after[k]:
            if t not in wanted:
                env.pop(t, None)
                quant.shared.pop(t, None)

    def _value(self, name: str, env: dict, weights: dict):
        if not name:
            return None
        if name in env:
            return env[name]
        if name in weights:
            w = weights[name]
            return w() if callable(w) else w
        return self.initializer(name)

    def forward(self, *args):
        out = list(self.run(dict(zip(self.inputs, args))).values())
        return out[0] if len(out) == 1 else out


@dataclass
class _Quant:
    """What one ``run`` substitutes: learned weights, output and input hooks, and the
    input hooks' values per tensor (tensor -> {hook: value}: one fake-quant per tensor)."""

    weights: dict
    hooks: dict
    input_hooks: dict
    shared: dict = field(default_factory=dict)


_FLOAT = _Quant({}, {}, {})  # no substitution: never holds a shared value


def _dead_after(nodes: list) -> list:
    """Per node, the tensors it is the last reader of."""
    last = {}
    for k, (_, _, ins, _, _) in enumerate(nodes):
        last.update((t, k) for t in ins if t)
    dead = [[] for _ in nodes]
    for t, k in last.items():
        dead[k].append(t)
    return dead


OnnxInterpreter = GraphModule  # the name tools/onnx2torch_compare.py reports it under
