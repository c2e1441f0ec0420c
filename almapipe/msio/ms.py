"""MeasurementSet (v2) reading and writing with python-casacore.

The pipeline's boundary format is the MS: every stage reads one, and the
importer writes one. Inside a stage, science kernels work on plain numpy
arrays held by :class:`Vis`, read here from one spectral window of an MS.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field

import numpy as np
import casacore.tables as ct

# CASA Stokes enumeration (casacore Stokes::StokesTypes) for the names we use.
CORR_CODES = {"RR": 5, "RL": 6, "LR": 7, "LL": 8, "XX": 9, "XY": 10, "YX": 11, "YY": 12,
              "I": 1, "Q": 2, "U": 3, "V": 4}
CORR_NAMES = {v: k for k, v in CORR_CODES.items()}
# MFrequency reference codes as stored in SPECTRAL_WINDOW.MEAS_FREQ_REF.
FREQ_FRAMES = {"REST": 0, "LSRK": 1, "LSRD": 2, "BARY": 3, "GEO": 4, "TOPO": 5, "GALACTO": 6}
FREQ_FRAME_NAMES = {v: k for k, v in FREQ_FRAMES.items()}

C_LIGHT = 299792458.0


class MSError(ValueError):
    """The input is not a usable MeasurementSet; the message says why."""


@dataclass
class Vis:
    """Visibilities of one spectral window, as arrays (rows are baselines x times)."""
    time: np.ndarray          # (nrow,) MJD seconds
    interval: np.ndarray      # (nrow,) s
    ant1: np.ndarray          # (nrow,) int
    ant2: np.ndarray          # (nrow,) int
    field_id: np.ndarray      # (nrow,) int
    scan: np.ndarray          # (nrow,) int
    uvw: np.ndarray           # (nrow, 3) m
    data: np.ndarray          # (nrow, nchan, ncorr) complex64
    flag: np.ndarray          # (nrow, nchan, ncorr) bool
    weight: np.ndarray        # (nrow, ncorr) float32
    freq: np.ndarray          # (nchan,) Hz
    corr_types: list = field(default_factory=list)
    rows: np.ndarray | None = None   # row numbers in the MS, to write back
    spw: int = 0
    state_id: np.ndarray | None = None

    @property
    def nant(self) -> int:
        return int(max(self.ant1.max(), self.ant2.max()) + 1) if len(self.ant1) else 0

    def select(self, mask: np.ndarray) -> "Vis":
        """A copy restricted to the rows where mask is true."""
        out = {}
        for k, v in self.__dict__.items():
            if isinstance(v, np.ndarray) and v.shape[:1] == self.time.shape and k != "freq":
                out[k] = v[mask]
            else:
                out[k] = v
        return Vis(**out)


def unique_rows(*columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of the key columns (sorted by the first column, then the next)
    as (nunique, ncolumn), and each row's index into them: what np.unique(np.stack(columns,
    axis=1), axis=0, return_inverse=True) gives, without its sort of rows as opaque bytes
    (25x faster on a row block of 200,000). The columns share one dtype."""
    order = np.lexsort(columns[::-1])
    sorted_cols = [np.asarray(c)[order] for c in columns]
    first = np.ones(len(order), bool)          # a row that starts a new key
    first[1:] = False
    for c in sorted_cols:
        first[1:] |= c[1:] != c[:-1]
    index = np.empty(len(order), np.int64)
    index[order] = np.cumsum(first) - 1
    return np.stack([c[first] for c in sorted_cols], axis=1), index


def channels_differ(f0: np.ndarray, f: np.ndarray, spw: int) -> str | None:
    """Why two EBs' channels of a spw cannot be combined (they must agree to half a
    channel: the EBs of one SB are tuned alike), or None."""
    if len(f) != len(f0) or np.max(np.abs(f - f0)) > 0.5 * abs(f0[1] - f0[0] if len(f0) > 1 else 1.0):
        return (f"spw {spw}: the execution blocks' channels differ "
                f"({len(f0)} from {f0[0] / 1e9:.6f} GHz vs {len(f)} from {f[0] / 1e9:.6f} GHz)")
    return None


