"""Clean verdicts of the validator, remembered across processes so that a restart with unchanged files skips the
schema, position and cross-check passes (about a second of a start-up).

Only a clean verdict is ever written, and it is keyed by everything the verdict depends on: the bytes of every
data file of the mapping set and of the site configuration (`_fingerprint`), every source and data file of the
`fhir_mappings` package (validator, schemas, loader, engine, `dosing/`, `text_context.yaml`), the Python version,
and the name and version of every installed distribution (jsonschema, PyYAML, the ICD code list, spaCy,
medspacy...). A set that has a problem never matches a recorded key, so it always goes through every pass and is
refused with the same lines. A remembered verdict is not a loaded set: the caller still runs the service's own
loader (`Mappings.load`).

The verdicts live in `$XDG_CACHE_HOME/ketamine-cds/mapping-verdicts/` (else `~/.cache/...`), one empty file per
key. Everything here fails soft: a missing, read-only or unusable directory means "not remembered" and a full
validation, never an error. Anyone who can write that directory can make the validator skip its passes for
content they choose, exactly as they could edit the mapping files the service runs; keep it the service user's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from functools import cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # fhir_mappings/
_KEEP = 32  # verdicts kept (the newest by mtime): one per mapping-set version tried on this machine, roughly
_SUFFIX = ".clean"
# The package's code and the data it reads whichever mapping directory is validated (dosing/, text_context.yaml).
_PACKAGE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".txt", ".csv")


def cache_dir() -> Path | None:
    """Where verdicts are kept, or None when there is no home to put them in."""
    root = os.environ.get("XDG_CACHE_HOME")
    if not root:
        home = os.environ.get("HOME") or os.path.expanduser("~")
        if not home or home == "~":
            return None
        root = os.path.join(home, ".cache")
    return Path(root) / "ketamine-cds" / "mapping-verdicts"


@cache
def _environment() -> str:
    """The code and libraries a verdict was reached with (computed once per process: they do not change)."""
    digest = hashlib.sha256(sys.version.encode())
    digest.update(sys.implementation.name.encode())
    for path in sorted(_PACKAGE.rglob("*")):
        if path.suffix not in _PACKAGE_SUFFIXES or any(p == "__pycache__" or p.endswith(".cases") for p in path.parts):
            continue
        digest.update(str(path.relative_to(_PACKAGE)).encode())
        digest.update(path.read_bytes())
    for distribution in _installed_distributions():
        digest.update(distribution.encode())
    return digest.hexdigest()


def _installed_distributions() -> list[str]:
    """Every `name-version.dist-info` (and `.egg-info`) on sys.path: an upgrade of any library is a new key.

    A directory listing, not importlib.metadata: the latter costs more to import than this whole check. The
    script's directory or working directory that Python puts first on sys.path is not an installation (and depends
    on how the process was started), so it is left out."""
    found: set[str] = set()
    for entry in sys.path[1:]:
        with contextlib.suppress(OSError):
            for name in os.listdir(entry or "."):
                if name.endswith((".dist-info", ".egg-info")):
                    found.add(name.lower())
    return sorted(found)


def verdict_key(set_fingerprint: str) -> str:
    """The key of a verdict on the mapping set whose content digest is `set_fingerprint`."""
    return hashlib.sha256(f"{set_fingerprint}\0{_environment()}".encode()).hexdigest()


def is_remembered_clean(key: str) -> bool:
    """True when this exact key was validated clean before (False whenever the directory cannot be read)."""
    folder = cache_dir()
    if folder is None:
        return False
    try:
        return (folder / f"{key}{_SUFFIX}").is_file()
    except OSError:
        return False


def remember_clean(key: str) -> None:
    """Record a clean verdict; silently nothing when the directory cannot be created or written."""
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name and renamed: a reader sees a complete entry or none.
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".verdict-")
    except OSError:
        return
    try:
        os.close(handle)
        os.replace(temporary, folder / f"{key}{_SUFFIX}")
        _prune(folder)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _prune(folder: Path) -> None:
    entries = []
    for path in folder.glob(f"*{_SUFFIX}"):
        with contextlib.suppress(OSError):
            entries.append((path.stat().st_mtime, path))
    for _, path in sorted(entries, reverse=True)[_KEEP:]:
        with contextlib.suppress(OSError):
            path.unlink()
