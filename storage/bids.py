"""Discovery of functional runs in a BIDS / fMRIPrep derivatives tree, local or remote.

A small BIDS file-name parser and a one-pass listing of the tree, instead of pybids (an
SQL index of every file, no fsspec) or bids2table (indexes everything into Arrow). Only
what ingestion needs is found: for each preprocessed BOLD series, its brain mask, its
confounds table and its JSON sidecar.

File names are parsed strictly (see :func:`parse_entities`); directories are listed once:

* on a local disk, by walking the tree and pruning what cannot hold functional data
  (hidden folders, ``sourcedata/``, ``freesurfer/``, ``figures/``, ``log(s)/``, ``code/``,
  and inside ``sub-*/`` everything but ``ses-*/`` and ``func/``), so a FreeSurfer
  subjects folder inside the derivatives is never listed;
* on an object store (``s3://`` ...), with one flat recursive listing of the prefix (one
  request per 1000 keys, far fewer round trips than listing folder by folder), to which
  the same pruning rules are applied, so both give the same runs.

Masks, confounds and sidecars are matched from that listing, with no further requests.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Callable, Iterable
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from .errors import InputError
from .runs import RunSpec

__all__ = ["discover", "parse_entities", "read_sidecar_tr"]

#: Folders (above the subject level) that never hold functional derivatives.
PRUNED_DIRS: frozenset[str] = frozenset(
    {"sourcedata", "freesurfer", "figures", "log", "logs", "code"})
#: Entities of the output space: the confounds table of a run is shared by all its spaces.
SPACE_ENTITIES: frozenset[str] = frozenset({"space", "cohort", "res", "den"})
#: Entities of a file name that are not part of a run's identity.
_NON_RUN_KEYS = ("desc", "suffix", "extension")
_BOLD_EXTENSIONS = (".nii.gz", ".nii")
_CONFOUNDS_SUFFIXES = ("timeseries", "regressors")  # fMRIPrep >= 1.4, then 1.2-1.3
#: RepetitionTime at or above this is taken for milliseconds (BIDS requires seconds).
MAX_TR_SECONDS = 100.0
_FILTER_PREFIXES = {"subjects": "sub", "sessions": "ses", "tasks": "task", "runs": "run",
                    "spaces": "space"}


# ----------------------------------------------------------------------------------------
# file names


def parse_entities(filename: str) -> dict[str, str]:
    """Parse the BIDS entities of a file name.

    Parameters
    ----------
    filename : str
        A file name, path or URL; only the base name is parsed.

    Returns
    -------
    dict of str to str
        The ``key-value`` pairs in file-name order, plus ``suffix`` (e.g. ``"bold"``) and
        ``extension`` (everything from the first dot, e.g. ``".nii.gz"``, ``".func.gii"``;
        ``""`` when there is none).

    Raises
    ------
    InputError
        If the name is not a valid BIDS name: a part without a dash or with an empty or
        non-alphanumeric key or value (``run-1.5``, ``task-rest-eyes``, ``copy``), a key
        given twice, or no suffix. Malformed names are rejected, not partly parsed:
        silently dropping a part would give two different files the same run identity.

    Examples
    --------
    >>> parse_entities("sub-01_ses-pre_task-rest_run-02_space-MNI152NLin2009cAsym_res-2_"
    ...                "desc-preproc_bold.nii.gz")  # doctest: +NORMALIZE_WHITESPACE
    {'sub': '01', 'ses': 'pre', 'task': 'rest', 'run': '02', 'space': 'MNI152NLin2009cAsym',
     'res': '2', 'desc': 'preproc', 'suffix': 'bold', 'extension': '.nii.gz'}
    """
    name = posixpath.basename(str(filename).rstrip("/"))
    stem, dot, ext = name.partition(".")
    parts = stem.split("_")
    if not stem or not parts[-1].isalnum() or not parts[-1].isascii():
        raise InputError(filename, "is not a BIDS file name (no '_<suffix>' before the "
                                   "extension, e.g. '_bold')")
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        key, dash, value = part.partition("-")
        if not (dash and _is_label(key) and _is_label(value)):
            raise InputError(filename, f"is not a BIDS file name: {part!r} is not a "
                                       "'key-value' pair with alphanumeric key and value")
        if key in entities or key in ("suffix", "extension"):
            raise InputError(filename, f"is not a BIDS file name: entity {key!r} repeated "
                                       "or reserved")
        entities[key] = value
    entities["suffix"] = parts[-1]
    entities["extension"] = dot + ext
    return entities


def _is_label(text: str) -> bool:
    return bool(text) and text.isascii() and text.isalnum()


def _try_parse(name: str) -> dict[str, str] | None:
    try:
        return parse_entities(name)
    except InputError:
        return None


def _run_entities(ents: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in ents.items() if k not in _NON_RUN_KEYS}


# ----------------------------------------------------------------------------------------
# listing


def _dir_allowed(parts: tuple[str, ...]) -> bool:
    """Whether a folder (path parts relative to the root) may hold runs or their sidecars."""
    state = "top"  # -> "subject" -> "session" -> "func"
    for name in parts:
        if name.startswith("."):
            return False
        if state == "top":
            if name.startswith("sub-"):
                state = "subject"
            elif name.startswith("ses-"):  # root given as a subject folder
                state = "session"
            elif name == "func":  # root given as a subject or session folder
                state = "func"
            elif name in PRUNED_DIRS:
                return False
        elif state in ("subject", "session") and name == "func":
            state = "func"
        elif state == "subject" and name.startswith("ses-"):
            state = "session"
        else:  # anat/, figures/, ... in a subject; anything below func/
            return False
    return True


def _list_tree(fs: fsspec.AbstractFileSystem, root: str, shown_root: str
               ) -> dict[tuple[str, ...], list[str]]:
    """File names under ``root``, by folder (parts relative to the root), pruned."""
    tree: dict[tuple[str, ...], list[str]] = {}
    try:
        if isinstance(fs, LocalFileSystem):
            if not fs.isdir(root):
                raise InputError(shown_root, "does not exist or is not a directory")
            for path, dirs, files in fs.walk(root, topdown=True, on_error="raise"):
                rel = _relative_parts(path, root)
                dirs[:] = sorted(d for d in dirs if _dir_allowed((*rel, d)))
                tree[rel] = sorted(f for f in files if not f.startswith("."))
        else:
            for path in fs.find(root):
                rel = _relative_parts(path, root)
                if not rel or not _dir_allowed(rel[:-1]) or rel[-1].startswith("."):
                    continue
                tree.setdefault(rel[:-1], []).append(rel[-1])
            for names in tree.values():
                names.sort()
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(shown_root, "does not exist") from e
    except OSError as e:
        where = getattr(e, "filename", None) or shown_root
        raise InputError(str(where), f"cannot be listed ({type(e).__name__}: {e})") from e
    return tree


def _relative_parts(path: str, root: str) -> tuple[str, ...]:
    path = path.rstrip("/")
    if path == root:
        return ()
    if root and not path.startswith(root + "/"):
        return ()
    rel = path[len(root) + 1:] if root else path
    return tuple(p for p in rel.split("/") if p)


# ----------------------------------------------------------------------------------------
# discovery


def _normalize_filter(name: str, values: Any) -> list[str] | None:
    """A filter as a list of labels without ``key-`` prefixes (None: no filtering)."""
    if values is None:
        return None
    if isinstance(values, str | int):
        values = [values]
    prefix = _FILTER_PREFIXES[name] + "-"
    out = []
    for v in values:
        label = str(v)
        if label.startswith(prefix):
            label = label[len(prefix):]
        space, colon, res = label.partition(":")
        if name == "spaces" and colon:  # fMRIPrep's "--output-spaces" syntax: SPACE:res-2
            rkey, dash, rval = res.partition("-")
            if rkey != "res" or not dash or not _is_label(rval) or not _is_label(space):
                raise ValueError(f"spaces filter {v!r}: expected 'SPACE' or 'SPACE:res-N'")
        elif not _is_label(label):
            raise ValueError(f"{name} filter {v!r} is not an alphanumeric BIDS label")
        out.append(label)
    return out or None


def _same_label(key: str, a: str, b: str) -> bool:
    if key == "run" and a.isdigit() and b.isdigit():  # run-02 is run 2
        return int(a) == int(b)
    return a == b


def _filter_matches(name: str, wanted: str, ents: dict[str, str]) -> bool:
    key = _FILTER_PREFIXES[name]
    if name == "spaces" and ":" in wanted:
        space, _, res = wanted.partition(":")
        return ents.get("space") == space and ents.get("res") == res.partition("-")[2]
    return key in ents and _same_label(key, wanted, ents[key])


def _pick_sidecar(tree: dict[tuple[str, ...], list[str]], folder: tuple[str, ...],
                  ents: dict[str, str], url: Callable[[tuple[str, ...]], str]) -> str | None:
    """The most specific applicable ``*_bold.json`` (BIDS inheritance), or None.

    Candidates are in the BOLD file's folder or any folder above it up to the root, with
    suffix ``bold`` and entities that are a subset of the BOLD file's (``desc`` included).
    The deepest folder wins, then the candidate with the most entities; two candidates
    equally specific are ambiguous (BIDS forbids it) and raise :class:`InputError`.
    """
    wanted = {k: v for k, v in ents.items() if k not in ("suffix", "extension")}
    for depth in range(len(folder), -1, -1):
        level = folder[:depth]
        best: list[tuple[int, str]] = []
        for name in tree.get(level, ()):
            if not name.endswith("_bold.json") and name != "bold.json":
                continue
            cand = _try_parse(name)
            if cand is None or cand["extension"] != ".json" or cand["suffix"] != "bold":
                continue
            keys = _run_entities(cand) | ({"desc": cand["desc"]} if "desc" in cand else {})
            if all(k in wanted and _same_label(k, v, wanted[k]) for k, v in keys.items()):
                best.append((len(keys), name))
        if best:
            best.sort(key=lambda t: (-t[0], t[1]))
            if len(best) > 1 and best[0][0] == best[1][0]:
                a, b = (url((*level, n)) for _, n in best[:2])
                raise InputError(a, f"and {b} are equally specific JSON sidecars of the same "
                                    "BOLD series (ambiguous BIDS inheritance)")
            return url((*level, best[0][1]))
    return None


def _find_companion(names: list[str], run_ents: dict[str, str], desc: str, suffixes:
                    tuple[str, ...], extensions: tuple[str, ...]) -> str | None:
    """The name in ``names`` with exactly ``run_ents`` plus ``desc``, by suffix preference."""
    found: dict[tuple[str, str], str] = {}
    for name in names:
        if f"_desc-{desc}_" not in name:
            continue
        cand = _try_parse(name)
        if (cand is None or cand.get("desc") != desc or cand["suffix"] not in suffixes
                or cand["extension"] not in extensions or _run_entities(cand) != run_ents):
            continue
        found[(cand["suffix"], cand["extension"])] = name
    for suffix in suffixes:
        for ext in extensions:
            if (suffix, ext) in found:
                return found[(suffix, ext)]
    return None


def discover(root: str, *, storage_options: dict | None = None,
             subjects: str | Iterable[str] | None = None,
             sessions: str | Iterable[str] | None = None,
             tasks: str | Iterable[str] | None = None,
             runs: str | int | Iterable[str | int] | None = None,
             spaces: str | Iterable[str] | None = None,
             desc: str | None = "preproc") -> list[RunSpec]:
    """Find the preprocessed BOLD runs of a BIDS / fMRIPrep derivatives tree.

    Every ``*_desc-<desc>_bold.nii[.gz]`` under ``root`` is a run, normally in
    ``sub-*/[ses-*/]func/``. Surface ``.func.gii`` and CIFTI ``.dtseries.nii`` series are
    not volumes and are ignored, and so are folders that never hold functional derivatives
    (hidden ones, ``sourcedata``, ``freesurfer``, ``figures``, ``log(s)``, ``code``, and in a
    subject folder all but ``ses-*`` and ``func``): they are not even listed. Companions are
    looked up in the same listing, with no further requests:

    * mask: same folder, same entities (space and resolution included),
      ``desc-brain_mask.nii[.gz]`` (``.nii.gz`` preferred if both exist);
    * confounds: same folder, same entities without ``space``/``cohort``/``res``/``den``,
      ``desc-confounds_timeseries.tsv``, else fMRIPrep < 1.4's
      ``desc-confounds_regressors.tsv``;
    * sidecar: the same name with ``.json``, else by BIDS inheritance the most specific
      ``*_bold.json`` whose entities are a subset of the run's, in the run's folder or any
      folder above it up to ``root`` (e.g. ``task-rest_bold.json`` at the root).

    Missing companions are None; the TR is not read here (see :func:`read_sidecar_tr`).

    Parameters
    ----------
    root : str or path-like
        Local folder or fsspec URL (``s3://bucket/derivatives/fmriprep``).
    storage_options : dict, optional
        fsspec options for ``root`` (credentials, ``client_kwargs``...).
    subjects, sessions, tasks, spaces : str or list of str, optional
        Keep only these labels; the ``sub-``/``ses-``/``task-``/``space-`` prefix is
        optional. A space may be given as ``"MNI152NLin2009cAsym:res-2"`` (fMRIPrep's
        ``--output-spaces`` syntax) to select one resolution. None or an empty list: all.
    runs : str, int or list of them, optional
        Keep only these run indices; compared as integers (``2`` matches ``run-02``).
    desc : str or None, default="preproc"
        The ``desc`` label of the BOLD series; None selects series without ``desc``
        (raw BIDS datasets).

    Returns
    -------
    list of RunSpec
        Sorted by ``run_id``. Entities are the file name's BIDS entities except ``desc``.
        Local paths are absolute paths; remote ones full URLs (``s3://bucket/...``).

    Raises
    ------
    InputError
        If ``root`` does not exist or cannot be listed; if no run is found (the message
        gives the pattern searched and the filters); if a filter value matches no run
        at all (likely a typo; the message lists the labels present); if a file matching
        the pattern has a malformed BIDS name; if two BOLD files map to the same run
        (e.g. ``.nii`` and ``.nii.gz`` copies); if sidecar inheritance is ambiguous.
    ValueError
        If a filter value is not a BIDS label.
    """
    shown_root = str(root)
    fs, root_path = url_to_fs(shown_root, **(storage_options or {}))
    root_path = root_path.rstrip("/")
    local = isinstance(fs, LocalFileSystem)

    def url(parts: tuple[str, ...]) -> str:
        path = "/".join((root_path, *parts))
        return path if local else fs.unstrip_protocol(path)

    filters = {name: _normalize_filter(name, value) for name, value in
               (("subjects", subjects), ("sessions", sessions), ("tasks", tasks),
                ("runs", runs), ("spaces", spaces))}
    filters = {k: v for k, v in filters.items() if v}

    tail = f"_desc-{desc}_bold" if desc is not None else "_bold"
    pattern = f"*{tail}.nii[.gz]"
    tree = _list_tree(fs, root_path, shown_root)

    candidates: list[tuple[tuple[str, ...], str, dict[str, str]]] = []
    for folder, names in tree.items():
        for name in names:
            if not name.endswith(tuple(tail + e for e in _BOLD_EXTENSIONS)):
                continue
            try:
                ents = parse_entities(name)
            except InputError as e:  # name the file by its full path
                raise InputError(url((*folder, name)), e.problem) from None
            if ents["extension"] not in _BOLD_EXTENSIONS or ents.get("desc") != desc:
                continue
            candidates.append((folder, name, ents))

    if not candidates:
        raise InputError(shown_root, f"no BOLD series found: searched for {pattern} "
                                     "in sub-*/[ses-*/]func/ folders (recursively)")

    for fname, wanted in filters.items():
        for label in wanted:
            if not any(_filter_matches(fname, label, e) for _, _, e in candidates):
                key = _FILTER_PREFIXES[fname]
                present = sorted({e[key] for _, _, e in candidates if key in e})
                raise InputError(shown_root, f"no {pattern} with {key}-{label} (asked in "
                                             f"{fname}={wanted}); {key} labels present: "
                                             f"{present or 'none'}")

    specs: dict[str, RunSpec] = {}
    for folder, name, ents in candidates:
        if not all(any(_filter_matches(f, w, ents) for w in wanted)
                   for f, wanted in filters.items()):
            continue
        run_ents = _run_entities(ents)
        bold = url((*folder, name))
        names = tree[folder]
        mask = _find_companion(names, run_ents, "brain", ("mask",), _BOLD_EXTENSIONS)
        conf_ents = {k: v for k, v in run_ents.items() if k not in SPACE_ENTITIES}
        confounds = _find_companion(names, conf_ents, "confounds", _CONFOUNDS_SUFFIXES,
                                    (".tsv",))
        sidecar = _pick_sidecar(tree, folder, ents, url)
        try:
            spec = RunSpec(bold=bold, entities=run_ents,
                           mask=url((*folder, mask)) if mask else None,
                           confounds=url((*folder, confounds)) if confounds else None,
                           sidecar=sidecar)
        except ValueError as e:  # missing sub/task
            raise InputError(bold, str(e).removeprefix(f"{bold}: ")) from None
        if spec.run_id in specs:
            other = specs[spec.run_id].bold
            raise InputError(bold, f"and {other} are the same run {spec.run_id} (remove or "
                                   "move one of them)")
        specs[spec.run_id] = spec

    if not specs:
        raise InputError(shown_root, f"no {pattern} matches all the filters {filters}")
    return [specs[k] for k in sorted(specs)]


# ----------------------------------------------------------------------------------------
# sidecars


def read_sidecar_tr(path: str, storage_options: dict | None = None) -> float | None:
    """Read ``RepetitionTime`` (seconds) from a BIDS JSON sidecar.

    Parameters
    ----------
    path : str
        Local path or fsspec URL of the JSON file.
    storage_options : dict, optional
        fsspec options for ``path``.

    Returns
    -------
    float or None
        The repetition time in seconds; None when the sidecar has no ``RepetitionTime``
        (e.g. sparse acquisitions described by ``VolumeTiming``).

    Raises
    ------
    InputError
        If the file cannot be read, is not UTF-8 JSON holding an object, or its
        ``RepetitionTime`` is not a finite positive number of seconds (a value of 100 or
        more is rejected as probably in milliseconds).
    """
    try:
        with fsspec.open(str(path), "rb", **(storage_options or {})) as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise InputError(path, "JSON sidecar does not exist") from e
    except Exception as e:  # any fsspec backend error means unreadable
        raise InputError(path, f"cannot read JSON sidecar ({type(e).__name__}: {e})") from e
    try:
        meta = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise InputError(path, f"JSON sidecar is not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise InputError(path, f"is not valid JSON (line {e.lineno}, column {e.colno}: "
                               f"{e.msg})") from e
    if not isinstance(meta, dict):
        raise InputError(path, f"JSON sidecar must hold an object, not a "
                               f"{type(meta).__name__}")
    if "RepetitionTime" not in meta:
        return None
    tr = meta["RepetitionTime"]
    if isinstance(tr, bool) or not isinstance(tr, int | float) or not math.isfinite(tr) \
            or tr <= 0:
        raise InputError(path, f"RepetitionTime {tr!r} is not a positive number of seconds")
    if tr >= MAX_TR_SECONDS:
        raise InputError(path, f"RepetitionTime {tr!r} is too long for seconds (BIDS "
                               "requires seconds; is it in milliseconds?)")
    return float(tr)
