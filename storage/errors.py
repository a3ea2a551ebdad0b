"""Exceptions raised by boldflow's storage layer.

Every error about an input names the file it concerns, so that a failure in a batch of
hundreds of runs can be traced to one file from the message alone.
"""

from __future__ import annotations

__all__ = ["BoldflowError", "IncompleteRunError", "InputError", "StoreError"]


class BoldflowError(Exception):
    """Base class of all boldflow errors (the CLI maps it to exit code 2)."""


class InputError(BoldflowError, ValueError):
    """An input file is unreadable, malformed or inconsistent with the rest of its run.

    Parameters
    ----------
    path : str
        The file (or URL) the problem concerns. Credentials are never part of it.
    problem : str
        What is wrong, in words a user can act on.
    """

    def __init__(self, path: str, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keep the two fields when pickled between Dask processes
        return (type(self), (self.path, self.problem))


class StoreError(BoldflowError):
    """The Zarr store is missing, unreadable, or lacks the requested run."""


class IncompleteRunError(StoreError):
    """The requested run exists in the store but was never completely written."""
