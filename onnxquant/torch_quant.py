"""The pieces torch reconstruction (reconstruct_torch.py) is built from.

    Rounding    AdaRound's learned rounding of one layer on its fixed grid (DESIGN.md §9):
                h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta 1.1, gamma -0.1
                W_soft = s (clamp(floor(W/s) + z + h(V), qmin, qmax) - z)
                codes  = clamp(floor(W/s) + z + [h(V) > 0.5], qmin, qmax)
                V starts where h(V) = W/s - floor(W/s), so W_soft starts at W (unclipped);
                or at given codes c (GPTQ's): base c or c - 1 (the side W lies on), h 0.1/0.9
    ActQuant    the fake-quant of an activation spec: uniform Q/DQ (round straight-through,
                step size optionally learned as in LSQ) or the log2 quantizer (fixed tables
                of quantizers.log2_tables, straight-through); QDrop: each element keeps its
                float value with probability ``drop``
    Samples     the calibration samples of a block's boundary values, drawn in batches

Hard codes give exactly the weight emission writes: DequantizeLinear computes
``(codes - z) * s`` in float32, as ``Rounding.hard`` does.
"""

from __future__ import annotations

import numpy as np
import torch

from . import block_runs, quantizers

ZETA, GAMMA = 1.1, -0.1


START_H = 0.1  # h of a rounding started at given codes: 0.1 below or 0.9 above 0.5


def _start_at(w_steps: np.ndarray, codes: np.ndarray) -> tuple:
    """(base, h) that decide ``codes`` (relative to the zero point) and leave the other
    rounding choice on the side of the float weight: base = codes, or codes - 1 where the
    weight lies below its code (e.g. GPTQ's codes, which may sit a step or more from W/s)."""
    codes = np.asarray(codes, np.float64)
    below = w_steps < codes
    return codes - below, np.where(below, 1.0 - START_H, START_H)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class Rounding(torch.nn.Module):
    """Learned rounding of one Layer (layers.py) as a [G, R, C] stack."""

    def __init__(self, layer, device, start_codes: np.ndarray | None = None):
        super().__init__()
        self.layer = layer
        scale, zero = layer.grid()
        w = layer.stack().astype(np.float64)
        if start_codes is None:
            base = np.floor(w / scale)
            frac = np.clip(w / scale - base, 0.0, 1.0)
        else:
            base, frac = _start_at(w / scale, start_codes - zero)
        v = -np.log((ZETA - GAMMA) / (frac - GAMMA) - 1)  # h(V) = frac
        def as_t(a):
            return torch.tensor(np.asarray(a), dtype=torch.float32, device=device)

        self.base, self.s, self.z = as_t(base), as_t(scale), as_t(zero)  # scale: float32 values
        self.v = torch.nn.Parameter(as_t(v))
        self.qmin, self.qmax = layer.params.qmin, layer.params.qmax

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def regularizer(self, beta: float) -> torch.Tensor:
        """mean(1 - |2 h - 1|^beta): 0 once every h is 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).mean()

    def codes(self) -> torch.Tensor:
        return torch.clamp(self.base + self.z + (self.h() > 0.5).float(), self.qmin, self.qmax)

    def soft_stack(self) -> torch.Tensor:
        """W_soft as [G, R, C] (differentiable in V)."""
        q = torch.clamp(self.base + self.z + self.h(), self.qmin, self.qmax)
        return (q - self.z) * self.s

    def soft(self) -> torch.Tensor:
        return self._unstack(self.soft_stack())

    def hard(self) -> torch.Tensor:
        return self._unstack((self.codes() - self.z) * self.s)

    def weight(self, soft: bool) -> torch.Tensor:
        return self.soft() if soft else self.hard().detach()

    def numpy_codes(self) -> np.ndarray:
        """Codes in the stored weight's shape and the zero point's dtype."""
        codes = self.codes().detach().cpu().numpy().astype(np.int64)
        return self.layer.unstack(codes).astype(self.layer.params.zero_point.dtype)

    def _unstack(self, s: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer.node.op_type == "Conv":
            return s.reshape(layer.weight.shape)
        return s[0].T if layer.transposed else s[0]


class ActQuant(torch.nn.Module):
    """Fake-quant of one activation spec (QuantSpec kind uniform or log2)."""

    def __init__(self, spec, device, learn_step: bool = False):
        super().__init__()
        self.kind, self.drop, self.generator = spec.kind, 0.0, None
        if spec.kind == "log2":
            p = spec.log2_params()
            thresholds, levels = quantizers.log2_tables(p)
            self.register_buffer("thresholds", torch.tensor(thresholds[:-1], device=device))
            self.register_buffer("levels", torch.tensor(levels, device=device))
            self.eps = float(p.eps)
            return
        p = spec.uniform_params()
        log_step = torch.tensor(np.log(float(p.scale.reshape(-1)[0])), device=device)
        self.log_step = torch.nn.Parameter(log_step) if learn_step else log_step
        self.zero, self.qmin, self.qmax = float(p.zero_point.reshape(-1)[0]), p.qmin, p.qmax

    @property
    def learned(self) -> bool:
        return isinstance(getattr(self, "log_step", None), torch.nn.Parameter)

    @property
    def step(self) -> torch.Tensor:
        """The step size, kept as its log while learned: Adam's updates are then relative
        (LSQ's gradient scaling solves the same problem of one lr for every magnitude)."""
        return self.log_step.exp()

    def step_value(self) -> np.float32:
        """The step as emission writes it (float32)."""
        return np.float32(self.step.detach().cpu())

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "log2":
            xm = torch.clamp(x.detach(), min=self.eps).contiguous()
            y = self.levels[torch.searchsorted(self.thresholds, xm, right=True)]
            return x + (y - x).detach()
        q = torch.clamp(_round_ste(x / self.step) + self.zero, self.qmin, self.qmax)
        return (q - self.zero) * self.step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantize(x)
        if self.drop <= 0:
            return y
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) < self.drop
        return torch.where(keep, x, y)


