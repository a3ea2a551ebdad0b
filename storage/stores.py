"""Opening Zarr stores from paths and URLs (local disk, memory, any fsspec filesystem)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import Store

__all__ = ["StoreRef", "open_zarr_store", "redact_url"]

_USERINFO = re.compile(r"(^[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def redact_url(url: str) -> str:
    """Drop any ``user:secret@`` part of a URL so it can be printed or stored."""
    return _USERINFO.sub(r"\1", str(url))


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


@dataclass(frozen=True)
class StoreRef:
    """A picklable reference to a store: what a Dask worker needs to open it itself.

    Workers never receive array data through the scheduler: they get this small
    object and read or write chunks directly.

    Parameters
    ----------
    url : str
        Local path, ``memory://`` or an fsspec URL (``s3://bucket/study.zarr``).
    storage_options : dict, optional
        fsspec options (endpoint, credentials). Never written to the store, never printed.
    """

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def coerce(cls, store: str | os.PathLike | StoreRef,
               storage_options: dict[str, Any] | None = None) -> StoreRef:
        """Build a ref from a path/URL, or return ``store`` if it already is one."""
        if isinstance(store, StoreRef):
            return store
        url = str(store)
        if _is_local(url):
            url = str(Path(url.removeprefix("file://")).expanduser().resolve())
        return cls(url, dict(storage_options or {}))

    @property
    def is_local(self) -> bool:
        """Whether the store lives on the local filesystem."""
        return _is_local(self.url)

    def open(self, *, read_only: bool = False) -> Store:
        """Open the underlying zarr store."""
        return open_zarr_store(self.url, read_only=read_only,
                               storage_options=self.storage_options)

    def __str__(self) -> str:
        return redact_url(self.url)


def open_zarr_store(url: str, *, read_only: bool = False,
                    storage_options: dict[str, Any] | None = None) -> Store:
    """Open a zarr v3 store for ``url``.

    Local paths use :class:`zarr.storage.LocalStore` (atomic writes of each key);
    everything else goes through :class:`zarr.storage.FsspecStore` (async fsspec
    filesystems such as s3fs are used natively).
    """
    if _is_local(url):
        path = Path(url.removeprefix("file://")).expanduser()
        if not read_only:
            path.mkdir(parents=True, exist_ok=True)
        return zarr.storage.LocalStore(path, read_only=read_only)
    if url.startswith("memory://"):
        return zarr.storage.MemoryStore(read_only=read_only)
    options = dict(storage_options or {})
    options.setdefault("asynchronous", True)
    return zarr.storage.FsspecStore.from_url(url, storage_options=options, read_only=read_only)
