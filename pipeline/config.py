"""The job configuration: one pydantic schema for YAML files, the CLI and Python.

Unknown keys are errors, reported with their key path (``clean.hihg_pass: unknown key``),
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from storage import BoldflowError

__all__ = ["AdaptConfig", "CleanConfig", "ClusterConfig", "ConfigError", "ConnectivityConfig",
           "DecomposeConfig", "ExportConfig", "IngestConfig", "JobConfig", "MaskConfig",
           "ParcellateConfig", "SeedConfig", "load_config"]

Strategy = Literal["simple", "scrubbing", "compcor", "ica_aroma", "yeo2011", "24p", "36p",
                   "none"]
Kind = Literal["correlation", "partial correlation", "covariance", "precision", "tangent",
               "pearson"]
PositiveHz = Annotated[float, Field(gt=0)]


class ConfigError(BoldflowError, ValueError):
    """The job configuration is invalid; the message lists every problem by key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CleanConfig(_Section):
    """Confound-regression cleaning (``nilearn.signal.clean`` semantics)."""

    strategy: Strategy = "simple"
    dummy_scans: int = Field(0, ge=0)
    detrend: bool = True
    standardize: Literal["zscore_sample", "psc", "none"] | None = "zscore_sample"
    high_pass: PositiveHz | None = 0.009
    low_pass: PositiveHz | None = 0.08
    fd_threshold: float = Field(0.5, gt=0)
    std_dvars_threshold: float = Field(1.5, gt=0)
    scrub: int = Field(5, ge=0)
    standardize_confounds: bool = True
    filter: Literal["butterworth", "cosine"] = "butterworth"
    level: Literal["region", "voxel"] = "region"

    @model_validator(mode="after")
    def _band(self) -> CleanConfig:
        if self.high_pass is not None and self.low_pass is not None \
                and self.high_pass >= self.low_pass:
            raise ValueError(f"high_pass ({self.high_pass}) must be below low_pass "
                             f"({self.low_pass})")
        return self


class MaskConfig(_Section):
    """Which brain mask selects the voxels."""

    strategy: Literal["run", "epi", "group"] = "run"
    group_threshold: float = Field(0.5, ge=0, le=1)


class ParcellateConfig(_Section):
    """Atlas for region signals."""

    atlas: str
    name: str = Field(pattern=r"^[A-Za-z0-9]+$")
    kind: Literal["auto", "labels", "maps"] = "auto"
    split_connected: bool = False


class ConnectivityConfig(_Section):
    """Per-subject matrices and the group comparison."""

    kinds: list[Kind] = Field(default_factory=lambda: ["correlation"], min_length=1)
    groups: str | None = None
    participants: str | None = None
    group_rules: dict[str, str] | None = None  # group label -> glob on "sub-XX", e.g. sub-P*
    test: Literal["welch", "permutation"] = "welch"
    n_permutations: int = Field(5000, ge=100)
    alpha: float = Field(0.05, gt=0, lt=1)
    seed: int = 0


    @model_validator(mode="after")
    def _rules(self) -> ConnectivityConfig:
        if self.group_rules is not None:
            if len(self.group_rules) != 2:
                raise ValueError("group_rules needs exactly two groups (label: glob)")
            if self.groups is None:
                object.__setattr__(self, "groups", "group")
        return self


class SeedConfig(_Section):
    """A seed for seed-to-voxel correlation maps: a sphere or an atlas region."""

    name: str = Field(pattern=r"^[A-Za-z0-9]+$")
    coords: tuple[float, float, float] | None = None
    radius: float = Field(6.0, gt=0)
    region: str | None = None

    @model_validator(mode="after")
    def _one(self) -> SeedConfig:
        if (self.coords is None) == (self.region is None):
            raise ValueError("give exactly one of coords (mm) or region (atlas region name)")
        return self