def concat_vis(parts: list) -> Vis:
    """One Vis from several of the same spectral setup (execution blocks of an MOUS),
    rows in the order given. Channel frequencies must agree to a small fraction of a
    channel (the EBs of one SB are tuned alike; Doppler tracking differences are what the
    LSRK regridding of cubes handles); rows keep their own MS row numbers, so a caller that
    writes back does so per part."""
    if len(parts) == 1:
        return parts[0]
    for p in parts[1:]:
        why = channels_differ(parts[0].freq, p.freq, parts[0].spw)
        if why:
            raise MSError(why)
    out = {}
    for k, v in parts[0].__dict__.items():
        if isinstance(v, np.ndarray) and k != "freq" and v.shape[:1] == parts[0].time.shape:
            out[k] = np.concatenate([getattr(p, k) for p in parts])
        else:
            out[k] = v
    return Vis(**out)


def check_ms(path: str) -> None:
    """Raise MSError naming the problem if path is not a readable MS."""
    if not os.path.isdir(path):
        raise MSError(f"{path}: not a MeasurementSet directory")
    if not os.path.exists(os.path.join(path, "table.dat")):
        raise MSError(f"{path}: no table.dat, not a casacore table")
    try:
        with ct.table(path, ack=False) as t:
            missing = {"DATA", "UVW", "ANTENNA1", "ANTENNA2", "TIME", "FLAG"} - set(t.colnames())
            kw = set(t.getkeywords())
    except RuntimeError as exc:
        raise MSError(f"{path}: cannot be opened as a casacore table ({exc})") from exc
    if missing:
        raise MSError(f"{path}: main table lacks columns {sorted(missing)}")
    for sub in ("ANTENNA", "FIELD", "SPECTRAL_WINDOW", "DATA_DESCRIPTION", "POLARIZATION"):
        if sub not in kw:
            raise MSError(f"{path}: missing subtable {sub}")


# casacore's tables are not to be opened from two threads at once, and makeimages' two
# images at a time read their MS shells' subtables from two threads: one at a time
_SUBTABLES = threading.RLock()


@contextlib.contextmanager
def subtable(ms: str, name: str, readonly: bool = True):
    """An MS's subtable, open for the `with` block (one thread of the process at a time)."""
    with _SUBTABLES, ct.table(os.path.join(ms, name), readonly=readonly, ack=False) as t:
        yield t


def spw_of_ddid(ms: str) -> dict:
    with subtable(ms, "DATA_DESCRIPTION") as t:
        return {i: int(s) for i, s in enumerate(t.getcol("SPECTRAL_WINDOW_ID"))}


def corr_types_of_spw(ms: str, spw: int) -> list:
    """The correlation names of a spw's data (its data description's POLARIZATION row:
    an ALMA EB's WVR spw has one correlation, its other spws two)."""
    with subtable(ms, "DATA_DESCRIPTION") as t:
        dd_spw, dd_pol = t.getcol("SPECTRAL_WINDOW_ID"), t.getcol("POLARIZATION_ID")
    pols = [int(p) for s_, p in zip(dd_spw, dd_pol) if int(s_) == spw]
    with subtable(ms, "POLARIZATION") as t:
        codes = t.getcell("CORR_TYPE", pols[0] if pols else 0)
    return [CORR_NAMES.get(int(c), str(c)) for c in codes]


def spw_rows_query(ms: str, spw: int, field_ids=None, cross_only: bool = False) -> str:
    """The TaQL that selects a spectral window's rows (of the given fields; only the
    cross-correlations); a spw without a data description is named."""
    ddids = [d for d, s in spw_of_ddid(ms).items() if s == spw]
    if not ddids:
        raise MSError(f"{ms}: no data description for spw {spw}")
    q = f"DATA_DESC_ID IN {ddids}"
    if cross_only:
        q += " AND ANTENNA1 != ANTENNA2"
    if field_ids is not None:
        q += f" AND FIELD_ID IN {list(map(int, field_ids))}"
    return q


