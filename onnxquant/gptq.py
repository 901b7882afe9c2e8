"""GPTQ (Frantar et al. 2023) in NumPy: round weights column by column, pushing each
column's rounding error onto the columns not yet rounded through the inverse Hessian of the
layer's reconstruction loss ||W X - W_hat X||^2, H = 2/n X X^T (DESIGN.md §9).

Weights are handled as ``[G, R, C]`` stacks: G independent groups (a grouped or depthwise
conv has one H per group; dense layers have G = 1), R output rows, C input columns
(in_channels/group x kh x kw for a conv, K for a linear layer). Scales and zero points are
fixed beforehand (the spec's parameters: one per tensor, per row, or per block of columns,
GPTQ's "static groups"); GPTQ only chooses the integer codes. Reference: ``quantize_rows``
is plain rounding to nearest, the result GPTQ must beat on ``layer_error``.

GPTQ's own target is the float layer on the quantized model's inputs: each layer keeps
the error of the layers before it. ``float_target`` moves the weights GPTQ rounds to the
least-squares fit of the float model's output on the float model's inputs (GPTAQ's
"asymmetric calibration"), with shrinkage and damping that keep 64 images from being
over-fitted; over 12 runs at W4 it took mobilevitv2_050 from -1.45 / -1.72 points to
-0.38 / -0.02 (docs/float_target.md).

H is estimated from a few calibration samples (64 images by default) whose columns are
far from independent; ``hessian(x, samples)`` shrinks it toward a scaled identity by the
Ledoit-Wolf intensity over those samples (``shrinkage``), so that the error feedback does
not fit the calibration images (docs/reconstruct_table.md, "GPTQ's H shrunk over the
calibration samples").
"""

from __future__ import annotations

import numpy as np

DAMP = 0.01  # damping: 1 % of the mean of diag(H)
TARGET_DAMP = 0.1  # float_target's damping of the regression (see there)
BATCHED_ELEMENTS = 2**23  # cross_shrinkage: per-sample moments made at once up to this size
BLOCK = 128  # columns rounded per lazy-update block
MAX_SAMPLES = 16384  # input columns (positions x images) used for H per layer


def hessian(x: np.ndarray, samples: np.ndarray | None = None) -> np.ndarray:
    """H = 2/n X X^T per group; ``x``: [G, C, n] -> [G, C, C] float64. With ``samples``
    (the calibration sample of each column, ascending), H is shrunk toward a scaled
    identity by ``shrinkage``: (1 - rho) H + rho mean(diag H) I."""
    x32 = np.asarray(x, np.float32)
    s = np.matmul(x32, np.swapaxes(x32, 1, 2)).astype(np.float64) / max(x.shape[2], 1)
    if samples is not None:
        rho = shrinkage(x32, s, samples)[:, None, None]
        mu = np.trace(s, axis1=1, axis2=2)[:, None, None] / s.shape[1]
        s = (1 - rho) * s + rho * mu * np.eye(s.shape[1])[None]
    return 2.0 * s


