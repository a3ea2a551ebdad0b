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

import os
import threading
from typing import Any

import numpy as np

#: Floor of the per-voxel noise std (Smith et al. 2014; HCP ``variance_normalise``).
VN_FLOOR = 1e-3


# ------------------------------------------------------------------------------ group ICA
def block_gram(block: np.ndarray) -> np.ndarray:
    """``block @ block.T`` with a trailing length-1 axis (one term of a sum over blocks)."""
    return (block @ block.T)[:, :, None]


def demean_block(block: np.ndarray) -> np.ndarray:
    """One ``(time, voxel)`` block minus each voxel's temporal mean (a new array)."""
    return block - block.mean(axis=0)


def vn_scale_block(y: np.ndarray, u: np.ndarray, out: np.ndarray | None = None
                   ) -> np.ndarray:
    """A demeaned ``(time, voxel)`` block divided by each voxel's robust noise std.

    The noise std of a voxel is the std (ddof=1) of its series after removing its
    projection on the columns of ``u`` (``(time, n)``, orthonormal), floored at
    :data:`VN_FLOOR`. With orthonormal ``u`` the residual's sum of squares is
    ``|y|^2 - |u^T y|^2``: no block-sized residual is formed (the result differs from
    forming it by rounding only). ``out``: where to write the result (may be ``y``).
    """
    p = u.T @ y
    ss = np.einsum("ij,ij->j", y, y) - np.einsum("ij,ij->j", p, p)
    std = np.sqrt(np.clip(ss, 0.0, None) / max(y.shape[0] - 1, 1))
    return np.divide(y, np.maximum(std, VN_FLOOR), out=out)


_LOCAL = threading.local()


def _buffer(owner: str, slot: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float64 array of ``shape`` reused by the next tasks of ``owner`` on this thread.

    Fresh block-sized arrays cost page faults (Dask's worker processes return freed
    memory to the system at once): reading into, and multiplying into, the same few
    buffers halves the CPU time of a read. A thread keeps one owner's buffers (a few
    ``(rows, block)`` blocks); a task of another owner (another fit) drops them, and
    :func:`release_buffers` frees them. Never returned from a task.
    """
    if getattr(_LOCAL, "owner", None) != owner:
        _LOCAL.owner, _LOCAL.bufs = owner, {}
    n = int(np.prod(shape))
    buf = _LOCAL.bufs.get(slot)
    if buf is None or buf.size < n:
        buf = _LOCAL.bufs[slot] = np.empty(n)
    return buf[:n].reshape(shape)


def release_buffers() -> None:
    """Free this thread's reused buffers (:func:`_buffer`)."""
    _LOCAL.owner, _LOCAL.bufs = None, {}


