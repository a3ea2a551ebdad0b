"""Masking and region signals from the store against nilearn's maskers on the same files."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.maskers import NiftiLabelsMasker, NiftiMapsMasker, NiftiMasker
from nilearn.masking import compute_epi_mask as nl_compute_epi_mask
from nilearn.masking import intersect_masks as nl_intersect_masks

import storage
from pipeline import masking
from pipeline.jobs import _clean_regions
from pipeline.masking import apply_mask, compute_epi_mask, intersect_masks, unmask
from pipeline.parcellation import label_signals, load_atlas, map_signals
from pipeline.signal import clean_signals
from pipeline.simulate import load_truth, simulate_dataset
from tests._builders import HAXBY

CLEAN = {"detrend": True, "standardize": "zscore_sample", "low_pass": 0.08,
         "high_pass": 0.01, "t_r": 2.0}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    sim = simulate_dataset(root / "derivs", n_subjects=2, shape=(14, 16, 12), n_volumes=80,
                           seed=11)
    # small chunks: many voxel blocks, so every reduction really combines blocks
    storage.ingest(sim.root, root / "s.zarr", chunk_bytes=14 * 16 * 12 * 80 * 4 // 9)
    return sim, root / "s.zarr"


def _open(store, sub="01"):
    return storage.open_run(store, subject=sub, task="rest")


def _c_order(matrix):
    return np.lexsort((matrix["k"].values, matrix["j"].values, matrix["i"].values))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's deprecation/future notes
        return fn(*args, **kwargs)


@pytest.mark.parametrize("gather_bytes", [None, 1, 7 * 1024])
def test_apply_mask_equals_niftimasker_and_unmask_inverts(sim, gather_bytes, monkeypatch):
    # gather_bytes: the in-mask voxels gathered one volume / a few volumes at a time
    if gather_bytes is not None:
        monkeypatch.setattr(masking, "_GATHER_BYTES", gather_bytes)
    s, store = sim
    ds = _open(store)
    matrix = apply_mask(ds)
    assert len(matrix.data.chunks[1]) > 3
    ref = _quiet(NiftiMasker(mask_img=str(s.runs[0].mask), standardize=None).fit_transform,
                 str(s.runs[0].bold))
    np.testing.assert_allclose(matrix.values[:, _c_order(matrix)], ref, rtol=1e-6)
    back = unmask(matrix).transpose("x", "y", "z", "time").values
    img = nib.load(s.runs[0].bold).get_fdata()
    inside = np.asanyarray(nib.load(s.runs[0].mask).dataobj) > 0
    np.testing.assert_allclose(back[inside], img[inside], rtol=1e-6)
    assert np.all(back[~inside] == 0)


def test_epi_and_group_masks_equal_nilearn(sim):
    s, store = sim
    ds = _open(store)
    ours = compute_epi_mask(ds).values
    mean = nib.Nifti1Image(nib.load(s.runs[0].bold).get_fdata().mean(axis=3),
                           nib.load(s.runs[0].bold).affine)
    ref = np.asanyarray(nl_compute_epi_mask(mean).dataobj).astype(bool)
    np.testing.assert_array_equal(ours, ref)
    assert 0.2 < ours.mean() < 0.9
    m1, m2 = _open(store, "01")["mask"], _open(store, "02")["mask"]
    m2 = m2.copy(data=m2.values.copy())
    m2.values[3:6] = False
    for threshold in (0.0, 0.5, 1.0):
        ours = intersect_masks([m1, m2], threshold=threshold).values
        imgs = [nib.Nifti1Image(m.values.astype(np.uint8), ds.attrs["affine"]) for m in (m1, m2)]
        ref = np.asanyarray(nl_intersect_masks(imgs, threshold=threshold).dataobj) > 0
        np.testing.assert_array_equal(ours, ref)


def test_label_signals_equal_nifti_labels_masker(sim):
    s, store = sim
    ds = _open(store)
    atlas = load_atlas(s.atlas, reference=ds)
    raw = label_signals(apply_mask(ds), atlas)
    masker = NiftiLabelsMasker(labels_img=str(s.atlas), mask_img=str(s.runs[0].mask),
                               standardize=None)
    ref = _quiet(masker.fit_transform, str(s.runs[0].bold))
    valid = raw["n_voxels"].values > 0
    assert valid.sum() == ref.shape[1]
    np.testing.assert_allclose(raw.values[:, valid], ref, rtol=1e-5)
    # the region names come from the atlas' TSV
    table = pd.read_csv(str(s.atlas).replace(".nii.gz", ".tsv"), sep="\t")
    assert list(raw["region"].values) == list(table["name"])


@pytest.mark.parametrize("chunks", [None, "time", {"x": 5, "y": 7, "z": 4, "time": 23}])
def test_label_signals_from_stored_chunks(sim, chunks):
    """The chunk-wise path (no rechunk) equals NiftiLabelsMasker and the matrix path."""
    s, store = sim
    ds = storage.open_run(store, subject="01", task="rest", chunks=chunks)
    if chunks is None:  # really reduces (space x time) chunks: several time blocks too
        assert len(ds["bold"].data.chunks[3]) > 1 or len(ds["bold"].data.chunks[0]) > 1
    atlas = load_atlas(s.atlas, reference=ds)
    fast = label_signals(ds, atlas)
    masker = NiftiLabelsMasker(labels_img=str(s.atlas), mask_img=str(s.runs[0].mask),
                               standardize=None)
    ref = _quiet(masker.fit_transform, str(s.runs[0].bold))
    valid = fast["n_voxels"].values > 0
    np.testing.assert_allclose(fast.values[:, valid], ref, rtol=1e-5)
    slow = label_signals(apply_mask(_open(store)), atlas)
    np.testing.assert_allclose(fast.values, slow.values, rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(fast["n_voxels"].values, slow["n_voxels"].values)
    assert fast.attrs["repetition_time"] == 2.0
    # another mask (a subset): regions outside it become NaN columns, as in the matrix path
    sub_mask = ds["mask"].values.copy()
    sub_mask[: sub_mask.shape[0] // 2] = False
    part = label_signals(ds, atlas, mask=sub_mask)
    np.testing.assert_allclose(part.values,
                               label_signals(apply_mask(_open(store), sub_mask), atlas).values,
                               rtol=1e-12, equal_nan=True)
    # dummy volumes dropped before the reduction
    np.testing.assert_allclose(label_signals(ds.isel(time=slice(3, None)), atlas).values,
                               fast.values[3:], rtol=1e-12, equal_nan=True)


def _fused(store, sub, atlas_path, split=False):
    """Region means from the sums ingestion stored (LabelSums), as the job reads them."""
    import zarr

    from pipeline.jobs import _file_sha
    from pipeline.parcellation import LabelSums, ingested_label_signals

    ds = storage.open_run(store, subject=sub, task=None)
    reducer = LabelSums(str(atlas_path), _file_sha(str(atlas_path)), split)
    group = storage.open_store(store).runs().set_index("sub").loc[sub, "group"]
    grp = zarr.open_group(str(store), path=group, mode="r")
    atlas = load_atlas(atlas_path, reference=ds, split_connected=split, min_region_size=1)
    return ds, atlas, ingested_label_signals(ds, grp, reducer, atlas)


def test_label_sums_at_ingest_equal_stored_chunks_and_nilearn(sim, tmp_path):
    """One pass: region sums computed by ingestion == the chunk path == NiftiLabelsMasker."""
    from pipeline.jobs import _file_sha
    from pipeline.parcellation import LabelSums

    s, _ = sim
    store = tmp_path / "fused.zarr"
    reducer = LabelSums(str(s.atlas), _file_sha(str(s.atlas)))
    # several time batches and spatial chunks: sums are added across both
    storage.ingest(s.root, store, chunk_bytes=14 * 16 * 12 * 80 * 4 // 9,
                   batch_bytes=14 * 16 * 12 * 4 * 30, reducers=[reducer])
    for sub, run in (("01", s.runs[0]), ("02", s.runs[1])):
        _, atlas, fused = _fused(store, sub, s.atlas)
        assert fused is not None
        chunked = label_signals(storage.open_run(store, subject=sub, task="rest",
                                                 chunks=None), atlas)
        np.testing.assert_allclose(fused.values, chunked.values, rtol=1e-12, equal_nan=True)
        np.testing.assert_array_equal(fused["n_voxels"].values, chunked["n_voxels"].values)
        assert list(fused["region"].values) == list(chunked["region"].values)
        np.testing.assert_array_equal(fused["time"].values, chunked["time"].values)
        masker = NiftiLabelsMasker(labels_img=str(s.atlas), mask_img=str(run.mask),
                                   standardize=None)
        ref = _quiet(masker.fit_transform, str(run.bold))
        valid = fused["n_voxels"].values > 0
        np.testing.assert_allclose(fused.values[:, valid], ref, rtol=1e-5)
    # another atlas (or none stored): no match, the job falls back to the chunk path
    other = tmp_path / "other.nii.gz"
    img = nib.load(s.atlas)
    nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine).to_filename(other)
    assert _fused(store, "01", other)[2] is None


def _haxby_scaled_int16(tmp_path):
    """Haxby run 1 rewritten as int16 with slope 0.5 / intercept 10, its brain mask, and
    the Schaefer 100-region atlas (2 mm: resampled to the 2.5 mm grid)."""
    src = nib.load(HAXBY / "run-001" / "bold_25mm.nii.gz")
    img = nib.Nifti1Image(np.asanyarray(src.dataobj).astype(np.int16), src.affine, src.header)
    img.header.set_slope_inter(0.5, 10.0)
    bold_path = tmp_path / "bold.nii.gz"
    img.to_filename(bold_path)
    mask_path = HAXBY / "masks" / "25mm" / "brain.nii.gz"
    spec = storage.RunSpec(bold=str(bold_path), mask=str(mask_path),
                           entities={"sub": "001", "task": "objects"}, t_r=2.5)
    atlas_path = ATLASES / ("tpl-MNI152NLin6Asym_atlas-Schaefer2018v0143_res-02_"
                            "desc-100Parcels17Networks_dseg.nii.gz")
    return spec, bold_path, mask_path, atlas_path


@pytest.mark.parametrize("split", [False, True])
def test_label_sums_at_ingest_scaled_int16_real_atlas_with_empty_regions(tmp_path, split):
    """Real data stored as scaled int16; a real atlas resampled to it, regions outside the
    brain mask are NaN columns in both paths."""
    from pipeline.jobs import _file_sha
    from pipeline.parcellation import LabelSums

    spec, bold_path, mask_path, atlas_path = _haxby_scaled_int16(tmp_path)
    store = tmp_path / "h.zarr"
    storage.ingest([spec], store, chunk_bytes="8KiB", batch_bytes="40KiB",
                   reducers=[LabelSums(str(atlas_path), _file_sha(str(atlas_path)), split)])
    ds, atlas, fused = _fused(store, "001", atlas_path, split=split)
    assert ds["bold"].encoding["scale_factor"] == 0.5
    chunked = label_signals(storage.open_run(store, subject="001", task="objects",
                                             chunks=None), atlas)
    empty = fused["n_voxels"].values == 0
    assert empty.any() and (~empty).sum() > 10  # both kinds of columns are exercised
    assert np.isnan(fused.values[:, empty]).all()
    np.testing.assert_allclose(fused.values, chunked.values, rtol=1e-6, equal_nan=True)
    if not split:  # nilearn on the same file: scaled values, regions it keeps
        masker = NiftiLabelsMasker(labels_img=str(atlas_path), mask_img=str(mask_path),
                                   standardize=None)
        ref = _quiet(masker.fit_transform, str(bold_path))
        assert ref.shape[1] == (~empty).sum()
        np.testing.assert_allclose(fused.values[:, ~empty], ref, rtol=1e-5)


def test_label_sums_without_voxels_equal_stored_voxels_and_nilearn(tmp_path):
    """Real scaled int16 data ingested without voxels (volumes in file order, several
    batches): the same sums as with voxels, and NiftiLabelsMasker's means."""
    from pipeline.jobs import _file_sha
    from pipeline.parcellation import LabelSums

    spec, bold_path, mask_path, atlas_path = _haxby_scaled_int16(tmp_path)
    reducer = LabelSums(str(atlas_path), _file_sha(str(atlas_path)))
    kw = {"chunk_bytes": "8KiB", "batch_bytes": "200KiB", "reducers": [reducer]}
    storage.ingest([spec], tmp_path / "full.zarr", **kw)
    cat = storage.ingest([spec], tmp_path / "lean.zarr", voxels=False, **kw)
    assert list(cat["status"]) == ["complete"]
    ds, _, lean = _fused(tmp_path / "lean.zarr", "001", atlas_path)
    assert "bold" not in ds
    _, _, full = _fused(tmp_path / "full.zarr", "001", atlas_path)
    np.testing.assert_allclose(lean.values, full.values, rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(lean["n_voxels"].values, full["n_voxels"].values)
    masker = NiftiLabelsMasker(labels_img=str(atlas_path), mask_img=str(mask_path),
                               standardize=None)
    ref = _quiet(masker.fit_transform, str(bold_path))
    keep = lean["n_voxels"].values > 0
    np.testing.assert_allclose(lean.values[:, keep], ref, rtol=1e-5)


@pytest.mark.parametrize("strategy_confounds", [False, True])
def test_region_level_cleaning_equals_labels_masker(sim, strategy_confounds):
    """NiftiLabelsMasker averages raw voxels, then cleans the region signals."""
    s, store = sim
    ds = _open(store)
    conf = pd.read_csv(s.runs[0].confounds, sep="\t", na_values="n/a")
    cols = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "csf", "white_matter"]
    confounds = conf[cols].to_numpy() if strategy_confounds else None
    kwargs = {**CLEAN, "confounds": confounds, "sample_mask": None,
              "standardize_confounds": True, "filter": "butterworth"}
    atlas = load_atlas(s.atlas, reference=ds)
    raw = label_signals(apply_mask(ds), atlas)
    ours = _clean_regions(raw, kwargs, raw["time"].values).values
    masker = NiftiLabelsMasker(labels_img=str(s.atlas), mask_img=str(s.runs[0].mask),
                               standardize="zscore_sample", detrend=True, low_pass=0.08,
                               high_pass=0.01, t_r=2.0)
    ref = _quiet(masker.fit_transform, str(s.runs[0].bold), confounds=confounds)
    valid = raw["n_voxels"].values > 0
    # the image is float32 and nilearn keeps float32 arithmetic (the float32
    # tolerance, 1e-3); z-scored values are O(1), so atol 1e-4 is 1e-4 relative to the scale
    np.testing.assert_allclose(ours[:, valid], ref, rtol=1e-3, atol=1e-4)


