"""Bounds on what a request may make a server do (decision 0009).

* Unpacking: an input may grow at most ALMAPIPE_MAX_UNPACK_RATIO times its packed
  size and to at most ALMAPIPE_MAX_UNPACKED_MB, whether it is a gzip or a tar: a
  2 MB gzip must not become 2 GB on the importer's disk. Checked while copying
  (gzip: its size is only known by reading it) or before extracting (tar: the
  members declare theirs).
* Imaging: no image side above ALMAPIPE_MAX_IMSIZE pixels and no cube above
  ALMAPIPE_MAX_IMAGE_CHANNELS channels, whatever a recipe or an override asks; the
  gateway refuses such a run at submit (`imaging_caps`).
The limits are read from the environment at the moment of use, so the process that
unpacks (a worker) and the one that validates (the gateway) need no shared object.
"""
from __future__ import annotations

import os
import tarfile

from .errors import ParameterError

DEFAULTS = {"ALMAPIPE_MAX_UNPACKED_MB": 200000.0, "ALMAPIPE_MAX_UNPACK_RATIO": 200.0,
            "ALMAPIPE_MAX_IMSIZE": 8192, "ALMAPIPE_MAX_IMAGE_CHANNELS": 8192}


class UnpackLimit(ValueError):
    """An input would unpack beyond a configured limit; the message names it."""


def _get(name: str):
    d = DEFAULTS[name]
    return type(d)(float(os.environ.get(name, d)))


def unpack_limits() -> tuple[int, float]:
    """(max unpacked bytes, max ratio unpacked / packed)."""
    return int(_get("ALMAPIPE_MAX_UNPACKED_MB") * (1 << 20)), _get("ALMAPIPE_MAX_UNPACK_RATIO")


def _mb(n: float) -> str:
    return f"{n / (1 << 20):.0f} MB" if n >= 1 << 20 else f"{n / 1024:.0f} kB"


def unpack_cap(packed_size: int, what: str) -> tuple[int, str]:
    """The most bytes an input of packed_size may unpack to, and the limit's name for errors."""
    max_bytes, ratio = unpack_limits()
    by_ratio = int(ratio * max(packed_size, 1))
    if by_ratio < max_bytes:
        return by_ratio, (f"{what} unpacks to more than {_mb(by_ratio)}, {ratio:g} times its packed "
                          f"{_mb(packed_size)} (ALMAPIPE_MAX_UNPACK_RATIO)")
    return max_bytes, f"{what} unpacks to more than {_mb(max_bytes)} (ALMAPIPE_MAX_UNPACKED_MB)"


def copy_bounded(src, dst, packed_size: int, what: str) -> int:
    """Copy a decompressing stream src to dst, stopping with UnpackLimit at the cap."""
    cap, message = unpack_cap(packed_size, what)
    n = 0
    while True:
        chunk = src.read(1 << 20)
        if not chunk:
            return n
        n += len(chunk)
        if n > cap:
            raise UnpackLimit(message)
        dst.write(chunk)


def check_tar(tar: tarfile.TarFile, packed_size: int, what: str) -> None:
    """Refuse a tar whose members add up beyond the cap, before extracting any."""
    cap, message = unpack_cap(packed_size, what)
    total = 0
    for m in tar:
        total += m.size
        if total > cap:
            raise UnpackLimit(message)


def gunzip_bounded(path: str, dest: str, what: str) -> None:
    import gzip
    with gzip.open(path, "rb") as src, open(dest, "wb") as dst:
        copy_bounded(src, dst, os.path.getsize(path), what)


# ------------------------------------------------------------------ imaging caps

def _channel_count(spec) -> int:
    n = 0
    s = str(spec)
    if ":" in s:
        s = s.split(":", 1)[1]
    for part in s.replace(",", ";").split(";"):
        lo, _, hi = part.strip().partition("~")
        try:
            n += int(hi or lo) - int(lo) + 1
        except ValueError:
            continue   # the stage names a malformed range itself
    return n


def imaging_caps(recipe: dict) -> None:
    """Raise ParameterError naming the parameter when a recipe (overrides applied)
    asks for an image side or a cube beyond the server's caps."""
    max_imsize, max_chans = _get("ALMAPIPE_MAX_IMSIZE"), _get("ALMAPIPE_MAX_IMAGE_CHANNELS")

    def walk(obj, path):
        if isinstance(obj, dict):
            for k, v in obj.items():
                p = f"{path}.{k}"
                if k in ("imsize", "max_imsize") and not isinstance(v, (dict, list)):
                    try:
                        big = int(v) > max_imsize
                    except (TypeError, ValueError):
                        raise ParameterError(f"parameters: {p} = {str(v)[:40]!r} is not an integer") from None
                    if big:
                        raise ParameterError(f"parameters: {p} = {v} is above this server's cap of {max_imsize} "
                                             f"pixels (ALMAPIPE_MAX_IMSIZE)")
                elif k in ("nchan", "chans") and isinstance(v, (int, str)) and v != "":
                    n = v if isinstance(v, int) else _channel_count(v)
                    if n > max_chans:
                        raise ParameterError(f"parameters: {p} asks for {n} channels, above this server's cap of "
                                             f"{max_chans} (ALMAPIPE_MAX_IMAGE_CHANNELS)")
                else:
                    walk(v, p)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")

    for st in recipe.get("stages", []):
        walk(st.get("params", {}), st.get("stage", "?"))

