"""GPTQ's core in NumPy (onnxquant/gptq.py) against the same algorithm in torch, on the
layer shapes of the models here: which is faster on this machine (issue 12 asks).

    python tools/bench_gptq.py [--repeats 5] [--threads 2]

Shapes [G, R, C] (groups, output rows, input columns): a depthwise 3x3 conv with 256
channels, a pointwise conv 256 -> 512, a dense 3x3 conv 256 -> 256 (C = 2304) and a
transformer linear 144 -> 288. H comes from 16384 random correlated samples; the timing
covers the factorization and the column loop (not H), median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from onnxquant import gptq  # noqa: E402

SHAPES = {"depthwise 3x3, 256 ch": (256, 1, 9), "pointwise 256->512": (1, 512, 256),
          "dense 3x3 256->256": (1, 256, 2304), "linear 144->288": (1, 288, 144)}


def problem(shape, seed=0):
    g, r, c = shape
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((g, r, c))
    x = np.matmul(rng.standard_normal((g, c, c)) / c**0.5,
                  rng.standard_normal((g, c, 4096)).astype(np.float32))
    h = gptq.hessian(x)
    scale = np.abs(w).max(axis=2) / 7
    return w, h, scale, np.zeros_like(scale)


def torch_gptq(w, h, scale, zero, qmin, qmax, damp=gptq.DAMP, block=gptq.BLOCK):
    """The algorithm of gptq.gptq (act order, lazy blocks) in torch float64."""
    import torch

    w, h = torch.from_numpy(w.copy()), torch.from_numpy(h.copy())
    s, z = torch.from_numpy(scale)[..., None], torch.from_numpy(zero)[..., None]
    diag = torch.diagonal(h, dim1=1, dim2=2)
    h = h + damp * diag.mean(1)[:, None, None] * torch.eye(h.shape[1], dtype=h.dtype)
    order = torch.argsort(-diag.mean(0), stable=True)
    w, h = w[:, :, order], h[:, order][:, :, order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty_like(w)
    cols = w.shape[2]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        err = torch.empty(w.shape[0], w.shape[1], i2 - i1, dtype=w.dtype)
        for i in range(i1, i2):
            q = torch.clamp(torch.round(w[:, :, i:i + 1] / s) + z, qmin, qmax)
            codes[:, :, i] = q[:, :, 0]
            e = (w[:, :, i] - (q[:, :, 0] - z[:, :, 0]) * s[:, :, 0]) / u[:, i, i][:, None]
            w[:, :, i:i2] -= e[:, :, None] * u[:, None, i, i:i2]
            err[:, :, i - i1] = e
        w[:, :, i2:] -= torch.matmul(err, u[:, i1:i2, i2:])
    out = torch.empty_like(codes)
    out[:, :, order] = codes
    return out.numpy()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(benchlib.header(benchlib.machine(), benchlib.command_line("tools/bench_gptq.py", argv)))
    print("| layer [G, R, C] | NumPy ms | torch ms | torch / NumPy | same codes |")
    print("|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        w, h, scale, zero = problem(shape)
        t_np, c_np = timed(lambda: gptq.gptq(w, h, scale, zero, -7, 7), args.repeats)
        t_pt, c_pt = timed(lambda: torch_gptq(w, h, scale, zero, -7, 7), args.repeats)
        same = float(np.mean(c_np == c_pt)) * 100
        print(f"| {name} {list(shape)} | {t_np * 1e3:.1f} | {t_pt * 1e3:.1f} | "
              f"{t_pt / t_np:.2f} | {same:.2f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