def block_hooks(plan, model, device, learn_steps=frozenset(), layers=None) -> tuple:
    """(hooks, input_hooks, {tensor: quantizer}) for torch_graph.GraphModule.run from the
    block's specs, placed as emit.py places them: the log2/uniform op on each attention
    output and a conv's output Q/DQ (every reader), the activation Q/DQ of a conv/linear
    input and of a residual skip (those readers only; one quantizer per tensor, the first
    spec's, as emission shares one Q/DQ). ``learn_steps``: tensors whose uniform step is a
    parameter (LSQ); ``layers``: the nodes whose input specs apply (default all)."""
    hooks, inputs, by_tensor = {}, {}, {}
    nodes = {n.name: n for n in model.graph.node}

    def quantizer(tensor, spec):
        if tensor not in by_tensor:
            by_tensor[tensor] = ActQuant(spec, device, tensor in learn_steps)
        return by_tensor[tensor]

    for site in plan.attention:
        if site.spec is not None:
            hooks[site.output] = quantizer(site.output, site.spec)
    for site in plan.convs + plan.linears:
        if site.weight_spec is None or (layers is not None and site.node not in layers):
            continue
        if getattr(site, "input_spec", None) is not None:
            inputs[site.node, 0] = quantizer(site.input, site.input_spec)
        if getattr(site, "output_spec", None) is not None:
            hooks[site.output] = quantizer(site.output, site.output_spec)
    for site in plan.residuals:
        if site.spec is not None and site.node in nodes:
            index = list(nodes[site.node].input).index(site.skip)
            inputs[site.node, index] = quantizer(site.skip, site.spec)
    return hooks, inputs, by_tensor


class Samples:
    """Boundary values (name -> array over the calibration samples) as torch tensors."""

    def __init__(self, values: dict, device, n: int | None = None, ints: dict | None = None):
        self.values = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
                       for k, v in values.items()}
        self.n = n or block_runs.sample_count(self.values)
        self.ints = ints or {}  # block_runs.batch_ints: shape values rescaled by take

    def take(self, idx: torch.Tensor | None) -> dict:
        if idx is None:
            return dict(self.values)
        return block_runs.take(self.values, idx, self.n, self.ints)
