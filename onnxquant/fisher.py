"""Output sensitivity of intermediate tensors: the diagonal Fisher weights of ``--auto``
with ``search_metric="fisher"`` (the Hessian-guided metric of PTQ4ViT / Q-HyViT, DESIGN.md §8).

For a tensor O inside the model and the model's float prediction y_hat (argmax over the last
axis of each output: class logits, or CTC probabilities per position), the task loss
L = CE(model(x), y_hat) has, to second order, E[dL] ~ 1/2 sum (dL/dO)^2 (O_q - O)^2 (the
Fisher approximation of the Hessian). So the block error of a candidate becomes

    err = sum g^2 (Y_q - Y)^2 / sum g^2 Y^2,   g = dL/dY on each calibration sample,

instead of the plain relative squared error. The gradients come from one forward and one
backward pass of the whole float model in torch (torch_graph.py) on the search samples.
"""

from __future__ import annotations

import numpy as np
import onnx

from .errors import UserError


def _loss(outputs: list):
    """Cross entropy against the model's own argmax, every output, last axis = classes;
    an output that already holds probabilities (non-negative, sums to 1) is taken as such."""
    import torch

    total = 0.0
    for y in outputs:
        if not y.is_floating_point() or y.dim() == 0 or y.shape[-1] < 2:
            continue
        flat = y.reshape(-1, y.shape[-1])
        is_prob = bool((flat.detach() >= 0).all()) and bool(
            torch.allclose(flat.detach().sum(-1), torch.ones(len(flat)), atol=1e-3))
        logp = torch.log(flat.clamp_min(1e-12)) if is_prob else torch.log_softmax(flat, -1)
        total = total + torch.nn.functional.nll_loss(logp, flat.detach().argmax(-1),
                                                     reduction="sum")
    return total


def sensitivities(model: onnx.ModelProto, names: list, feed: dict) -> dict:
    """{tensor: (dL/dO)^2 per element on ``feed``} for the float tensors ``names``."""
    try:
        import torch

        from .torch_graph import GraphModule
    except ImportError as exc:
        raise UserError(f"search_metric 'fisher' needs torch: pip install 'onnxquant[torch]' "
                        f"({exc})") from exc
    try:
        module = GraphModule(model)
    except NotImplementedError as exc:
        raise UserError(f"search_metric 'fisher': {exc}; use the default metric") from exc
    kept = {}

    def keep(name):
        def hook(value):
            if value.is_floating_point() and value.requires_grad:
                kept[name] = value
            return value
        return hook

    with torch.enable_grad():
        inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
        for value in inputs.values():  # every float tensor downstream joins the graph
            if value.is_floating_point():
                value.requires_grad_(True)
        out = module.run(inputs, hooks={n: keep(n) for n in names})
        loss = _loss(list(out.values()))
        if not torch.is_tensor(loss):
            raise UserError("search_metric 'fisher': no float model output with classes "
                            "on its last axis to take a cross entropy of")
        grads = torch.autograd.grad(loss, list(kept.values()), allow_unused=True)
    found = {n: (g.detach().numpy().astype(np.float32) ** 2 if g is not None
                 else np.zeros(kept[n].shape, np.float32))
             for n, g in zip(kept, grads)}
    return {n: found.get(n) for n in names if n in found}
