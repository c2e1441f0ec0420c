"""Deterministic flagging as pure functions: antenna shadowing, and the flag templates
in CASA's flagdata list syntax (parse_template; template_selection, the samples of a row
block a command selects, or template_mask, the same as a mask; parse_timerange). A
malformed template is a ParameterError naming its line."""
from __future__ import annotations

import functools
import shlex
from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError
from ..imaging.uvcontsub import parse_channels
from ..msio import ms as msio


TEMPLATE_KEYS = {"mode", "antenna", "spw", "field", "scan", "correlation", "reason", "autocorr", "timerange"}


def shadow_mask(time, ant1, ant2, uvw, diameters: np.ndarray) -> np.ndarray:
    """Rows (nrow,) in which either antenna is shadowed by another at that time.

    For a baseline with projected length < (D1 + D2) / 2, the antenna farther
    from the source is shadowed. UVW is the projection of x1 - x2 (CASA's MS),
    so w > 0 means antenna 1 is nearer the source and antenna 2 is behind.
    """
    cross = ant1 != ant2
    proj = np.hypot(uvw[:, 0], uvw[:, 1])
    close = cross & (proj < 0.5 * (diameters[ant1] + diameters[ant2]))
    shadowed = {(time[r], int(ant2[r] if uvw[r, 2] > 0 else ant1[r])) for r in np.flatnonzero(close)}
    if not shadowed:
        return np.zeros(len(time), bool)
    times = time.tolist()

    def hit(ants):
        return np.fromiter(((t, a) in shadowed for t, a in zip(times, ants.tolist())), bool, len(times))
    return hit(ant1) | hit(ant2)


def parse_template(text: str) -> list:
    """CASA flagdata list syntax: one command per line, key='value' pairs."""
    cmds = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        cmd = {}
        try:
            tokens = shlex.split(line)
        except ValueError as exc:
            raise ParameterError(f"flag template line {n}: {exc}") from exc
        for tok in tokens:
            key, eq, val = tok.partition("=")
            if not eq:
                raise ParameterError(f"flag template line {n}: {tok!r} is not key='value'")
            if key not in TEMPLATE_KEYS:
                raise ParameterError(f"flag template line {n}: unknown key {key!r} (known: {', '.join(sorted(TEMPLATE_KEYS))})")
            cmd[key] = val
        if cmd.get("mode", "manual") != "manual":
            raise ParameterError(f"flag template line {n}: only mode='manual' is supported, not {cmd['mode']!r}")
        cmds.append(cmd)
    return cmds


@dataclass(frozen=True, eq=False)
class FlagSelection:
    """Samples of a row block chosen by rows, channels and correlations (None: all of
    them): what a flag command selects, without a (nrow, nchan, ncorr) mask of it. A
    command that selects an antenna over a time range hits a few rows of a few blocks;
    flagging through its selection costs what it selects, not the block's size."""
    rows: np.ndarray
    chans: np.ndarray | None = None
    corrs: np.ndarray | None = None

    def _index(self, shape: tuple) -> tuple:
        def pick(mask):
            return None if mask is None or mask.all() else np.flatnonzero(mask)
        r, c, k = np.flatnonzero(self.rows), pick(self.chans), pick(self.corrs)
        if c is None and k is None:
            return (r,)
        return np.ix_(r, np.arange(shape[1]) if c is None else c, np.arange(shape[2]) if k is None else k)

    def flag(self, flag: np.ndarray) -> int:
        """Sets the selected samples of flag (nrow, nchan, ncorr); returns how many of
        them were not flagged before."""
        for mask, n, what in ((self.rows, flag.shape[0], "rows"), (self.chans, flag.shape[1], "channels"),
                              (self.corrs, flag.shape[2], "correlations")):
            if mask is not None and len(mask) != n:
                raise ValueError(f"flag selection: {len(mask)} {what} for a block of {n}")
        if not self.rows.any() or (self.chans is not None and not self.chans.any()) or \
                (self.corrs is not None and not self.corrs.any()):
            return 0
        idx = self._index(flag.shape)
        before = flag[idx]
        flag[idx] = True
        return int(before.size - np.count_nonzero(before))

    def mask(self, shape: tuple) -> np.ndarray:
        """The selection as a (nrow, nchan, ncorr) mask."""
        nrow, nchan, ncorr = shape
        chans = np.ones(nchan, bool) if self.chans is None else self.chans
        corrs = np.ones(ncorr, bool) if self.corrs is None else self.corrs
        return self.rows[:, None, None] & chans[None, :, None] & corrs[None, None, :]


def template_mask(vis: msio.Vis, cmd: dict, ants: list, fields: list, spw: int) -> np.ndarray:
    """Flags (nrow, nchan, ncorr) selected by one template command."""
    return template_selection(vis, cmd, ants, fields, spw).mask(vis.flag.shape)


