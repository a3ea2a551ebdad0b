"""Group dictionary learning (nilearn ``DictLearning``), streamed over voxel blocks.

Sparse spatial maps as in Mensch et al. (2016) and nilearn's
:class:`nilearn.decomposition.DictLearning`: the subjects are reduced as for CanICA
(per-subject PCA, rows ``S U^T``), the maps are initialised with CanICA's, and a dense
temporal dictionary with sparse spatial loadings is learnt by online (mini-batch) dictionary
learning where the *voxels are the samples*. That makes the method naturally out of core:

1. reduction and the CanICA initialisation: :func:`pipeline.decomposition.group._canica_reduce`
   (stacked subject rows in a temporary Zarr array, randomized SVD over voxel blocks);
2. initial dictionary: ridge regression of the data on the initial maps (nilearn's
   ``_compute_loadings``), one pass over voxel blocks (``C Y^T`` is ``k x rows``);
3. :class:`sklearn.decomposition.MiniBatchDictionaryLearning` ``partial_fit`` on mini-batches
   of voxels, streamed in ranges of 2048 voxels in a seeded random order (ranges shuffled,
   voxels shuffled within each range; the next range is read while one is learnt from),
   ``n_epochs`` passes;
4. the sparse code of every voxel (``sparse_encode``, lasso coordinate descent), one task
   per voxel block on the cluster, gives the maps.

Memory: the learner holds ``rows x k`` dictionary statistics and one voxel block; nothing of
size ``rows x n_voxels`` is in one process. Unlike nilearn, whose single in-memory shuffle
permutes all voxels at once, voxels are visited in a block-wise random order, so the maps
equal nilearn's up to the randomness of online learning (compared in the tests), not to
rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import dask
import dask.array as da
import numpy as np
from sklearn.base import BaseEstimator
from sklearn.decomposition import MiniBatchDictionaryLearning, sparse_encode
from sklearn.utils import check_random_state

from .group import (
    GroupICA,
    SubjectLike,
    _canica_reduce,
    _canica_unmix,
    _check_subjects,
    _Scratch,
)

__all__ = ["GroupDictLearning"]

#: Voxels per learning block: the unit of the random visiting order (independent of chunks).
_LEARN_BLOCK = 2048


def _cross(maps_block: np.ndarray, data_block: np.ndarray) -> np.ndarray:
    # C Y^T for one voxel block: (k, b) @ (b, rows)
    return maps_block @ data_block.T


def _encode(data_block: np.ndarray, dictionary: np.ndarray, alpha: float,
            algorithm: str) -> np.ndarray:
    # voxels are the samples: (b, rows) coded on the (k, rows) dictionary -> (k, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        code = sparse_encode(np.ascontiguousarray(data_block.T), dictionary,
                             algorithm=algorithm, alpha=alpha, max_iter=1000)
    return code.T


class GroupDictLearning(BaseEstimator):
    """Sparse group maps by online dictionary learning over voxel blocks.

    Parameters
    ----------
    n_components : int, default=20
        Number of maps.
    alpha : float, default=10
        Sparsity of the maps (nilearn's default).
    n_epochs : int, default=1
        Passes over the voxels.
    batch_size : int, default=20
        Voxels per mini-batch (nilearn's default).
    method : {"cd", "lars"}, default="cd"
        Lasso solver of the code (nilearn's ``method``).
    random_state : int or None, default=0
        Seed: reduction, CanICA initialisation and the order voxels are visited in.
    workdir, storage_options, block_size :
        Temporary storage of the stacked subject rows, as
        :class:`pipeline.decomposition.group.GroupICA`.

    Attributes
    ----------
    components_ : ndarray (n_components, n_voxels)
        Unit-norm sparse maps, signs such that the positive part has more voxels.
    components_init_ : ndarray (n_components, n_voxels)
        The CanICA initialisation.
    dictionary_ : ndarray (n_components, n_rows)
        The temporal dictionary of the stacked reduced data.
    n_subjects_, n_features_in_, voxel_ijk_, affine_, shape_ :
        As :class:`~pipeline.decomposition.group.GroupICA`.

    Examples
    --------
    >>> dl = GroupDictLearning(n_components=10).fit(subject_matrices)  # doctest: +SKIP
    >>> dl.components_.shape  # doctest: +SKIP
    (10, 50000)
    """

    def __init__(self, n_components: int = 20, *, alpha: float = 10.0, n_epochs: int = 1,
                 batch_size: int = 20, method: str = "cd", random_state: Any = 0,
                 workdir: Any = None, storage_options: dict | None = None,
                 block_size: int | None = None) -> None:
        self.n_components = n_components
        self.alpha = alpha
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.method = method
        self.random_state = random_state
        self.workdir = workdir
        self.storage_options = storage_options
        self.block_size = block_size

    def fit(self, subjects: Iterable[SubjectLike], y: None = None) -> GroupDictLearning:
        """Learn the maps.

        Parameters
        ----------
        subjects : sequence or iterable of DataArray (or callables returning one)
            ``(time, voxel)`` masked (and cleaned) data of each subject, same voxels.
        y : None
            Ignored.

        Returns
        -------
        GroupDictLearning
            self.
        """
        _check_subjects(subjects)
        if self.method not in ("cd", "lars"):
            raise ValueError(f"method must be 'cd' or 'lars', got {self.method!r}")
        k = int(self.n_components)
        rng = check_random_state(self.random_state)
        out: dict[str, Any] = {}
        with _Scratch(self.workdir, self.storage_options) as scratch:
            comps, _, voxels, n_subjects, _ = _canica_reduce(
                subjects, k, do_cca=True, random_state=self.random_state, n_power_iter=3,
                scratch=scratch, block_size=self.block_size, out=out)
            # nilearn: CanICA (one init, threshold = n_components) on the CCA rows ...
            with warnings.catch_warnings():
                # threshold = k is "no threshold" (nilearn silences the same note)
                warnings.simplefilter("ignore", category=UserWarning)
                init, _, _ = _canica_unmix(comps.T, n_init=1,
                                           random_state=self.random_state,
                                           threshold=float(k))
            init = np.asarray(init, dtype=np.float64)
            # a canonical order (by the centre of mass of each squared map over the voxel
            # index: continuous, so rounding cannot swap two maps): the randomized SVD's
            # basis, hence FastICA's order, depends on the chunks, and the online learning
            # below depends on the order of its atoms
            energy = init**2
            centre = energy @ np.arange(init.shape[1]) / np.maximum(energy.sum(axis=1), 1e-300)
            init = init[np.argsort(centre, kind="stable")]
            sq = (init**2).sum(axis=1)
            init /= np.where(sq == 0, 1.0, sq)[:, None]
            # ... and the dictionary learnt on the un-normalised reduced data (S U^T rows)
            data = out["stacked"] * out["row_norms"][:, None]
            dictionary = self._learn(data, init, rng)
            codes = da.map_blocks(
                _encode, data, dictionary, float(self.alpha),
                "lasso_cd" if self.method == "cd" else "lasso_lars",
                chunks=((k,), data.chunks[1]), dtype=np.float64)
            maps = np.asarray(codes.compute())
        norms = np.sqrt((maps**2).sum(axis=1))
        maps /= np.where(norms == 0, 1.0, norms)[:, None]
        for row in maps:  # nilearn: the positive part is the larger in voxel count
            if np.sum(row > 0) < np.sum(row < 0):
                row *= -1
        self.components_ = maps
        self.components_init_ = init
        self.dictionary_ = dictionary
        self.n_subjects_ = n_subjects
        self.n_features_in_ = voxels.n_voxels
        self.voxel_ijk_ = voxels.ijk
        self.affine_ = voxels.affine
        self.shape_ = voxels.shape
        return self

    #: The maps on the 3D grid (see :meth:`GroupICA.components_img`).
    components_img = GroupICA.components_img

    def _learn(self, data: da.Array, init: np.ndarray, rng: np.random.RandomState
               ) -> np.ndarray:
        """Initial dictionary (ridge loadings), then mini-batch learning over voxel blocks."""
        k = init.shape[0]
        init_d = da.from_array(init, chunks=((k,), data.chunks[1]))
        # nilearn _compute_loadings: Ridge(alpha=1e-8, no intercept) of Y^T on C^T
        cty = sum(da.map_blocks(_cross, init_d.blocks[0, j], data.blocks[0, j],
                                chunks=((k,), (data.shape[0],)), dtype=np.float64)
                  for j in range(data.numblocks[1]))
        cty = np.asarray(dask.compute(cty)[0])
        gram = init @ init.T + 1e-8 * np.eye(k)
        loadings = np.linalg.solve(gram, cty)  # (k, rows)
        col = np.sqrt((loadings**2).sum(axis=0))
        loadings /= np.where(col == 0, 1.0, col)[None, :]
        learner = MiniBatchDictionaryLearning(
            n_components=k, alpha=float(self.alpha), batch_size=int(self.batch_size),
            fit_algorithm=self.method, dict_init=loadings, shuffle=False,
            random_state=rng.randint(np.iinfo(np.int32).max), max_iter=1)
        # the visiting order is defined on fixed voxel ranges, not on the storage blocks:
        # the same seed gives the same maps whatever the chunking
        starts = list(range(0, data.shape[1], _LEARN_BLOCK))

        def piece(a: int):
            return data[:, a:a + _LEARN_BLOCK].persist()

        for _ in range(int(self.n_epochs)):
            order = [starts[i] for i in rng.permutation(len(starts))]
            nxt = piece(order[0]) if order else None
            for n in range(len(order)):
                current, nxt = nxt, piece(order[n + 1]) if n + 1 < len(order) else None
                x = np.asarray(current.compute()).T  # voxels x rows; the next is being read
                x = x[rng.permutation(x.shape[0])]
                for b0 in range(0, x.shape[0], int(self.batch_size)):
                    learner.partial_fit(x[b0:b0 + int(self.batch_size)])
                del current
        return np.asarray(learner.components_)
