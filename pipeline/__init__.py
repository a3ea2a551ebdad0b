"""boldflow pipeline: statistics and orchestration over the stores that :mod:`storage` writes.

This release provides the simulator with ground truth, cluster helpers and the CLI; the
stages (masking, cleaning, decomposition, denoising, connectivity) build on it.
"""

from __future__ import annotations

from .cluster import cluster_client
from .simulate import SimulatedDataset, SimulatedRun, load_truth, simulate_dataset

__all__ = ["SimulatedDataset", "SimulatedRun", "cluster_client", "load_truth",
           "simulate_dataset"]