def template_selection(vis: msio.Vis, cmd: dict, ants: list, fields: list, spw: int) -> FlagSelection:
    """The samples of a row block that one template command selects."""
    nrow, nchan, ncorr = vis.flag.shape
    rows = np.ones(nrow, bool)
    chans = corrs = None
    if "antenna" in cmd:
        rows &= _antenna_rows(vis, cmd["antenna"], ants)
    if "field" in cmd:
        ids = _lookup(cmd["field"], fields, "field")
        rows &= np.isin(vis.field_id, ids)
    if "timerange" in cmd and len(vis.time):
        # rows whose integration overlaps the range (CASA compares the integration's extent)
        half = 0.5 * vis.interval
        hit = np.zeros(nrow, bool)
        for lo, hi in parse_timerange(cmd["timerange"], float(vis.time[0])):
            hit |= (vis.time + half >= lo) & (vis.time - half <= hi)
        rows &= hit
    if "scan" in cmd:
        scans = [int(s) for part in cmd["scan"].split(",") for s in _range(part)]
        rows &= np.isin(vis.scan, scans)
    if cmd.get("autocorr", "").lower() in ("true", "1"):
        rows &= vis.ant1 == vis.ant2
    if "spw" in cmd:
        sp, _, ch = cmd["spw"].partition(":")
        if sp not in ("", "*") and int(sp) != spw:
            return FlagSelection(np.zeros(nrow, bool))
        if ch:
            chans = parse_channels(ch, nchan)
    if "correlation" in cmd:
        wanted = {c.strip().upper() for c in cmd["correlation"].split(",")}
        corrs = np.array([c in wanted for c in vis.corr_types])
    return FlagSelection(rows, chans, corrs)


def parse_timerange(spec: str, ref_mjd_s: float) -> list:
    """CASA timerange 'T0~T1[,T0~T1...]' -> [(start, end)] in MJD seconds (UTC).
    T is YYYY/MM/DD/hh:mm:ss[.s] or hh:mm:ss[.s] (then on the day of ref_mjd_s)."""
    # by day: a flag stage asks again for every row block, and astropy's Time takes
    # milliseconds
    return list(_parse_timerange(spec, int(ref_mjd_s // 86400)))


@functools.lru_cache(maxsize=256)
def _parse_timerange(spec: str, mjd_day: int) -> tuple:
    from astropy.time import Time
    day = Time(float(mjd_day), format="mjd", scale="utc").iso[:10]

    def one(t: str) -> float:
        t = t.strip()
        parts = t.split("/")
        if len(parts) == 4:
            iso = f"{parts[0]}-{parts[1]}-{parts[2]}T{parts[3]}"
        elif len(parts) == 1 and t.count(":") == 2:
            iso = f"{day}T{t}"
        else:
            raise ParameterError(f"flag command: timerange {spec!r}: {t!r} is not YYYY/MM/DD/hh:mm:ss or hh:mm:ss")
        try:
            return float(Time(iso, format="isot", scale="utc").mjd * 86400)
        except ValueError as exc:
            raise ParameterError(f"flag command: timerange {spec!r}: {exc}") from None
    out = []
    for item in spec.split(","):
        lo, sep, hi = item.partition("~")
        if not sep:
            raise ParameterError(f"flag command: timerange {spec!r} needs start~end")
        out.append((one(lo), one(hi)))
    return tuple(out)


def _range(part: str) -> range:
    lo, _, hi = part.partition("~")
    return range(int(lo), int(hi or lo) + 1)


def _lookup(spec: str, table: list, what: str) -> list:
    ids = []
    for item in spec.split(","):
        item = item.strip()
        match = [t["id"] for t in table if t["name"] == item or str(t["id"]) == item or
                 t.get("station") == item]
        if not match:
            raise ParameterError(f"flag template: no {what} {item!r}")
        ids += match
    return ids


def _antenna_rows(vis, spec: str, ants: list) -> np.ndarray:
    rows = np.zeros(len(vis.time), bool)
    for item in spec.split(";"):
        # 'DV03&&*' and 'DV03&*' (with or without auto-correlations) mean every
        # baseline of DV03; autocorrelations are flagged anyway
        item = item.strip().removesuffix("&&*").removesuffix("&*").removesuffix("&&")
        if "&" in item:
            a, b = item.split("&", 1)
            ia, ib = _lookup(a, ants, "antenna"), _lookup(b, ants, "antenna") if b.strip() else None
            ra = np.isin(vis.ant1, ia) | np.isin(vis.ant2, ia)
            rows |= ra if ib is None else ((np.isin(vis.ant1, ia) & np.isin(vis.ant2, ib)) |
                                           (np.isin(vis.ant2, ia) & np.isin(vis.ant1, ib)))
        else:
            ia = _lookup(item, ants, "antenna")
            rows |= np.isin(vis.ant1, ia) | np.isin(vis.ant2, ia)
    return rows
