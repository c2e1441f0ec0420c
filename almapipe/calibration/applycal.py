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

from ..msio.ms import Vis


@dataclass
class GainApply:
    """One entry of the calibration library: a table and how to apply it.

    gainfield: the field ids whose solutions are used for every row (None: all);
    field_map: instead, per field of the data, the solution fields to use
    (a calibrator its own, a target its phase calibrator's)."""
    solutions: object          # CalSolutions
    gainfield: list | None = None
    interp: str = "linear"     # 'linear' or 'nearest'
    calwt: bool = True
    field_map: dict | None = None


def interpolate_gains(sol, times: np.ndarray, nant: int, interp: str, fields=None):
    """Gains at the given times: (ntime, nant, nchan_sol, ncorr) and a flag array."""
    nt = len(times)
    nch, ncorr = sol.cparam.shape[1:]
    out = np.ones((nt, nant, nch, ncorr), np.complex64)
    bad = np.ones((nt, nant, nch, ncorr), bool)
    use = np.ones(len(sol.time), bool) if fields is None else np.isin(sol.field_id, list(fields))
    for a in range(nant):
        rows = np.flatnonzero(use & (sol.antenna == a))
        if not len(rows):
            continue
        rows = rows[np.argsort(sol.time[rows])]
        ts = sol.time[rows]
        g = sol.cparam[rows]
        f = sol.flag[rows]
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
                bad[:, a, c, p] = False
    return out, bad


def apply_tables(vis: Vis, applies: list, data: np.ndarray | None = None):
    """Apply a list of GainApply (or bare CalSolutions) to vis.

    Returns (corrected data, flags, weights). Rows whose gains are missing are flagged.
    """
    data = (vis.data if data is None else data).astype(np.complex64, copy=True)
    flag = vis.flag.copy()
    weight = vis.weight.astype(np.float32, copy=True)
    utimes, tidx = np.unique(vis.time, return_inverse=True)
    nant = vis.nant
    for ap in applies:
        if not isinstance(ap, GainApply):
            ap = GainApply(ap)
        sol = ap.solutions
        nch_sol = sol.cparam.shape[1]
        if nch_sol != 1 and nch_sol != data.shape[1]:
            raise ValueError(f"{sol.kind} table has {nch_sol} channels, data have {data.shape[1]}")
        if ap.field_map is None:
            groups = [(np.ones(len(vis.time), bool), ap.gainfield)]
        else:
            groups = [(vis.field_id == f, ap.field_map.get(int(f))) for f in np.unique(vis.field_id)]
        g1 = np.ones((len(vis.time), nch_sol, sol.cparam.shape[2]), np.complex64)
        g2 = np.ones_like(g1)
        b = np.zeros(g1.shape, bool)
        for rows, fields in groups:
            g, bad = interpolate_gains(sol, utimes, nant, ap.interp, fields)
            t = tidx[rows]
            g1[rows], g2[rows] = g[t, vis.ant1[rows]], g[t, vis.ant2[rows]]
            b[rows] = bad[t, vis.ant1[rows]] | bad[t, vis.ant2[rows]]
        denom = g1 * np.conj(g2)
        zero = np.abs(denom) == 0
        data /= np.where(zero, 1, denom)
        flag |= np.broadcast_to(b | zero, data.shape)
        if ap.calwt:
            weight *= (np.abs(g1) ** 2 * np.abs(g2) ** 2).mean(axis=1).astype(np.float32)
    return data, flag, weight