class DecomposeConfig(_Section):
    """ICA: per run (MELODIC-style) or for the group (MIGP or CanICA) + dual regression."""

    level: Literal["subject", "group"] = "subject"
    method: Literal["melodic", "migp", "canica", "dictlearning"] | None = None
    n_components: int | Literal["auto"] = "auto"
    seed: int = 0
    alpha: float = Field(10.0, gt=0)  # dictlearning: sparsity of the maps (nilearn's default)
    threshold: float | Literal["mixture"] | None = None
    dual_regression: bool = True
    melodic_export: bool = False

    @model_validator(mode="after")
    def _method(self) -> DecomposeConfig:
        method = self.method or ("melodic" if self.level == "subject" else "migp")
        if (self.level == "subject") != (method == "melodic"):
            raise ValueError(f"method {method!r} does not apply at level {self.level!r} "
                             "(subject: melodic; group: migp, canica or dictlearning)")
        if self.level == "group" and self.n_components == "auto":
            object.__setattr__(self, "n_components", 20)
        object.__setattr__(self, "method", method)
        return self


ClusterKind = Literal["local", "address", "slurm", "pbs", "kubernetes", "gateway"]


class AdaptConfig(_Section):
    """Adaptive scaling: the cluster grows and shrinks between ``minimum`` and ``maximum``
    workers with the load (``cluster.adapt(minimum=..., maximum=...)``)."""

    minimum: int = Field(0, ge=0)
    maximum: int = Field(ge=1)

    @model_validator(mode="after")
    def _range(self) -> AdaptConfig:
        if self.minimum > self.maximum:
            raise ValueError(f"minimum ({self.minimum}) is above maximum ({self.maximum})")
        return self


class ClusterConfig(_Section):
    """Where to compute: a LocalCluster, an existing scheduler, or a cluster started here.

    ``kind`` (default: ``address`` when ``address`` is set, else ``local``):

    - ``local``: a :class:`distributed.LocalCluster` on this machine, one single-threaded
      worker process per core (``n_workers``, ``memory_limit`` per worker);
    - ``address``: connect to a running scheduler at ``address`` (``tcp://host:8786``);
    - ``slurm`` / ``pbs``: ``dask_jobqueue.SLURMCluster`` / ``PBSCluster`` (extra
      ``boldflow[slurm]`` / ``boldflow[pbs]``); each batch job runs workers;
    - ``kubernetes``: ``dask_kubernetes.operator.KubeCluster`` (``boldflow[kubernetes]``);
    - ``gateway``: a new cluster of the Dask Gateway at ``address``
      (``boldflow[gateway]``).

    ``options`` are passed unchanged to the cluster class (``LocalCluster``,
    ``SLURMCluster(cores=, memory=, queue=, walltime=, ...)``, ``KubeCluster(name=,
    image=, ...)``, ``Gateway.new_cluster(...)``); dashes in keys become underscores, so
    keys can be copied from a ``jobqueue.yaml``. ``n_workers`` workers are requested at
    start (``cluster.scale``); ``adapt`` makes the cluster adaptive instead.
    """

    kind: ClusterKind | None = None
    address: str | None = None
    n_workers: int | None = Field(None, ge=1)
    memory_limit: str | int | None = None
    adapt: AdaptConfig | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind(self) -> ClusterConfig:
        kind = self.kind or ("address" if self.address else "local")
        if kind == "address":
            if not self.address:
                raise ValueError("kind 'address' needs address (tcp://host:8786)")
            extra = [k for k in ("n_workers", "memory_limit", "adapt")
                     if getattr(self, k) is not None] + (["options"] if self.options else [])
            if extra:
                raise ValueError(f"{', '.join(extra)} do(es) not apply to an existing "
                                 "scheduler (kind 'address'); size that cluster where it is "
                                 "started")
        elif self.address and kind != "gateway":
            raise ValueError(f"address is for kind 'address' (a scheduler) or 'gateway' (the "
                             f"gateway's URL), not kind {kind!r}")
        if self.memory_limit is not None and kind != "local":
            raise ValueError(f"memory_limit is the LocalCluster worker limit; for kind {kind!r} "
                             "give the cluster's own option (e.g. options: {memory: 16GiB})")
        object.__setattr__(self, "kind", kind)
        return self