def test_voxel_level_cleaning_equals_niftimasker(sim):
    s, store = sim
    ds = _open(store)
    conf = pd.read_csv(s.runs[0].confounds, sep="\t", na_values="n/a")
    confounds = conf[["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]].to_numpy()
    matrix = apply_mask(ds)
    ours = clean_signals(matrix.data, confounds=confounds, **CLEAN)
    masker = NiftiMasker(mask_img=str(s.runs[0].mask), standardize="zscore_sample",
                         detrend=True, low_pass=0.08, high_pass=0.01, t_r=2.0)
    ref = _quiet(masker.fit_transform, str(s.runs[0].bold), confounds=confounds)
    np.testing.assert_allclose(np.asarray(ours)[:, _c_order(matrix)], ref, rtol=1e-3,
                               atol=1e-4)  # nilearn works in float32 on float32 images


def test_map_signals_equal_nifti_maps_masker(sim, tmp_path):
    s, store = sim
    ds = _open(store)
    truth = load_truth(s.root)
    maps = np.moveaxis(np.asarray(truth["network_maps"], dtype=np.float32), 0, -1)
    maps[maps < 0.05] = 0
    path = tmp_path / "maps.nii.gz"
    nib.Nifti1Image(maps, ds.attrs["affine"]).to_filename(path)
    atlas = load_atlas(path, reference=ds)
    assert atlas.kind == "maps"
    ours = map_signals(apply_mask(ds), atlas).values
    masker = NiftiMapsMasker(maps_img=str(path), mask_img=str(s.runs[0].mask),
                             standardize=None)
    ref = _quiet(masker.fit_transform, str(s.runs[0].bold))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


def test_results_do_not_depend_on_chunking(sim, tmp_path):
    s, _ = sim
    outs = []
    for chunk in ("64KiB", "300KiB", "64MiB"):
        store = tmp_path / f"{chunk}.zarr"
        storage.ingest([_spec(s)], store, chunk_bytes=chunk)
        ds = _open(store)
        atlas = load_atlas(s.atlas, reference=ds)
        matrix = apply_mask(ds)
        cleaned = matrix.copy(data=clean_signals(matrix.data, **CLEAN))
        outs.append(label_signals(cleaned, atlas).values)
    for other in outs[1:]:
        np.testing.assert_allclose(other, outs[0], rtol=1e-10, atol=1e-12)


def _spec(s):
    run = s.runs[0]
    return storage.RunSpec(bold=str(run.bold), mask=str(run.mask), confounds=str(run.confounds),
                           entities={"sub": "01", "task": "rest"}, t_r=2.0)


def test_haxby_real_data_labels(tmp_path):
    """Real native-space data: ventral temporal and occipital masks as a label atlas."""
    masks = HAXBY / "masks" / "25mm"
    vt = np.asanyarray(nib.load(masks / "vt.nii.gz").dataobj) > 0
    hoc = np.asanyarray(nib.load(masks / "hoc.nii.gz").dataobj) > 0
    labels = np.zeros(vt.shape, dtype=np.int16)
    labels[hoc] = 2
    labels[vt] = 1
    atlas_path = tmp_path / "atlas.nii.gz"
    bold_path = HAXBY / "run-001" / "bold_25mm.nii.gz"
    nib.Nifti1Image(labels, nib.load(bold_path).affine).to_filename(atlas_path)
    spec = storage.RunSpec(bold=str(bold_path), mask=str(masks / "brain.nii.gz"),
                           confounds=str(HAXBY / "run-001" / "bold_moest.txt"),
                           entities={"sub": "001", "task": "objects"})
    storage.ingest([spec], tmp_path / "h.zarr", chunk_bytes="20KiB")
    ds = storage.open_run(tmp_path / "h.zarr", subject="001", task="objects")
    motion = ds["confounds"].sel(confound=["trans_x", "trans_y", "trans_z", "rot_x", "rot_y",
                                           "rot_z"]).values
    atlas = load_atlas(atlas_path, reference=ds)
    raw = label_signals(apply_mask(ds), atlas)
    kwargs = {"detrend": True, "standardize": "zscore_sample", "high_pass": 0.01,
              "low_pass": None, "t_r": 2.5, "confounds": motion, "sample_mask": None,
              "standardize_confounds": True, "filter": "butterworth"}
    ours = _clean_regions(raw, kwargs, raw["time"].values).values
    masker = NiftiLabelsMasker(labels_img=str(atlas_path), mask_img=str(masks / "brain.nii.gz"),
                               standardize="zscore_sample", detrend=True, high_pass=0.01,
                               t_r=2.5)
    ref = _quiet(masker.fit_transform, str(bold_path), confounds=motion)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


ATLASES = HAXBY.parents[1] / "atlases"


@pytest.mark.parametrize("atlas_name,split", [
    ("tpl-MNI152NLin6Asym_atlas-Schaefer2018v0143_res-02_desc-100Parcels17Networks_dseg.nii.gz",
     False),
    ("tpl-MNI152NLin6Asym_atlas-Schaefer2018v0143_res-02_desc-100Parcels17Networks_dseg.nii.gz",
     True),
])
def test_real_atlas_on_another_grid(tmp_path, atlas_name, split):
    """Real atlases resampled (nearest) to a 2.5 cm native grid, as NiftiLabelsMasker does;
    regions that miss the brain mask are NaN columns instead of being dropped."""
    from nilearn.regions import connected_label_regions

    bold_path = HAXBY / "run-001" / "bold_25mm.nii.gz"
    mask_path = HAXBY / "masks" / "25mm" / "brain.nii.gz"
    spec = storage.RunSpec(bold=str(bold_path), mask=str(mask_path),
                           entities={"sub": "001", "task": "objects"})
    storage.ingest([spec], tmp_path / "h.zarr")
    ds = storage.open_run(tmp_path / "h.zarr", subject="001", task="objects")
    atlas_path = ATLASES / atlas_name
    atlas = load_atlas(atlas_path, reference=ds, split_connected=split, min_region_size=1)
    ours = label_signals(apply_mask(ds), atlas)
    labels_img = str(atlas_path)
    if split:
        labels_img = _quiet(connected_label_regions, str(atlas_path), min_size=1)
        assert len(atlas.labels) > 100  # some parcels have several components
    masker = NiftiLabelsMasker(labels_img=labels_img, mask_img=str(mask_path), standardize=None)
    ref = _quiet(masker.fit_transform, str(bold_path))
    present = ours["n_voxels"].values > 0
    assert present.sum() == ref.shape[1]
    assert (~present).sum() > 0  # the atlas has regions outside this small brain
    assert np.isnan(ours.values[:, ~present]).all()
    np.testing.assert_allclose(ours.values[:, present], ref, rtol=1e-6)
    if not split:  # names from the atlas' dseg.tsv next to it (BIDS atlas naming)
        assert ours["region"].values[0].startswith("17Networks_LH_")
