"""Ingestion's fast paths: chunks written as zarr writes them, reused buffers, clean failures.

Ingestion encodes whole chunks itself (``storage.ingest._ChunkWriter``) and reuses its
batch and block buffers; none of it may change a stored byte, leak values between
batches or runs, or weaken the failure handling.
"""

from __future__ import annotations

import gzip
import importlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

import storage
from storage import InputError
from storage.nifti import iter_volume_batches, read_header
from tests._builders import bold_array, make_run, write_bold

ing = importlib.import_module("storage.ingest")  # storage.ingest is also a function
nifti = importlib.import_module("storage.nifti")


def _chunk_files(root: Path) -> dict[str, bytes]:
    """Every chunk file under ``root`` (keys relative to it), with its bytes."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = Path(d) / f
            rel = p.relative_to(root).as_posix()
            if "/c/" in f"/{rel}" and not f.endswith(".json"):
                out[rel] = p.read_bytes()
    return out


def _zarr_rewrite(src_arr: zarr.Array, dest: Path) -> Path:
    """The same array written by zarr itself (``arr[...] = data``), chunk by chunk."""
    data = src_arr[...]
    arr = zarr.create_array(str(dest), shape=src_arr.shape, chunks=src_arr.chunks,
                            dtype=src_arr.dtype, fill_value=src_arr.fill_value,
                            compressors=src_arr.compressors, zarr_format=3,
                            config={"write_empty_chunks": True})
    arr[...] = data
    return dest


@pytest.fixture(autouse=True)
def _fresh_verification():
    # the direct-Blosc check is cached per process: each test decides afresh
    ing._VERIFIED.clear()
    yield
    ing._VERIFIED.clear()


# ------------------------------------------------------------------ byte-identical chunks


@pytest.mark.parametrize("dtype,cname,shuffle", [("float32", "lz4", "bitshuffle"),
                                                 ("int16", "zstd", "shuffle"),
                                                 ("uint8", "lz4", "noshuffle"),
                                                 ("float64", "blosclz", "bitshuffle")])
def test_chunks_byte_identical_to_zarr(tmp_path, dtype, cname, shuffle):
    # 13x11x7 with ~1/3 chunks: edge chunks on every spatial axis, and 3 time batches
    spec = make_run(tmp_path / "in", "01", shape=(13, 11, 7, 23), dtype=dtype)
    vol = 13 * 11 * 7 * np.dtype(dtype).itemsize
    cat = storage.ingest([spec], tmp_path / "s.zarr", chunk_bytes=vol * 8 // 9,
                         batch_bytes=vol * 8, cname=cname, shuffle=shuffle)
    assert list(cat["status"]) == ["complete"]
    arr = zarr.open_array(str(tmp_path / "s.zarr"), path="sub-01/task-rest/bold", mode="r")
    assert any(s % c for s, c in zip(arr.shape, arr.chunks, strict=True))  # edge chunks
    np.testing.assert_array_equal(arr[...], np.asanyarray(nib.load(spec.bold).dataobj))
    ours = _chunk_files(tmp_path / "s.zarr" / "sub-01" / "task-rest" / "bold")
    theirs = _chunk_files(_zarr_rewrite(arr, tmp_path / "ref.zarr"))
    assert len(ours) == np.prod([-(-s // c) for s, c in zip(arr.shape, arr.chunks,
                                                            strict=True)])
    assert ours == theirs


def _writer_roundtrip(tmp_path: Path, name: str) -> tuple[dict, dict, ing._ChunkWriter]:
    data = bold_array((9, 10, 5, 12), "float32")
    kw = {"shape": data.shape, "chunks": (4, 6, 5, 12), "dtype": "float32",
          "fill_value": np.nan, "zarr_format": 3, "config": {"write_empty_chunks": True},
          "compressors": [BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")]}
    ref = zarr.create_array(str(tmp_path / f"{name}-ref.zarr"), **kw)
    ref[...] = data
    arr = zarr.create_array(str(tmp_path / f"{name}.zarr"), **kw)
    writer = ing._ChunkWriter.for_array(arr)
    assert writer is not None
    for idx, block in ing.time_last_blocks(np.asfortranarray(data), (4, 6, 5), reuse=True):
        assert writer.write((*idx, slice(0, 12)), block)
    writer.flush()
    np.testing.assert_array_equal(arr[...], data)
    return (_chunk_files(tmp_path / f"{name}.zarr"), _chunk_files(tmp_path / f"{name}-ref.zarr"),
            writer)


def test_direct_blosc_is_used_and_identical(tmp_path):
    ours, theirs, writer = _writer_roundtrip(tmp_path, "direct")
    assert writer._compress is not None  # this numcodecs: the buffer-reusing path
    assert ours == theirs


def test_numcodecs_fallback_when_direct_blosc_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(ing, "_blosc_compress_ctx", lambda: None)
    ours, theirs, writer = _writer_roundtrip(tmp_path, "nodirect")
    assert writer._compress is None
    assert ours == theirs


def test_direct_blosc_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("BOLDFLOW_DIRECT_BLOSC", "0")
    ing._blosc_compress_ctx.cache_clear()
    try:
        assert ing._blosc_compress_ctx() is None
        ours, theirs, writer = _writer_roundtrip(tmp_path, "off")
        assert writer._compress is None
        assert ours == theirs
    finally:
        monkeypatch.delenv("BOLDFLOW_DIRECT_BLOSC")
        ing._blosc_compress_ctx.cache_clear()
    assert ing._blosc_compress_ctx() is not None


def test_direct_blosc_rejected_when_it_disagrees_with_numcodecs(tmp_path, monkeypatch):
    real = ing._blosc_compress_ctx()

    def wrong(clevel, shuffle, *args):  # another "Blosc" that compresses differently
        return real(clevel, 0 if shuffle else 1, *args)

    monkeypatch.setattr(ing, "_blosc_compress_ctx", lambda: wrong)
    ours, theirs, writer = _writer_roundtrip(tmp_path, "wrong")
    assert writer._compress is None  # the check caught it: numcodecs encodes
    assert ours == theirs


def test_writer_declines_what_it_cannot_write_whole(tmp_path):
    kw = {"shape": (8, 8, 4, 6), "chunks": (4, 4, 4, 6), "dtype": "float32",
          "zarr_format": 3}
    arr = zarr.create_array(str(tmp_path / "a.zarr"), **kw,
                            compressors=[BloscCodec(cname="lz4", shuffle="bitshuffle")])
    writer = ing._ChunkWriter.for_array(arr)
    block = np.ones((4, 4, 4, 6), np.float32)
    # not chunk-aligned, or a partial chunk inside the array: zarr's path
    assert not writer.write((slice(2, 6), slice(0, 4), slice(0, 4), slice(0, 6)), block)
    assert not writer.write((slice(0, 2), slice(0, 4), slice(0, 4), slice(0, 6)),
                            block[:2])
    assert not writer.write((slice(0, 4), slice(0, 4), slice(0, 4), slice(0, 6)),
                            block.astype(np.float64))
    assert not _chunk_files(tmp_path / "a.zarr")
    # other codecs or sharding: no writer at all
    zstd = zarr.create_array(str(tmp_path / "z.zarr"), **kw,
                             compressors=[zarr.codecs.ZstdCodec()])
    sharded = zarr.create_array(str(tmp_path / "s.zarr"), **{**kw, "chunks": (2, 2, 4, 6)},
                                shards=(4, 4, 4, 6),
                                compressors=[BloscCodec(cname="lz4", shuffle="bitshuffle")])
    assert ing._ChunkWriter.for_array(zstd) is None
    assert ing._ChunkWriter.for_array(sharded) is None


# ------------------------------------------------------------------ reused buffers


def test_reused_batches_are_exact_and_share_one_buffer(tmp_path):
    data = bold_array((5, 6, 4, 23), "int16")
    path = write_bold(tmp_path / "b.nii.gz", data)
    info = read_header(str(path))
    seen, bases = [], set()
    for t0, raw in iter_volume_batches(info, 5, reuse=True):  # last batch: 3 volumes
        assert raw.flags.f_contiguous
        bases.add(raw.__array_interface__["data"][0])
        seen.append((t0, raw.copy()))
    assert len(bases) == 1  # one buffer for all five batches
    np.testing.assert_array_equal(np.concatenate([r for _, r in seen], axis=3), data)
    assert [t0 for t0, _ in seen] == [0, 5, 10, 15, 20]


def test_reused_batches_big_endian(tmp_path):
    data = bold_array((4, 5, 3, 7), "int16")
    nib.Nifti1Image(data.astype(">i2"), np.eye(4)).to_filename(str(tmp_path / "be.nii.gz"))
    info = read_header(str(tmp_path / "be.nii.gz"))
    got = np.concatenate([r.copy() for _, r in iter_volume_batches(info, 3, reuse=True)],
                         axis=3)
    assert got.dtype == np.dtype("int16")
    np.testing.assert_array_equal(got, data)


def test_reused_blocks_are_exact():
    raw = np.asfortranarray(bold_array((9, 7, 5, 6), "float32"))
    fresh = [(idx, b) for idx, b in ing.time_last_blocks(raw, (4, 3, 5))]
    reused = [(idx, b.copy()) for idx, b in ing.time_last_blocks(raw, (4, 3, 5), reuse=True)]
    assert [i for i, _ in fresh] == [i for i, _ in reused]
    for (idx, a), (_, b) in zip(fresh, reused, strict=True):
        assert b.flags.c_contiguous
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, np.moveaxis(raw[idx], 3, 3))


class _Keeper:
    """Test reducer that keeps copies of every run's blocks (read-only views)."""

    name = "keeper"

    def __init__(self):
        self.blocks = []

    def begin(self, info, mask):
        return _KeeperAcc(self, info.path)


