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

The names above are imported on first use (PEP 562), not by ``import pipeline``: a Dask
worker that unpickles a task of :mod:`pipeline._kernels` or
:mod:`pipeline.decomposition._blocks` imports only what that module needs (NumPy, SciPy), not
nilearn, scikit-learn or the job machinery.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs
    from .cluster import cluster_client
    from .config import ConfigError, JobConfig, load_config
    from .connectivity import (
        compare_groups,
        connectivity,
        group_connectivity,
        group_mean,
        vectorize,
    )
    from .jobs import Job, JobResult, Pipeline
    from .masking import apply_mask, compute_epi_mask, intersect_masks, unmask
    from .parcellation import Atlas, label_signals, load_atlas, map_signals
    from .seeds import seed_correlation
    from .signal import clean_signals
    from .simulate import SimulatedDataset, SimulatedRun, load_truth, simulate_dataset
    from .strategies import STRATEGIES, select_confounds, strategy_confounds

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "cluster_client": "cluster",
    **dict.fromkeys(("ConfigError", "JobConfig", "load_config"), "config"),
    **dict.fromkeys(("compare_groups", "connectivity", "group_connectivity", "group_mean",
                     "vectorize"), "connectivity"),
    **dict.fromkeys(("Job", "JobResult", "Pipeline"), "jobs"),
    **dict.fromkeys(("apply_mask", "compute_epi_mask", "intersect_masks", "unmask"),
                    "masking"),
    **dict.fromkeys(("Atlas", "label_signals", "load_atlas", "map_signals"), "parcellation"),
    "seed_correlation": "seeds",
    "clean_signals": "signal",
    **dict.fromkeys(("SimulatedDataset", "SimulatedRun", "load_truth", "simulate_dataset"),
                    "simulate"),
    **dict.fromkeys(("STRATEGIES", "select_confounds", "strategy_confounds"), "strategies"),
}

__all__ = [
    "STRATEGIES", "Atlas", "ConfigError", "Job", "JobConfig", "JobResult", "Pipeline",
    "SimulatedDataset", "SimulatedRun", "apply_mask", "clean_signals", "cluster_client",
    "compare_groups", "compute_epi_mask", "connectivity", "group_connectivity", "group_mean",
    "intersect_masks", "label_signals", "load_atlas", "load_config", "load_truth",
    "map_signals", "seed_correlation", "select_confounds", "simulate_dataset",
    "strategy_confounds", "unmask", "vectorize",
]


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, e.g. ``pipeline.jobs``) on first access."""
    source = _EXPORTS.get(name)
    if source is not None:
        value = getattr(importlib.import_module(f".{source}", __name__), name)
        if name != "connectivity":  # that one is a property of the package, see below
            globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the dunders and the submodules imported so far."""
    loaded = {n for n, v in globals().items()
              if isinstance(v, types.ModuleType) and v.__name__ == f"{__name__}.{n}"}
    return sorted({n for n in globals() if n.startswith("__")} | set(__all__) | loaded)


class _Package(types.ModuleType):
    """The ``pipeline`` package: ``pipeline.connectivity`` stays the *function*.

    The submodule :mod:`pipeline.connectivity` has the name of one of its functions. The
    eager ``from .connectivity import connectivity`` used to rebind the package attribute to
    the function after the submodule was imported; with lazy imports the import system would
    set the attribute to the submodule whenever that is first imported (by any module), so
    ``pipeline.connectivity`` (and ``from pipeline import connectivity``) would depend on
    import order. The property keeps the old answer; the import system's assignment of the
    submodule is ignored, any other assignment (e.g. a test's monkeypatch) is kept.
    """

    @property
    def connectivity(self) -> Any:
        override = self.__dict__.get("_connectivity_override")
        if override is not None:
            return override
        return importlib.import_module(".connectivity", __name__).connectivity

    @connectivity.setter
    def connectivity(self, value: Any) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.connectivity":
            return
        self.__dict__["_connectivity_override"] = value

    @connectivity.deleter
    def connectivity(self) -> None:
        self.__dict__.pop("_connectivity_override", None)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # pickled by reference, like a plain module (cloudpickle's module reducer only
        # matches the exact type): a closure that uses ``pipeline`` still ships to workers
        return importlib.import_module, (self.__name__,)


sys.modules[__name__].__class__ = _Package