def _chunk_file(z: Any, c0: int, c1: int) -> str | None:
    """Path of the chunk file holding columns ``c0:c1`` of a local, uncompressed,
    ``(rows, block)``-chunked Zarr v3 float64 array, or None (then zarr reads it)."""
    try:
        from zarr.codecs import BytesCodec
        from zarr.storage import LocalStore

        meta = z.metadata
        if not isinstance(z.store, LocalStore) or meta.zarr_format != 3 \
                or getattr(z, "shards", None) is not None or meta.storage_transformers \
                or len(meta.codecs) != 1 or type(meta.codecs[0]) is not BytesCodec \
                or np.dtype(z.dtype) != np.dtype("<f8") or len(z.chunks) != 2:
            return None
        rows, block = (int(n) for n in z.chunks)
        if rows != z.shape[0] or c0 % block or c1 - c0 > block:
            return None
        key = meta.encode_chunk_key((0, c0 // block))
        return os.path.join(str(z.store.root), *(z.path.split("/") if z.path else ()),
                            *key.split("/"))
    except Exception:  # another zarr layout or version: zarr's own read is always right
        return None


def _read_rows(src: Any, c0: int, c1: int, u: np.ndarray | None, owner: str | None = None,
               slot: str = "") -> np.ndarray:
    """Columns ``c0:c1`` of a scratch part as float64, robustly variance-normalised with
    ``u`` when given.

    ``src`` is a Zarr array or, in memory mode, the block itself (never modified). With an
    ``owner``, a whole chunk of a local array is read straight into a reused buffer (the
    file is the raw chunk: one copy from the page cache, where zarr's read allocates and
    copies twice) and normalised in place.
    """
    if isinstance(src, np.ndarray):
        blk = np.asarray(src, dtype=np.float64)
        return blk if u is None else vn_scale_block(blk, u)
    path = None if owner is None else _chunk_file(src, c0, c1)
    blk = None
    if path is not None:
        rows, block = (int(n) for n in src.chunks)
        buf = _buffer(owner, slot, (rows, block))
        try:
            with open(path, "rb", buffering=0) as f:
                size = f.readinto(memoryview(buf).cast("B"))
            if size == buf.nbytes:
                blk = buf[:, :c1 - c0]
        except FileNotFoundError:  # never written: the fill value, as zarr reads it
            pass
    if blk is None:
        blk = np.asarray(src[:, c0:c1], dtype=np.float64)
    return blk if u is None else vn_scale_block(blk, u, out=blk)


def migp_first_block(x: np.ndarray, target: Any, c0: int, c1: int, gram: bool,
                     owner: str | None = None
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """MIGP's first pass over one ``(time, voxel)`` block of a subject.

    The block is demeaned (each voxel over time) and written to columns ``c0:c1`` of
    ``target`` (a Zarr array; through a reused buffer for an ``owner``, see
    :func:`_buffer`); with ``target=None`` (memory mode) it is returned instead.

    Returns
    -------
    (numpy.ndarray or None, numpy.ndarray or None)
        The demeaned block (None when written) and, when ``gram``, its ``time x time``
        Gram matrix (one term of the sum over blocks).
    """
    x = np.asarray(x, dtype=np.float64)
    if target is None or owner is None:
        d = demean_block(x)
    else:
        d = np.subtract(x, x.mean(axis=0), out=_buffer(owner, "x", x.shape))
    g = d @ d.T if gram else None
    if target is None:
        return d, g
    target[:, c0:c1] = d
    return None, g


def migp_step_block(c0: int, c1: int, z_parts: list[tuple[Any, np.ndarray | None]],
                    ut: np.ndarray | None, target: Any,
                    y_next: tuple[Any, np.ndarray | None] | None, owner: str | None = None,
                    release: bool = False) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One MIGP round on voxel columns ``c0:c1``: a reduction and the next cross products.

    ``z_parts`` are the row blocks of ``Z`` (``(source, u)``: a scratch part and its
    variance-normalisation basis, or None). With ``ut`` (``(n, rows of Z)``) the block of
    ``W' = ut @ Z`` is computed (as a sum of per-part products: ``Z`` is never
    concatenated) and written to ``target`` (Zarr; returned when ``target`` is None);
    without, ``W' = Z``. With ``y_next`` (the next subject's part), the cross products
    ``[W'; y] @ y.T`` of the block are returned: with ``W' W'^T`` known they complete the
    Gram matrix of ``[W'; y]``. Each part is read once; at most ``Z``, ``W'`` and ``y``
    blocks are held, in buffers reused from task to task (see :func:`_buffer`) for an
    ``owner``; ``release`` frees them at the end (the last round).

    Returns
    -------
    (numpy.ndarray or None, numpy.ndarray or None)
        The ``W'`` block when it is not written (memory mode, or the final projection) and
        the cross products (None without ``y_next``).
    """
    blocks = [_read_rows(src, c0, c1, u, owner, f"z{j}")
              for j, (src, u) in enumerate(z_parts)]
    if ut is not None:
        reuse = owner is not None and target is not None
        shape = (ut.shape[0], c1 - c0)
        new = _buffer(owner, "new", shape) if reuse else np.empty(shape)
        tmp = _buffer(owner, "tmp", shape) if reuse and len(blocks) > 1 else None
        r0 = 0
        for j, b in enumerate(blocks):
            r1 = r0 + b.shape[0]
            if j == 0:
                np.matmul(ut[:, r0:r1], b, out=new)
            else:
                new += np.matmul(ut[:, r0:r1], b, out=tmp)
            r0 = r1
        left = [new]
        del blocks, tmp
    else:
        new, left = None, blocks
    cross = None
    if y_next is not None:
        y = _read_rows(y_next[0], c0, c1, y_next[1], owner, "y")
        yt = y.T
        cross = np.concatenate([b @ yt for b in left] + [y @ yt])
        del y, yt
    del left
    if new is not None and target is not None:
        target[:, c0:c1] = new
        new = None
    if release:
        release_buffers()
    return new, cross


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
