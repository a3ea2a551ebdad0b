"""Streaming NIfTI reads and writes agree with nibabel, byte for byte."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from storage import InputError
from storage.nifti import NiftiStreamWriter, iter_volume_batches, read_header, read_volume
from tests._builders import AFFINE, HAXBY, bold_array, write_bold


def _read_all(info, batch):
    return np.concatenate([raw for _, raw in iter_volume_batches(info, batch)], axis=3)


@pytest.mark.parametrize("dtype", ["float32", "int16", "uint8", "float64"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("batch", [1, 7, 100])
def test_batches_equal_nibabel(tmp_path, dtype, suffix, batch):
    data = bold_array((5, 6, 4, 13), dtype)
    path = write_bold(tmp_path / f"b{suffix}", data)
    info = read_header(str(path))
    got = _read_all(info, batch)
    ref = np.asanyarray(nib.load(path).dataobj.get_unscaled())
    assert got.dtype == ref.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, ref)
    assert info.shape == data.shape
    np.testing.assert_allclose(info.affine, AFFINE)


def test_big_endian_and_nifti2(tmp_path):
    data = bold_array((4, 5, 3, 6), "int16")
    img = nib.Nifti2Image(data.astype(">i2"), AFFINE)
    img.to_filename(str(tmp_path / "be.nii.gz"))
    info = read_header(str(tmp_path / "be.nii.gz"))
    assert isinstance(info.header, nib.Nifti2Header)
    got = _read_all(info, 4)
    assert got.dtype == np.dtype("int16")
    np.testing.assert_array_equal(got, data)


def test_scaling_and_tr_units(tmp_path):
    data = bold_array((4, 4, 3, 5), "int16")
    path = write_bold(tmp_path / "s.nii.gz", data, slope=0.5, inter=10.0)
    info = read_header(str(path))
    assert (info.slope, info.inter) == (0.5, 10.0)
    assert info.header_tr() == 2.0
    img = nib.load(path)
    img.header.set_xyzt_units("mm", "msec")
    img.header.set_zooms((1, 1, 1, 2500.0))
    img.to_filename(str(tmp_path / "ms.nii.gz"))
    assert read_header(str(tmp_path / "ms.nii.gz")).header_tr() == pytest.approx(2.5)


def test_real_haxby_header():
    info = read_header(str(HAXBY / "run-001" / "bold_25mm.nii.gz"))
    ref = nib.load(HAXBY / "run-001" / "bold_25mm.nii.gz")
    assert info.shape == ref.shape == (6, 10, 10, 121)
    np.testing.assert_allclose(info.affine, ref.affine)
    assert info.header_tr() == pytest.approx(2.5)
    np.testing.assert_array_equal(_read_all(info, 16), np.asanyarray(ref.dataobj))


def test_mask_volume(tmp_path):
    vol = (np.arange(60).reshape(3, 4, 5) % 3).astype(np.uint8)
    nib.Nifti1Image(vol, AFFINE).to_filename(str(tmp_path / "m.nii.gz"))
    np.testing.assert_array_equal(read_volume(read_header(str(tmp_path / "m.nii.gz"))), vol)


def test_truncated_gzip_names_file_and_volumes(tmp_path):
    path = write_bold(tmp_path / "t.nii.gz", bold_array((64, 64, 32, 30)))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    info = read_header(str(path))  # the header is intact
    with pytest.raises(InputError, match=r"t\.nii\.gz.*truncated.*volumes"):
        _read_all(info, 5)


def test_not_nifti(tmp_path):
    path = tmp_path / "x.nii.gz"
    path.write_bytes(gzip.compress(b"hello world" * 100))
    with pytest.raises(InputError, match=r"x\.nii\.gz.*not a NIfTI"):
        read_header(str(path))
    with pytest.raises(InputError, match=r"cannot open|not found|No such"):
        read_header(str(tmp_path / "missing.nii.gz"))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_stream_writer_roundtrip(tmp_path, suffix):
    data = bold_array((5, 4, 3, 11), "int16")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(AFFINE, code=4)
    hdr.set_qform(AFFINE, code=1)
    out = tmp_path / f"w{suffix}"
    with NiftiStreamWriter(str(out), hdr) as w:
        for t0 in range(0, 11, 4):
            w.write(data[..., t0:t0 + 4])
    img = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, AFFINE)
    assert int(img.header["sform_code"]) == 4


def test_stream_writer_leaves_nothing_on_error(tmp_path):
    data = bold_array((3, 3, 3, 6), "float32")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.float32)
    out = tmp_path / "w.nii.gz"
    with pytest.raises(RuntimeError), NiftiStreamWriter(str(out), hdr) as w:
        w.write(data[..., :3])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # too few volumes is an error too, and leaves nothing behind
    with pytest.raises(ValueError, match="wrote 3 volumes"), \
            NiftiStreamWriter(str(out), hdr) as w:
        w.write(data[..., :3])
    assert list(tmp_path.iterdir()) == []