def read_vis(ms: str, spw: int = 0, column: str = "DATA", field_ids=None,
             chan: slice | None = None) -> Vis:
    """Read one spectral window of an MS into a :class:`Vis`."""
    q = spw_rows_query(ms, spw, field_ids)
    with ct.table(ms, ack=False) as t:
        if column not in t.colnames():
            raise MSError(f"{ms}: no {column} column")
        sel = t.query(q, sortlist="TIME,ANTENNA1,ANTENNA2")
        rows = sel.rownumbers()
        data = sel.getcol(column)
        flag = sel.getcol("FLAG")
        if chan is not None:
            data, flag = data[:, chan], flag[:, chan]
        flag_row = sel.getcol("FLAG_ROW")
        if flag_row.any():
            flag |= flag_row[:, None, None]
        vis = Vis(time=sel.getcol("TIME"), interval=sel.getcol("INTERVAL"),
                  ant1=sel.getcol("ANTENNA1"), ant2=sel.getcol("ANTENNA2"),
                  field_id=sel.getcol("FIELD_ID"), scan=sel.getcol("SCAN_NUMBER"),
                  uvw=sel.getcol("UVW"), data=data.astype(np.complex64, copy=False), flag=flag,
                  weight=sel.getcol("WEIGHT").astype(np.float32, copy=False),
                  freq=np.zeros(0), rows=np.asarray(rows), spw=spw,
                  state_id=sel.getcol("STATE_ID"))
        sel.close()
    with subtable(ms, "SPECTRAL_WINDOW") as t:
        f = t.getcell("CHAN_FREQ", spw)
    vis.freq = f[chan] if chan is not None else f
    vis.corr_types = corr_types_of_spw(ms, spw)
    return vis


def write_column(ms: str, rows: np.ndarray, column: str, values: np.ndarray) -> None:
    """Write values (nrow, nchan, ncorr) into column for the given MS rows."""
    with ct.table(ms, readonly=False, ack=False) as t:
        if column not in t.colnames():
            desc = t.getcoldesc("DATA")
            desc["comment"] = f"{column} written by almapipe"
            t.addcols(ct.maketabdesc(ct.makecoldesc(column, desc)))
        _put_rows(t, column, rows, values)


def _put_rows(t: ct.table, column: str, rows: np.ndarray, values: np.ndarray) -> None:
    # putcol on contiguous runs: far faster than one putcell per row.
    order = np.argsort(rows)
    rows, values = rows[order], values[order]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        t.putcol(column, values[start:stop], startrow=int(rows[start]), nrow=int(stop - start))


def write_flags(ms: str, rows: np.ndarray, flags: np.ndarray) -> None:
    with ct.table(ms, readonly=False, ack=False) as t:
        _put_rows(t, "FLAG", rows, flags)


def new_ms(path: str, nchan: int | None, ncorr: int | None) -> None:
    """Create an empty MS with a DATA column of fixed shape (nchan, ncorr), or of a
    shape set per row when nchan is None (spws of different shapes in one table, as
    ALMA's EBs hold them: tiles per shape, TiledShapeStMan's purpose)."""
    shape = [] if nchan is None else [nchan, ncorr]
    desc = ct.makearrcoldesc("DATA", 0j, ndim=2, shape=shape, valuetype="complex",
                             datamanagertype="TiledShapeStMan", datamanagergroup="TiledData",
                             comment="The data column")
    t = ct.default_ms(path, ct.maketabdesc([desc]))
    t.close()


def fill_table(tab_path: str, columns: dict) -> None:
    """Append rows to a subtable: columns maps name -> sequence of row values."""
    n = len(next(iter(columns.values())))
    with ct.table(tab_path, readonly=False, ack=False) as t:
        start = t.nrows()
        t.addrows(n)
        for name, values in columns.items():
            if name not in t.colnames():
                continue
            t.putcol(name, np.asarray(values), startrow=start, nrow=n)


def field_table(ms: str) -> list[dict]:
    with subtable(ms, "FIELD") as t:
        names = t.getcol("NAME")
        dirs = t.getcol("PHASE_DIR")
    return [{"id": i, "name": str(n), "ra_rad": float(d[0][0]) % (2 * np.pi), "dec_rad": float(d[0][1])}
            for i, (n, d) in enumerate(zip(names, dirs))]


def antenna_table(ms: str) -> list[dict]:
    with subtable(ms, "ANTENNA") as t:
        return [{"id": i, "name": str(n), "station": str(s), "position": [float(x) for x in p],
                 "diameter_m": float(d)}
                for i, (n, s, p, d) in enumerate(zip(t.getcol("NAME"), t.getcol("STATION"),
                                                      t.getcol("POSITION"), t.getcol("DISH_DIAMETER")))]


def baseband_of(name: str) -> int | None:
    """The baseband number in an ALMA spw name ('...#BB_2#SW-01#FULL_RES' -> 2)."""
    for part in name.split("#"):
        if part.startswith("BB_") and part[3:].isdigit():
            return int(part[3:])
    return None