class _KeeperAcc:
    def __init__(self, keeper, path):
        self.keeper, self.path = keeper, path

    def update(self, index, block):
        assert not block.flags.writeable and block.flags.c_contiguous
        with pytest.raises(ValueError):
            block[(0,) * block.ndim] = 0
        self.keeper.blocks.append((self.path, index, block.copy()))

    def finish(self):
        return np.zeros(1), {}


def test_consecutive_runs_in_one_process_do_not_leak(tmp_path):
    # different shapes, dtypes and time batching, one after the other in one process
    specs = [make_run(tmp_path / "a", "01", shape=(13, 11, 7, 23), dtype="float32", seed=1),
             make_run(tmp_path / "b", "02", shape=(9, 12, 5, 17), dtype="int16", seed=2),
             make_run(tmp_path / "c", "03", shape=(13, 11, 7, 23), dtype="float32", seed=3)]
    keeper = _Keeper()
    vol = 13 * 11 * 7 * 4
    cat = storage.ingest(specs, tmp_path / "s.zarr", chunk_bytes=vol * 5, batch_bytes=vol * 8,
                         reducers=[keeper])
    assert list(cat["status"]) == ["complete"] * 3
    for spec in specs:
        sub = spec.entities["sub"]
        arr = zarr.open_array(str(tmp_path / "s.zarr"), path=f"sub-{sub}/task-rest/bold")
        np.testing.assert_array_equal(arr[...], np.asanyarray(nib.load(spec.bold).dataobj))
    # every block a reducer saw was its own run's data at its index, whole runs covered
    datas = {s.bold: np.asanyarray(nib.load(s.bold).dataobj) for s in specs}
    covered = {path: np.zeros(d.shape, dtype=int) for path, d in datas.items()}
    for path, index, block in keeper.blocks:
        np.testing.assert_array_equal(block, datas[path][index])
        covered[path][index] += 1
    assert all((c == 1).all() for c in covered.values())


