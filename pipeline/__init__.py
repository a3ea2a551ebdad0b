"""boldflow pipeline: statistics and orchestration over the stores that :mod:`storage` writes.

Public API:

* jobs: :class:`Pipeline` (``Pipeline.from_yaml(path).submit(client=None)``), :class:`Job`,
  :class:`JobResult`, :func:`load_config`;
* stages: :func:`clean_signals` (``nilearn.signal.clean`` for NumPy and Dask),
  :func:`apply_mask`, :func:`unmask`, :func:`compute_epi_mask`, :func:`intersect_masks`,
  :func:`load_atlas`, :func:`label_signals`, :func:`map_signals`,
  :func:`seed_correlation`, :func:`select_confounds`, :func:`strategy_confounds`;
* connectivity: :func:`connectivity`, :func:`group_connectivity`, :func:`compare_groups`,
  :func:`group_mean`, :func:`vectorize`;
* the simulator with ground truth: :func:`simulate_dataset`, :func:`load_truth`.
"""

from __future__ import annotations

from .cluster import cluster_client
from .config import ConfigError, JobConfig, load_config
from .connectivity import compare_groups, connectivity, group_connectivity, group_mean, vectorize
from .jobs import Job, JobResult, Pipeline
from .masking import apply_mask, compute_epi_mask, intersect_masks, unmask
from .parcellation import Atlas, label_signals, load_atlas, map_signals
from .seeds import seed_correlation
from .signal import clean_signals
from .simulate import SimulatedDataset, SimulatedRun, load_truth, simulate_dataset
from .strategies import STRATEGIES, select_confounds, strategy_confounds

__all__ = [
    "STRATEGIES", "Atlas", "ConfigError", "Job", "JobConfig", "JobResult", "Pipeline",
    "SimulatedDataset", "SimulatedRun", "apply_mask", "clean_signals", "cluster_client",
    "compare_groups", "compute_epi_mask", "connectivity", "group_connectivity", "group_mean",
    "intersect_masks", "label_signals", "load_atlas", "load_config", "load_truth",
    "map_signals", "seed_correlation", "select_confounds", "simulate_dataset",
    "strategy_confounds", "unmask", "vectorize",
]
