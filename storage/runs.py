"""The unit of work of ingestion: one functional run and the files that belong to it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["ENTITY_ORDER", "RunSpec"]

#: BIDS entities boldflow keys runs by, in the order BIDS puts them in file names.
ENTITY_ORDER: tuple[str, ...] = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo",
                                 "space", "res", "den")


@dataclass(frozen=True)
class RunSpec:
    """One run to ingest: a 4D BOLD image plus its optional mask, confounds and TR.

    Discovery (:func:`storage.discover`) builds these from a BIDS/fMRIPrep derivatives
    tree; for data that is not BIDS (e.g. FSL-style folders) build them by hand.

    Parameters
    ----------
    bold : str
        Path or URL of the 4D NIfTI.
    entities : dict of str to str
        BIDS entities without prefixes' dashes, e.g. ``{"sub": "01", "task": "rest"}``.
        ``sub`` and ``task`` are required.
    mask : str, optional
        Brain mask on the same grid (any non-zero voxel is brain).
    confounds : str, optional
        fMRIPrep confounds TSV, or a motion-parameter text file (FSL ``.par`` style,
        six whitespace-separated columns) read with fMRIPrep column names.
    sidecar : str, optional
        BIDS JSON sidecar with ``RepetitionTime``.
    t_r : float, optional
        Repetition time in seconds; overrides the sidecar and the header.
    motion_format : {"fsl", "spm", "afni"}, default="fsl"
        Column order of a plain motion text file (FSL: rotations (rad) then translations).
    """

    bold: str
    entities: dict = field(default_factory=dict)
    mask: str | None = None
    confounds: str | None = None
    sidecar: str | None = None
    t_r: float | None = None
    motion_format: str = "fsl"

    def __post_init__(self) -> None:
        missing = [k for k in ("sub", "task") if not self.entities.get(k)]
        if missing:
            raise ValueError(f"{self.bold}: run entities need {missing} (got {self.entities})")
        for k, v in self.entities.items():
            if not str(v).replace("+", "").isalnum():
                raise ValueError(f"{self.bold}: entity {k}={v!r} must be alphanumeric (BIDS)")

    @property
    def run_id(self) -> str:
        """BIDS-style identifier, e.g. ``sub-01_ses-1_task-rest_run-2_space-MNI``."""
        return "_".join(f"{k}-{self.entities[k]}" for k in self.ordered_keys())

    def ordered_keys(self) -> list[str]:
        """Entity keys in BIDS order (unknown entities last, alphabetically)."""
        known = [k for k in ENTITY_ORDER if k in self.entities]
        return known + sorted(k for k in self.entities if k not in ENTITY_ORDER)

    @property
    def group_path(self) -> str:
        """Zarr group of this run: ``sub-XX/[ses-YY/]task-T[_acq-..][_run-R][_space-S]``."""
        parts = [f"sub-{self.entities['sub']}"]
        if self.entities.get("ses"):
            parts.append(f"ses-{self.entities['ses']}")
        leaf = [f"{k}-{self.entities[k]}" for k in self.ordered_keys() if k not in ("sub", "ses")]
        parts.append("_".join(leaf))
        return "/".join(parts)

    def to_dict(self) -> dict:
        """Plain-dict form (for catalogs and YAML manifests)."""
        return asdict(self)