# ------------------------------------------------------------------ failures still clean up


def test_failure_while_writing_chunks_removes_the_run(tmp_path, monkeypatch):
    spec = make_run(tmp_path / "in", "01", shape=(13, 11, 7, 23))
    calls = []
    real = ing._ChunkWriter.write

    def failing(self, index, block):
        calls.append(index)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(self, index, block)

    monkeypatch.setattr(ing._ChunkWriter, "write", failing)
    vol = 13 * 11 * 7 * 4
    cat = storage.ingest([spec], tmp_path / "s.zarr", chunk_bytes=vol * 5, batch_bytes=vol * 8)
    row = cat.iloc[0]
    assert row["status"] == "failed" and "disk full" in row["error"]
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert "sub-01" not in root or "task-rest" not in root["sub-01"]
    # fixed: ingested whole
    monkeypatch.setattr(ing._ChunkWriter, "write", real)
    assert list(storage.ingest([spec], tmp_path / "s.zarr")["status"]) == ["complete"]


@pytest.mark.parametrize("where", ["direct", "fallback"])
def test_corrupt_deflate_is_an_input_error(tmp_path, monkeypatch, where):
    if where == "fallback":  # GzipFile, bounded reads
        monkeypatch.setattr(nifti, "_GzipReader", None)
    data = bold_array((32, 32, 16, 12), "float32")
    path = write_bold(tmp_path / "c.nii.gz", data)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2: len(blob) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(blob))
    # zeroed bytes may still inflate: only the gzip CRC catches them (the fallback's
    # read-ahead may already get there while reading the header)
    with pytest.raises(InputError, match=r"c\.nii\.gz.*(corrupt|truncated)"):
        for _ in iter_volume_batches(read_header(str(path)), 5, reuse=True):
            pass


def test_fallback_reader_matches(tmp_path, monkeypatch):
    monkeypatch.setattr(nifti, "_GzipReader", None)
    monkeypatch.setattr(nifti, "_READ_SIZE", 1000)  # several bounded reads per batch
    data = bold_array((6, 7, 5, 11), "float32")
    path = write_bold(tmp_path / "f.nii.gz", data)
    info = read_header(str(path))
    got = np.concatenate([r.copy() for _, r in iter_volume_batches(info, 4, reuse=True)],
                         axis=3)
    np.testing.assert_array_equal(got, data)
    assert gzip.decompress(path.read_bytes())[:4] == (348).to_bytes(4, "little")


