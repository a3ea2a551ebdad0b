"""Group ICA with bounded memory: MIGP and CanICA-style, over many subjects.

Inputs are subjects' masked ``(time, voxel)`` matrices (:func:`pipeline.masking.apply_mask`,
usually cleaned with :func:`pipeline.signal.clean_signals`), lazy dask-backed DataArrays on
the *same* voxel set (the same group mask applied to every run: the ``i, j, k`` voxel
coordinates must be identical, which is checked). ``subjects`` is a sequence or any iterable
(a generator); an item may also be a zero-argument callable returning the DataArray, so that a
run is only opened when its turn comes.

:class:`MIGP`
    MELODIC's Incremental Group-PCA (Smith et al., NeuroImage 2014): subjects are streamed
    one at a time in a seeded random order, each demeaned and variance-normalised; a running
    ``W`` of at most ``d_internal + T`` rows is kept and reduced back to ``d_internal`` rows
    (``W <- U^T W``, ``U`` the top eigenvectors of ``W W^T``) whenever it grows beyond
    ``d_internal``. Output: the top ``n_components`` rows (spatial eigenmaps).
:class:`GroupICA`
    ``method="migp"``: MIGP, then spatial FastICA of the group eigenmaps (MELODIC's
    concat-ICA); maps z-scored, sign such that each map has a positive skew, ordered by
    decreasing explained variance. ``method="canica"``: nilearn's ``CanICA`` (Varoquaux et
    al. 2010): per-subject PCA, CCA normalisation, randomized SVD of the stacked subject
    components (:func:`dask.array.linalg.svd_compressed`), ``n_init`` FastICA runs keeping the
    sparsest (smallest maximum L1 norm), thresholding and peak-positive signs, as
    ``nilearn.decomposition.CanICA._unmix_components`` (same numbers up to rounding, see
    :func:`_fastica` for the one deliberate difference).

Memory
------
No ``(rows, n_voxels)`` array with ``rows`` growing with the data (MIGP's running ``W``,
``(d_internal + T) x n_voxels``; each subject's normalised data; CanICA's stacked subject
components, ``(n_subjects * k) x n_voxels``) is ever held by one process. Each is written to
a temporary Zarr array (``workdir``) in regular column blocks of ``block_size`` voxels and
read back lazily; all arithmetic over voxels runs one block at a time, each block used by
one task per pass, and what is computed is small (``rows x rows`` Gram matrices, reduced to
eigenvectors in NumPy). Per process this is a small multiple of one ``(rows, block_size)``
block (default about 16 MiB) per worker thread, whatever the number of voxels and of
subjects. By default ``workdir``
is a local temporary directory, removed at the end of ``fit`` (fine with the threaded
scheduler and with a ``LocalCluster``); on a multi-machine cluster give a shared path or an
fsspec URL (``s3://bucket/tmp``). ``workdir="memory"`` instead persists the intermediates in
the cluster's memory (faster for small problems, but then memory grows with
``rows x n_voxels``).

What is of the size of the *output* is held in memory: the fitted maps (``components_``,
``(n_components, n_voxels)``, NumPy), the FastICA on them (``n_voxels x n_components``), and
for CanICA the ``n_voxels x (n_components + 10)`` sketches that
:func:`dask.array.linalg.svd_compressed` persists between its passes.

With the threaded scheduler, limit BLAS to one thread per task
(``threadpoolctl.threadpool_limits(1, "blas")``): Dask already runs one task per core.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy import linalg
from scipy.stats import scoreatpercentile
from sklearn.base import BaseEstimator
from sklearn.decomposition import fastica
from sklearn.utils import check_random_state
from threadpoolctl import threadpool_limits

from ._blocks import VN_FLOOR
from ._blocks import block_gram as _block_gram
from ._blocks import ica_fun as _ica_fun
from ._blocks import migp_first_block as _migp_first_block
from ._blocks import migp_step_block as _migp_step_block
from .pca import _sign_flip as _flip_rows  # each row's largest-magnitude entry positive

__all__ = ["MIGP", "GroupICA"]

#: Target bytes of one ``(rows, block)`` float64 block of the temporary arrays.
_BLOCK_BYTES = 16 * 2**20
#: Smallest default voxel block.
_MIN_BLOCK = 256
#: Components removed before estimating the noise std (robust variance normalisation).
_VN_COMPONENTS = 30
#: Floor of the per-voxel noise std (Smith et al. 2014; HCP ``variance_normalise``).
_VN_FLOOR = VN_FLOOR
#: ``n_voxels x k`` elements below which the in-memory FastICA runs on one BLAS thread.
_SINGLE_THREAD_SIZE = 2**22

SubjectLike = xr.DataArray | da.Array | np.ndarray | Callable[[], Any]


# ------------------------------------------------------------------------------------------
# subjects
# ------------------------------------------------------------------------------------------
class _Voxels:
    """Voxel set of the first subject: ``i, j, k`` coordinates, grid and affine."""

    def __init__(self, template: xr.DataArray | None, n_voxels: int) -> None:
        self.n_voxels = n_voxels
        self.ijk: np.ndarray | None = None
        self.affine: np.ndarray | None = None
        self.shape: tuple[int, int, int] | None = None
        if template is not None and all(c in template.coords for c in ("i", "j", "k")):
            self.ijk = np.stack([np.asarray(template[c].values) for c in ("i", "j", "k")],
                                axis=1)
        if template is not None:
            if "affine" in template.attrs:
                self.affine = np.asarray(template.attrs["affine"], dtype=float)
            if "shape" in template.attrs:
                self.shape = tuple(int(s) for s in template.attrs["shape"])

    def check(self, template: xr.DataArray | None, n_voxels: int, index: int) -> None:
        if n_voxels != self.n_voxels:
            raise ValueError(f"subject {index} has {n_voxels} voxels, the first one "
                             f"{self.n_voxels}: apply the same group mask to every run")
        if self.ijk is None or template is None:
            return
        if not all(c in template.coords for c in ("i", "j", "k")):
            raise ValueError(f"subject {index} has no i, j, k voxel coordinates")
        for col, c in enumerate(("i", "j", "k")):
            if not np.array_equal(np.asarray(template[c].values), self.ijk[:, col]):
                raise ValueError(
                    f"subject {index}: voxel coordinates ({c}) differ from the first "
                    "subject's; apply the same group mask (same voxel order) to every run")


def _load(item: SubjectLike, index: int) -> tuple[da.Array, xr.DataArray | None]:
    """A subject as a float64 ``(time, voxel)`` dask array (one chunk along time)."""
    if callable(item) and not isinstance(item, xr.DataArray | da.Array | np.ndarray):
        item = item()
    template = None
    if isinstance(item, xr.DataArray):
        if set(item.dims) != {"time", "voxel"}:
            raise ValueError(f"subject {index}: dims must be (time, voxel), got {item.dims}")
        template = item.transpose("time", "voxel")
        data = template.data
    else:
        data = item
    if not isinstance(data, da.Array):
        data = np.asarray(data)
        data = da.from_array(data, chunks=(-1, max(1, min(data.shape[-1], 8192))))
    if data.ndim != 2:
        raise ValueError(f"subject {index}: expected a 2-D (time, voxel) array, got "
                         f"shape {data.shape}")
    if data.dtype != np.float64:
        data = data.astype(np.float64)
    return data, template


def _check_subjects(subjects: Any) -> None:
    if isinstance(subjects, xr.DataArray | da.Array | np.ndarray | str):
        raise TypeError("pass a sequence (or an iterable) of subjects, not a single array")


def _shuffled(subjects: Iterable[Any], rng: np.random.Generator,
              buffer: int) -> Iterator[tuple[int, Any]]:
    """``(position, subject)`` in a seeded random order.

    A sequence is fully permuted (items are accessed by index, in the permuted order); any
    other iterable is consumed lazily through a shuffle buffer of ``buffer`` items, so that a
    generator of thousands of subjects never has more than ``buffer`` of them open.
    """
    if isinstance(subjects, Sequence):
        for i in rng.permutation(len(subjects)):
            yield int(i), subjects[int(i)]
        return
    pool: list[tuple[int, Any]] = []
    for i, item in enumerate(subjects):
        pool.append((i, item))
        if len(pool) >= buffer:
            yield pool.pop(int(rng.integers(len(pool))))
    while pool:
        yield pool.pop(int(rng.integers(len(pool))))


def _block_size(block_size: int | None, rows: int, n_voxels: int) -> int:
    if block_size is None:
        block_size = max(_MIN_BLOCK, _BLOCK_BYTES // (8 * max(rows, 1)))
    return int(max(1, min(block_size, n_voxels)))


# ------------------------------------------------------------------------------------------
# temporary (rows, voxel) arrays
# ------------------------------------------------------------------------------------------
class _Scratch:
    """Temporary ``(rows, voxel)`` arrays: a Zarr group (default) or cluster memory.

    Parameters
    ----------
    workdir : None, str, path or "memory"
        None: a new local temporary directory, deleted by :meth:`close`. A path or fsspec
        URL: a uniquely named sub-group is created there and deleted by :meth:`close`.
        ``"memory"``: arrays are persisted with :meth:`dask.array.Array.persist` instead.
    storage_options : dict, optional
        fsspec options for a URL ``workdir``.
    """

    def __init__(self, workdir: Any = None, storage_options: dict | None = None) -> None:
        import zarr

        self.memory = isinstance(workdir, str) and workdir == "memory"
        self._tmpdir: str | None = None
        self._parent = None
        self._name = f"boldflow-group-{uuid.uuid4().hex[:12]}"
        if self.memory:
            self.group = None
            return
        if workdir is None or str(workdir) == "":
            self._tmpdir = tempfile.mkdtemp(prefix="boldflow-group-")
            self.group = zarr.open_group(self._tmpdir, mode="w", zarr_format=3)
        else:
            self._parent = zarr.open_group(str(workdir), mode="a", zarr_format=3,
                                           storage_options=storage_options)
            self.group = self._parent.create_group(self._name)

    def put(self, name: str, x: da.Array, block: int) -> da.Array:
        """Materialise ``x`` (2-D) and return a lazy array reading it back."""
        return self.put_with(name, x, block)[0]

    def put_with(self, name: str, x: da.Array, block: int,
                 others: Sequence[da.Array | None] = ()) -> tuple[da.Array, list[Any]]:
        """:meth:`put` ``x`` and compute ``others`` (small results) in the same pass.

        One scheduling round instead of several: the tasks that ``x`` shares with
        ``others`` run once, and independent work (the next subject's first pass) fills the
        workers while ``x`` is written. A None in ``others`` gives None.

        Returns
        -------
        (dask.array.Array, list)
            The lazy reader of ``x`` and the computed ``others`` (NumPy).
        """
        readers, values = self.put_many({name: x}, block, others)
        return readers[name], values

    def put_many(self, arrays: dict[str, da.Array | None], block: int,
                 others: Sequence[da.Array | None] = (), extra: Sequence[Any] = ()
                 ) -> tuple[dict[str, da.Array | None], list[Any]]:
        """:meth:`put_with` for several arrays (a None array is skipped): one compute.

        ``extra``: more lazy work (e.g. :meth:`StackWriter.add` stores) run in the same
        compute; their results are dropped.

        Returns
        -------
        (dict, list)
            Lazy readers by name (None for a None array) and the computed ``others``.
        """
        todo = [o for o in others if o is not None]
        named = {n: x.rechunk((x.shape[0], block)) for n, x in arrays.items()
                 if x is not None}
        readers: dict[str, da.Array | None] = dict.fromkeys(arrays)
        if self.memory:
            *persisted, = dask.persist(*named.values())
            readers.update(zip(named, persisted, strict=True))
            values = list(dask.compute(*extra, *todo)[len(extra):])
        else:
            stores, targets = [], []
            for n, x in named.items():
                z = self.group.create_array(name=n, shape=x.shape, dtype=x.dtype,
                                            chunks=(x.shape[0], block), compressors=None,
                                            fill_value=0.0, overwrite=True)
                stores.append(da.store(x, z, lock=False, compute=False))
                targets.append((n, z, x.shape[0]))
            values = list(dask.compute(*stores, *extra, *todo)[len(stores) + len(extra):])
            for n, z, rows in targets:
                readers[n] = da.from_zarr(z, chunks=(rows, block))
        it = iter(values)
        return readers, [None if o is None else np.asarray(next(it)) for o in others]

    def create(self, name: str, rows: int, n_voxels: int, block: int,
               dtype: Any = np.float64) -> Any:
        """An empty ``(rows, n_voxels)`` Zarr array in column chunks of ``block`` voxels,
        that tasks write whole chunks of (None in ``"memory"`` mode)."""
        if self.group is None:
            return None
        return self.group.create_array(name=name, shape=(rows, n_voxels), dtype=dtype,
                                       chunks=(rows, block), compressors=None,
                                       fill_value=0.0, overwrite=True,
                                       config={"write_empty_chunks": True})

    def reopen(self, name: str, chunks: tuple[int, int]) -> da.Array | None:
        """A lazy reader of the stored array ``name`` with other dask chunks (None in
        ``"memory"`` mode)."""
        if self.group is None:
            return None
        return da.from_zarr(self.group[name], chunks=chunks)

    def drop(self, name: str) -> None:
        if self.group is not None and name in self.group:
            del self.group[name]

    def close(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        elif self._parent is not None:
            if self._name in self._parent:
                del self._parent[self._name]
            self._parent = None

    def __enter__(self) -> _Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Stack:
    """Subjects' component rows in one ``(rows, voxel)`` scratch array.

    Each subject's rows go to their own row band; the array's chunks are ``row_chunk``
    rows by ``col_chunk`` voxels, so that the stack can be read back in column blocks of
    any multiple of ``col_chunk`` with all rows (what the randomized SVD's passes need)
    without decoding a chunk twice, in one task per column block (with one array per
    subject, a pass was one read task per subject and column block: scheduler load and
    reads growing with subjects). The number of subjects need not be known: the array
    grows by doubling. In ``"memory"`` mode the rows are persisted instead.
    """

    def __init__(self, scratch: _Scratch, n_voxels: int, row_chunk: int, col_chunk: int,
                 expected_rows: int | None) -> None:
        self.scratch = scratch
        self.col_chunk = col_chunk
        self.n_rows = 0
        self.parts: list[da.Array] = []
        self.z = None
        if scratch.group is not None:
            self.z = scratch.group.create_array(
                name="stack", shape=(max(expected_rows or 16 * row_chunk, row_chunk),
                                     n_voxels),
                dtype=np.float64, chunks=(row_chunk, col_chunk), compressors=None,
                fill_value=0.0, overwrite=True)

    def add(self, rows: da.Array) -> Any:
        """The lazy store of ``rows`` into the next row band (None in memory mode, where
        the rows are persisted here)."""
        r0, r1 = self.n_rows, self.n_rows + rows.shape[0]
        self.n_rows = r1
        if self.z is None:
            self.parts.append(rows.persist())
            return None
        if r1 > self.z.shape[0]:
            self.z.resize((max(r1, 2 * self.z.shape[0]), self.z.shape[1]))
        return da.store(rows, self.z, regions=(slice(r0, r1), slice(None)), lock=False,
                        compute=False)

    def read(self, col_block: int) -> da.Array:
        """The whole stack, lazily, in ``(n_rows, col_block)`` blocks (``col_block`` is
        rounded down to a multiple of the column chunks)."""
        col_block = max(self.col_chunk, col_block // self.col_chunk * self.col_chunk)
        if self.z is None:
            return da.concatenate(self.parts, axis=0).rechunk((-1, col_block))
        if self.z.shape[0] != self.n_rows:
            self.z.resize((self.n_rows, self.z.shape[1]))
        return da.from_zarr(self.z, chunks=(self.n_rows, col_block))


def _col_chunk(block: int) -> tuple[int, int]:
    """Column chunk of the stack for voxel blocks of about ``block``, and the block rounded
    to a multiple of it (so that every block writes whole chunks)."""
    col = 1 << max(0, int(np.log2(max(1, block // 8))))
    return col, max(col, block // col * col)


# ------------------------------------------------------------------------------------------
# small linear algebra over voxel blocks
# ------------------------------------------------------------------------------------------
def _gram_lazy(x: da.Array) -> da.Array:
    """``x @ x.T`` (rows x rows) summed over voxel blocks, lazily.

    Each ``(rows, block)`` column block is one task, used once (its rows are merged first):
    with several row chunks, ``x @ x.T`` would use every block in several partial products,
    and the scheduler may then keep all of ``x`` in memory until the last one runs.
    """
    x = x.rechunk({0: -1})
    n = x.shape[0]
    parts = da.blockwise(_block_gram, "ijb", x, "kb", new_axes={"i": n, "j": n},
                         adjust_chunks={"b": 1}, concatenate=True, dtype=np.float64)
    return parts.sum(axis=2)


def _gram(x: da.Array) -> np.ndarray:
    """``x @ x.T`` (rows x rows) summed over voxel blocks: one bounded compute."""
    return np.asarray(_gram_lazy(x).compute())


def _top_eigh(gram: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` largest eigenvalues (descending, clipped at 0) and their eigenvectors.

    On one BLAS thread: for these small matrices a multi-threaded LAPACK only adds
    synchronisation, and on a busy machine (the workers computing next to the client)
    OpenBLAS threads waiting for a core made one 300 x 300 ``eigh`` take seconds.
    """
    with _blas_threads(gram.size):
        vals, vecs = np.linalg.eigh((gram + gram.T) / 2)
    order = np.argsort(vals)[::-1][:n]
    return np.clip(vals[order], 0.0, None), vecs[:, order]


def _project(basis_t: np.ndarray, x: da.Array) -> da.Array:
    """``basis_t @ x`` (``(n, rows) @ (rows, voxel)``), lazily, one voxel block per task.

    The small basis is one graph key shared by all the tasks (not a copy per task).
    """
    x = x.rechunk({0: -1})
    return da.from_array(np.asarray(basis_t, dtype=np.float64), chunks=-1) @ x


def _blas_threads(size: int) -> threadpool_limits:
    """One BLAS thread for small in-memory problems (threads only add overhead there and
    contend with Dask's worker threads); no limit for large ones."""
    return threadpool_limits(limits=1 if size <= _SINGLE_THREAD_SIZE else None,
                             user_api="blas")


# ------------------------------------------------------------------------------------------
# MIGP
# ------------------------------------------------------------------------------------------
def _graph_value(value: Any) -> Any:
    """``value`` as one graph key (a Delayed) shared by the tasks that take it: a small
    array sent once, not once per task; a Zarr array (a dataclass) not traversed field by
    field for collections each time a task is built."""
    if value is None:
        return None
    return dask.delayed(value, name=f"migp-value-{uuid.uuid4().hex}", traverse=False)


class _Part:
    """Rows of MIGP's running ``Z = [W; Y_s]``: a scratch array or its blocks.

    ``src`` is a Zarr array (read and written by the tasks themselves, one whole chunk per
    voxel block) or, in ``"memory"`` mode, the list of the persisted blocks. ``vn``: the
    variance-normalisation basis (one shared graph key) applied to the rows when read
    (a subject's demeaned copy), or None (a reduced ``W``).
    """

    def __init__(self, name: str, rows: int, src: Any, vn: Any = None) -> None:
        self.name, self.rows, self.vn = name, rows, vn
        self.src = src if isinstance(src, list) else _graph_value(src)

    def at(self, i: int) -> tuple[Any, Any]:
        """``(source, basis)`` of voxel block ``i``, as the block kernels take it."""
        return (self.src[i] if isinstance(self.src, list) else self.src), self.vn


class _MIGPRounds:
    """MIGP's passes over voxel blocks, one compute (scheduling round) each.

    Each task handles one voxel block and reads and writes the scratch itself (no
    ``(rows, block)`` array moves between tasks or workers): only small matrices (Gram and
    cross products, the bases) are graph data. Sums over blocks are taken here in block
    order, so the results do not depend on the scheduler or the number of workers.
    """

    def __init__(self, scratch: _Scratch, n_voxels: int, block: int,
                 cols: list[tuple[int, int]]) -> None:
        self.scratch, self.n_voxels, self.block, self.cols = scratch, n_voxels, block, cols
        self.owner = uuid.uuid4().hex  # the tasks' reused buffers belong to this fit

    def _compute(self, tasks: list[Any]) -> list[tuple[Any, Any]]:
        """Run tasks returning ``(block or None, small or None)``; in memory mode the
        blocks stay in the cluster (persisted, returned as lazy keys)."""
        if not tasks:
            return []
        if not self.scratch.memory:
            return list(dask.compute(*tasks))
        persisted = dask.persist(*tasks)
        small = dask.compute(*[t[1] for t in persisted])
        return [(t[0], s) for t, s in zip(persisted, small, strict=True)]

    def run(self, *, upcoming: tuple[str, da.Array] | None, vn: bool,
            z_parts: list[_Part], ut: np.ndarray | None, new_w: str | None, d_int: int,
            y_next: _Part | None) -> tuple[_Part | None, tuple[_Part | None, Any]]:
        """One round: the first pass of ``upcoming`` (``(name, data)``) and, per block,
        ``W' = ut @ Z`` written as ``new_w`` (when ``ut`` is given; else ``W' = Z``) with
        the cross products ``[W'; y] y^T`` of ``y_next``.

        Returns
        -------
        (_Part or None, (_Part or None, numpy.ndarray or None))
            The upcoming subject's part (demeaned copy, with its VN basis); the new ``W``
            part and the summed cross products.
        """
        first = []
        if upcoming is not None:
            name, x = upcoming
            t = x.shape[0]
            gram = vn and min(_VN_COMPONENTS, t // 2) >= 1
            x_target = self.scratch.create(name, t, self.n_voxels, self.block)
            x_key = _graph_value(x_target)
            first = [dask.delayed(_migp_first_block, pure=False)(blk, x_key, c0, c1, gram,
                                                                 self.owner)
                     for blk, (c0, c1) in zip(x.to_delayed().ravel(), self.cols,
                                              strict=True)]
        steps = []
        if ut is not None or y_next is not None:
            w_target = (self.scratch.create(new_w, d_int, self.n_voxels, self.block)
                        if ut is not None else None)
            ut_key = None if ut is None else _graph_value(np.ascontiguousarray(ut))
            w_key = _graph_value(w_target)
            steps = [dask.delayed(_migp_step_block, pure=False)(
                c0, c1, [p.at(i) for p in z_parts], ut_key, w_key,
                None if y_next is None else y_next.at(i), self.owner)
                for i, (c0, c1) in enumerate(self.cols)]
        out = self._compute([*first, *steps])
        first_out, step_out = out[:len(first)], out[len(first):]
        x_part = None
        if upcoming is not None:
            vn_key = None
            if gram:
                g = sum(r[1] for r in first_out)
                _, u = _top_eigh(g, min(_VN_COMPONENTS, t // 2))
                vn_key = _graph_value(np.ascontiguousarray(u))
            x_part = _Part(name, t, x_target if x_target is not None
                           else [r[0] for r in first_out], vn_key)
        w_part = None
        if ut is not None:
            w_part = _Part(new_w, d_int, w_target if w_target is not None
                           else [r[0] for r in step_out])
        cross = None if y_next is None else sum(r[1] for r in step_out)
        return x_part, (w_part, cross)

    def project(self, z_parts: list[_Part], ut: np.ndarray) -> np.ndarray:
        """``ut @ Z`` (few rows: the output), computed block by block, in memory."""
        ut_key = _graph_value(np.ascontiguousarray(ut))
        tasks = [dask.delayed(_migp_step_block, pure=False)(
            c0, c1, [p.at(i) for p in z_parts], ut_key, None, None, self.owner, True)
            for i, (c0, c1) in enumerate(self.cols)]
        return np.concatenate([r[0] for r in dask.compute(*tasks)], axis=1)


class MIGP(BaseEstimator):
    """MELODIC's Incremental Group-PCA, streamed over subjects with bounded memory.

    Parameters
    ----------
    n_components : int
        Number of group spatial eigenmaps kept (``d_out``).
    d_internal : int, optional
        Rows of the running basis ``W`` after each reduction. Default: ``2 * T`` (``T`` the
        number of volumes of the first subject processed), and at least ``n_components``.
    variance_normalize : bool, default=True
        Divide each voxel by its robust noise std (see Notes) after demeaning.
    random_state : int or None, default=0
        Seed of the order in which the subjects are processed.
    workdir : None, str, path or "memory", default=None
        Where the ``(rows, voxel)`` intermediates live (see the module docstring): None, a
        local temporary directory; a path or fsspec URL (shared by the workers of a
        multi-machine cluster); ``"memory"``, persisted in (cluster) memory.
    block_size : int, optional
        Voxels per block of the intermediates. Default: about 16 MiB per
        ``(d_internal + T, block)`` float64 block.
    shuffle_buffer : int, default=16
        For an iterable that is not a sequence (a generator), the subjects are shuffled
        through a buffer of this many items instead of a full permutation.
    storage_options : dict, optional
        fsspec options of a URL ``workdir``.

    Attributes
    ----------
    components_ : numpy.ndarray, shape (n_components, n_voxels)
        Top rows of the final ``W``: spatial eigenmaps, each scaled by its singular value
        (``singular_values_[i] * v_i`` with ``v_i`` of unit norm), as MIGP outputs them.
        Sign: each row's largest-magnitude voxel is positive.
    singular_values_ : numpy.ndarray, shape (n_components,)
        Norms of the rows of ``components_`` (square roots of the eigenvalues of ``W W^T``).
    d_internal_ : int
        The internal dimension used.
    n_subjects_ : int
        Number of subjects processed.
    n_features_in_ : int
        Number of voxels.
    subject_order_ : numpy.ndarray of int
        Position (in the input) of the subject processed at each step.
    w_rows_ : list of int
        Rows of ``W`` held after each subject (never more than ``d_internal_ + T``).
    block_size_ : int
        Voxels per block used.
    voxel_ijk_ : numpy.ndarray, shape (n_voxels, 3) or None
        Voxel indices (the ``i, j, k`` coordinates of the inputs).
    affine_ : numpy.ndarray, shape (4, 4) or None
    shape_ : tuple of int or None
        The 3D grid of the inputs.

    Notes
    -----
    Algorithm (Smith et al., NeuroImage 2014): for each subject ``Y_s`` (``T x V``), in a
    random order: demean each voxel over time; if ``variance_normalize``, divide each voxel
    by ``max(std(R), 0.001)`` where ``R`` is the residual after removing the top
    ``min(30, T // 2)`` temporal components of the demeaned data (``std`` with ddof=1); then
    ``W = [W; Y_s]`` and, when ``W`` has more than ``d_internal`` rows,
    ``W <- U^T W`` with ``U`` the top ``d_internal`` eigenvectors of ``W W^T``. The output
    is the top ``n_components`` rows of ``W`` when the last subject triggered a reduction,
    else of a final reduction (so that the last subjects count even when they did not
    trigger one; Smith et al. take the top rows of ``W`` as it is).

    The passes are pipelined, one scheduling round (compute) per subject, each voxel block
    in one task per kind of work that reads and writes the scratch arrays itself (no block
    moves between tasks or workers): in round ``r``, subject ``r`` is read (and cleaned)
    once, demeaned, written to ``workdir`` with the Gram matrix of its variance
    normalisation summed over blocks; subject ``r - 1`` (whose normalisation is then known,
    applied to its copy as it is read) gives the cross products ``[W; Y_s] Y_s^T``
    (``W W^T`` is known: ``diag`` of the eigenvalues after a reduction), in the same task
    as the reduction of subject ``r - 2``, ``W <- U^T [W; Y]``, whose block is written and
    used at once. So ``W`` is read once and written once per reduction, each subject's copy
    written once and read twice; the last reduction computes only the ``n_components``
    output rows. Per task: a few ``(d_internal + T, block_size)`` blocks, whatever
    ``n_voxels`` and the number of subjects. Sums over blocks are taken in block order (the
    same numbers for any scheduler or worker count). The small eigendecompositions run in
    the calling process on one BLAS thread.
    """

    def __init__(self, n_components: int, *, d_internal: int | None = None,
                 variance_normalize: bool = True, random_state: int | None = 0,
                 workdir: Any = None, block_size: int | None = None,
                 shuffle_buffer: int = 16, storage_options: dict | None = None) -> None:
        self.n_components = n_components
        self.d_internal = d_internal
        self.variance_normalize = variance_normalize
        self.random_state = random_state
        self.workdir = workdir
        self.block_size = block_size
        self.shuffle_buffer = shuffle_buffer
        self.storage_options = storage_options

    def fit(self, subjects: Iterable[SubjectLike], y: None = None) -> MIGP:
        """Stream the subjects and compute the group spatial eigenmaps.

        Parameters
        ----------
        subjects : sequence or iterable of DataArray (or callables returning one)
            ``(time, voxel)`` masked data of each subject, same voxels for all.
        y : None
            Ignored.

        Returns
        -------
        MIGP
            self.
        """
        _check_subjects(subjects)
        k = int(self.n_components)
        if k < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}")
        rng = np.random.default_rng(self.random_state)
        order: list[int] = []
        rows_seen: list[int] = []
        voxels: _Voxels | None = None
        d_int = block = 0
        cols: list[tuple[int, int]] = []

        def prepare(entry: tuple[int, Any] | None) -> tuple[int, da.Array] | None:
            """Open a subject: ``(position, data in (time, block) chunks)``."""
            nonlocal voxels, d_int, block, cols
            if entry is None:
                return None
            position, item = entry
            x, template = _load(item, position)
            t, n_vox = x.shape
            if voxels is None:
                voxels = _Voxels(template, n_vox)
                d_int = int(self.d_internal) if self.d_internal else 2 * t
                d_int = max(d_int, k)
                block = _block_size(self.block_size, d_int + t, n_vox)
                cols = [(c0, min(c0 + block, n_vox)) for c0 in range(0, n_vox, block)]
            else:
                voxels.check(template, n_vox, position)
            return position, x.rechunk((-1, block))

        subjects_iter = _shuffled(subjects, rng, max(1, int(self.shuffle_buffer)))
        with _Scratch(self.workdir, self.storage_options) as scratch:
            upcoming = prepare(next(subjects_iter, None))
            if upcoming is None:
                raise ValueError("no subject given")
            rounds = _MIGPRounds(scratch, voxels.n_voxels, block, cols)
            w_parts: list[_Part] = []  # W's rows: [W] after a reduction, else subjects
            w_gram = np.zeros((0, 0))  # W W^T, known without another pass over W
            pending: tuple[list[_Part], np.ndarray, np.ndarray] | None = None
            current: tuple[int, _Part] | None = None
            step = 0
            # One compute per round, each voxel block in one task of each kind: the first
            # pass of the upcoming subject (read, clean, demean, write, VN Gram); the
            # reduction decided in the previous round (W <- U^T [W; Y], written); and the
            # cross products [W; Y] Y^T of the current subject (read in the previous round).
            while upcoming is not None or current is not None:
                new_w = f"w{step}" if pending is not None else None
                first, crossed = rounds.run(
                    upcoming=None if upcoming is None else (f"x{step}", upcoming[1]),
                    vn=self.variance_normalize,
                    z_parts=pending[0] if pending is not None else w_parts,
                    ut=None if pending is None else pending[1], new_w=new_w, d_int=d_int,
                    y_next=None if current is None else current[1])
                if pending is not None:
                    w_parts, w_gram = [crossed[0]], np.diag(pending[2])  # U^T Z Z^T U
                    for part in pending[0]:
                        scratch.drop(part.name)
                    pending = None
                if current is not None:
                    position, y_part = current
                    cross = crossed[1]
                    n_w = w_gram.shape[0]
                    z_gram = np.block([[w_gram, cross[:n_w]], [cross[:n_w].T, cross[n_w:]]])
                    z_parts = [*w_parts, y_part]
                    if z_gram.shape[0] > d_int:
                        vals, vecs = _top_eigh(z_gram, d_int)
                        pending = (z_parts, vecs.T, vals)
                        rows_seen.append(d_int)
                    else:
                        w_parts, w_gram = z_parts, z_gram
                        rows_seen.append(z_gram.shape[0])
                    order.append(position)
                    current = None
                if upcoming is not None:
                    current = (upcoming[0], first)
                    upcoming = prepare(next(subjects_iter, None))
                step += 1
            # The output: the top k rows of U^T Z of the last reduction (only these k
            # rows are computed), else of a final reduction of W.
            if pending is not None:
                z_parts, ut, vals = pending[0], pending[1][:k], pending[2][:k]
            else:
                if w_gram.shape[0] < k:
                    raise ValueError(f"n_components={k} exceeds the {w_gram.shape[0]} rows "
                                     "of the group data")
                vals, vecs = _top_eigh(w_gram, k)
                z_parts, ut = w_parts, vecs.T
            comps = rounds.project(z_parts, ut)
        self.components_ = _flip_rows(comps)
        self.singular_values_ = np.sqrt(vals)
        self.d_internal_ = d_int
        self.n_subjects_ = len(order)
        self.n_features_in_ = voxels.n_voxels
        self.subject_order_ = np.asarray(order, dtype=int)
        self.w_rows_ = rows_seen
        self.block_size_ = block
        self.voxel_ijk_ = voxels.ijk
        self.affine_ = voxels.affine
        self.shape_ = voxels.shape
        return self


# ------------------------------------------------------------------------------------------
# CanICA-style reduction and unmixing
# ------------------------------------------------------------------------------------------
def _canica_reduce(subjects: Iterable[SubjectLike], k: int, *, do_cca: bool,
                   random_state: Any, n_power_iter: int, scratch: _Scratch,
                   block_size: int | None, out: dict | None = None
                   ) -> tuple[np.ndarray, np.ndarray, _Voxels, int, int]:
    """Per-subject PCA, stacking, randomized SVD: nilearn ``_MultiPCA`` over voxel blocks.

    Returns the group components ``(k, V)`` (unit rows), their singular values, the voxel
    set, the number of subjects and the block size. ``out``, if given, receives the lazy
    stacked subject rows (``"stacked"``, in ``scratch``: valid while it is open) and each
    row's singular value (``"row_norms"``: the CCA divisors, ones without CCA).
    """
    row_norms: list[np.ndarray] = []
    voxels: _Voxels | None = None
    block = 0
    stack: _Stack | None = None
    expected = len(subjects) * k if isinstance(subjects, Sequence) else None

    def prepare(s: int, item: Any) -> tuple[da.Array, da.Array]:
        """Open subject ``s``: its data and the lazy Gram matrix of its PCA."""
        nonlocal voxels, block, stack
        x, template = _load(item, s)
        t, n_vox = x.shape
        if voxels is None:
            voxels = _Voxels(template, n_vox)
            block = _block_size(block_size, max(t, k), n_vox)
            # a given block_size is kept as it is (the stack read in blocks of it)
            col, block = (block, block) if block_size else _col_chunk(block)
            stack = _Stack(scratch, n_vox, k, col, expected)
        else:
            voxels.check(template, n_vox, s)
        x = x.rechunk((-1, block))
        return x, _gram_lazy(x)

    items = enumerate(subjects)
    first = next(items, None)
    if first is None:
        raise ValueError("no subject given")
    # each subject is read (and cleaned) once: written to the scratch with its Gram matrix
    # in the same pass; its projection reads the scratch copy
    stored, (gram,) = scratch.put_many({"x0": (first_x := prepare(*first))[0]}, block,
                                       [first_x[1]])
    x_s: da.Array | None = stored["x0"]
    s = 0
    while x_s is not None:
        # nilearn: SVD of the cleaned data (not re-centred), keep min(k, T) rows U^T X = S V^T
        vals, vecs = _top_eigh(gram, min(k, x_s.shape[0]))
        rows = _project(vecs.T, x_s)
        norms = np.ones(rows.shape[0])
        if do_cca:  # each row divided by its L2 norm (= its singular value)
            norms = np.sqrt(np.clip(vals, 0, None))
            norms[norms == 0] = 1.0
            rows = rows / norms[:, None]
        row_norms.append(norms)
        upcoming = next(items, None)
        new: dict[str, da.Array | None] = {}
        others: list[da.Array | None] = [None]
        if upcoming is not None:
            x_next, gram_next = prepare(*upcoming)
            new, others = {f"x{s + 1}": x_next}, [gram_next]
        # write this subject's rows and, in the same pass, the next subject's scratch copy
        # and Gram matrix
        add = stack.add(rows.rechunk((rows.shape[0], block)))
        stored, (gram,) = scratch.put_many(new, block, others,
                                           extra=() if add is None else (add,))
        scratch.drop(f"x{s}")
        x_s = stored.get(f"x{s + 1}")
        s += 1
    n_rows = stack.n_rows
    # one task per column block of the whole stack (blocks used once per pass), of bounded
    # size
    stacked = stack.read(_block_size(block_size, n_rows, voxels.n_voxels))
    if stacked.shape[0] < k:
        raise ValueError(f"n_components={k} exceeds the {stacked.shape[0]} stacked subject "
                         "components")
    seed = random_state if isinstance(random_state, int | np.integer) else (
        check_random_state(random_state).randint(np.iinfo(np.int32).max))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=da.PerformanceWarning)
        _, sv, v = da.linalg.svd_compressed(stacked, k, iterator="QR",
                                            n_power_iter=n_power_iter, seed=int(seed),
                                            compute=True)
        sv, v = dask.compute(sv, v)
    if out is not None:
        out["stacked"] = stacked
        out["row_norms"] = np.concatenate(row_norms)
    return np.asarray(v), np.asarray(sv), voxels, s, block


def _fastica(x: np.ndarray, *, whiten: str, fun: str, random_state: Any, max_iter: int,
             tol: float, limit_blas: bool = True) -> np.ndarray:
    """Sources ``(n_samples, k)`` of :func:`sklearn.decomposition.fastica`, safely whitened.

    The same computation as ``fastica(x, whiten=..., whiten_solver="svd")`` (PCA whitening
    by the SVD of the centred data, then the parallel fixed-point iterations from the same
    seeded initial matrix), except for one step: scikit-learn fixes the signs of the
    whitening vectors with ``u *= np.sign(u[0])``, and an exact 0 in ``u[0]`` then zeroes a
    whitened dimension, so that FastICA returns mixtures (or NaN). This happens with
    orthonormal columns - exactly CanICA's input - whose singular values are all 1: LAPACK
    then returns axis-aligned singular vectors (in the tests, for some subject orders or
    block sizes). Here a zero counts as positive.

    ``limit_blas=False`` leaves the BLAS threads alone (the caller limits them: threadpoolctl
    limits are process-wide, so concurrent runs must not set and restore them each).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    xt = (x - x.mean(axis=0)).T
    with _blas_threads(x.size) if limit_blas else contextlib.nullcontext():
        u, d = linalg.svd(xt, full_matrices=False, check_finite=False)[:2]
        u *= np.where(u[0] < 0, -1.0, 1.0)
        x1 = ((u / d).T @ xt) * np.sqrt(n)
        _, w, _ = fastica(x1.T, whiten=False, fun=_ica_fun(fun), random_state=random_state,
                          max_iter=max_iter, tol=tol)
        sources = (w @ x1).T / np.sqrt(n)
    if whiten == "unit-variance":
        sources /= np.std(sources, axis=0, keepdims=True)
    return sources


def _threshold_ratio(threshold: Any, k: int) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, str):
        if threshold == "auto":
            return 1.0
        raise ValueError(f"threshold must be None, 'auto' or a float, got {threshold!r}")
    ratio = float(threshold)
    if not 0 <= ratio <= k:
        raise ValueError(f"threshold must be in [0, n_components={k}], got {threshold}")
    return ratio


def _apply_threshold(maps: np.ndarray, ratio: float | None) -> np.ndarray:
    """nilearn's CanICA threshold: keep about ``ratio * n_voxels`` voxels over all maps."""
    if ratio is None:
        return maps
    abs_maps = np.abs(maps)
    percentile = 100.0 - (100.0 / len(maps)) * ratio
    if percentile <= 0:
        warnings.warn(f"critical threshold (percentile {percentile}); no threshold applied",
                      UserWarning, stacklevel=3)
        return maps
    cut = scoreatpercentile(abs_maps, percentile)
    out = maps.copy()
    out[abs_maps < cut] = 0.0
    return out


def _canica_unmix(components: np.ndarray, *, n_init: int, random_state: Any,
                  threshold: Any, max_iter: int = 200, tol: float = 1e-4
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """``CanICA._unmix_components`` of nilearn 0.14, on ``(n_voxels, k)`` components.

    Returns the ``(k, n_voxels)`` maps, the maximum L1 norm of each run's maps and the index
    of the run kept.
    """
    rs = check_random_state(random_state)
    seeds = rs.randint(np.iinfo(np.int32).max, size=n_init)
    x = np.asarray(components, dtype=np.float64)

    def run(seed: int) -> np.ndarray:
        return _fastica(x, whiten="arbitrary-variance", fun="cube", random_state=seed,
                        max_iter=max_iter, tol=tol, limit_blas=False).T

    # the restarts are independent (each from its own seed): run them on the local cores
    # (NumPy releases the GIL in the array arithmetic), BLAS on one thread each; the
    # results do not depend on the number of threads
    n_threads = max(1, min(len(seeds), len(os.sched_getaffinity(0))
                           if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    with threadpool_limits(limits=1, user_api="blas"):
        if n_threads == 1:
            runs = [run(int(seed)) for seed in seeds]
        else:
            with ThreadPoolExecutor(n_threads, thread_name_prefix="canica-ica") as pool:
                runs = list(pool.map(run, (int(seed) for seed in seeds)))
    scores = [np.sum(np.abs(maps), axis=1).max() for maps in runs]
    best = int(np.argmin(scores))  # first minimum, as nilearn's min(..., key=...)
    maps = _apply_threshold(runs[best], _threshold_ratio(threshold, x.shape[1]))
    maps = maps.astype(np.asarray(components).dtype, copy=True)
    for row in maps:
        if row.max() < -row.min():
            row *= -1
    return maps, np.asarray(scores), best


def _melodic_unmix(eigenmaps: np.ndarray, *, random_state: Any, fun: str,
                   max_iter: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Spatial FastICA of ``(k, V)`` eigenmaps: z-scored, positive-skew maps by variance.

    Returns the maps and the mixing matrix ``(k, k)`` (eigenmaps ~ mixing @ sources before
    the z-scoring of the sources), columns in the order of the maps.
    """
    x = np.asarray(eigenmaps, dtype=np.float64).T  # voxels are the samples
    seed = check_random_state(random_state).randint(np.iinfo(np.int32).max)
    sources = _fastica(x, whiten="unit-variance", fun=fun, random_state=seed,
                       max_iter=max_iter, tol=tol)
    centred = x - x.mean(axis=0)
    with _blas_threads(x.size):
        mixing = np.linalg.lstsq(sources, centred, rcond=None)[0].T  # (k_pca, k_ica)
    energy = (mixing**2).sum(axis=0) * (sources**2).sum(axis=0)
    order = np.argsort(energy)[::-1]
    sources, mixing = sources[:, order], mixing[:, order]
    maps = sources.T - sources.mean(axis=0)[:, None]
    std = maps.std(axis=1, ddof=1)
    std[std == 0] = 1.0
    mixing = mixing * std[None, :]
    maps = maps / std[:, None]
    sign = np.where((maps**3).mean(axis=1) < 0, -1.0, 1.0)
    return maps * sign[:, None], mixing * sign[None, :]


# ------------------------------------------------------------------------------------------
# Group ICA
# ------------------------------------------------------------------------------------------
class GroupICA(BaseEstimator):
    """Multi-subject spatial ICA with bounded memory: MIGP (MELODIC) or CanICA-style.

    Parameters
    ----------
    n_components : int, default=20
        Number of group components.
    method : {"migp", "canica"}, default="migp"
        ``"migp"``: :class:`MIGP` group PCA, then spatial FastICA (MELODIC concat-ICA).
        ``"canica"``: nilearn ``CanICA`` semantics (per-subject PCA, CCA, randomized SVD,
        ``n_init`` FastICA runs).
    n_init : int, default=10
        FastICA restarts (``"canica"``; the run with the smallest maximum L1 norm of its
        maps is kept). ``"migp"`` runs FastICA once.
    random_state : int or None, default=0
        Seed (subject order of MIGP, randomized SVD, FastICA initialisations).
    threshold : None, "auto" or float, default="auto"
        ``"canica"``: nilearn semantics - ``"auto"`` keeps about ``n_voxels`` voxels over all
        the maps (ratio 1), a float is that ratio (in ``[0, n_components]``), None keeps
        everything. ``"migp"``: ``"auto"`` means no threshold (z-maps, as MELODIC before its
        mixture-model step); a float is the same ratio as for ``"canica"``.
    do_cca : bool, default=True
        ``"canica"``: divide each subject component by its norm before the group SVD.
    d_internal : int, optional
        ``"migp"``: see :class:`MIGP`.
    variance_normalize : bool, default=True
        ``"migp"``: see :class:`MIGP`.
    fun : {"cube", "logcosh", "exp"}, default="cube"
        ``"migp"``: FastICA non-linearity (``"cube"`` is MELODIC's default ``pow3``);
        ``"canica"`` always uses ``"cube"``, as nilearn.
    n_power_iter : int, default=3
        ``"canica"``: power (QR) iterations of the randomized SVD (nilearn uses 3).
    max_iter : int, default=200
        FastICA iterations.
    tol : float, default=1e-4
        FastICA tolerance.
    workdir, block_size, storage_options
        Temporary storage of the ``(rows, voxel)`` intermediates; see :class:`MIGP`.

    Attributes
    ----------
    components_ : numpy.ndarray, shape (n_components, n_voxels)
        Group maps (``"migp"``: z-scored, positive skew, by decreasing explained variance;
        ``"canica"``: nilearn's scaling and order, thresholded, peak positive).
    pca_components_ : numpy.ndarray, shape (n_components, n_voxels)
        The group PCA maps given to FastICA (MIGP eigenmaps, or CanICA's right singular
        vectors of the stacked subject components).
    mixing_ : numpy.ndarray, shape (n_components, n_components) or None
        ``"migp"``: ``migp_.components_`` (the scaled eigenmaps), each demeaned over voxels,
        ``~= mixing_ @ components_`` (before any thresholding); columns in the order of
        the maps.
    migp_ : MIGP or None
        The fitted group PCA (``"migp"``).
    init_scores_ : numpy.ndarray or None
        ``"canica"``: maximum L1 norm of the maps of each FastICA run; ``best_init_`` the
        run kept.
    n_subjects_ : int
    n_features_in_ : int
        Number of voxels.
    voxel_ijk_ : numpy.ndarray, shape (n_voxels, 3) or None
        Voxel indices of the maps.
    affine_ : numpy.ndarray (4, 4) or None
    shape_ : tuple of int or None
        The 3D grid (for :meth:`components_img`).

    Examples
    --------
    >>> subjects = [clean_signals(apply_mask(open_run(store, subject=s), mask)  # doctest: +SKIP
    ...             for s in ("01", "02")]
    >>> ica = GroupICA(10, method="migp").fit(subjects)  # doctest: +SKIP
    >>> img = ica.components_img(dim="time")  # doctest: +SKIP
    >>> storage.to_nifti(img, "desc-migp_components.nii.gz")  # doctest: +SKIP
    """

    def __init__(self, n_components: int = 20, *, method: Literal["migp", "canica"] = "migp",
                 n_init: int = 10, random_state: int | None = 0,
                 threshold: Literal["auto"] | float | None = "auto", do_cca: bool = True,
                 d_internal: int | None = None, variance_normalize: bool = True,
                 fun: str = "cube", n_power_iter: int = 3, max_iter: int = 200,
                 tol: float = 1e-4, workdir: Any = None, block_size: int | None = None,
                 storage_options: dict | None = None) -> None:
        self.n_components = n_components
        self.method = method
        self.n_init = n_init
        self.random_state = random_state
        self.threshold = threshold
        self.do_cca = do_cca
        self.d_internal = d_internal
        self.variance_normalize = variance_normalize
        self.fun = fun
        self.n_power_iter = n_power_iter
        self.max_iter = max_iter
        self.tol = tol
        self.workdir = workdir
        self.block_size = block_size
        self.storage_options = storage_options

    def fit(self, subjects: Iterable[SubjectLike], y: None = None) -> GroupICA:
        """Compute the group maps.

        Parameters
        ----------
        subjects : sequence or iterable of DataArray (or callables returning one)
            ``(time, voxel)`` masked (and cleaned) data of each subject, same voxels.
        y : None
            Ignored.

        Returns
        -------
        GroupICA
            self.
        """
        _check_subjects(subjects)
        k = int(self.n_components)
        ratio = _threshold_ratio(None if self.method == "migp" and self.threshold == "auto"
                                 else self.threshold, k)
        self.migp_ = None
        self.init_scores_ = None
        self.best_init_ = None
        self.mixing_ = None
        if self.method == "migp":
            migp = MIGP(k, d_internal=self.d_internal,
                        variance_normalize=self.variance_normalize,
                        random_state=self.random_state, workdir=self.workdir,
                        block_size=self.block_size,
                        storage_options=self.storage_options).fit(subjects)
            maps, mixing = _melodic_unmix(migp.components_, random_state=self.random_state,
                                          fun=self.fun, max_iter=self.max_iter, tol=self.tol)
            self.migp_ = migp
            self.mixing_ = mixing
            norms = np.where(migp.singular_values_ > 0, migp.singular_values_, 1.0)
            self.pca_components_ = migp.components_ / norms[:, None]
            self.components_ = _apply_threshold(maps, ratio)
            voxels = _Voxels(None, migp.n_features_in_)
            voxels.ijk, voxels.affine, voxels.shape = (migp.voxel_ijk_, migp.affine_,
                                                       migp.shape_)
            n_subjects = migp.n_subjects_
        elif self.method == "canica":
            with _Scratch(self.workdir, self.storage_options) as scratch:
                comps, _, voxels, n_subjects, _ = _canica_reduce(
                    subjects, k, do_cca=self.do_cca, random_state=self.random_state,
                    n_power_iter=self.n_power_iter, scratch=scratch,
                    block_size=self.block_size)
            maps, scores, best = _canica_unmix(comps.T, n_init=int(self.n_init),
                                               random_state=self.random_state,
                                               threshold=self.threshold,
                                               max_iter=self.max_iter, tol=self.tol)
            self.pca_components_ = comps
            self.components_ = maps
            self.init_scores_ = scores
            self.best_init_ = best
        else:
            raise ValueError(f"method must be 'migp' or 'canica', got {self.method!r}")
        self.n_subjects_ = n_subjects
        self.n_features_in_ = voxels.n_voxels
        self.voxel_ijk_ = voxels.ijk
        self.affine_ = voxels.affine
        self.shape_ = voxels.shape
        return self

    def components_img(self, *, dim: str = "component", fill: float = 0.0) -> xr.DataArray:
        """The maps on the 3D grid: a ``(x, y, z, <dim>)`` DataArray.

        Parameters
        ----------
        dim : str, default="component"
            Name of the 4th dimension; ``dim="time"`` gives an array that
            :func:`storage.to_nifti` writes as a 4D NIfTI (one volume per component).
        fill : float, default=0.0
            Value outside the mask.

        Returns
        -------
        xarray.DataArray
            NumPy-backed; attribute ``affine``.
        """
        if self.voxel_ijk_ is None or self.shape_ is None:
            raise ValueError("the inputs had no i, j, k coordinates / shape attribute "
                             "(use pipeline.masking.apply_mask)")
        k = self.components_.shape[0]
        out = np.full((*self.shape_, k), fill, dtype=self.components_.dtype)
        ii, jj, kk = self.voxel_ijk_.T
        out[ii, jj, kk, :] = self.components_.T
        attrs = {} if self.affine_ is None else {"affine": self.affine_}
        return xr.DataArray(out, dims=("x", "y", "z", dim), coords={dim: np.arange(k)},
                            attrs=attrs, name="components")
