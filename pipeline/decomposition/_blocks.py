"""NumPy kernels that the decomposition estimators run on voxel blocks, as Dask tasks.

They live here, apart from the estimators (:mod:`.group`, :mod:`.pca`), so that a worker
process unpickling a task imports NumPy only: the estimator modules import scikit-learn
(``BaseEstimator``, ``fastica``), SciPy's statistics and threadpoolctl, which the tasks do not
need (about 50 MB of resident memory per worker process). The estimator modules re-export
these names.

Each kernel works on one ``(rows, voxel-block)`` array and allocates as few block-sized
temporaries as the arithmetic allows (in-place steps where the result is the same number
for number).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Floor of the per-voxel noise std (Smith et al. 2014; HCP ``variance_normalise``).
VN_FLOOR = 1e-3


# ------------------------------------------------------------------------------ group ICA
def block_gram(block: np.ndarray) -> np.ndarray:
    """``block @ block.T`` with a trailing length-1 axis (one term of a sum over blocks)."""
    return (block @ block.T)[:, :, None]


def block_cross(w_block: np.ndarray, y_block: np.ndarray) -> np.ndarray:
    """``[w; y] @ y.T`` of one voxel block, with a trailing length-1 axis."""
    return np.concatenate([w_block @ y_block.T, y_block @ y_block.T])[:, :, None]


def demean_block(block: np.ndarray) -> np.ndarray:
    """One ``(time, voxel)`` block minus each voxel's temporal mean (a new array)."""
    return block - block.mean(axis=0)


def vn_scale_block(y: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A demeaned ``(time, voxel)`` block divided by each voxel's robust noise std.

    The noise std of a voxel is the std (ddof=1) of its series after removing its
    projection on the columns of ``u`` (``(time, n)``, orthonormal), floored at
    :data:`VN_FLOOR`. With orthonormal ``u`` the residual's sum of squares is
    ``|y|^2 - |u^T y|^2``: no block-sized residual is formed (the result differs from
    forming it by rounding only).
    """
    p = u.T @ y
    ss = np.einsum("ij,ij->j", y, y) - np.einsum("ij,ij->j", p, p)
    std = np.sqrt(np.clip(ss, 0.0, None) / max(y.shape[0] - 1, 1))
    return y / np.maximum(std, VN_FLOOR)


# ------------------------------------------------------------------------------ PCA
def voxel_scale(block: np.ndarray) -> np.ndarray:
    """Temporal std (ddof=1) of each voxel of a ``(time, voxel)`` block; 1 where it is 0."""
    sd = np.std(block, axis=0, ddof=1) if block.shape[0] > 1 else np.ones(block.shape[1])
    return np.where(sd > 0, sd, 1.0)


def prepare_block(block: np.ndarray, demean: bool, normalize: bool) -> np.ndarray:
    """A float64 block, demeaned and / or divided by :func:`voxel_scale` (of the input).

    The input is converted to float64 once (not once per use) and never modified.
    """
    f64 = np.asarray(block, dtype=np.float64)
    out = f64 - f64.mean(axis=0) if demean else f64
    if normalize:
        scale = voxel_scale(f64)
        if not demean and isinstance(block, np.ndarray) and np.may_share_memory(out, block):
            out = out / scale  # never modify the caller's array
        else:
            out /= scale
    return out


def orthonormal(y: np.ndarray) -> np.ndarray:
    """Orthonormal basis (``Q`` of the reduced QR) of the columns of a small block."""
    return np.linalg.qr(y)[0]


# ------------------------------------------------------------------------------ FastICA
def cube(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FastICA's ``"cube"`` non-linearity: ``g(x) = x**3`` and the mean of ``g'(x)``.

    The same function as scikit-learn's ``_cube``, computed with multiplications: NumPy's
    ``x**3`` calls ``pow`` per element, which on whitened sources took ~25x longer than two
    products (0.19 s vs 0.007 s for 20 x 72791 values; 10 CanICA restarts spent ~35 s in
    it). Results differ from ``x**3`` by rounding only.
    """
    x2 = x * x
    return x2 * x, (3 * x2).mean(axis=-1)


def ica_fun(fun: str) -> Any:
    """The ``fun`` to give scikit-learn's FastICA: :func:`cube` for ``"cube"``."""
    return cube if fun == "cube" else fun
