"""Small NIfTI/TSV builders for storage tests (independent of the simulator)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from storage import RunSpec

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAXBY = SHARED_DATA / "haxby2001" / "sub001"

AFFINE = np.array([[-3.0, 0, 0, 30], [0, 3.0, 0, -40], [0, 0, 3.5, -20], [0, 0, 0, 1]])


def bold_array(shape=(7, 8, 6, 20), dtype="float32", seed=0) -> np.ndarray:
    """Smooth-ish random data with a spatial baseline, so compression has work to do."""
    rng = np.random.default_rng(seed)
    base = 500 + 100 * rng.random(shape[:3])
    data = base[..., None] + rng.normal(0, 10, shape)
    return data.astype(dtype) if np.dtype(dtype).kind == "f" else np.rint(data).astype(dtype)


def write_bold(path: Path, data: np.ndarray, *, affine=AFFINE, tr: float | None = 2.0,
               slope: float | None = None, inter: float | None = None,
               header_cls=nib.Nifti1Image) -> Path:
    img = header_cls(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None and data.ndim == 4:
        img.header.set_zooms((*img.header.get_zooms()[:3], tr))
    elif data.ndim == 4:
        img.header.set_zooms((*img.header.get_zooms()[:3], 0.0))
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    img.to_filename(str(path))
    return path


def write_mask(path: Path, shape, *, affine=AFFINE) -> Path:
    mask = np.zeros(shape, dtype=np.uint8)
    sl = tuple(slice(1, max(2, s - 1)) for s in shape)
    mask[sl] = 1
    nib.Nifti1Image(mask, affine).to_filename(str(path))
    return path


def write_confounds(path: Path, n: int, *, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    cols = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "csf"]
    frame = pd.DataFrame(rng.normal(size=(n, len(cols))), columns=cols)
    frame["trans_x_derivative1"] = frame["trans_x"].diff()
    frame.to_csv(path, sep="\t", index=False, na_rep="n/a")
    return path


def make_run(folder: Path, sub: str, *, shape=(7, 8, 6, 20), dtype="float32", seed=0,
             task="rest", mask=True, confounds=True, sidecar_tr: float | None = None,
             **bold_kwargs) -> RunSpec:
    """Write one run's files in ``folder`` and return its RunSpec."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{sub}_task-{task}"
    data = bold_array(shape, dtype, seed)
    bold = write_bold(folder / f"{stem}_bold.nii.gz", data, **bold_kwargs)
    sidecar = None
    if sidecar_tr is not None:
        sidecar = folder / f"{stem}_bold.json"
        sidecar.write_text(json.dumps({"RepetitionTime": sidecar_tr}))
    return RunSpec(
        bold=str(bold),
        entities={"sub": sub, "task": task},
        mask=str(write_mask(folder / f"{stem}_mask.nii.gz", shape[:3])) if mask else None,
        confounds=str(write_confounds(folder / f"{stem}_confounds.tsv", shape[3], seed=seed))
        if confounds else None,
        sidecar=str(sidecar) if sidecar else None,
    )
