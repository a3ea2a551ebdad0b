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


def vn_block(block: np.ndarray, u: np.ndarray | None = None) -> np.ndarray:
    """Demean one ``(time, voxel)`` block and, with ``u``, divide by the robust noise std.

    The noise std of a voxel is the std (ddof=1) of its demeaned series after removing its
    projection on the columns of ``u`` (``(time, n)``, orthonormal), floored at
    :data:`VN_FLOOR`. Two block-sized temporaries besides the input and the output
    (the residual is formed and squared in place, the division is in place).
    """
    y = block - block.mean(axis=0)
    if u is None:
        return y
    if not y.flags.c_contiguous:  # keep the memory order (hence the sums) of y - u u^T y
        resid = y - u @ (u.T @ y)
        std = np.sqrt((resid**2).sum(axis=0) / max(y.shape[0] - 1, 1))
        return y / np.maximum(std, VN_FLOOR)
    resid = u @ (u.T @ y)
    np.subtract(y, resid, out=resid)
    np.square(resid, out=resid)
    std = np.sqrt(resid.sum(axis=0) / max(y.shape[0] - 1, 1))
    del resid
    y /= np.maximum(std, VN_FLOOR)
    return y


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
