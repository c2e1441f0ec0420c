"""Gain solutions in memory, and as CASA calibration tables on disk.

The on-disk layout is CASA's "NewCalTable": one row per (time, field, spw,
antenna) with CPARAM/PARAMERR/FLAG/SNR/WEIGHT arrays of shape (nchan, npol)
as python-casacore returns them, keywords ParType/VisCal/MSName/PolBasis, and
the OBSERVATION, ANTENNA, FIELD, SPECTRAL_WINDOW and HISTORY subtables copied
from the MS, so that CASA's applycal, plotms and browsetable accept it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import numpy as np
import casacore.tables as ct

# Our kinds and the CASA VisCal type each is written as. TSYS is CASA's own float
# table (FPARAM holds Tsys in K; the gain it stands for is 1/sqrt(Tsys)). WVR and
# ANTPOS phase corrections vary per channel and time, so they are written as
# time-dependent B Jones tables (which CASA's applycal interpolates), marked with
# the keyword almapipe_kind.
VISCAL_NAMES = {"G": "G Jones", "T": "T Jones", "B": "B Jones", "TSYS": "B TSYS", "WVR": "B Jones",
                "ANTPOS": "B Jones"}
_SUBTABLES = ("OBSERVATION", "ANTENNA", "FIELD", "HISTORY")


@dataclass
class CalSolutions:
    kind: str               # 'G', 'T', 'B'
    spw: int
    freq: np.ndarray        # (nchan_sol,) Hz
    time: np.ndarray        # (nrow,) MJD s
    interval: np.ndarray    # (nrow,)
    field_id: np.ndarray    # (nrow,)
    scan: np.ndarray        # (nrow,)
    antenna: np.ndarray     # (nrow,)
    cparam: np.ndarray      # (nrow, nchan_sol, ncorr) complex
    flag: np.ndarray        # (nrow, nchan_sol, ncorr) bool
    snr: np.ndarray         # (nrow, nchan_sol, ncorr) float
    refant: int = -1

    def select(self, rows: np.ndarray) -> "CalSolutions":
        return CalSolutions(self.kind, self.spw, self.freq, self.time[rows], self.interval[rows],
                            self.field_id[rows], self.scan[rows], self.antenna[rows],
                            self.cparam[rows], self.flag[rows], self.snr[rows], self.refant)

    @staticmethod
    def concat(parts: list) -> "CalSolutions":
        p0 = parts[0]
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return CalSolutions(p0.kind, p0.spw, p0.freq, cat("time"), cat("interval"), cat("field_id"),
                            cat("scan"), cat("antenna"), cat("cparam"), cat("flag"), cat("snr"), p0.refant)


def write_caltable(sol: CalSolutions | list, path: str, ms_path: str) -> None:
    """Write solutions (one CalSolutions per spw, or one) as a CASA caltable at path."""
    sols = sol if isinstance(sol, list) else [sol]
    kind = sols[0].kind
    nchan = max(len(s.freq) for s in sols)
    if os.path.exists(path):
        shutil.rmtree(path)
    cols = [
        ct.makescacoldesc("TIME", 0.0, keywords={"QuantumUnits": ["s"], "MEASINFO": {"type": "epoch", "Ref": "UTC"}}),
        ct.makescacoldesc("FIELD_ID", 0), ct.makescacoldesc("SPECTRAL_WINDOW_ID", 0),
        ct.makescacoldesc("ANTENNA1", 0), ct.makescacoldesc("ANTENNA2", 0),
        ct.makescacoldesc("INTERVAL", 0.0, keywords={"QuantumUnits": ["s"]}),
        ct.makescacoldesc("SCAN_NUMBER", 0), ct.makescacoldesc("OBSERVATION_ID", 0),
        ct.makearrcoldesc("FPARAM", 0.0, ndim=2, valuetype="float") if kind == "TSYS" else
        ct.makearrcoldesc("CPARAM", 0j, ndim=2, valuetype="complex"),
        ct.makearrcoldesc("PARAMERR", 0.0, ndim=2, valuetype="float"),
        ct.makearrcoldesc("FLAG", False, ndim=2),
        ct.makearrcoldesc("SNR", 0.0, ndim=2, valuetype="float"),
        ct.makearrcoldesc("WEIGHT", 0.0, ndim=2, valuetype="float"),
    ]
    nrow = sum(len(s.time) for s in sols)
    with ct.table(path, ct.maketabdesc(cols), nrow=nrow, ack=False) as t:
        start = 0
        for s in sols:
            n = len(s.time)
            sl = dict(startrow=start, nrow=n)
            t.putcol("TIME", s.time, **sl)
            t.putcol("INTERVAL", s.interval, **sl)
            t.putcol("FIELD_ID", s.field_id.astype(np.int32), **sl)
            t.putcol("SPECTRAL_WINDOW_ID", np.full(n, s.spw, np.int32), **sl)
            t.putcol("ANTENNA1", s.antenna.astype(np.int32), **sl)
            t.putcol("ANTENNA2", np.full(n, s.refant, np.int32), **sl)
            t.putcol("SCAN_NUMBER", s.scan.astype(np.int32), **sl)
            t.putcol("OBSERVATION_ID", np.zeros(n, np.int32), **sl)
            if kind == "TSYS":
                t.putcol("FPARAM", (1.0 / np.maximum(np.abs(s.cparam), 1e-12) ** 2).astype(np.float32), **sl)
            else:
                t.putcol("CPARAM", s.cparam.astype(np.complex64), **sl)
            t.putcol("PARAMERR", np.where(s.snr > 0, np.abs(s.cparam) / np.maximum(s.snr, 1e-30), -1).astype(np.float32), **sl)
            t.putcol("FLAG", s.flag, **sl)
            t.putcol("SNR", s.snr.astype(np.float32), **sl)
            t.putcol("WEIGHT", np.ones(s.cparam.shape, np.float32), **sl)
            start += n
        t.putinfo({"type": "Calibration", "subType": VISCAL_NAMES[kind], "readme": "written by almapipe"})
        t.putkeyword("ParType", "Float" if kind == "TSYS" else "Complex")
        t.putkeyword("almapipe_kind", kind)
        t.putkeyword("MSName", os.path.basename(os.path.normpath(ms_path)))
        t.putkeyword("VisCal", VISCAL_NAMES[kind])
        t.putkeyword("PolBasis", "unknown")
        t.putkeyword("CASA_Version", "almapipe")
        for sub in _SUBTABLES:
            src = os.path.join(ms_path, sub)
            dst = os.path.join(path, sub)
            with ct.table(src, ack=False) as s_t:
                s_t.copy(dst, deep=True, valuecopy=True).close()
            t.putkeyword(sub, "Table: " + os.path.abspath(dst))
        _write_spw_subtable(path, ms_path, sols, nchan)
        t.putkeyword("SPECTRAL_WINDOW", "Table: " + os.path.abspath(os.path.join(path, "SPECTRAL_WINDOW")))


def _write_spw_subtable(path: str, ms_path: str, sols: list, nchan: int) -> None:
    # The caltable's SPECTRAL_WINDOW describes the solution channels
    # (one averaged channel for G/T, every channel for B).
    dst = os.path.join(path, "SPECTRAL_WINDOW")
    with ct.table(os.path.join(ms_path, "SPECTRAL_WINDOW"), ack=False) as s_t:
        s_t.copy(dst, deep=True, valuecopy=True).close()
    with ct.table(dst, readonly=False, ack=False) as t:
        for s in sols:
            if len(s.freq) == t.getcell("NUM_CHAN", s.spw):
                continue
            width = float(np.sum(t.getcell("CHAN_WIDTH", s.spw)))
            for col, val in (("CHAN_FREQ", s.freq), ("CHAN_WIDTH", [width]), ("EFFECTIVE_BW", [abs(width)]),
                             ("RESOLUTION", [abs(width)])):
                t.putcell(col, s.spw, np.asarray(val, float))
            t.putcell("NUM_CHAN", s.spw, len(s.freq))


def read_caltable(path: str) -> list:
    """Read a CASA caltable into CalSolutions, one per spectral window."""
    with ct.table(path, ack=False) as t:
        viscal = t.getkeyword("VisCal")
        kws = t.getkeywords()
        kind = kws.get("almapipe_kind") or {"G Jones": "G", "T Jones": "T", "B Jones": "B",
                                            "B TSYS": "TSYS"}.get(viscal)
        if kind is None:
            raise ValueError(f"{path}: unsupported calibration type {viscal!r}")
        spw = t.getcol("SPECTRAL_WINDOW_ID")
        cols = {c: t.getcol(c) for c in ("TIME", "INTERVAL", "FIELD_ID", "SCAN_NUMBER", "ANTENNA1", "ANTENNA2")}
        if kind == "TSYS":
            cparam = (1.0 / np.sqrt(np.maximum(t.getcol("FPARAM"), 1e-12))).astype(np.complex64)
        else:
            cparam = t.getcol("CPARAM")
        flag, snr = t.getcol("FLAG"), t.getcol("SNR")
    with ct.table(os.path.join(path, "SPECTRAL_WINDOW"), ack=False) as st:
        freqs = [st.getcell("CHAN_FREQ", i) for i in range(st.nrows())]
    out = []
    for s in np.unique(spw):
        r = spw == s
        out.append(CalSolutions(kind, int(s), freqs[s], cols["TIME"][r], cols["INTERVAL"][r], cols["FIELD_ID"][r],
                                cols["SCAN_NUMBER"][r], cols["ANTENNA1"][r], cparam[r], flag[r], snr[r],
                                int(cols["ANTENNA2"][r][0]) if r.any() else -1))
    return out
