"""Opening and slicing a run computes nothing; only explicit reads touch chunks."""

from __future__ import annotations

import dask
import numpy as np
from dask.callbacks import Callback

import storage
from tests._builders import make_run


class CountComputes(Callback):
    def __init__(self):
        super().__init__()
        self.count = 0

    def _start(self, dsk):
        self.count += 1


def test_open_run_is_lazy(tmp_path):
    spec = make_run(tmp_path / "in", "01", shape=(12, 10, 8, 30))
    storage.ingest([spec], tmp_path / "s.zarr", chunk_bytes=12 * 10 * 8 * 30 * 4 // 4)
    with dask.config.set(scheduler="sync"), CountComputes() as counter:
        ds = storage.open_run(tmp_path / "s.zarr", subject="01", task="rest")
        sub = ds["bold"].isel(x=slice(0, 6)).mean("time")
        assert counter.count == 0
        assert dask.is_dask_collection(sub.data)
        assert len(ds["bold"].data.dask) < 50  # one task per chunk, not per volume
        values = sub.values
        assert counter.count == 1
    assert values.shape == (6, 10, 8)
    assert np.isfinite(values).all()