def spw_table(ms: str) -> list[dict]:
    """Every spectral window: channel frequencies as stored (descending in a lower
    sideband), the signed channel width, the baseband where the name gives it."""
    with subtable(ms, "SPECTRAL_WINDOW") as t:
        out = []
        for i in range(t.nrows()):
            f = t.getcell("CHAN_FREQ", i)
            name = str(t.getcell("NAME", i))
            width = float(t.getcell("CHAN_WIDTH", i)[0])
            # the effective noise bandwidth of a channel: 2.667 widths where ALMA's FDM
            # channels are not averaged online (hif_checkproductsize bins those cubes)
            ebw = float(t.getcell("EFFECTIVE_BW", i)[0]) if "EFFECTIVE_BW" in t.colnames() else abs(width)
            out.append({"id": i, "name": name, "nchan": int(len(f)), "baseband": baseband_of(name),
                        "chan_freq_hz": [float(x) for x in f],
                        "chan_width_hz": width, "effective_bw_hz": ebw,
                        "ref_freq_hz": float(t.getcell("REF_FREQUENCY", i)),
                        "frame": FREQ_FRAME_NAMES.get(int(t.getcell("MEAS_FREQ_REF", i)), "TOPO")})
        return out


def online_flag_commands(ms: str) -> list[dict]:
    """The FLAG_CMD table's commands not yet applied: [{'command', 'reason', 'type'}]
    (ALMA's online flags as importasdm writes them); empty when there is no table."""
    if not os.path.exists(os.path.join(ms, "FLAG_CMD")):
        return []
    with subtable(ms, "FLAG_CMD") as t:
        if not t.nrows():
            return []
        cols = t.colnames()
        applied = t.getcol("APPLIED") if "APPLIED" in cols else np.zeros(t.nrows(), bool)
        reasons = t.getcol("REASON") if "REASON" in cols else [""] * t.nrows()
        types = t.getcol("TYPE") if "TYPE" in cols else [""] * t.nrows()
        return [{"command": str(c), "reason": str(r), "type": str(ty)}
                for c, r, ty, a in zip(t.getcol("COMMAND"), reasons, types, applied) if not a and str(c).strip()]


def state_intents(ms: str) -> list[str]:
    """OBS_MODE strings of the STATE table (empty when the MS records no intents)."""
    with subtable(ms, "STATE") as t:
        return [str(m) for m in t.getcol("OBS_MODE")] if t.nrows() else []


def set_direction_frame(ms: str, frame: str) -> None:
    """Label the FIELD table's directions with a frame ('ICRS' in ALMA's EBs; the
    default MS says 'J2000'): the MEASINFO reference that images take RADESYS from."""
    with ct.table(f"{ms}/FIELD", readonly=False, ack=False) as t:
        for col in ("PHASE_DIR", "DELAY_DIR", "REFERENCE_DIR"):
            kw = t.getcolkeywords(col)
            kw.setdefault("MEASINFO", {"type": "direction"})["Ref"] = frame
            t.putcolkeywords(col, kw)


def write_source_table(ms: str, names: list, rest_freq_hz: list, t0: float) -> None:
    """A SOURCE table of one row per source (SOURCE_ID i = FIELD i) with its line's rest
    frequency (REST_FREQUENCY, NUM_LINES 1; none where the frequency is 0), as importuvfits
    writes the AIPS SU table's RESTFREQ: where images take RESTFRQ from."""
    path = f"{ms}/SOURCE"
    t = ct.default_ms_subtable("SOURCE", path)
    t.addcols(ct.maketabdesc(ct.makearrcoldesc("REST_FREQUENCY", 0.0, ndim=1,
                                               keywords={"QuantumUnits": ["Hz"],
                                                         "MEASINFO": {"type": "frequency", "Ref": "LSRK"}})))
    n = len(names)
    t.addrows(n)
    t.putcol("SOURCE_ID", np.arange(n))
    t.putcol("NAME", [str(x) for x in names])
    t.putcol("SPECTRAL_WINDOW_ID", np.full(n, -1))
    t.putcol("TIME", np.full(n, t0))
    for i, f in enumerate(rest_freq_hz):
        t.putcell("NUM_LINES", i, 1 if f > 0 else 0)
        if f > 0:
            t.putcell("REST_FREQUENCY", i, np.array([float(f)]))
    t.close()
    with ct.table(ms, readonly=False, ack=False) as m:
        m.putkeyword("SOURCE", "Table: " + os.path.abspath(path))