def shrinkage(x: np.ndarray, s: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrinkage intensity per group, the calibration samples taken as the
    observations, not the columns.

    The columns of one image (overlapping im2col patches, the tokens of one image or text
    line) are far from independent: a layer seeing 32 images has 32 draws of its input
    statistics, however many columns they give. Where those few draws leave X X^T / n
    uncertain (late layers: few positions per image, many columns), GPTQ's error
    compensation fits the calibration images' noise and generalizes worse than it scores
    on them. With S_i the second moment of sample i's columns (weight w_i = its share of
    the columns) and S = sum w_i S_i,

        rho = min(1, sum_i w_i^2 ||S_i - S||_F^2 / ||S - mu I||_F^2),   mu = tr(S) / C:

    the estimated variance of S over its distance from the scaled identity. rho = 0 with
    one sample (nothing to estimate the variance from); rho -> 1 (rounding to nearest)
    where the samples disagree about everything but the scale. ``samples``: ascending,
    one per column of ``x`` [G, C, n]; ``s``: [G, C, C]."""
    samples = np.asarray(samples)
    _, starts, counts = np.unique(samples, return_index=True, return_counts=True)
    if len(counts) < 2:
        return np.zeros(s.shape[0])
    n = x.shape[2]
    var = np.zeros(s.shape[0])
    for start, count in zip(starts, counts):
        var += (count / n) ** 2 * _distance2(x[:, :, start:start + count], s)
    mu = np.trace(s, axis1=1, axis2=2) / s.shape[1]
    spread = np.sum((s - mu[:, None, None] * np.eye(s.shape[1])[None]) ** 2, axis=(1, 2))
    return np.clip(var / np.maximum(spread, 1e-300), 0.0, 1.0)


def _distance2(xi: np.ndarray, s: np.ndarray) -> np.ndarray:
    """||X_i X_i^T / m - S||_F^2 per group (m: the sample's columns). Where m < C, without
    the C x C matrix of one sample: ||X_i^T X_i||^2 / m^2 - 2 <S X_i, X_i> / m + ||S||^2."""
    m, c = xi.shape[2], xi.shape[1]
    if m >= c:
        si = np.matmul(xi, np.swapaxes(xi, 1, 2)).astype(np.float64) / m
        return np.sum((si - s) ** 2, axis=(1, 2))
    x64 = xi.astype(np.float64)
    gram = np.matmul(np.swapaxes(x64, 1, 2), x64)  # [G, m, m]
    cross = np.sum(np.matmul(s, x64) * x64, axis=(1, 2))
    return np.sum(gram ** 2, axis=(1, 2)) / m ** 2 - 2 * cross / m + np.sum(s ** 2, axis=(1, 2))


def float_target(w: np.ndarray, x: np.ndarray, x_float: np.ndarray, h: np.ndarray,
                 samples: np.ndarray, damp: float = TARGET_DAMP) -> np.ndarray:
    """The weights [G, R, C] whose output on the quantized model's inputs ``x`` best matches
    the float layer's output on the float model's inputs ``x_float`` (both [G, C, n], the
    same columns), GPTQ's target in place of ``w`` (GPTAQ, Li et al. 2025, "asymmetric
    calibration"). GPTQ alone matches W x: each layer keeps the error of the layers before
    it. With D = (x_float - x) x^T / n, least squares over the calibration columns gives

        ||W x_float - W' x||^2 = ||(W + W D S^-1 - W') x||^2 + const,   S = H / 2,

    so rounding W* = W + W D S^-1 with GPTQ on H optimizes the float target. Two guards
    keep the correction from fitting 64 images' noise (unguarded it reached 20-50 % of
    ||W|| in late layers, and 4 of 12 mobilevitv2_050 runs fell to 86-88 % agreement with
    float, where the guarded ones reach 96-97 %): D is shrunk toward 0 by its Ledoit-Wolf
    intensity over the calibration samples (``cross_shrinkage``), and S is damped by
    ``damp`` (TARGET_DAMP, 10 % of its mean diagonal, ten times GPTQ's own: low-variance
    directions of x are where a regression amplifies noise; with 1 %, one run of twelve
    still fell to 85 %). docs/float_target.md."""
    x32 = np.asarray(x, np.float32)
    dx = np.asarray(x_float, np.float32) - x32
    n = x32.shape[2]
    d = _cross(dx, x32) / max(n, 1)
    d *= (1.0 - cross_shrinkage(x32, dx, d, samples))[:, None, None]
    _, hd = _prepare(np.asarray(w, np.float64), np.asarray(h, np.float64), damp)
    w = np.asarray(w, np.float64)
    return w + 2.0 * np.matmul(np.matmul(w, d), np.linalg.inv(hd))


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a b^T over the last axis, [..., C, n] x [..., C, n] -> [..., C, C], float32 products
    (as ``hessian``) summed into float64."""
    return np.matmul(a, np.swapaxes(b, -1, -2)).astype(np.float64)


def cross_shrinkage(x: np.ndarray, dx: np.ndarray, d: np.ndarray, samples: np.ndarray):
    """``shrinkage``'s intensity for the cross moment D = dx x^T / n toward 0, per group:
    rho = min(1, sum_i w_i^2 ||D_i - D||_F^2 / ||D||_F^2) over the calibration samples i
    (w_i: sample i's share of the columns)."""
    samples = np.asarray(samples)
    _, starts, counts = np.unique(samples, return_index=True, return_counts=True)
    if len(counts) < 2:
        return np.zeros(d.shape[0])
    n = x.shape[2]
    g, c = x.shape[:2]
    if np.all(counts == counts[0]) and g * len(counts) * c * c <= BATCHED_ELEMENTS:
        # one batched product: [G, S, C, m] per sample
        m = counts[0]
        per = [np.swapaxes(a.reshape(g, c, len(counts), m), 1, 2) for a in (dx, x)]
        di = _cross(*per) / m  # [G, S, C, C]
        var = (m / n) ** 2 * np.sum((di - d[:, None]) ** 2, axis=(1, 2, 3))
    else:
        var = np.zeros(d.shape[0])
        for start, count in zip(starts, counts):
            cols = slice(start, start + count)
            di = _cross(dx[:, :, cols], x[:, :, cols]) / count
            var += (count / n) ** 2 * np.sum((di - d) ** 2, axis=(1, 2))
    return np.clip(var / np.maximum(np.sum(d ** 2, axis=(1, 2)), 1e-300), 0.0, 1.0)


