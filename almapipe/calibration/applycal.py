"""Applying gain tables to visibilities (CASA applycal semantics).

For each table the gains of the chosen fields are interpolated to each row's
time per antenna ('linear' in amplitude and phase, or 'nearest'; outside the
solutions' time range the nearest solution is used, as CASA does), then
V_corrected = V / (g_1 conj(g_2)). With calwt, weights are multiplied by
|g_1|^2 |g_2|^2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..msio.ms import Vis, unique_rows


@dataclass
class GainApply:
    """One entry of the calibration library: a table and how to apply it.

    gainfield: the field ids whose solutions are used for every row (None: all);
    field_map: instead, per field of the data, the solution fields to use
    (a calibrator its own, a target its phase calibrator's); an empty list:
    the table does not apply to that field."""
    solutions: object          # CalSolutions
    gainfield: list | None = None
    interp: str = "linear"     # 'linear' or 'nearest'
    calwt: bool = True
    field_map: dict | None = None


def interpolate_gains(sol, times: np.ndarray, nant: int, interp: str, fields=None, strict: bool = False):
    """Gains at the given times: (ntime, nant, nchan_sol, ncorr) and a flag array.
    strict: a time whose interpolation would use a flagged solution is flagged (CASA's
    applycal with calflagstrict; see _stencil_flags); otherwise flagged solutions are
    passed over and the good ones either side interpolated, as the solves pre-apply."""
    nt = len(times)
    nch, ncorr = sol.cparam.shape[1:]
    out = np.ones((nt, nant, nch, ncorr), np.complex64)
    bad = np.ones((nt, nant, nch, ncorr), bool)
    use = np.ones(len(sol.time), bool) if fields is None else np.isin(sol.field_id, list(fields))
    for a in range(nant):
        rows = np.flatnonzero(use & (sol.antenna == a))
        if not len(rows):
            continue
        rows = rows[np.argsort(sol.time[rows], kind="stable")]
        ts = sol.time[rows]
        g = sol.cparam[rows]
        f = sol.flag[rows]
        if (f == f[:1]).all():
            # the usual case: the same channels flagged at every time, so one set of
            # interpolation weights serves every channel and correlation at once
            out[:, a], bad[:, a] = _interpolate_all(ts, g, times, interp), f[:1]
            continue
        stencil = _stencil_flags(ts, times, interp)
        for c in range(nch):
            for p in range(ncorr):
                good = ~f[:, c, p]
                if not good.any():
                    continue
                tg, gg = ts[good], g[good, c, p]
                if interp == "nearest" or len(tg) == 1:
                    idx = np.abs(times[:, None] - tg[None, :]).argmin(axis=1)
                    val = gg[idx]
                else:
                    amp = np.interp(times, tg, np.abs(gg))
                    ph = np.interp(times, tg, np.unwrap(np.angle(gg)))
                    val = amp * np.exp(1j * ph)
                out[:, a, c, p] = val
                bad[:, a, c, p] = stencil(f[:, c, p]) if strict else False
    return out, bad


def _stencil_flags(ts: np.ndarray, times: np.ndarray, interp: str):
    """A function of the solutions' flags (nsol,) giving each time's flag as CASA's
    applycal (applymode 'calflagstrict', the ALMA pipeline's) sets it: a time is flagged
    when a solution its interpolation uses is flagged (linear: either neighbour that
    carries weight; nearest, and outside the solutions' range: the nearest one), rather
    than interpolated across. A flagged solution thus flags the data up to the next good
    one, as in the ALMA pipeline's products."""
    n = len(ts)
    if n == 1:
        return lambda f: np.broadcast_to(f[:1], (len(times),)).copy()
    i = np.searchsorted(ts, times).clip(1, n - 1)
    if interp == "nearest":
        pick = np.where(np.abs(times - ts[i - 1]) <= np.abs(ts[i] - times), i - 1, i)
        return lambda f: f[pick]
    dt = ts[i] - ts[i - 1]
    w = np.clip(np.where(dt > 0, (times - ts[i - 1]) / np.where(dt > 0, dt, 1), 0.0), 0.0, 1.0)
    # a time within a thousandth of the spacing of a solution is that solution's (timestamps
    # of data and solutions differ by microseconds in float)
    w = np.where(w < 1e-3, 0.0, np.where(w > 1 - 1e-3, 1.0, w))
    return lambda f: (f[i - 1] & (w < 1)) | (f[i] & (w > 0))


def _interpolate_all(ts: np.ndarray, g: np.ndarray, times: np.ndarray, interp: str) -> np.ndarray:
    """g (nsol, nchan, ncorr) at solution times ts (sorted) -> (ntime, nchan, ncorr) at
    times: nearest, or linear in amplitude and (unwrapped) phase; the end solutions
    outside their range. The same as interpolating each channel on its own."""
    n = len(ts)
    if n == 1:
        return np.broadcast_to(g[:1], (len(times),) + g.shape[1:])
    if len(times):
        # only the solutions the times fall between: applycal asks one row block at a
        # time, and a table holds every integration of the EB. Unwrapping a window
        # changes its phases by a whole number of turns, which cancels between the two
        # neighbours a time is interpolated from.
        lo = max(min(int(np.searchsorted(ts, times.min())), n - 1), 1) - 1
        hi = min(int(np.searchsorted(ts, times.max())), n - 1) + 1
        ts, g, n = ts[lo:hi], g[lo:hi], hi - lo
    i = np.searchsorted(ts, times).clip(1, n - 1)
    if interp == "nearest":
        pick = np.where(np.abs(times - ts[i - 1]) <= np.abs(ts[i] - times), i - 1, i)
        return g[pick]
    dt = ts[i] - ts[i - 1]
    w = np.clip(np.where(dt > 0, (times - ts[i - 1]) / np.where(dt > 0, dt, 1), 0.0), 0.0, 1.0)[:, None, None]
    amp = np.abs(g)
    ph = np.unwrap(np.angle(g), axis=0)
    return (amp[i - 1] * (1 - w) + amp[i] * w) * np.exp(1j * (ph[i - 1] * (1 - w) + ph[i] * w))


def apply_tables(vis: Vis, applies: list, data: np.ndarray | None = None, strict: bool = False,
                 in_place: bool = False):
    """Apply a list of GainApply (or bare CalSolutions) to vis.

    All tables are first multiplied into one antenna-gain cube per (field, time)
    and channel (antenna_gains), small next to the data; one fused pass
    (kernels.apply_gains) then corrects every sample. Returns (corrected data, flags,
    weights); samples whose gains are missing are flagged; with strict (applycal,
    restore), also those whose interpolation would use a flagged solution, as CASA's
    applycal flags them.
    in_place: the data (vis.data, or data) may be corrected where they are, when they are
    a writeable, contiguous complex64 array (the copy was a tenth of applycal's time).
    """
    from .kernels import apply_gains
    data = vis.data if data is None else data
    if not (in_place and data.dtype == np.complex64 and data.flags.writeable and data.flags.c_contiguous):
        data = data.astype(np.complex64, copy=True)
    flag = vis.flag.copy()
    weight = vis.weight.astype(np.float32, copy=True)
    if not len(vis.time):
        return data, flag, weight
    pairs, pidx = unique_rows(vis.field_id.astype(np.float64), vis.time)
    gain, wfac, bad = antenna_gains(pairs[:, 0].astype(int), pairs[:, 1], applies, vis.nant, *data.shape[1:],
                                    strict=strict)
    apply_gains(data, flag, weight, pidx.astype(np.int64), vis.ant1.astype(np.int64), vis.ant2.astype(np.int64),
                gain, wfac, bad)
    return data, flag, weight


def antenna_gains(field_ids: np.ndarray, times: np.ndarray, applies: list, nant: int, nchan: int, ncorr: int,
                  strict: bool = False):
    """The product of the tables' gains for each (field, time) pair, antenna, channel and
    correlation: (gain complex64, wfac float32 (|g|^2 of the calwt tables), bad bool),
    each of shape (npair, nant, nchan, ncorr). bad: no gain, or (strict) one interpolated
    from a flagged solution (interpolate_gains)."""
    n = len(times)
    gain = np.ones((n, nant, nchan, ncorr), np.complex64)
    wfac = np.ones((n, nant, nchan, ncorr), np.float32)
    bad = np.zeros((n, nant, nchan, ncorr), bool)
    for ap in applies:
        if not isinstance(ap, GainApply):
            ap = GainApply(ap)
        sol = ap.solutions
        nch_sol = sol.cparam.shape[1]
        if nch_sol != 1 and nch_sol != nchan:
            raise ValueError(f"{sol.kind} table has {nch_sol} channels, data have {nchan}")
        for f in np.unique(field_ids):
            sel = field_ids == f
            fields = ap.gainfield if ap.field_map is None else ap.field_map.get(int(f))
            if fields is not None and len(fields) == 0:
                continue                         # this table does not apply to field f
            g, b = interpolate_gains(sol, times[sel], nant, ap.interp, fields, strict)
            gain[sel] *= g                       # (nt, nant, 1 or nchan, ncorr) broadcasts
            bad[sel] |= b
            if ap.calwt:
                wfac[sel] *= np.abs(g) ** 2
    return gain, wfac, bad


def flags_and_weights(vis: Vis, pair: np.ndarray, gain: np.ndarray, wfac: np.ndarray, bad: np.ndarray):
    """What applying the gains (antenna_gains of the pairs `pair` indexes, per row) does
    to vis's flags and weights, without the data: applycal's part when the data are
    corrected on reading (decision 0021). Returns (flags, weights float32)."""
    from .kernels import apply_gains
    flag = vis.flag.copy()
    weight = vis.weight.astype(np.float32, copy=True)
    apply_gains(np.zeros((0, 0, 0), np.complex64), flag, weight, np.asarray(pair, np.int64),
                vis.ant1.astype(np.int64), vis.ant2.astype(np.int64), gain, wfac, bad, False)
    return flag, weight


class GainWindows:
    """antenna_gains of a partition's (field, time) pairs for ascending ranges of them
    (applycal's row blocks), computed in windows of many pairs: each table's
    interpolation is a few numpy calls per antenna and field whatever the number of
    times, so a row block at a time was half of applycal. A window holds at most
    `max_bytes` (bounded memory for an FDM spw) and its gains of flagged solutions are
    zero, as the store keeps them (visstore's CALIBRATION_GAIN). `on_window(first,
    gains)` is given each window as it is computed."""

    def __init__(self, field_ids: np.ndarray, times: np.ndarray, applies: list, nant: int, nchan: int,
                 ncorr: int, on_window, max_bytes: int = 64 << 20):
        self.field_ids, self.times, self.applies = field_ids, times, applies
        self.shape = (nant, nchan, ncorr)
        self.per_window = max(1, max_bytes // (nant * nchan * ncorr * 13))    # complex64 + float32 + bool
        self.on_window = on_window
        self.lo = self.hi = 0
        self.window = None

    def get(self, lo: int, hi: int):
        """(gain, wfac, bad) of pairs lo..hi-1."""
        if self.window is None or lo < self.lo or hi > self.hi:
            self.lo, self.hi = lo, min(len(self.times), max(hi, lo + self.per_window))
            gain, wfac, bad = antenna_gains(self.field_ids[self.lo:self.hi], self.times[self.lo:self.hi],
                                            self.applies, *self.shape, strict=True)
            gain[bad] = 0            # flagged: the data are flagged and left as they are
            self.window = gain, wfac, bad
            self.on_window(self.lo, gain)
        return tuple(a[lo - self.lo:hi - self.lo] for a in self.window)
