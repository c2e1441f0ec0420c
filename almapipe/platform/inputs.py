"""Inputs read where they lie: file:// keys under the stack's import roots (decision 0022).

A run's input key names an object in the raw bucket (what Upload answers), or, where the
importers see the same filesystem as whoever submits (a local stack, an observatory's
EB export area mounted on every host at the same path), `file://` and an absolute path
under one of ALMAPIPE_IMPORT_ROOTS: an MS directory, an MS tar or a UVFITS file. Such
an input is read in place and never written; nothing of it is copied into S3 but the
visibility store importdata makes of it.
"""
from __future__ import annotations

import os

SCHEME = "file://"


class InputError(ValueError):
    """An input key that names nothing this stack may read (the message says why)."""

    def __init__(self, msg: str, not_found: bool = False):
        super().__init__(msg)
        self.not_found = not_found


def is_local(key: str) -> bool:
    return key.startswith(SCHEME)


def key_for(path: str) -> str:
    """The file:// key of a local path (links resolved: the key names what is read)."""
    return SCHEME + os.path.realpath(path)


def covering_root(path: str, roots) -> str | None:
    """The import root that holds `path` once its links are resolved, or None."""
    real = os.path.realpath(path)
    for root in roots:
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return root
    return None


def local_path(key: str, roots, field: str = "input_key") -> str:
    """The path a file:// key names, checked: absolute and normalised, inside an import
    root once its links are resolved (a link out of the root is refused), present and
    readable. Raises InputError naming the problem and the request's field."""
    shown = f"{field}: {key[:200]}"
    path = key[len(SCHEME):]
    if not roots:
        raise InputError(f"{shown}: this stack reads no input in place (ALMAPIPE_IMPORT_ROOTS is "
                         f"empty); upload it instead")
    if not os.path.isabs(path) or os.path.normpath(path) != path.rstrip(os.sep) or "\0" in path:
        raise InputError(f"{shown}: not file:// and an absolute, normalised path")
    real = os.path.realpath(path)
    if covering_root(real, roots) is None:
        raise InputError(f"{shown}: not under an import root of this stack "
                         f"({', '.join(roots)}; ALMAPIPE_IMPORT_ROOTS)")
    if not os.path.exists(real):
        raise InputError(f"{shown}: no such file or directory", not_found=True)
    if not os.path.isdir(real) and not os.path.isfile(real):
        raise InputError(f"{shown}: neither an MS directory nor a file")
    if not os.access(real, os.R_OK | (os.X_OK if os.path.isdir(real) else 0)):
        raise InputError(f"{shown}: not readable by the pipeline")
    return real


def list_local(location: str, roots) -> list:
    """The inputs a file:// location names: itself, or, for a directory ending in '/',
    the EBs in it (MS directories and files, hidden ones left out) in name order."""
    if not location.endswith("/"):
        return [key_for(local_path(location, roots, "data_location"))]
    folder = local_path(location, roots, "data_location")
    if not os.path.isdir(folder):
        raise InputError(f"data_location: {location[:200]}: not a directory")
    keys = []
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if name.startswith(".") or not (os.path.isfile(p) or os.path.isfile(os.path.join(p, "table.dat"))):
            continue
        keys.append(key_for(local_path(SCHEME + p, roots, "data_location")))
    if not keys:
        raise InputError(f"data_location: no MS directory or file in {location[:200]}")
    return keys
