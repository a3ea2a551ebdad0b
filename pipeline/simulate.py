"""Deterministic simulator of a small multi-subject fMRIPrep-derivatives dataset.

:func:`simulate_dataset` writes a BIDS/fMRIPrep-style derivatives tree (preprocessed BOLD,
brain masks, confounds TSV/JSON, BOLD sidecars, a label atlas, ``participants.tsv``) whose
every voxel time series is a *known* linear combination of sources, and saves that ground
truth under ``sourcedata/simulation/`` (:func:`load_truth` reads it back). It exists to test
what reference implementations cannot: network recovery, removal of noise sources, group
differences in connectivity, and out-of-core behaviour on realistic grid sizes.

Generative model
----------------
For voxel ``v`` (flattened in NIfTI/Fortran order) and volume ``t`` of run ``r``::

    y[v, t] = baseline[v]
              + sum_k  network_coef[k, v] * network_timeseries[r, t, k]
              + sum_j  motion_coef[j, v]  * motion[r, t, j]
              + sum_j  drift_coef[r, j, v] * drift_basis[t, j]
              + physio_coef[v] * physio[r, t]
              + wm_coef[v]     * wm_signal[r, t]
              + dummy_coef[v]  * dummy[r, t]
              + noise_sigma[v] * e[v, t],          e ~ N(0, 1) i.i.d.

All arrays named above are saved in ``truth.npz`` (float32 maps, float64 time courses), so
the noiseless data can be rebuilt exactly (up to float32 rounding, and the int16
quantisation when ``dtype="int16"``).

- **Anatomy** (shared by all subjects, already "in MNI space"): an ellipsoid brain mask with
  semi-axes 40 % of each grid dimension (80 % of the box along each axis). Tissue by the
  normalised ellipsoid radius ``rho``: CSF ("ventricles") ``rho < 0.25``, white matter
  ``0.25 <= rho < 0.6``, grey matter ``0.6 <= rho < 1``. Baseline intensities GM 800, WM 600,
  CSF 1000, outside 20, smoothed by a Gaussian of 0.7 voxel (partial volume) and multiplied by
  a smooth linear bias field (within +-15 %).
- **Networks**: ``n_networks`` maps, each the maximum of 1–2 isotropic Gaussian blobs (peak 1)
  centred in grey matter; the BOLD contribution is ``2 %`` of the baseline times the map,
  restricted to grey matter. Atlas regions: each blob thresholded at 0.5 within GM (a voxel
  goes to the blob with the largest value), then the remaining GM split by octant into
  "background" parcels. Labels ``1..`` are the network regions (by network, then blob),
  followed by the background parcels.
- **Network time courses**: band-limited (0.01–0.1 Hz, capped below Nyquist; for runs too
  short to hold ``n_networks`` independent signals in that band, the lowest FFT bins are
  used instead) Gaussian signals, whitened so that their *sample* correlation is exactly the
  identity, then mixed by the Cholesky factor of the subject's correlation matrix: every
  run's network time courses have unit variance and sample correlation (ddof=1) exactly
  ``subject_corr[s]``. The subject matrix is the group matrix plus a small symmetric jitter
  (sd 0.05). The two group matrices are identical except for the *effect pairs* of networks
  ``(0, 1)`` and, when ``n_networks >= 4``, ``(2, 3)``: correlation 0.1 in controls and
  ``0.1 + group_effect`` in patients.
- **Groups**: alternating, ``sub-01`` control, ``sub-02`` patient, ``sub-03`` control, ... (with
  an odd number of subjects there is one more control).
- **Motion**: 6 rigid-body parameters (mm, rad) = smoothed random walk (peak ~0.15–0.3 mm /
  ~0.0025–0.005 rad) + small jitter + about one single-volume spike per 60 volumes (every
  translation moves 0.2–0.5 mm, rotations 0.001–0.004 rad, so framewise displacement exceeds
  0.5 mm on the spike and on the return). Its effect on voxels is the first-order Taylor
  expansion of the rigid motion of the baseline image: ``dI = -grad(I0) . (trans + rot x r)``
  with ``r`` the voxel position in mm relative to the grid centre (world origin), i.e.
  ``motion_coef = -[g_x, g_y, g_z, (r x g)_x, (r x g)_y, (r x g)_z]``.
- **Scanner drift**: per run, linear + cosine (orders 1, 2) basis, per-voxel amplitudes
  ``baseline * a_j * (1 + b_j . p)`` (``a_j ~ N(0, 1 %)``, ``b_j`` uniform in [-0.5, 0.5]^3,
  ``p`` the position normalised to [-1, 1]).
- **Physiological** source in CSF voxels: an amplitude- and phase-modulated oscillation at
  ``min(0.3 Hz, 0.8 * Nyquist)`` (0.2 Hz at TR 2 s), 3 % of baseline.
- **White-matter** source in WM voxels: slow (< 0.05 Hz) Gaussian signal, 1 % of baseline.
- **Thermal noise**: white Gaussian, standard deviation ``noise_std * baseline`` per voxel.
- **Non-steady state** (``n_dummy > 0``): the first ``n_dummy`` volumes get a decaying T1
  transient of up to 60 % of the baseline.

Confounds are computed from the data as written (after int16 quantisation), batch by batch,
the way fMRIPrep/nipype compute them (see :func:`simulate_dataset`, Notes).

Memory: each 4D image is written in volume batches by :class:`storage.nifti.NiftiStreamWriter`;
besides the 3D maps only one batch, a bounded voxel sample (for aCompCor and standardised
DVARS) and per-volume scalars are held. Random numbers come from ``numpy.random.SeedSequence``
children (dataset anatomy, then per subject, then per run; the thermal noise is drawn volume
by volume from its own stream), so results do not depend on the batch size, and subject ``i``
is the same whatever ``n_subjects``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from storage.nifti import NiftiStreamWriter

__all__ = [
    "EFFECT_CONTROL_CORRELATION",
    "MOTION_COLUMNS",
    "SPACE",
    "TASK",
    "SimulatedDataset",
    "SimulatedRun",
    "load_truth",
    "simulate_dataset",
]

#: Template-space entity of every simulated file.
SPACE = "MNI152NLin2009cAsym"
#: Task entity of every simulated run.
TASK = "rest"
#: fMRIPrep names of the 6 rigid-body parameters, in the order of ``truth["motion"]``.
MOTION_COLUMNS: tuple[str, ...] = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
#: Correlation of the effect network pairs in the control group.
EFFECT_CONTROL_CORRELATION = 0.1

_TRUTH_DIR = ("sourcedata", "simulation")
_TISSUE_LABELS = {0: "outside", 1: "gm", 2: "wm", 3: "csf"}
_GM, _WM, _CSF = 1, 2, 3
_TISSUE_INTENSITY = np.array([20.0, 800.0, 600.0, 1000.0])
_NETWORK_AMPLITUDE = 0.02
_PHYSIO_AMPLITUDE = 0.03
_WM_AMPLITUDE = 0.01
_DRIFT_AMPLITUDE = 0.01
_DUMMY_AMPLITUDE = 0.6
_MOTION_AMPLITUDE = np.array([0.3, 0.3, 0.3, 0.005, 0.005, 0.005])
_SUBJECT_JITTER = 0.05
_N_ACOMPCOR = 5
_HIGH_PASS_PERIOD = 128.0
_MAX_SAMPLE_VOXELS = 10_000
_BATCH_BYTES = 64 * 2**20
_FD_RADIUS_MM = 50.0
_INT16_HALF_RANGE = 32500.0


@dataclass(frozen=True)
class SimulatedRun:
    """The files of one simulated run.

    Attributes
    ----------
    index : int
        Row of this run in the per-run arrays of the truth (``truth["runs"][index]``).
    subject : str
        Subject label without prefix (``"01"``).
    session : str or None
        Session label, or None without a session level.
    run : str or None
        Run label, or None when ``n_runs == 1``.
    group : {"control", "patient"}
        Group of the subject.
    bold, bold_json, mask, confounds, confounds_json : pathlib.Path
        Preprocessed BOLD, its sidecar, the brain mask, the confounds TSV and its sidecar.
    """

    index: int
    subject: str
    session: str | None
    run: str | None
    group: str
    bold: Path
    bold_json: Path
    mask: Path
    confounds: Path
    confounds_json: Path

    @property
    def entities(self) -> dict[str, str]:
        """BIDS entities of the BOLD file (``sub``, [``ses``], ``task``, [``run``], ``space``)."""
        ent = {"sub": self.subject}
        if self.session is not None:
            ent["ses"] = self.session
        ent["task"] = TASK
        if self.run is not None:
            ent["run"] = self.run
        ent["space"] = SPACE
        return ent


@dataclass(frozen=True)
class SimulatedDataset:
    """What :func:`simulate_dataset` wrote.

    Attributes
    ----------
    root : pathlib.Path
        Dataset root (``dataset_description.json`` lives here).
    runs : tuple of SimulatedRun
        One record per run, ordered by subject, session, run.
    atlas, atlas_tsv : pathlib.Path
        ``atlas-simulated_dseg.nii.gz`` (int16 labels, 0 = background) and its label table.
    participants : pathlib.Path
        ``participants.tsv``.
    truth, truth_json : pathlib.Path
        ``sourcedata/simulation/truth.npz`` and ``truth.json``.
    dataset_description : pathlib.Path
        ``dataset_description.json``.
    """

    root: Path
    runs: tuple[SimulatedRun, ...]
    atlas: Path
    atlas_tsv: Path
    participants: Path
    truth: Path
    truth_json: Path
    dataset_description: Path

    @property
    def bold(self) -> list[Path]:
        """BOLD files, one per run."""
        return [r.bold for r in self.runs]

    @property
    def masks(self) -> list[Path]:
        """Brain masks, one per run."""
        return [r.mask for r in self.runs]

    @property
    def confounds(self) -> list[Path]:
        """Confounds TSVs, one per run."""
        return [r.confounds for r in self.runs]


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def simulate_dataset(
    out_dir: str | Path,
    *,
    n_subjects: int = 8,
    shape: Sequence[int] = (20, 24, 20),
    n_volumes: int = 150,
    t_r: float = 2.0,
    n_networks: int = 6,
    seed: int = 0,
    dtype: Literal["float32", "int16"] = "float32",
    sessions: Sequence[str] | None = None,
    n_runs: int = 1,
    noise_std: float = 0.01,
    group_effect: float = 0.5,
    compresslevel: int = 1,
    voxel_size: float | Sequence[float] = 3.0,
    n_dummy: int = 0,
    batch_size: int | None = None,
) -> SimulatedDataset:
    """Simulate a multi-subject fMRIPrep-derivatives dataset with saved ground truth.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Dataset root; created if needed. Existing files with the same names are replaced.
    n_subjects : int, default=8
        Number of subjects (``sub-01`` ...); groups alternate control/patient.
    shape : sequence of 3 int, default=(20, 24, 20)
        Spatial grid (each dimension >= 8).
    n_volumes : int, default=150
        Volumes per run (including the ``n_dummy`` non-steady-state volumes).
    t_r : float, default=2.0
        Repetition time in seconds.
    n_networks : int, default=6
        Number of networks (>= 2).
    seed : int, default=0
        Seed of all random numbers; the same seed gives identical files.
    dtype : {"float32", "int16"}, default="float32"
        On-disk voxel type. ``"int16"`` stores scaled integers (``scl_slope``/``scl_inter``
        chosen per run so the data span about +-32500 of the int16 range).
    sessions : sequence of str, optional
        Session labels (``["1", "2"]`` gives ``ses-1``/``ses-2``); None: no session level.
    n_runs : int, default=1
        Runs per session; with more than one, files get a ``run-<n>`` entity (1-based).
    noise_std : float, default=0.01
        Standard deviation of the white thermal noise as a fraction of each voxel's baseline
        intensity (0.01: temporal SNR of about 100 before the other sources; the network
        signal is 2 % at a map peak).
    group_effect : float, default=0.5
        Patient minus control correlation of the effect network pairs (controls: 0.1).
    compresslevel : int, default=1
        gzip level of the NIfTI files.
    voxel_size : float or sequence of 3 float, default=3.0
        Voxel size in mm; the affine is diagonal with the grid centre at world (0, 0, 0).
    n_dummy : int, default=0
        Non-steady-state volumes at the start of each run (T1 transient; one-hot
        ``non_steady_state_outlierXX`` confound columns).
    batch_size : int, optional
        Volumes per written batch; default: about 64 MB of float32 per batch. The output
        does not depend on it.

    Returns
    -------
    SimulatedDataset
        Paths of everything written.

    Raises
    ------
    ValueError
        On invalid parameters (including a grid too small for ``n_networks`` separated blobs
        or runs too short for ``n_networks`` independent band-limited signals).

    Notes
    -----
    Confound columns (fMRIPrep names; first row ``n/a`` for every ``*_derivative1*`` column,
    ``framewise_displacement``, ``dvars`` and ``std_dvars``):

    - ``trans_*``/``rot_*`` (mm, rad): the simulated motion itself, with ``_derivative1``
      (backward difference), ``_power2`` and ``_derivative1_power2`` expansions.
    - ``global_signal``, ``csf``, ``white_matter`` (+ the same 3 expansions): per-volume means
      over the brain mask, the CSF and the WM tissue masks (not eroded).
    - ``framewise_displacement`` (Power 2012): ``sum |d trans| + 50 mm * sum |d rot|``.
    - ``dvars``, ``std_dvars``: nipype's ``compute_dvars`` (intensity normalisation to a
      median of 1000, robust SD with "lower" percentiles, Yule–Walker AR(1)); the median and
      the standardisation use all brain voxels when there are at most 10,000 of them, else a
      fixed random sample of 10,000 (``dvars`` itself always uses every brain voxel).
    - ``a_comp_cor_00..04``: nipype's aCompCor on the combined WM+CSF mask (up to 10,000
      sampled voxels): cosine high-pass (128 s) and mean removed, each voxel scaled to unit
      variance, left singular vectors; sign fixed so each column's largest entry is positive.
      The JSON sidecar lists them with ``Method``, ``Mask``, ``SingularValue``,
      ``VarianceExplained``, ``CumulativeVarianceExplained`` and ``Retained``.
    - ``cosineXX``: the DCT high-pass basis of fMRIPrep/nilearn for a 128 s cut-off,
      ``floor(2 * n * t_r / 128)`` columns with ``n`` the number of steady-state volumes.
    - ``non_steady_state_outlierXX``: only when ``n_dummy > 0``; like nipype's CompCor with
      ``ignore_initial_volumes``, aCompCor and cosine columns are computed on the
      steady-state volumes and are 0 on the dummy volumes.

    Examples
    --------
    >>> ds = simulate_dataset("/tmp/sim", n_subjects=4)  # doctest: +SKIP
    >>> truth = load_truth(ds.root)  # doctest: +SKIP
    >>> truth["network_timeseries"].shape  # doctest: +SKIP
    (4, 150, 6)
    """
    p = _validate(
        n_subjects=n_subjects, shape=shape, n_volumes=n_volumes, t_r=t_r,
        n_networks=n_networks, seed=seed, dtype=dtype, sessions=sessions, n_runs=n_runs,
        noise_std=noise_std, group_effect=group_effect, compresslevel=compresslevel,
        voxel_size=voxel_size, n_dummy=n_dummy, batch_size=batch_size,
    )
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)

    ss_anat, ss_cohort, ss_sample = np.random.SeedSequence(p["seed"]).spawn(3)
    anat_rng = np.random.default_rng(ss_anat)
    anat = _build_anatomy(p["shape"], p["voxel_size"], p["n_networks"], p["noise_std"],
                          anat_rng)
    group_corr, effect_pairs = _group_correlations(p["n_networks"], p["group_effect"],
                                                   anat_rng)

    subjects = _subjects(p["n_subjects"])
    sessions_l: list[str | None] = list(p["sessions"]) if p["sessions"] else [None]
    run_labels: list[str | None] = (
        [str(i + 1) for i in range(p["n_runs"])] if p["n_runs"] > 1 else [None])
    n_vol = p["n_volumes"]
    V = int(np.prod(p["shape"]))
    batch = p["batch_size"] or max(1, min(n_vol, _BATCH_BYTES // (4 * V)))

    # files shared by all runs
    atlas_path = root / "atlas-simulated_dseg.nii.gz"
    _write_volume(atlas_path, anat.atlas, anat.affine, np.int16, compresslevel)
    atlas_tsv = root / "atlas-simulated_dseg.tsv"
    pd.DataFrame({"index": [r["index"] for r in anat.regions],
                  "name": [r["name"] for r in anat.regions]}).to_csv(
        atlas_tsv, sep="\t", index=False)
    desc_path = root / "dataset_description.json"
    _write_json(desc_path, _dataset_description())

    # per-subject, per-run simulation
    subject_ss = ss_cohort.spawn(p["n_subjects"])
    participants = []
    subject_corr = np.empty((p["n_subjects"], p["n_networks"], p["n_networks"]))
    runs: list[SimulatedRun] = []
    run_meta: list[dict[str, Any]] = []
    per_run: dict[str, list[np.ndarray]] = {
        k: [] for k in ("network_timeseries", "motion", "physio", "wm_signal", "dummy",
                        "drift_coef")}
    mask_u8 = anat.mask.astype(np.uint8)
    for s_idx, label in enumerate(subjects):
        group = "control" if s_idx % 2 == 0 else "patient"
        ss_subject, *ss_runs = subject_ss[s_idx].spawn(1 + len(sessions_l) * len(run_labels))
        srng = np.random.default_rng(ss_subject)
        age = int(srng.integers(20, 66))
        participants.append({"participant_id": f"sub-{label}", "group": group, "age": age})
        subject_corr[s_idx] = _jitter_correlation(group_corr[group == "patient"], srng)
        for i_ses, ses in enumerate(sessions_l):
            for i_run, run in enumerate(run_labels):
                r_idx = len(runs)
                ss_tc, ss_noise = ss_runs[i_ses * len(run_labels) + i_run].spawn(2)
                src = _run_sources(anat, subject_corr[s_idx], p, np.random.default_rng(ss_tc))
                files = _run_paths(root, label, ses, run)
                for f in files.values():
                    f.parent.mkdir(parents=True, exist_ok=True)
                scaling = _write_bold_and_confounds(
                    files, anat, src, p, batch, np.random.default_rng(ss_noise), ss_sample)
                _write_volume(files["mask"], mask_u8, anat.affine, np.uint8, compresslevel)
                _write_json(files["bold_json"], {
                    "RepetitionTime": p["t_r"], "TaskName": TASK, "SkullStripped": False})
                rec = SimulatedRun(index=r_idx, subject=label, session=ses, run=run,
                                   group=group, **files)
                runs.append(rec)
                run_meta.append({
                    "index": r_idx, "subject": label, "subject_index": s_idx,
                    "session": ses, "run": run, "group": group,
                    **{k: v.relative_to(root).as_posix() for k, v in files.items()},
                    "scl_slope": scaling[0], "scl_inter": scaling[1],
                    "spike_volumes": src["spikes"],
                })
                for k in per_run:
                    per_run[k].append(src[k])

    participants_path = root / "participants.tsv"
    pd.DataFrame(participants).to_csv(participants_path, sep="\t", index=False)

    truth_dir = root.joinpath(*_TRUTH_DIR)
    truth_dir.mkdir(parents=True, exist_ok=True)
    arrays = {
        "affine": anat.affine,
        "tissue": anat.tissue,
        "mask": mask_u8,
        "baseline": anat.baseline.astype(np.float32),
        "noise_sigma": anat.noise_sigma.astype(np.float32),
        "atlas": anat.atlas,
        "network_maps": anat.network_maps,
        "network_coef": anat.network_coef,
        "motion_coef": anat.motion_coef,
        "physio_coef": anat.physio_coef,
        "wm_coef": anat.wm_coef,
        "dummy_coef": anat.dummy_coef,
        "drift_basis": _drift_basis(n_vol),
        "group_corr": np.stack([group_corr[False], group_corr[True]]),
        "subject_corr": subject_corr,
        **{k: np.stack(v) for k, v in per_run.items()},
    }
    truth_npz = truth_dir / "truth.npz"
    np.savez_compressed(truth_npz, **arrays)
    truth_json = truth_dir / "truth.json"
    _write_json(truth_json, _truth_document(p, anat, participants, run_meta, effect_pairs))

    return SimulatedDataset(
        root=root, runs=tuple(runs), atlas=atlas_path, atlas_tsv=atlas_tsv,
        participants=participants_path, truth=truth_npz, truth_json=truth_json,
        dataset_description=desc_path,
    )


def load_truth(out_dir: str | Path | SimulatedDataset) -> dict[str, Any]:
    """Read the ground truth saved by :func:`simulate_dataset`.

    Parameters
    ----------
    out_dir : str, pathlib.Path or SimulatedDataset
        The dataset root (or the object returned by :func:`simulate_dataset`).

    Returns
    -------
    dict
        The contents of ``truth.json`` (``parameters``, ``subjects``, ``groups``, ``runs``,
        ``tissue_labels``, ``networks``, ``regions``, ``effect_pairs``, ``different_edges``,
        ``effect_correlation``, ``noise_sources``, ``sources``, ``arrays``) merged with the
        arrays of ``truth.npz`` (keys described in ``truth["arrays"]``). Per-run arrays have
        the run index (``truth["runs"][i]["index"]``) as first axis; 3D maps are (x, y, z).
    """
    root = Path(out_dir.root if isinstance(out_dir, SimulatedDataset) else out_dir)
    d = root.joinpath(*_TRUTH_DIR)
    truth = json.loads((d / "truth.json").read_text())
    with np.load(d / "truth.npz") as z:
        arrays = {k: z[k] for k in z.files}
    clash = set(truth) & set(arrays)
    if clash:  # pragma: no cover - guards the file format
        raise ValueError(f"{d}: keys in both truth.json and truth.npz: {sorted(clash)}")
    truth.update(arrays)
    return truth


# --------------------------------------------------------------------------------------
# validation and names
# --------------------------------------------------------------------------------------
def _validate(**p: Any) -> dict[str, Any]:
    shape = tuple(int(s) for s in p["shape"])
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 integers >= 8, got {p['shape']!r}")
    p["shape"] = shape
    vs = np.broadcast_to(np.asarray(p["voxel_size"], dtype=float), (3,)).copy()
    if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size must be positive, got {p['voxel_size']!r}")
    p["voxel_size"] = tuple(float(v) for v in vs)
    for name, low in (("n_subjects", 1), ("n_networks", 2), ("n_runs", 1)):
        if int(p[name]) != p[name] or p[name] < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {p[name]!r}")
        p[name] = int(p[name])
    if int(p["n_dummy"]) != p["n_dummy"] or p["n_dummy"] < 0:
        raise ValueError(f"n_dummy must be an integer >= 0, got {p['n_dummy']!r}")
    p["n_dummy"] = int(p["n_dummy"])
    if int(p["n_volumes"]) != p["n_volumes"] or p["n_volumes"] - p["n_dummy"] < 20:
        raise ValueError(f"n_volumes must leave at least 20 steady-state volumes after "
                         f"n_dummy={p['n_dummy']}, got {p['n_volumes']!r}")
    p["n_volumes"] = int(p["n_volumes"])
    if not (np.isfinite(p["t_r"]) and p["t_r"] > 0):
        raise ValueError(f"t_r must be a positive number of seconds, got {p['t_r']!r}")
    p["t_r"] = float(p["t_r"])
    if p["dtype"] not in ("float32", "int16"):
        raise ValueError(f"dtype must be 'float32' or 'int16', got {p['dtype']!r}")
    if not (np.isfinite(p["noise_std"]) and p["noise_std"] >= 0):
        raise ValueError(f"noise_std must be >= 0, got {p['noise_std']!r}")
    p["noise_std"] = float(p["noise_std"])
    patient = EFFECT_CONTROL_CORRELATION + p["group_effect"]
    if not (np.isfinite(patient) and -0.9 < patient < 0.9):
        raise ValueError(f"group_effect must keep the patient correlation "
                         f"{EFFECT_CONTROL_CORRELATION} + group_effect within (-0.9, 0.9), "
                         f"got {p['group_effect']!r}")
    p["group_effect"] = float(p["group_effect"])
    if p["sessions"] is not None:
        if isinstance(p["sessions"], str):
            raise ValueError("sessions must be a sequence of labels, e.g. ['1', '2']")
        sessions = [str(s) for s in p["sessions"]]
        if not sessions or len(set(sessions)) != len(sessions) or not all(
                s.isalnum() for s in sessions):
            raise ValueError(f"sessions must be distinct alphanumeric labels, got {sessions!r}")
        p["sessions"] = sessions
    if p["batch_size"] is not None and (int(p["batch_size"]) != p["batch_size"]
                                        or p["batch_size"] < 1):
        raise ValueError(f"batch_size must be a positive integer, got {p['batch_size']!r}")
    if not 0 <= int(p["compresslevel"]) <= 9:
        raise ValueError(f"compresslevel must be 0..9, got {p['compresslevel']!r}")
    p["seed"] = int(p["seed"])
    return p


def _subjects(n: int) -> list[str]:
    width = max(2, len(str(n)))
    return [f"{i + 1:0{width}d}" for i in range(n)]


def _run_paths(root: Path, sub: str, ses: str | None, run: str | None) -> dict[str, Path]:
    d = root / f"sub-{sub}"
    stem = f"sub-{sub}"
    if ses is not None:
        d = d / f"ses-{ses}"
        stem += f"_ses-{ses}"
    d = d / "func"
    stem += f"_task-{TASK}"
    if run is not None:
        stem += f"_run-{run}"
    spaced = f"{stem}_space-{SPACE}"
    return {
        "bold": d / f"{spaced}_desc-preproc_bold.nii.gz",
        "bold_json": d / f"{spaced}_desc-preproc_bold.json",
        "mask": d / f"{spaced}_desc-brain_mask.nii.gz",
        "confounds": d / f"{stem}_desc-confounds_timeseries.tsv",
        "confounds_json": d / f"{stem}_desc-confounds_timeseries.json",
    }


def _dataset_description() -> dict[str, Any]:
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            ver = version("boldflow")
        except PackageNotFoundError:
            ver = "unknown"
    except ImportError:  # pragma: no cover
        ver = "unknown"
    return {
        "Name": "boldflow simulated resting-state dataset",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "boldflow-simulate",
            "Version": ver,
            "Description": "Synthetic fMRIPrep-style derivatives with known ground truth "
                           "(pipeline.simulate.simulate_dataset); truth in "
                           "sourcedata/simulation/.",
        }],
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------
@dataclass
class _Anatomy:
    shape: tuple[int, int, int]
    voxel_size: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray          # int8 labels
    mask: np.ndarray            # bool
    baseline: np.ndarray        # float64
    noise_sigma: np.ndarray     # float64
    pos_norm: np.ndarray        # (3, x, y, z) position normalised to [-1, 1]
    network_maps: np.ndarray    # (K, x, y, z) float32
    network_coef: np.ndarray    # (K, x, y, z) float32
    motion_coef: np.ndarray     # (6, x, y, z) float32
    physio_coef: np.ndarray     # float32
    wm_coef: np.ndarray         # float32
    dummy_coef: np.ndarray      # float32
    atlas: np.ndarray           # int16
    regions: list[dict[str, Any]]
    networks: list[dict[str, Any]]
    blob_sigma_mm: float


def _build_anatomy(shape: tuple[int, int, int], voxel_size: tuple[float, ...], n_networks: int,
                   noise_std: float, rng: np.random.Generator) -> _Anatomy:
    dims = np.asarray(shape, dtype=float)
    vs = np.asarray(voxel_size, dtype=float)
    centre = (dims - 1) / 2
    affine = np.diag([*vs, 1.0])
    affine[:3, 3] = -vs * centre
    rel = np.indices(shape, dtype=float) - centre[:, None, None, None]  # voxels from centre
    pos_mm = rel * vs[:, None, None, None]
    semi = 0.4 * dims
    rho = np.sqrt(np.sum((rel / semi[:, None, None, None]) ** 2, axis=0))
    tissue = np.zeros(shape, dtype=np.int8)
    tissue[rho < 1.0] = _GM
    tissue[rho < 0.6] = _WM
    tissue[rho < 0.25] = _CSF
    for label, name in ((_CSF, "CSF"), (_WM, "white-matter"), (_GM, "grey-matter")):
        if not np.any(tissue == label):
            raise ValueError(f"grid {shape} is too small to hold {name} voxels; "
                             "use at least 10 voxels along each axis")
    mask = rho < 1.0
    pos_norm = rel / (dims / 2)[:, None, None, None]

    bias_grad = rng.uniform(-0.05, 0.05, size=3)
    bias = 1.0 + np.tensordot(bias_grad, pos_norm, axes=1)
    baseline = ndimage.gaussian_filter(_TISSUE_INTENSITY[tissue], 0.7, mode="nearest") * bias

    # first-order rigid-motion coefficients: dI = -g.(t + w x r) = -g.t - w.(r x g)
    gx, gy, gz = np.gradient(baseline, *vs)
    x, y, z = pos_mm
    motion_coef = -np.stack([gx, gy, gz, y * gz - z * gy, z * gx - x * gz, x * gy - y * gx])

    # network blobs in the middle of the grey-matter shell
    sigma_mm = float(max(vs.max(), 0.18 * np.min(semi * vs)))
    n_blobs = rng.integers(1, 3, size=n_networks)
    cand = np.argwhere((tissue == _GM) & (rho >= 0.7) & (rho <= 0.9))
    if len(cand) < n_blobs.sum():
        cand = np.argwhere(tissue == _GM)
    cand_mm = (cand - centre) * vs
    order = rng.permutation(len(cand))
    centres = _place_blobs(cand_mm[order], int(n_blobs.sum()), sigma_mm)
    blob_network = np.repeat(np.arange(n_networks), n_blobs)

    gm = tissue == _GM
    network_maps = np.zeros((n_networks, *shape), dtype=np.float64)
    best = np.zeros(shape)
    best_blob = np.full(shape, -1, dtype=np.int64)
    for j, (c, k) in enumerate(zip(centres, blob_network, strict=True)):
        d2 = sum((pos_mm[a] - c[a]) ** 2 for a in range(3))
        b = np.exp(-d2 / (2 * sigma_mm**2))
        np.maximum(network_maps[k], b, out=network_maps[k])
        upd = b > best
        best[upd] = b[upd]
        best_blob[upd] = j
    atlas = np.zeros(shape, dtype=np.int16)
    in_blob = gm & (best > 0.5)
    atlas[in_blob] = (best_blob[in_blob] + 1).astype(np.int16)
    regions: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = [
        {"index": k, "name": f"network{k + 1:02d}", "regions": [], "blob_centres_mm": []}
        for k in range(n_networks)]
    blob_in_network = np.zeros(n_networks, dtype=int)
    for j, (c, k) in enumerate(zip(centres, blob_network, strict=True)):
        blob_in_network[k] += 1
        regions.append({"index": j + 1, "name": f"network{k + 1:02d}_blob{blob_in_network[k]}",
                        "network": int(k), "kind": "network",
                        "n_voxels": int(np.count_nonzero(atlas == j + 1))})
        networks[k]["regions"].append(j + 1)
        networks[k]["blob_centres_mm"].append([float(v) for v in c])
    rest = gm & (atlas == 0)
    octant = ((x >= 0).astype(int) + 2 * (y >= 0) + 4 * (z >= 0))
    label = len(centres)
    for o in range(8):
        sel = rest & (octant == o)
        if not sel.any():
            continue
        label += 1
        atlas[sel] = label
        name = "background_" + "".join(
            f"{ax}{'+' if (o >> i) & 1 else '-'}" for i, ax in enumerate("xyz"))
        regions.append({"index": label, "name": name, "network": None, "kind": "background",
                        "n_voxels": int(np.count_nonzero(sel))})

    network_maps[network_maps < 1e-3] = 0.0
    network_coef = _NETWORK_AMPLITUDE * baseline * network_maps * gm
    return _Anatomy(
        shape=shape, voxel_size=vs, affine=affine, tissue=tissue, mask=mask,
        baseline=baseline, noise_sigma=noise_std * baseline, pos_norm=pos_norm,
        network_maps=network_maps.astype(np.float32),
        network_coef=network_coef.astype(np.float32),
        motion_coef=motion_coef.astype(np.float32),
        physio_coef=(_PHYSIO_AMPLITUDE * baseline * (tissue == _CSF)).astype(np.float32),
        wm_coef=(_WM_AMPLITUDE * baseline * (tissue == _WM)).astype(np.float32),
        dummy_coef=(_DUMMY_AMPLITUDE * baseline).astype(np.float32),
        atlas=atlas, regions=regions, networks=networks, blob_sigma_mm=sigma_mm,
    )


def _place_blobs(cand_mm: np.ndarray, n: int, sigma_mm: float) -> np.ndarray:
    """Greedily pick ``n`` candidates (in the given order) at least ``f * sigma`` apart."""
    for factor in (3.0, 2.5, 2.0, 1.5):
        sep2 = (factor * sigma_mm) ** 2
        chosen: list[np.ndarray] = []
        for c in cand_mm:
            if all(np.sum((c - q) ** 2) >= sep2 for q in chosen):
                chosen.append(c)
                if len(chosen) == n:
                    return np.array(chosen)
    raise ValueError(f"the grid is too small to place {n} separated network blobs; "
                     f"use a larger shape or fewer n_networks")


# --------------------------------------------------------------------------------------
# correlation structure
# --------------------------------------------------------------------------------------
def _effect_pairs(k: int) -> list[tuple[int, int]]:
    return [(0, 1), (2, 3)] if k >= 4 else [(0, 1)]


def _group_correlations(k: int, group_effect: float, rng: np.random.Generator
                        ) -> tuple[dict[bool, np.ndarray], list[tuple[int, int]]]:
    """Control and patient matrices (keyed by ``is_patient``) and the effect pairs."""
    loadings = rng.normal(0.0, 0.35, size=(k, 2))
    cov = loadings @ loadings.T + np.eye(k)
    d = np.sqrt(np.diag(cov))
    base = cov / np.outer(d, d)
    pairs = _effect_pairs(k)
    for _ in range(30):
        mats = {}
        for patient in (False, True):
            m = base.copy()
            for a, b in pairs:
                m[a, b] = m[b, a] = EFFECT_CONTROL_CORRELATION + (group_effect if patient else 0)
            mats[patient] = m
        if min(np.linalg.eigvalsh(m).min() for m in mats.values()) > 0.05:
            return mats, pairs
        base = np.eye(k) + 0.5 * (base - np.eye(k))
    raise ValueError(f"group_effect={group_effect} gives no valid correlation matrix")


def _jitter_correlation(c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    k = c.shape[0]
    e = np.triu(rng.normal(0.0, _SUBJECT_JITTER, size=(k, k)), 1)
    e = e + e.T
    for _ in range(20):
        m = c + e
        if np.linalg.eigvalsh(m).min() > 0.02 and np.abs(m - np.eye(k)).max() < 0.95:
            return m
        e *= 0.5
    return c.copy()


# --------------------------------------------------------------------------------------
# time courses of one run
# --------------------------------------------------------------------------------------
def _band_limited(rng: np.random.Generator, n: int, t_r: float, low: float, high: float,
                  n_signals: int, min_bins: int) -> np.ndarray:
    """Gaussian signals with power only in FFT bins ``low <= f <= high`` (zero mean, unit sd)."""
    freqs = np.fft.rfftfreq(n, d=t_r)
    k = np.arange(len(freqs))
    valid = (k > 0) & ~((n % 2 == 0) & (k == n // 2))
    band = valid & (freqs >= low) & (freqs <= high)
    if band.sum() < min_bins:
        band = valid & (k <= min_bins)
        if band.sum() < min_bins:
            raise ValueError(f"n_volumes={n} is too short for {n_signals} band-limited signals")
    spec = rng.standard_normal((len(freqs), n_signals)) + 1j * rng.standard_normal(
        (len(freqs), n_signals))
    x = np.fft.irfft(spec * band[:, None], n=n, axis=0)
    x -= x.mean(axis=0)
    x /= x.std(axis=0, ddof=1)
    return x


def _drift_basis(n: int) -> np.ndarray:
    t = np.arange(n, dtype=float)
    half = (n - 1) / 2
    return np.column_stack([(t - half) / half] + [np.cos(np.pi * (t + 0.5) * j / n)
                                                  for j in (1, 2)])


def _motion(rng: np.random.Generator, n: int, n_dummy: int) -> tuple[np.ndarray, list[int]]:
    walk = np.cumsum(rng.standard_normal((n, 6)), axis=0)
    walk = ndimage.gaussian_filter1d(walk, 2.0, axis=0, mode="nearest")
    walk -= walk[0]
    peak = np.abs(walk).max(axis=0)
    peak[peak == 0] = 1.0
    walk *= _MOTION_AMPLITUDE * rng.uniform(0.5, 1.0, size=6) / peak
    jitter = rng.standard_normal((n, 6)) * _MOTION_AMPLITUDE * 0.03
    where = np.arange(n_dummy + 1, n - 1)
    n_spikes = min(len(where), max(1, round((n - n_dummy) / 60)))
    spikes = np.sort(rng.choice(where, size=n_spikes, replace=False))
    motion = walk + jitter
    for t in spikes:
        sign = rng.choice([-1.0, 1.0], size=6)
        mag = np.concatenate([rng.uniform(0.2, 0.5, 3), rng.uniform(0.001, 0.004, 3)])
        motion[t] += sign * mag
    return motion, [int(t) for t in spikes]


def _physio(rng: np.random.Generator, n: int, t_r: float) -> np.ndarray:
    freq = min(0.3, 0.8 * 0.5 / t_r)
    t = np.arange(n) * t_r
    phase = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.15, n))
    am = 1.0 + 0.3 * np.clip(_band_limited(rng, n, t_r, 0.0, 0.03, 1, 1)[:, 0], -2, 2)
    x = am * np.sin(2 * np.pi * freq * t + phase)
    return (x - x.mean()) / x.std(ddof=1)


def _run_sources(anat: _Anatomy, corr: np.ndarray, p: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, Any]:
    n, t_r, k = p["n_volumes"], p["t_r"], p["n_networks"]
    nyq = 0.5 / t_r
    z = _band_limited(rng, n, t_r, 0.01, min(0.1, 0.9 * nyq), k, min_bins=k // 2 + 2)
    zc = z - z.mean(axis=0)
    w, v = np.linalg.eigh(zc.T @ zc / (n - 1))
    if w.min() <= 1e-10 * w.max():  # pragma: no cover - guarded by min_bins
        raise ValueError(f"n_volumes={n} is too short for {k} independent network signals")
    white = zc @ (v / np.sqrt(w)) @ v.T
    networks = white @ np.linalg.cholesky(corr).T
    motion, spikes = _motion(rng, n, p["n_dummy"])
    physio = _physio(rng, n, t_r)
    wm = _band_limited(rng, n, t_r, 0.0, min(0.05, 0.9 * nyq), 1, min_bins=2)[:, 0]
    amp = rng.normal(0.0, _DRIFT_AMPLITUDE, size=3)
    grad = rng.uniform(-0.5, 0.5, size=(3, 3))
    drift_coef = np.stack([
        anat.baseline * amp[j] * (1.0 + np.tensordot(grad[j], anat.pos_norm, axes=1))
        for j in range(3)]).astype(np.float32)
    dummy = np.zeros(n)
    if p["n_dummy"]:
        tau = max(p["n_dummy"] / 3, 0.5)
        dummy[: p["n_dummy"]] = np.exp(-np.arange(p["n_dummy"]) / tau)
    return {"network_timeseries": networks, "motion": motion, "spikes": spikes,
            "physio": physio, "wm_signal": wm, "dummy": dummy, "drift_coef": drift_coef}


# --------------------------------------------------------------------------------------
# writing one run
# --------------------------------------------------------------------------------------
@dataclass
class _Component:
    tc: np.ndarray                # (T,) float32
    coef: np.ndarray              # (n_support,) float32
    idx: np.ndarray | None        # flat (Fortran-order) voxel indices, or None for all voxels


def _flat(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).ravel(order="F")


def _component(tc: np.ndarray, coef3d: np.ndarray) -> _Component | None:
    coef = _flat(coef3d).astype(np.float32)
    nz = np.flatnonzero(coef)
    if nz.size == 0 or not np.any(tc):
        return None
    if nz.size < 0.5 * coef.size:
        return _Component(tc.astype(np.float32), coef[nz], nz)
    return _Component(tc.astype(np.float32), coef, None)


def _components(anat: _Anatomy, src: dict[str, Any]) -> list[_Component]:
    parts = [(src["network_timeseries"][:, k], anat.network_coef[k])
             for k in range(anat.network_coef.shape[0])]
    parts += [(src["motion"][:, j], anat.motion_coef[j]) for j in range(6)]
    basis = _drift_basis(len(src["physio"]))
    parts += [(basis[:, j], src["drift_coef"][j]) for j in range(3)]
    parts += [(src["physio"], anat.physio_coef), (src["wm_signal"], anat.wm_coef),
              (src["dummy"], anat.dummy_coef)]
    return [c for c in (_component(tc, m) for tc, m in parts) if c is not None]


def _header(anat: _Anatomy, shape: tuple[int, ...], dtype: Any, t_r: float | None
            ) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(anat.affine, code=1)
    hdr.set_sform(anat.affine, code=4)
    zooms = tuple(float(v) for v in anat.voxel_size)
    hdr.set_zooms((*zooms, t_r) if t_r is not None else zooms)
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b"boldflow-simulate"
    return hdr


def _write_volume(path: Path, data: np.ndarray, affine: np.ndarray, dtype: Any,
                  compresslevel: int) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=4)
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b"boldflow-simulate"
    with NiftiStreamWriter(str(path), hdr, compresslevel=compresslevel) as w:
        w.write(np.asarray(data, dtype=dtype))


def _int16_scaling(base: np.ndarray, sigma: np.ndarray, comps: list[_Component]
                   ) -> tuple[float, float]:
    """Slope/intercept mapping a bound on every value of the run onto +-32500."""
    spread = 6.5 * sigma.astype(np.float64)
    for c in comps:
        amp = np.abs(c.coef).astype(np.float64) * float(np.abs(c.tc).max())
        if c.idx is None:
            spread += amp
        else:
            spread[c.idx] += amp
    hi = float(np.max(base + spread))
    lo = float(np.min(base - spread))
    return (hi - lo) / (2 * _INT16_HALF_RANGE), (hi + lo) / 2


def _write_bold_and_confounds(files: dict[str, Path], anat: _Anatomy, src: dict[str, Any],
                              p: dict[str, Any], batch: int, noise_rng: np.random.Generator,
                              sample_seed: np.random.SeedSequence
                              ) -> tuple[float | None, float | None]:
    n_vol = p["n_volumes"]
    nx, ny, nz = anat.shape
    base = _flat(anat.baseline).astype(np.float32)
    sigma = _flat(anat.noise_sigma).astype(np.float32)
    comps = _components(anat, src)
    is_int = p["dtype"] == "int16"
    hdr = _header(anat, (nx, ny, nz, n_vol), np.int16 if is_int else np.float32, p["t_r"])
    slope = inter = None
    if is_int:
        hdr.set_slope_inter(*_int16_scaling(anat.baseline.ravel(order="F"), sigma, comps))
        s, i = hdr.get_slope_inter()  # the float32 values stored in the header
        slope, inter = float(s), float(i)
        slope32, inter32 = np.float32(slope), np.float32(inter)

    # the same voxel sample for every run (it only matters above _MAX_SAMPLE_VOXELS voxels)
    stats = _ConfoundStats(anat, n_vol, np.random.default_rng(sample_seed))
    with NiftiStreamWriter(str(files["bold"]), hdr, compresslevel=p["compresslevel"]) as w:
        for t0 in range(0, n_vol, batch):
            t1 = min(n_vol, t0 + batch)
            acc = np.empty((t1 - t0, base.size), dtype=np.float32)
            acc[:] = base
            for c in comps:
                tc = c.tc[t0:t1]
                if not np.any(tc):
                    continue
                if c.idx is None:
                    acc += tc[:, None] * c.coef[None, :]
                else:
                    acc[:, c.idx] += tc[:, None] * c.coef[None, :]
            for i in range(t1 - t0):  # one draw per volume: independent of the batch size
                acc[i] += noise_rng.standard_normal(base.size, dtype=np.float32) * sigma
            if is_int:
                raw = np.rint((acc - inter32) / slope32)
                np.clip(raw, -32768, 32767, out=raw)
                raw = raw.astype(np.int16)
                vals = raw.astype(np.float32) * slope32 + inter32
                out = raw
            else:
                vals = out = acc
            # (t, V) with V in Fortran order is the file layout: view it as (x, y, z, t)
            w.write(out.reshape(t1 - t0, nz, ny, nx).transpose(3, 2, 1, 0))
            stats.update(t0, vals)

    table, sidecar = stats.finish(src["motion"], p["t_r"], p["n_dummy"])
    table.to_csv(files["confounds"], sep="\t", na_rep="n/a", index=False)
    _write_json(files["confounds_json"], sidecar)
    return slope, inter


# --------------------------------------------------------------------------------------
# confounds
# --------------------------------------------------------------------------------------
def _cosine_basis(n: int, t_r: float, period: float = _HIGH_PASS_PERIOD) -> np.ndarray:
    """fMRIPrep/nilearn DCT high-pass regressors (without the constant)."""
    order = min(n - 1, int(np.floor(2 * n * t_r / period)))
    t = np.arange(n)
    return np.column_stack([np.sqrt(2.0 / n) * np.cos(np.pi / n * (t + 0.5) * k)
                            for k in range(1, order + 1)]) if order else np.zeros((n, 0))


def _sample(idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if idx.size <= _MAX_SAMPLE_VOXELS:
        return idx
    return np.sort(rng.choice(idx, size=_MAX_SAMPLE_VOXELS, replace=False))


class _ConfoundStats:
    """Per-volume means, DVARS and voxel samples accumulated batch by batch."""

    def __init__(self, anat: _Anatomy, n_volumes: int, rng: np.random.Generator) -> None:
        tissue = _flat(anat.tissue)
        self.mask_idx = np.flatnonzero(_flat(anat.mask))
        in_mask = tissue[self.mask_idx]
        self.csf_pos = np.flatnonzero(in_mask == _CSF)
        self.wm_pos = np.flatnonzero(in_mask == _WM)
        self.dv_pos = _sample(np.arange(self.mask_idx.size), rng)
        self.cc_pos = _sample(np.flatnonzero((in_mask == _WM) | (in_mask == _CSF)), rng)
        self.means = {k: np.empty(n_volumes) for k in ("global_signal", "csf", "white_matter")}
        self.msq_diff = np.full(n_volumes, np.nan)
        self.dv_sample = np.empty((n_volumes, self.dv_pos.size), dtype=np.float32)
        self.cc_sample = np.empty((n_volumes, self.cc_pos.size), dtype=np.float32)
        self.prev: np.ndarray | None = None

    def update(self, t0: int, vals: np.ndarray) -> None:
        t1 = t0 + vals.shape[0]
        m = vals[:, self.mask_idx].astype(np.float64)
        self.means["global_signal"][t0:t1] = m.mean(axis=1)
        self.means["csf"][t0:t1] = m[:, self.csf_pos].mean(axis=1)
        self.means["white_matter"][t0:t1] = m[:, self.wm_pos].mean(axis=1)
        chain = m if self.prev is None else np.vstack([self.prev[None], m])
        msq = np.mean(np.diff(chain, axis=0) ** 2, axis=1)
        self.msq_diff[t1 - msq.size:t1] = msq
        self.prev = m[-1].copy()
        self.dv_sample[t0:t1] = m[:, self.dv_pos]
        self.cc_sample[t0:t1] = m[:, self.cc_pos]

    def _dvars(self) -> tuple[np.ndarray, np.ndarray]:
        norm = 1000.0 / float(np.median(self.dv_sample))
        dvars = np.sqrt(self.msq_diff) * norm
        x = self.dv_sample.astype(np.float64) * norm
        func_sd = (np.percentile(x, 75, axis=0, method="lower")
                   - np.percentile(x, 25, axis=0, method="lower")) / 1.349
        keep = func_sd > 1e-7
        xc = (x[:, keep] - x[:, keep].mean(axis=0)).astype(np.float32).astype(np.float64)
        ar1 = np.sum(xc[1:] * xc[:-1], axis=0) / np.sum(xc**2, axis=0)
        diff_sd_mean = float(np.mean(np.sqrt(2.0 * (1.0 - ar1)) * func_sd[keep]))
        return dvars / diff_sd_mean, dvars

    def _acompcor(self, t_r: float, n_dummy: int) -> tuple[np.ndarray, np.ndarray, dict]:
        x = self.cc_sample[n_dummy:].astype(np.float64)
        n = x.shape[0]
        cosines = _cosine_basis(n, t_r)
        design = np.column_stack([cosines, np.ones(n)])
        x = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
        sd = x.std(axis=0)
        sd[sd == 0] = 1.0
        x /= sd
        if x.shape[1] > x.shape[0]:  # left singular vectors from the small (time x time) Gram
            w, u = np.linalg.eigh(x @ x.T)
            w, u = w[::-1], u[:, ::-1]
            s = np.sqrt(np.clip(w, 0.0, None))
        else:
            u, s, _ = np.linalg.svd(x, full_matrices=False)
        n_keep = min(_N_ACOMPCOR, int(np.sum(s > s[0] * 1e-6)))
        comps = u[:, :n_keep]
        flip = comps[np.argmax(np.abs(comps), axis=0), np.arange(n_keep)] < 0
        comps[:, flip] *= -1
        var = s**2 / np.sum(s**2)
        cum = np.cumsum(var)
        meta = {f"a_comp_cor_{i:02d}": {
            "Method": "aCompCor", "Mask": "combined", "SingularValue": float(s[i]),
            "VarianceExplained": float(var[i]), "CumulativeVarianceExplained": float(cum[i]),
            "Retained": True} for i in range(n_keep)}
        pad = np.zeros((n_dummy, n_keep))
        return np.vstack([pad, comps]), np.vstack([np.zeros((n_dummy, cosines.shape[1])),
                                                   cosines]), meta

    def finish(self, motion: np.ndarray, t_r: float, n_dummy: int
               ) -> tuple[pd.DataFrame, dict[str, Any]]:
        cols: dict[str, np.ndarray] = {}

        def expand(name: str, x: np.ndarray) -> None:
            d = np.concatenate([[np.nan], np.diff(x)])
            cols[name] = x
            cols[f"{name}_derivative1"] = d
            cols[f"{name}_power2"] = x**2
            cols[f"{name}_derivative1_power2"] = d**2

        for name in ("global_signal", "csf", "white_matter"):
            expand(name, self.means[name])
        std_dvars, dvars = self._dvars()
        cols["std_dvars"] = std_dvars
        cols["dvars"] = dvars
        dm = np.abs(np.diff(motion, axis=0))
        cols["framewise_displacement"] = np.concatenate(
            [[np.nan], dm[:, :3].sum(axis=1) + _FD_RADIUS_MM * dm[:, 3:].sum(axis=1)])
        acc, cosines, meta = self._acompcor(t_r, n_dummy)
        for i in range(acc.shape[1]):
            cols[f"a_comp_cor_{i:02d}"] = acc[:, i]
        for i in range(cosines.shape[1]):
            cols[f"cosine{i:02d}"] = cosines[:, i]
        for i in range(n_dummy):
            one_hot = np.zeros(motion.shape[0])
            one_hot[i] = 1.0
            cols[f"non_steady_state_outlier{i:02d}"] = one_hot
        for j, name in enumerate(MOTION_COLUMNS):
            expand(name, motion[:, j])
        return pd.DataFrame(cols), meta


# --------------------------------------------------------------------------------------
# truth document
# --------------------------------------------------------------------------------------
_ARRAY_DOC = {
    "affine": "(4, 4) voxel-to-world affine of every image",
    "tissue": "(x, y, z) int8 tissue labels, see tissue_labels",
    "mask": "(x, y, z) uint8 brain mask (same as every *_desc-brain_mask)",
    "baseline": "(x, y, z) baseline intensity",
    "noise_sigma": "(x, y, z) standard deviation of the white noise (noise_std * baseline)",
    "atlas": "(x, y, z) int16 atlas labels (same as atlas-simulated_dseg.nii.gz)",
    "network_maps": "(K, x, y, z) smooth network maps, peak 1 (before the GM restriction)",
    "network_coef": "(K, x, y, z) intensity per unit of network signal (GM only)",
    "motion_coef": "(6, x, y, z) intensity per mm (trans) / per rad (rot), Taylor model",
    "physio_coef": "(x, y, z) intensity per unit of the physiological signal (CSF only)",
    "wm_coef": "(x, y, z) intensity per unit of the white-matter signal (WM only)",
    "dummy_coef": "(x, y, z) intensity per unit of the non-steady-state transient",
    "drift_basis": "(T, 3) drift time courses: linear, cosine order 1, cosine order 2",
    "group_corr": "(2, K, K) network correlation matrices: [control, patient]",
    "subject_corr": "(S, K, K) per-subject network correlation (realised exactly per run)",
    "network_timeseries": "(R, T, K) network time courses, unit variance",
    "motion": "(R, T, 6) rigid-body parameters, columns MOTION_COLUMNS (mm, rad)",
    "physio": "(R, T) physiological (CSF) signal, unit variance",
    "wm_signal": "(R, T) white-matter signal, unit variance",
    "dummy": "(R, T) non-steady-state transient (zeros when n_dummy == 0)",
    "drift_coef": "(R, 3, x, y, z) per-voxel drift amplitudes for drift_basis",
}


def _truth_document(p: dict[str, Any], anat: _Anatomy, participants: list[dict[str, Any]],
                    run_meta: list[dict[str, Any]], effect_pairs: list[tuple[int, int]]
                    ) -> dict[str, Any]:
    net_of_region = {r["index"]: r["network"] for r in anat.regions}
    pairs = {frozenset(pr) for pr in effect_pairs}
    labels = sorted(net_of_region)
    edges = [[a, b] for i, a in enumerate(labels) for b in labels[i + 1:]
             if net_of_region[a] is not None and net_of_region[b] is not None
             and frozenset((net_of_region[a], net_of_region[b])) in pairs]
    nyq = 0.5 / p["t_r"]
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()}
    params.update({
        "network_amplitude": _NETWORK_AMPLITUDE, "physio_amplitude": _PHYSIO_AMPLITUDE,
        "wm_amplitude": _WM_AMPLITUDE, "drift_amplitude_sd": _DRIFT_AMPLITUDE,
        "dummy_amplitude": _DUMMY_AMPLITUDE, "blob_sigma_mm": anat.blob_sigma_mm,
        "network_band_hz": [0.01, min(0.1, 0.9 * nyq)],
        "physio_frequency_hz": min(0.3, 0.8 * nyq),
        "wm_band_hz": [0.0, min(0.05, 0.9 * nyq)],
        "subject_correlation_jitter_sd": _SUBJECT_JITTER,
        "tissue_intensity": {_TISSUE_LABELS[i]: float(v)
                             for i, v in enumerate(_TISSUE_INTENSITY)},
    })
    noise_sources = ["motion", "drift", "physio", "white_matter", "thermal"]
    if p["n_dummy"]:
        noise_sources.append("non_steady_state")
    return {
        "format": "boldflow-simulate-truth/1",
        "parameters": params,
        "subjects": participants,
        "groups": {g: [s["participant_id"] for s in participants if s["group"] == g]
                   for g in ("control", "patient")},
        "group_assignment": "alternating: sub-01 control, sub-02 patient, ...",
        "runs": run_meta,
        "tissue_labels": {str(k): v for k, v in _TISSUE_LABELS.items()},
        "networks": anat.networks,
        "regions": anat.regions,
        "effect_pairs": [list(pr) for pr in effect_pairs],
        "effect_correlation": {"control": EFFECT_CONTROL_CORRELATION,
                               "patient": EFFECT_CONTROL_CORRELATION + p["group_effect"]},
        "different_edges": edges,
        "signal_sources": ["network"],
        "noise_sources": noise_sources,
        "sources": {
            "network": {"timeseries": "network_timeseries", "coefficients": "network_coef"},
            "motion": {"timeseries": "motion", "coefficients": "motion_coef"},
            "drift": {"timeseries": "drift_basis", "coefficients": "drift_coef"},
            "physio": {"timeseries": "physio", "coefficients": "physio_coef"},
            "white_matter": {"timeseries": "wm_signal", "coefficients": "wm_coef"},
            "non_steady_state": {"timeseries": "dummy", "coefficients": "dummy_coef"},
            "thermal": {"timeseries": None, "coefficients": "noise_sigma"},
        },
        "arrays": _ARRAY_DOC,
    }
