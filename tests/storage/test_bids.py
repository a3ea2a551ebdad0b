"""Tests of BIDS / fMRIPrep discovery (storage.bids), on local trees and a local S3 server."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import pytest

from storage.bids import discover, parse_entities, read_sidecar_tr
from storage.confounds import read_confounds
from storage.errors import InputError
from storage.runs import RunSpec

DATA = Path(__file__).parents[2].parent / "shared" / "data"
MNI = "MNI152NLin2009cAsym"


def touch(root: Path, *relpaths: str, content: bytes | str = b"") -> None:
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)


# ----------------------------------------------------------------------------------------
# parse_entities


def test_parse_entities_fmriprep_name():
    name = ("sub-01_ses-pre_task-rest_acq-mb4_run-02_space-MNI152NLin2009cAsym_res-2_"
            "desc-preproc_bold.nii.gz")
    ents = parse_entities(name)
    assert ents == {"sub": "01", "ses": "pre", "task": "rest", "acq": "mb4", "run": "02",
                    "space": MNI, "res": "2", "desc": "preproc", "suffix": "bold",
                    "extension": ".nii.gz"}
    assert list(ents)[:3] == ["sub", "ses", "task"]  # file-name order
    assert parse_entities(f"/data/derivs/sub-01/func/{name}") == ents
    assert parse_entities(f"s3://bucket/derivs/sub-01/func/{name}") == ents


@pytest.mark.parametrize(("name", "expected"), [
    ("sub-01_task-rest_hemi-L_space-fsnative_bold.func.gii",
     {"sub": "01", "task": "rest", "hemi": "L", "space": "fsnative", "suffix": "bold",
      "extension": ".func.gii"}),
    ("sub-01_task-rest_space-fsLR_den-91k_bold.dtseries.nii",
     {"sub": "01", "task": "rest", "space": "fsLR", "den": "91k", "suffix": "bold",
      "extension": ".dtseries.nii"}),
    ("task-rest_bold.json", {"task": "rest", "suffix": "bold", "extension": ".json"}),
    ("sub-01_task-rest_desc-confounds_timeseries.tsv",
     {"sub": "01", "task": "rest", "desc": "confounds", "suffix": "timeseries",
      "extension": ".tsv"}),
    ("sub-01_task-rest_run-1_from-scanner_to-T1w_mode-image_xfm.txt",
     {"sub": "01", "task": "rest", "run": "1", "from": "scanner", "to": "T1w",
      "mode": "image", "suffix": "xfm", "extension": ".txt"}),
    ("sub-01_task-rest_bold", {"sub": "01", "task": "rest", "suffix": "bold",
                               "extension": ""}),
])
def test_parse_entities_variants(name, expected):
    assert parse_entities(name) == expected


@pytest.mark.parametrize("name", [
    "sub-01_task-rest-eyes_bold.nii.gz",    # dash in a label
    "sub-01_run-1.5_bold.nii",               # dot in a label: no suffix left
    "sub-01_copy_task-rest_bold.nii.gz",     # part without a dash
    "sub-01_sub-02_task-rest_bold.nii",      # entity repeated
    "sub-_task-rest_bold.nii",               # empty value
    "sub-01_task-rest.nii.gz",               # no suffix
    "sub-01_task-rest_bold-x.nii",           # suffix with a dash
    "sub-01_task-rest+eyes_bold.nii",        # '+' is not alphanumeric
    "sub-01_task-rëst_bold.nii",             # non-ASCII
    "dataset_description.json",
    "",
])
def test_parse_entities_rejects_malformed(name):
    with pytest.raises(InputError) as exc:
        parse_entities(name)
    assert exc.value.path == name


# ----------------------------------------------------------------------------------------
# a realistic fMRIPrep tree


def _func(sub: str, ses: str | None, rest: str) -> str:
    folder = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + "func/"
    prefix = f"sub-{sub}_" + (f"ses-{ses}_" if ses else "")
    return folder + prefix + rest


@pytest.fixture
def fmriprep_tree(tmp_path: Path) -> Path:
    """fMRIPrep >= 21 derivatives: sessions, runs, spaces, surfaces, reports, FreeSurfer."""
    root = tmp_path / "derivatives" / "fmriprep"
    touch(root, "dataset_description.json", content='{"Name": "fMRIPrep", "BIDSVersion": "1.4.0"}')
    touch(root, "task-rest_bold.json", content='{"RepetitionTime": 2.0}')
    touch(root, "sub-01.html", "sub-02.html", "logs/CITATION.md", "desc-aparcaseg_dseg.tsv",
          "sub-01/log/20240101-120000_abc/fmriprep.toml")
    # FreeSurfer subjects dir and reports, with decoys that must never be discovered
    touch(root, "sourcedata/freesurfer/sub-01/mri/orig.mgz",
          "sourcedata/freesurfer/sub-01/surf/lh.white",
          "sourcedata/sub-01_task-rest_desc-preproc_bold.nii.gz",
          "sub-01/figures/sub-01_ses-pre_task-rest_run-1_desc-carpetplot_bold.svg",
          "sub-01/figures/sub-01_ses-pre_task-rest_run-1_desc-preproc_bold.nii.gz",
          "sub-01/figures/sub-01_ses-pre_task-rest_run-1_desc-rois_bold.svg")
    touch(root, "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz",
          "sub-01/anat/sub-01_desc-brain_mask.nii.gz",
          f"sub-01/anat/sub-01_space-{MNI}_res-2_desc-brain_mask.nii.gz",
          "sub-01/anat/sub-01_hemi-L_white.surf.gii")
    for run in ("1", "2"):
        base = f"task-rest_run-{run}"
        touch(root,
              _func("01", "pre", f"{base}_space-{MNI}_res-2_desc-preproc_bold.nii.gz"),
              _func("01", "pre", f"{base}_space-{MNI}_res-2_desc-brain_mask.nii.gz"),
              _func("01", "pre", f"{base}_space-{MNI}_res-2_boldref.nii.gz"),
              _func("01", "pre", f"{base}_space-{MNI}_res-2_desc-aparcaseg_dseg.nii.gz"),
              _func("01", "pre", f"{base}_space-T1w_desc-preproc_bold.nii.gz"),
              _func("01", "pre", f"{base}_space-T1w_boldref.nii.gz"),
              _func("01", "pre", f"{base}_desc-confounds_timeseries.tsv"),
              _func("01", "pre", f"{base}_desc-confounds_timeseries.json"),
              _func("01", "pre", f"{base}_hemi-L_space-fsnative_bold.func.gii"),
              _func("01", "pre", f"{base}_hemi-R_space-fsnative_bold.func.gii"),
              _func("01", "pre", f"{base}_hemi-L_space-fsaverage5_desc-preproc_bold.func.gii"),
              _func("01", "pre", f"{base}_space-fsLR_den-91k_bold.dtseries.nii"),
              _func("01", "pre", f"{base}_from-scanner_to-T1w_mode-image_xfm.txt"),
              _func("01", "pre", f"{base}_desc-coreg_boldref.nii.gz"))
        touch(root, _func("01", "pre", f"{base}_space-{MNI}_res-2_desc-preproc_bold.json"),
              content='{"RepetitionTime": 2.0, "SkullStripped": false}')
    # run 1 in T1w space has a mask; run 2 does not
    touch(root, _func("01", "pre", "task-rest_run-1_space-T1w_desc-brain_mask.nii.gz"))
    # second session: one run, no run entity
    touch(root,
          _func("01", "post", f"task-rest_space-{MNI}_res-2_desc-preproc_bold.nii.gz"),
          _func("01", "post", f"task-rest_space-{MNI}_res-2_desc-brain_mask.nii.gz"),
          _func("01", "post", "task-rest_desc-confounds_timeseries.tsv"))
    # sub-02: no sessions, fMRIPrep 1.2-1.3 confounds name, an AROMA series, macOS junk
    touch(root,
          _func("02", None, f"task-rest_space-{MNI}_desc-preproc_bold.nii.gz"),
          _func("02", None, f"task-rest_space-{MNI}_desc-brain_mask.nii.gz"),
          _func("02", None, f"task-rest_space-{MNI}_desc-smoothAROMAnonaggr_bold.nii.gz"),
          _func("02", None, "task-rest_desc-confounds_regressors.tsv"),
          f"sub-02/func/._sub-02_task-rest_space-{MNI}_desc-preproc_bold.nii.gz",
          "sub-02/func/.DS_Store")
    # sub-02 n-back: both confounds names present; the newer wins. Uncompressed NIfTI.
    touch(root,
          _func("02", None, f"task-nback_acq-mb4_space-{MNI}_desc-preproc_bold.nii"),
          _func("02", None, "task-nback_acq-mb4_desc-confounds_timeseries.tsv"),
          _func("02", None, "task-nback_acq-mb4_desc-confounds_regressors.tsv"))
    return root


def _expected(root: Path) -> list[RunSpec]:
    def p(rel: str) -> str:
        return str(root / rel)

    specs = []
    for run in ("1", "2"):
        base = f"task-rest_run-{run}"
        specs.append(RunSpec(
            bold=p(_func("01", "pre", f"{base}_space-{MNI}_res-2_desc-preproc_bold.nii.gz")),
            entities={"sub": "01", "ses": "pre", "task": "rest", "run": run, "space": MNI,
                      "res": "2"},
            mask=p(_func("01", "pre", f"{base}_space-{MNI}_res-2_desc-brain_mask.nii.gz")),
            confounds=p(_func("01", "pre", f"{base}_desc-confounds_timeseries.tsv")),
            sidecar=p(_func("01", "pre", f"{base}_space-{MNI}_res-2_desc-preproc_bold.json"))))
        specs.append(RunSpec(
            bold=p(_func("01", "pre", f"{base}_space-T1w_desc-preproc_bold.nii.gz")),
            entities={"sub": "01", "ses": "pre", "task": "rest", "run": run, "space": "T1w"},
            mask=(p(_func("01", "pre", f"{base}_space-T1w_desc-brain_mask.nii.gz"))
                  if run == "1" else None),
            confounds=p(_func("01", "pre", f"{base}_desc-confounds_timeseries.tsv")),
            sidecar=p("task-rest_bold.json")))
    specs.append(RunSpec(
        bold=p(_func("01", "post", f"task-rest_space-{MNI}_res-2_desc-preproc_bold.nii.gz")),
        entities={"sub": "01", "ses": "post", "task": "rest", "space": MNI, "res": "2"},
        mask=p(_func("01", "post", f"task-rest_space-{MNI}_res-2_desc-brain_mask.nii.gz")),
        confounds=p(_func("01", "post", "task-rest_desc-confounds_timeseries.tsv")),
        sidecar=p("task-rest_bold.json")))
    specs.append(RunSpec(
        bold=p(_func("02", None, f"task-rest_space-{MNI}_desc-preproc_bold.nii.gz")),
        entities={"sub": "02", "task": "rest", "space": MNI},
        mask=p(_func("02", None, f"task-rest_space-{MNI}_desc-brain_mask.nii.gz")),
        confounds=p(_func("02", None, "task-rest_desc-confounds_regressors.tsv")),
        sidecar=p("task-rest_bold.json")))
    specs.append(RunSpec(
        bold=p(_func("02", None, f"task-nback_acq-mb4_space-{MNI}_desc-preproc_bold.nii")),
        entities={"sub": "02", "task": "nback", "acq": "mb4", "space": MNI},
        confounds=p(_func("02", None, "task-nback_acq-mb4_desc-confounds_timeseries.tsv"))))
    return sorted(specs, key=lambda s: s.run_id)


def test_discover_fmriprep_tree(fmriprep_tree):
    found = discover(fmriprep_tree)
    expected = _expected(fmriprep_tree)
    assert [s.run_id for s in found] == [s.run_id for s in expected]
    assert found == expected
    assert [s.run_id for s in found] == sorted(s.run_id for s in found)
    assert discover(str(fmriprep_tree)) == found  # str or Path, deterministic
    assert discover(f"file://{fmriprep_tree}") == found  # plain paths even from file:// URLs
    assert all(Path(s.bold).is_absolute() for s in found)


def test_discover_relative_root_gives_absolute_paths(fmriprep_tree, monkeypatch):
    monkeypatch.chdir(fmriprep_tree.parent)
    found = discover("fmriprep")
    assert found == _expected(fmriprep_tree)


def test_discover_from_a_parent_folder(fmriprep_tree):
    """Root above the fMRIPrep folder: derivatives/ with fmriprep/ and freesurfer/."""
    touch(fmriprep_tree.parent, "freesurfer/sub-01/mri/T1.mgz",
          "freesurfer/sub-01_task-rest_desc-preproc_bold.nii.gz")
    assert discover(fmriprep_tree.parent) == _expected(fmriprep_tree)


def test_discover_from_a_subject_folder(fmriprep_tree):
    found = discover(fmriprep_tree / "sub-02")
    assert [s.run_id for s in found] == [
        f"sub-02_task-nback_acq-mb4_space-{MNI}", f"sub-02_task-rest_space-{MNI}"]
    assert found[1].sidecar is None  # inheritance stops at the given root


def test_discover_other_desc(fmriprep_tree):
    (aroma,) = discover(fmriprep_tree, desc="smoothAROMAnonaggr")
    assert aroma.bold.endswith("sub-02_task-rest_space-MNI152NLin2009cAsym_desc-"
                               "smoothAROMAnonaggr_bold.nii.gz")
    assert aroma.entities == {"sub": "02", "task": "rest", "space": MNI}
    assert aroma.confounds.endswith("sub-02_task-rest_desc-confounds_regressors.tsv")
    assert aroma.mask.endswith("sub-02_task-rest_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz")


@pytest.mark.parametrize(("filters", "run_ids"), [
    ({"subjects": "02"}, [f"sub-02_task-nback_acq-mb4_space-{MNI}",
                          f"sub-02_task-rest_space-{MNI}"]),
    ({"subjects": ["sub-02"], "tasks": "task-nback"}, [f"sub-02_task-nback_acq-mb4_space-{MNI}"]),
    ({"sessions": "post"}, [f"sub-01_ses-post_task-rest_space-{MNI}_res-2"]),
    ({"runs": 2, "spaces": "T1w"}, ["sub-01_ses-pre_task-rest_run-2_space-T1w"]),
    ({"runs": ["02"], "spaces": ["space-T1w"]}, ["sub-01_ses-pre_task-rest_run-2_space-T1w"]),
    ({"spaces": f"{MNI}:res-2", "sessions": ["pre"]},
     [f"sub-01_ses-pre_task-rest_run-1_space-{MNI}_res-2",
      f"sub-01_ses-pre_task-rest_run-2_space-{MNI}_res-2"]),
    ({"subjects": ["01", "02"], "tasks": "nback"}, [f"sub-02_task-nback_acq-mb4_space-{MNI}"]),
    ({"subjects": []}, None),  # empty list: no filtering
])
def test_discover_filters(fmriprep_tree, filters, run_ids):
    found = discover(fmriprep_tree, **filters)
    expected = _expected(fmriprep_tree)
    if run_ids is None:
        run_ids = [s.run_id for s in expected]
    assert [s.run_id for s in found] == run_ids
    assert found == [s for s in expected if s.run_id in run_ids]


def test_discover_filter_value_not_present(fmriprep_tree):
    with pytest.raises(InputError, match=r"sub-03.*present: \['01', '02'\]") as exc:
        discover(fmriprep_tree, subjects=["01", "03"])
    assert exc.value.path == str(fmriprep_tree)


def test_discover_filters_exclude_everything(fmriprep_tree):
    with pytest.raises(InputError, match="matches all the filters"):
        discover(fmriprep_tree, sessions="post", tasks="nback")


def test_discover_bad_filter_value(fmriprep_tree):
    with pytest.raises(ValueError, match="alphanumeric"):
        discover(fmriprep_tree, subjects="01/../02")


def test_discover_no_runs(tmp_path):
    touch(tmp_path, "sub-01/func/sub-01_task-rest_bold.nii.gz",  # raw data, no desc
          "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz")
    with pytest.raises(InputError, match=r"no BOLD series found.*desc-preproc_bold\.nii") as exc:
        discover(tmp_path)
    assert exc.value.path == str(tmp_path)


def test_discover_missing_root(tmp_path):
    with pytest.raises(InputError, match="does not exist") as exc:
        discover(tmp_path / "nope")
    assert "nope" in str(exc.value)


def test_discover_raw_bids_with_desc_none(tmp_path):
    touch(tmp_path, "task-rest_bold.json", content='{"RepetitionTime": 2.5}')
    touch(tmp_path, "sub-01/func/sub-01_task-rest_bold.nii.gz",
          "sub-01/func/sub-01_task-rest_events.tsv")
    (spec,) = discover(tmp_path, desc=None)
    assert spec == RunSpec(bold=str(tmp_path / "sub-01/func/sub-01_task-rest_bold.nii.gz"),
                           entities={"sub": "01", "task": "rest"},
                           sidecar=str(tmp_path / "task-rest_bold.json"))


def test_discover_duplicate_run(fmriprep_tree):
    gz = fmriprep_tree / _func("02", None, f"task-rest_space-{MNI}_desc-preproc_bold.nii.gz")
    touch(fmriprep_tree, _func("02", None, f"task-rest_space-{MNI}_desc-preproc_bold.nii"))
    with pytest.raises(InputError, match="same run") as exc:
        discover(fmriprep_tree)
    assert str(gz) in str(exc.value)
    assert str(gz)[:-3] in str(exc.value)
    # filtered out: no error
    assert len(discover(fmriprep_tree, subjects="01")) == 5


def test_discover_duplicate_run_in_two_pipelines(fmriprep_tree):
    other = fmriprep_tree.parent / "fmriprep-old"
    touch(other, _func("02", None, f"task-rest_space-{MNI}_desc-preproc_bold.nii.gz"))
    with pytest.raises(InputError, match="same run sub-02_task-rest_space-MNI152NLin2009cAsym"):
        discover(fmriprep_tree.parent)


def test_discover_malformed_bold_name(fmriprep_tree):
    bad = fmriprep_tree / _func("02", None, "task-rest_copy_desc-preproc_bold.nii.gz")
    touch(fmriprep_tree, str(bad.relative_to(fmriprep_tree)))
    with pytest.raises(InputError, match="'copy' is not a 'key-value' pair") as exc:
        discover(fmriprep_tree)
    assert exc.value.path == str(bad)


def test_discover_missing_task(tmp_path):
    touch(tmp_path, "sub-01/func/sub-01_run-1_desc-preproc_bold.nii.gz")
    with pytest.raises(InputError, match="task") as exc:
        discover(tmp_path)
    assert exc.value.path.endswith("sub-01_run-1_desc-preproc_bold.nii.gz")


def test_sidecar_inheritance_most_specific_wins(tmp_path):
    touch(tmp_path, "task-rest_bold.json", "sub-01/sub-01_task-rest_bold.json",
          "sub-01/func/sub-01_task-rest_space-T1w_desc-preproc_bold.json",  # other space
          "sub-01/func/sub-01_task-rest_desc-confounds_timeseries.json",  # other suffix
          "sub-01/func/sub-01_task-rest_space-MNI_desc-preproc_bold.nii.gz",
          "sub-02/func/sub-02_task-rest_space-MNI_desc-preproc_bold.nii.gz",
          "sub-02/func/sub-02_task-rest_run-1_space-MNI_bold.json",  # run-1 not in the bold
          "sub-02/func/sub-02_task-rest_desc-preproc_bold.json")
    one, two = discover(tmp_path)
    assert one.sidecar == str(tmp_path / "sub-01/sub-01_task-rest_bold.json")
    assert two.sidecar == str(tmp_path / "sub-02/func/sub-02_task-rest_desc-preproc_bold.json")


def test_sidecar_inheritance_ambiguous(tmp_path):
    touch(tmp_path, "task-rest_space-MNI_bold.json", "sub-01_task-rest_bold.json",
          "sub-01/func/sub-01_task-rest_space-MNI_desc-preproc_bold.nii.gz")
    with pytest.raises(InputError, match="equally specific"):
        discover(tmp_path)


# ----------------------------------------------------------------------------------------
# read_sidecar_tr


def test_read_sidecar_tr(tmp_path):
    touch(tmp_path, "a_bold.json", content='{"RepetitionTime": 0.72, "TaskName": "rest"}')
    touch(tmp_path, "b_bold.json", content='{"RepetitionTime": 2}')
    touch(tmp_path, "c_bold.json", content='{"VolumeTiming": [0, 2, 4]}')
    assert read_sidecar_tr(str(tmp_path / "a_bold.json")) == 0.72
    tr = read_sidecar_tr(str(tmp_path / "b_bold.json"))
    assert tr == 2.0 and isinstance(tr, float)
    assert read_sidecar_tr(str(tmp_path / "c_bold.json")) is None


@pytest.mark.parametrize(("content", "problem"), [
    ('{"RepetitionTime": 2.0,}', "not valid JSON"),
    ("", "not valid JSON"),
    (b"\xff\xfe{", "not UTF-8"),
    ("[2.0]", "must hold an object"),
    ('{"RepetitionTime": 0}', "not a positive number"),
    ('{"RepetitionTime": -2.0}', "not a positive number"),
    ('{"RepetitionTime": "2.0"}', "not a positive number"),
    ('{"RepetitionTime": true}', "not a positive number"),
    ('{"RepetitionTime": null}', "not a positive number"),
    ('{"RepetitionTime": NaN}', "not a positive number"),
    ('{"RepetitionTime": 2000}', "milliseconds"),
])
def test_read_sidecar_tr_bad(tmp_path, content, problem):
    touch(tmp_path, "sub-01_task-rest_bold.json", content=content)
    path = str(tmp_path / "sub-01_task-rest_bold.json")
    with pytest.raises(InputError, match=problem) as exc:
        read_sidecar_tr(path)
    assert exc.value.path == path
    assert "sub-01_task-rest_bold.json" in str(exc.value)


def test_read_sidecar_tr_missing(tmp_path):
    with pytest.raises(InputError, match="does not exist") as exc:
        read_sidecar_tr(str(tmp_path / "nope_bold.json"))
    assert "nope_bold.json" in str(exc.value)


# ----------------------------------------------------------------------------------------
# S3 (moto server)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _s3_options(endpoint: str) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing",
            "secret": "testing", "skip_instance_cache": True, "use_listings_cache": False}


def _s3_client(endpoint: str):
    boto3 = pytest.importorskip("boto3")
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.mark.s3
def test_discover_s3(s3_server, fmriprep_tree):
    client = _s3_client(s3_server)
    bucket = f"study-{uuid.uuid4().hex[:8]}"  # unique: the server may be shared later
    client.create_bucket(Bucket=bucket)
    conf = (DATA / "confounds" / "test-v21_desc-confounds_timeseries.tsv").read_bytes()
    for path in sorted(p for p in fmriprep_tree.rglob("*") if p.is_file()):
        rel = path.relative_to(fmriprep_tree).as_posix()
        body = conf if rel.endswith("_desc-confounds_timeseries.tsv") else path.read_bytes()
        client.put_object(Bucket=bucket, Key=f"derivs/{rel}", Body=body)
    client.put_object(Bucket=bucket, Key="elsewhere/sub-09/func/"
                      f"sub-09_task-rest_space-{MNI}_desc-preproc_bold.nii.gz", Body=b"")

    options = _s3_options(s3_server)
    found = discover(f"s3://{bucket}/derivs", storage_options=options)
    local = str(fmriprep_tree)
    expected = [RunSpec(**{k: (v.replace(local, f"s3://{bucket}/derivs") if isinstance(v, str)
                               else v) for k, v in s.to_dict().items()})
                for s in _expected(fmriprep_tree)]
    assert found == expected
    assert found[0].bold == (f"s3://{bucket}/derivs/sub-01/ses-post/func/sub-01_ses-post_task-rest_"
                             f"space-{MNI}_res-2_desc-preproc_bold.nii.gz")
    assert discover(f"s3://{bucket}/derivs/", storage_options=options) == found
    assert [s.run_id for s in discover(f"s3://{bucket}/derivs", storage_options=options,
                                       subjects="02", tasks="rest")] == [
        f"sub-02_task-rest_space-{MNI}"]

    # companions read back from the bucket
    t1w = next(s for s in found if s.entities.get("space") == "T1w")
    assert t1w.sidecar == f"s3://{bucket}/derivs/task-rest_bold.json"
    assert read_sidecar_tr(t1w.sidecar, options) == 2.0
    df = read_confounds(t1w.confounds, storage_options=options)
    assert df.shape == (30, 84)


@pytest.mark.s3
def test_discover_s3_errors(s3_server):
    client = _s3_client(s3_server)
    bucket = f"empty-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="derivs/dataset_description.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="derivs/sub-01/func/bad_bold.json", Body=b"{,}")
    options = _s3_options(s3_server)
    with pytest.raises(InputError, match="no BOLD series found") as exc:
        discover(f"s3://{bucket}/derivs", storage_options=options)
    assert exc.value.path == f"s3://{bucket}/derivs"
    with pytest.raises(InputError, match="no BOLD series found"):
        discover(f"s3://{bucket}/nothing-here", storage_options=options)
    with pytest.raises(InputError, match="not valid JSON") as exc:
        read_sidecar_tr(f"s3://{bucket}/derivs/sub-01/func/bad_bold.json", options)
    assert exc.value.path == f"s3://{bucket}/derivs/sub-01/func/bad_bold.json"
    with pytest.raises(InputError, match="does not exist"):
        read_sidecar_tr(f"s3://{bucket}/derivs/missing_bold.json", options)


def test_json_of_expected_tree_is_valid(fmriprep_tree):
    # the fixture's sidecars are real JSON with a TR (guards the tree itself)
    for spec in _expected(fmriprep_tree):
        if spec.sidecar:
            assert json.loads(Path(spec.sidecar).read_text())["RepetitionTime"] == 2.0


def test_discover_lists_only_what_it_needs(fmriprep_tree, monkeypatch):
    """FreeSurfer, figures, logs and anat folders are pruned from the walk, not filtered."""
    from fsspec.implementations.local import LocalFileSystem

    listed: list[str] = []
    original = LocalFileSystem.ls

    def spy(self, path, *args, **kwargs):
        listed.append(str(path))
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "ls", spy)
    assert discover(fmriprep_tree) == _expected(fmriprep_tree)
    rel = sorted(str(Path(p).relative_to(fmriprep_tree)) for p in listed)
    assert rel == [".", "sub-01", "sub-01/ses-post", "sub-01/ses-post/func", "sub-01/ses-pre",
                   "sub-01/ses-pre/func", "sub-02", "sub-02/func"]
