"""Real ``dask scheduler`` / ``dask worker`` processes: imports and distributed ingestion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import storage
from tests._builders import make_run

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]


def _import_storage_on_worker(dask_worker=None):
    import importlib
    import os

    mod = importlib.import_module("storage")
    spill = os.path.join(dask_worker.local_directory, "storage") if dask_worker else None
    return {"file": getattr(mod, "__file__", None), "has_ingest": hasattr(mod, "ingest"),
            "spill_dir_exists": bool(spill and os.path.isdir(spill)),
            "pipeline_file": importlib.import_module("pipeline").__file__}


def test_storage_imports_on_real_workers(dask_processes):
    """The worker's spill folder is called ``storage/`` and sits first on sys.path:
    the real package must still win (see the install notes in the README)."""
    from distributed import Client

    address, _ = dask_processes
    with Client(address) as client:
        results = client.run(_import_storage_on_worker)
    assert len(results) == 2
    for info in results.values():
        assert info["spill_dir_exists"], info  # the hazard is really there
        assert info["has_ingest"], info
        assert info["file"] is not None and Path(info["file"]).name == "__init__.py"
        assert Path(info["file"]).resolve().parent == Path(storage.__file__).resolve().parent
        assert Path(info["pipeline_file"]).resolve().parent.name == "pipeline"


def test_ingest_on_real_cluster_matches_local(tmp_path, dask_processes):
    from distributed import Client

    address, _ = dask_processes
    specs = [make_run(tmp_path / f"in{i}", f"0{i}", seed=i, shape=(9, 8, 7, 25))
             for i in range(4)]
    with Client(address) as client:
        cat = storage.ingest(specs, tmp_path / "dist.zarr", client=client)
        who = client.run(lambda: 1)
    assert len(who) == 2
    assert (cat["status"] == "complete").all(), cat["error"].tolist()
    storage.ingest(specs, tmp_path / "local.zarr")  # threads in this process
    for spec in specs:
        sub = spec.entities["sub"]
        a = storage.open_run(tmp_path / "dist.zarr", subject=sub, task="rest")
        b = storage.open_run(tmp_path / "local.zarr", subject=sub, task="rest")
        np.testing.assert_array_equal(a["bold"].values, b["bold"].values)
        np.testing.assert_array_equal(a["confounds"].values, b["confounds"].values)
