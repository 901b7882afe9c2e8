"""The paper's Figure 3 for any model: conv-block weights vs post-Softmax activations.

Conv weights are bell-shaped around 0 (a uniform grid suits them); attention probabilities
pile up near 0 with a long tail to 1 (a uniform grid wastes its codes there; a log2 grid
does not). Needs matplotlib (``pip install 'onnxquant[plots]'``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from .calibrate import batches, model_input, probe_session
from .errors import UserError
from .graph import constant_value
from .plan import Plan

SAMPLE = 200_000  # values kept per histogram (a seeded subsample)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plots needs matplotlib: pip install 'onnxquant[plots]'") from None
    return plt


def _subsample(values: np.ndarray, rng) -> np.ndarray:
    values = values.ravel()
    return values if values.size <= SAMPLE else rng.choice(values, SAMPLE, replace=False)


def conv_weights(model, plan: Plan, role: str = "conv_block") -> np.ndarray:
    graph = gs.import_onnx(model)
    nodes = {n.name: n for n in graph.nodes}
    ws = [constant_value(nodes[c.node].inputs[1]).ravel() for c in plan.convs if c.role == role]
    return np.concatenate(ws) if ws else np.zeros(0, np.float32)


def softmax_values(model, plan: Plan, source, preprocess, cfg) -> np.ndarray:
    tensors = [a.output for a in plan.attention]
    if not tensors:
        return np.zeros(0, np.float32)
    name, shape = model_input(model)
    session, rng, kept = probe_session(model, tensors), np.random.default_rng(0), []
    for _, batch in batches(source, name, shape, cfg, preprocess):
        kept += [_subsample(v, rng) for v in session.run(tensors, {name: batch})]
    return _subsample(np.concatenate(kept), rng)


def write_plots(model, plan: Plan, source, preprocess, cfg, folder: Path) -> list[Path]:
    """Write the two Figure-3 panels as PNG into ``folder``; returns the paths."""
    plt = _pyplot()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot create the plots folder ({exc.strerror})") from None
    rng = np.random.default_rng(0)
    w = _subsample(conv_weights(model, plan), rng)
    x = softmax_values(model, plan, source, preprocess, cfg)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist(w, bins=200, color="tab:blue")
    axes[0].set(title=f"conv-block weights ({w.size:,} sampled)", xlabel="weight", ylabel="count")
    axes[1].hist(x, bins=200, color="tab:orange", log=True)
    axes[1].set(title="post-Softmax activations", xlabel="probability", ylabel="count (log)")
    axes[2].hist(np.log2(np.maximum(x, 2.0**-40)), bins=200, color="tab:green")
    axes[2].set(title="post-Softmax activations, log2 domain", xlabel="log2(probability)")
    fig.tight_layout()
    out = folder / "figure3_distributions.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]