def quantize_rows(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int):
    """Codes of ``w`` with ``scale``/``zero`` broadcast against it: round to nearest."""
    return np.clip(np.round(w / scale) + zero, qmin, qmax)


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of H^-1 per group (H already damped), factorized in float32 as
    the reference implementation does (damping keeps H well conditioned), returned float64."""
    hinv = np.linalg.inv(h.astype(np.float32))
    hinv = (hinv + np.swapaxes(hinv, 1, 2)) / 2
    return np.swapaxes(np.linalg.cholesky(hinv), 1, 2).astype(np.float64)


def _prepare(w: np.ndarray, h: np.ndarray, damp: float):
    """Dead inputs (H_ii = 0: never non-zero in calibration) get H_ii = 1 and W = 0 there
    (their value cannot matter on the data); then damping."""
    w, h = w.copy(), h.copy()
    dead = np.diagonal(h, axis1=1, axis2=2) == 0  # [G, C]
    g_idx, c_idx = np.nonzero(dead)
    h[g_idx, c_idx, c_idx] = 1.0
    w[g_idx, :, c_idx] = 0.0
    diag = np.diagonal(h, axis1=1, axis2=2)
    bump = damp * diag.mean(axis=1)  # [G]
    h = h + bump[:, None, None] * np.eye(h.shape[1])[None]
    return w, h


def gptq(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int,
         qmax: int, damp: float = DAMP, block: int = BLOCK, act_order: bool = True) -> np.ndarray:
    """Integer codes [G, R, C] for weights ``w`` [G, R, C] given H [G, C, C] and the grid
    ``scale``/``zero``: [G, R] per row (a per-tensor scale repeated) or [G, R, C] per weight
    (block-wise scales)."""
    w, h = _prepare(np.asarray(w, np.float64), np.asarray(h, np.float64), damp)
    cols = w.shape[2]
    s, z = (np.broadcast_to(np.asarray(a, np.float64).reshape(*a.shape[:2], -1), w.shape)
            for a in (scale, zero))
    order = np.arange(cols)
    if act_order:  # one order for all groups keeps the stacks aligned: the mean of diag H
        order = np.argsort(-np.diagonal(h, axis1=1, axis2=2).mean(axis=0), kind="stable")
        w, h, s, z = w[:, :, order], h[:, order][:, :, order], s[:, :, order], z[:, :, order]
    u = _inverse_cholesky(h)
    s, z = (np.ascontiguousarray(np.swapaxes(a, 1, 2)) for a in (s, z))  # [G, C, R]
    wt = np.ascontiguousarray(np.swapaxes(w, 1, 2))  # [G, C, R]: one column is contiguous
    codes = np.empty_like(wt)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        err = np.empty((wt.shape[0], i2 - i1, wt.shape[2]))
        for i in range(i1, i2):
            q = quantize_rows(wt[:, i], s[:, i], z[:, i], qmin, qmax)  # [G, R]
            codes[:, i] = q
            e = (wt[:, i] - (q - z[:, i]) * s[:, i]) / u[:, i, i][:, None]
            wt[:, i:i2] -= u[:, i, i:i2][:, :, None] * e[:, None, :]
            err[:, i - i1] = e
        wt[:, i2:] -= np.matmul(np.swapaxes(u[:, i1:i2, i2:], 1, 2), err)
    out = np.empty_like(codes)
    out[:, order] = codes
    return np.swapaxes(out, 1, 2)


def layer_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """tr((W - W_hat) H (W - W_hat)^T), summed over groups: the loss GPTQ minimizes."""
    d = np.asarray(w, np.float64) - w_hat
    return float(np.einsum("grc,gcd,grd->", d, h, d))
