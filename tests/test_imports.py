"""Import footprint: ``import pipeline`` is lazy, and the workers of a group ICA stay light.

``pipeline/__init__.py`` imports its public names on first use (PEP 562), so that a Dask
worker unpickling a task of ``pipeline._kernels`` (cleaning), ``pipeline.masking``
(masking) or ``pipeline.decomposition._blocks`` (PCA / MIGP / CanICA block kernels) does not
import nilearn, scikit-learn or matplotlib (~50-80 MB of resident memory per worker process).
These tests run in fresh interpreters: the test session itself has everything imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: the public API of ``pipeline`` (must not change)
PUBLIC = [
    "STRATEGIES", "Atlas", "ConfigError", "Job", "JobConfig", "JobResult", "Pipeline",
    "SimulatedDataset", "SimulatedRun", "apply_mask", "clean_signals", "cluster_client",
    "compare_groups", "compute_epi_mask", "connectivity", "group_connectivity", "group_mean",
    "intersect_masks", "label_signals", "load_atlas", "load_config", "load_truth",
    "map_signals", "seed_correlation", "select_confounds", "simulate_dataset",
    "strategy_confounds", "unmask", "vectorize",
]
#: never needed by the tasks of cleaning, masking and decomposition
HEAVY = ("nilearn", "sklearn", "matplotlib")


def _run(code: str, timeout: float = 300) -> dict:
    """Run ``code`` in a fresh interpreter (repo first on sys.path); its last stdout line
    parsed as JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_pipeline_is_lazy():
    out = _run("""
        import json, sys
        import pipeline
        json.dump(sorted(m for m in sys.modules if m.split(".")[0] in
                         ("nilearn", "sklearn", "matplotlib", "pipeline", "storage")), sys.stdout)
    """)
    assert out == ["pipeline"]


@pytest.mark.parametrize("modules", [
    "pipeline._kernels, pipeline.masking, pipeline.decomposition._blocks",  # the workers'
    "pipeline.signal",  # nilearn.signal is imported when clean_signals is first called
])
def test_light_modules_import_neither_nilearn_nor_sklearn(modules):
    out = _run(f"""
        import json, sys
        import {modules}
        json.dump(sorted(m for m in sys.modules if m.split(".")[0] in
                         ("nilearn", "sklearn", "matplotlib", "nibabel")
                         or m in ("scipy.signal", "scipy.stats")), sys.stdout)
    """)
    assert out == []


def test_clean_signals_imports_nilearn_when_called():
    out = _run("""
        import json, sys
        import numpy as np
        from pipeline.signal import clean_signals
        before = "nilearn.signal" in sys.modules
        y = clean_signals(np.arange(40.0).reshape(20, 2) ** 2, detrend=True,
                          standardize="zscore_sample", high_pass=0.05, t_r=2.0)
        json.dump([before, "nilearn.signal" in sys.modules, y.shape], sys.stdout)
    """)
    assert out == [False, True, [20, 2]]


def test_public_names_unchanged():
    out = _run("""
        import json, sys, types
        import pipeline
        names = list(pipeline.__all__)
        before = set(pipeline.__dict__)
        ns = {}
        exec("from pipeline import *", ns)
        star = sorted(n for n in ns if not n.startswith("__"))
        objs = {n: getattr(pipeline, n) for n in names}
        where = {n: getattr(o, "__module__", None) for n, o in objs.items()}
        import pipeline.connectivity  # the submodule's import must not rebind the name
        from pipeline import connectivity
        json.dump({"all": names, "star": star, "dir": dir(pipeline), "where": where,
                   "conn": [type(connectivity).__name__,
                            type(pipeline.connectivity).__name__,
                            pipeline.connectivity is objs["connectivity"]],
                   "jobs": type(pipeline.jobs).__name__,
                   "strategies": list(pipeline.STRATEGIES)}, sys.stdout)
    """)
    assert out["all"] == PUBLIC
    assert out["star"] == sorted(PUBLIC)
    assert set(PUBLIC) <= set(out["dir"])
    assert {"importlib", "sys", "types", "_Package", "_EXPORTS"}.isdisjoint(out["dir"])
    assert all(m is None or m.startswith("pipeline.") for m in out["where"].values())
    assert out["conn"] == ["function", "function", True]
    assert out["jobs"] == "module"  # submodules stay reachable as attributes
    assert out["strategies"]


