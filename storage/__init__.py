"""boldflow storage: fMRI bytes and places.

NIfTI / BIDS discovery, the Zarr v3 layout, object stores, ingestion and export. This
package never does statistics; :mod:`pipeline` does, through the API below.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("boldflow")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

from .bids import discover, parse_entities, read_sidecar_tr
from .catalog import read_catalog
from .chunking import ChunkPlan, plan_bold_chunks
from .confounds import read_confounds
from .dataset import BoldStore, open_run, open_store, world_coordinates
from .errors import BoldflowError, IncompleteRunError, InputError, StoreError
from .export import to_nifti
from .ingest import BlockReducer, IngestOptions, ingest, ingest_run, load_manifest
from .nifti import NiftiStreamWriter, read_header
from .runs import RunSpec
from .stores import StoreRef

__all__ = [
    "BlockReducer",
    "BoldStore",
    "BoldflowError",
    "ChunkPlan",
    "IncompleteRunError",
    "IngestOptions",
    "InputError",
    "NiftiStreamWriter",
    "RunSpec",
    "StoreError",
    "StoreRef",
    "__version__",
    "discover",
    "ingest",
    "ingest_run",
    "load_manifest",
    "open_run",
    "open_store",
    "parse_entities",
    "plan_bold_chunks",
    "read_catalog",
    "read_confounds",
    "read_header",
    "read_sidecar_tr",
    "to_nifti",
    "world_coordinates",
]