@pytest.mark.parametrize("value,where", [(np.nan, (1, 2, 0, 3)), (np.inf, (0, 0, 1, 0)),
                                         (-np.inf, (2, 1, 1, 4))])
def test_check_finite_names_the_first_bad_voxel(value, where):
    raw = np.asfortranarray(bold_array((3, 3, 2, 5), "float32"))
    ing._check_finite(raw, "x.nii.gz", 10)  # all finite: fine
    raw[where] = value
    with pytest.raises(InputError, match=rf"1 NaN/inf.*voxel {where[:3]}.*volume "
                                         rf"{10 + where[3]}".replace("(", r"\(")
                       .replace(")", r"\)")):
        ing._check_finite(raw, "x.nii.gz", 10)


def test_check_finite_no_false_alarm_on_huge_values():
    raw = np.full((2, 2, 2, 3), np.finfo(np.float32).max, dtype=np.float32)
    raw[0, 0, 0, 0] = -np.finfo(np.float32).max
    ing._check_finite(raw, "x", 0)  # a float32 sum would overflow; max/min do not
    ing._check_finite(np.zeros((2, 2, 2, 3), np.int16), "x", 0)  # integers: no check


def test_long_runs_get_chunks_that_readers_do_not_split(tmp_path):
    """A run longer than one ingest batch is stored with spatial chunks whose whole time
    series fit ``series_bytes``: open_run with the same ``block_bytes`` uses the stored
    chunks as they are (each decoded once) and reads back exactly the file's values."""
    spec = make_run(tmp_path / "in", "01", shape=(9, 8, 6, 60), dtype="int16")
    per_volume = 9 * 8 * 6 * 2
    kw = dict(batch_bytes=20 * per_volume, chunk_bytes="1MiB", series_bytes="64KiB")
    storage.ingest([spec], tmp_path / "s.zarr", **kw)
    arr = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")[f"{spec.group_path}/bold"]
    cx, cy, cz, ct = arr.chunks
    assert ct == 20 and cx * cy * cz * 60 * 8 <= 64 * 1024
    ds = storage.open_run(tmp_path / "s.zarr", subject="01", task="rest",
                          block_bytes="64KiB")
    bold = ds["bold"].data
    assert bold.chunks[:3] == tuple(
        tuple(min(c, n - s) for s in range(0, n, c)) for c, n in zip((cx, cy, cz), (9, 8, 6),
                                                                      strict=True))
    assert bold.chunks[3] == (60,)
    np.testing.assert_array_equal(bold.compute(), nib.load(spec.bold).get_fdata())
    # without the series budget the chunks follow chunk_bytes alone: the reader splits them
    storage.ingest([spec], tmp_path / "t.zarr", **{**kw, "series_bytes": None})
    wide = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")[f"{spec.group_path}/bold"]
    assert wide.chunks[:3] == (9, 8, 6)


def test_small_chunks_are_queued_bounded_and_all_stored_on_flush(tmp_path, monkeypatch):
    """Chunks below max_pending wait in a bounded queue (copies of the reused buffer) and
    are stored together; nothing is lost or mixed up between the queue and the store."""
    data = bold_array((9, 10, 5, 12), "float32")
    arr = zarr.create_array(str(tmp_path / "q.zarr"), shape=data.shape, chunks=(4, 6, 5, 12),
                            dtype="float32", fill_value=np.nan, zarr_format=3,
                            compressors=[BloscCodec(cname="lz4", clevel=1,
                                                    shuffle="bitshuffle")])
    writer = ing._ChunkWriter.for_array(arr)
    monkeypatch.setattr(writer, "max_pending", 3 * 4 * 6 * 5 * 12 * 4 // 2)
    seen = []
    for idx, block in ing.time_last_blocks(np.asfortranarray(data), (4, 6, 5), reuse=True):
        assert writer.write((*idx, slice(0, 12)), block)
        seen.append(len(writer._pending))
        assert writer._pending_bytes < writer.max_pending  # flushed when it reaches it
    assert max(seen) >= 2  # chunks did wait together
    stored = len(_chunk_files(tmp_path / "q.zarr"))
    assert stored < 6  # some still queued: not in the store yet
    writer.flush()
    assert not writer._pending and len(_chunk_files(tmp_path / "q.zarr")) == 6
    np.testing.assert_array_equal(arr[...], data)