def test_connectivity_name_whatever_the_import_order():
    # the submodule first (as pipeline.jobs does), then the package attribute
    out = _run("""
        import json, sys
        import pipeline.connectivity as c
        import pipeline
        from pipeline import connectivity
        json.dump([type(c).__name__, type(connectivity).__name__,
                   connectivity is sys.modules["pipeline.connectivity"].connectivity],
                  sys.stdout)
    """)
    assert out == ["function", "function", True]


def test_attribute_errors_and_pickling():
    import pickle

    import cloudpickle

    import pipeline

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = pipeline.nope
    assert pickle.loads(pickle.dumps(pipeline)) is pipeline
    assert cloudpickle.loads(cloudpickle.dumps(pipeline)) is pipeline
    fn = cloudpickle.loads(cloudpickle.dumps(lambda: pipeline.clean_signals))
    assert fn() is pipeline.clean_signals


@pytest.mark.distributed
def test_group_ica_workers_import_neither_nilearn_nor_sklearn(tmp_path):
    """A LocalCluster worker that runs whole GroupICA fits (migp and canica) from an
    ingested store: open_run -> apply_mask -> clean_signals -> GroupICA. Without a filter
    the worker needs no scipy.signal either; with one, still neither nilearn nor
    scikit-learn."""
    out = _run(f"""
        import json, sys, warnings
        from pathlib import Path
        warnings.simplefilter("ignore")

        def worker_modules():
            return sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}
                          or m == "scipy.signal")

        if __name__ == "__main__":
            from distributed import Client, LocalCluster
            import storage
            from pipeline import apply_mask, clean_signals
            from pipeline.decomposition.group import GroupICA
            from tests._builders import make_run

            tmp = Path({str(tmp_path)!r})
            specs = [make_run(tmp / f"in{{i}}", f"0{{i}}", seed=i, shape=(9, 8, 7, 40))
                     for i in range(3)]
            cat = storage.ingest(specs, tmp / "s.zarr")
            assert (cat["status"] == "complete").all()

            def subjects(**clean):
                out = []
                for i in range(3):
                    run = storage.open_run(tmp / "s.zarr", subject=f"0{{i}}", task="rest",
                                           block_bytes=4 * 9 * 8 * 40)
                    m = apply_mask(run)
                    out.append(m.copy(data=clean_signals(m.data, detrend=True,
                                                         standardize="zscore_sample",
                                                         t_r=2.0, **clean)))
                return out

            with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                              dashboard_address=":0") as lc, Client(lc) as client:
                seen = [list(client.run(worker_modules).values())]
                shapes = []
                for method in ("migp", "canica"):
                    ica = GroupICA(3, method=method, n_init=1, random_state=0)
                    shapes.append(ica.fit(subjects()).components_.shape)
                seen.append(list(client.run(worker_modules).values()))
                ica = GroupICA(3, method="migp", random_state=0)
                shapes.append(ica.fit(subjects(high_pass=0.05)).components_.shape)
                seen.append(list(client.run(worker_modules).values()))
            json.dump({{"seen": seen, "shapes": shapes}}, sys.stdout)
    """)
    assert all(s[0] == 3 for s in out["shapes"])
    before, no_filter, with_filter = out["seen"]
    assert before == [[]]  # one worker, nothing of the list imported at start
    assert no_filter == [[]]
    # filtering needs scipy.signal only when the stepwise evaluation is chosen (long runs);
    # short runs fold the filter into the linear operator built in the client
    assert with_filter in ([[]], [["scipy.signal"]])