def _size(value: Any) -> Any:
    """A byte size (``"32MiB"``, ``1e6``) checked with dask's parser; None passes."""
    if value is None:
        return None
    from dask.utils import parse_bytes

    try:
        parse_bytes(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a byte size: {value!r}") from e
    return str(value)


class IngestConfig(_Section):
    """How a job ingests its input (when it is not a store yet): :class:`storage.IngestOptions`.

    Changing any of these changes the runs' fingerprints: a re-run re-ingests them.
    """

    chunk_bytes: str = "32MiB"
    batch_bytes: str = "128MiB"
    shard_bytes: str | None = None
    # a chunk's block over all volumes (float64): match a smaller block_bytes with it
    series_bytes: str | None = "128MiB"
    codec: Literal["lz4", "zstd", "lz4hc", "blosclz", "zlib"] = "lz4"
    clevel: int = Field(1, ge=0, le=9)
    # false: store the region sums of the job's atlas, not the voxels (labels jobs only)
    voxels: bool = True

    _sizes = field_validator("chunk_bytes", "batch_bytes", "shard_bytes", "series_bytes",
                             mode="before")(classmethod(lambda cls, v: _size(v)))


class ExportConfig(_Section):
    """Optional exports."""

    cleaned_bold: bool = False


class JobConfig(_Section):
    """A boldflow job.

    ``input`` is a derivatives folder/URL (ingested into ``store`` first) or an existing
    boldflow store; ``output`` receives BIDS-derivative-style files.
    """

    input: str
    output: str
    store: str | None = None
    task: str | None = None
    subjects: list[str] | None = None
    sessions: list[str] | None = None
    runs: list[str] | None = None
    space: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    # largest voxel block x all volumes a task holds (float64): memory per worker thread
    block_bytes: str = "128MiB"
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    clean: CleanConfig | None = Field(default_factory=CleanConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    parcellate: ParcellateConfig | None = None
    connectivity: ConnectivityConfig | None = None
    seeds: list[SeedConfig] = Field(default_factory=list)
    decompose: DecomposeConfig | None = None
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("subjects", "sessions", "runs", mode="before")
    @classmethod
    def _listify(cls, v):
        if v is None:
            return None
        return [str(x) for x in (v if isinstance(v, list | tuple) else [v])]

    @model_validator(mode="after")
    def _needs(self) -> JobConfig:
        if self.connectivity is not None and self.parcellate is None:
            raise ValueError("connectivity needs a parcellate section (region signals)")
        if any(s.region for s in self.seeds) and self.parcellate is None:
            raise ValueError("a seed given by region needs a parcellate section")
        if not self.ingest.voxels:
            needs = [what for what, bad in (
                ("a parcellate section", self.parcellate is None),
                ("a labels atlas (parcellate.kind maps)",
                 self.parcellate is not None and self.parcellate.kind == "maps"),
                ("mask.strategy run", self.mask.strategy != "run"),
                ("clean.level region", self.clean is not None and self.clean.level == "voxel"),
                ("no seeds", bool(self.seeds)),
                ("no export.cleaned_bold", self.export.cleaned_bold),
                ("no decompose section", self.decompose is not None)) if bad]
            if needs:
                raise ValueError("ingest.voxels: false stores only region sums of a labels "
                                 f"atlas; this job needs voxels (it would need "
                                 f"{', '.join(needs)})")
        return self

    def resolve_paths(self, base: Path) -> JobConfig:
        """Relative local paths resolved against ``base`` (the YAML file's folder)."""
        def fix(p: str | None) -> str | None:
            if p is None or "://" in p or os.path.isabs(p):
                return p
            return str((base / p).resolve())

        update: dict[str, Any] = {"input": fix(self.input), "output": fix(self.output),
                                  "store": fix(self.store)}
        if self.parcellate:
            update["parcellate"] = self.parcellate.model_copy(
                update={"atlas": fix(self.parcellate.atlas)})
        if self.connectivity and self.connectivity.participants:
            update["connectivity"] = self.connectivity.model_copy(
                update={"participants": fix(self.connectivity.participants)})
        return self.model_copy(update=update)


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{path}: {msg}")
    return "; ".join(lines)


def load_config(source: str | os.PathLike | dict) -> JobConfig:
    """Validate a job from a YAML file path or a dict.

    Raises
    ------
    ConfigError
        Listing each invalid or unknown key by its path.
    """
    base = Path.cwd()
    where = "job"
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e})") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from e
        base = path.resolve().parent
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a job is a mapping of keys (input, output, clean, ...)")
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_format(e)}") from None
    return cfg.resolve_paths(base)
