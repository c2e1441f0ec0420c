"""Gain terms: how each Jones type bins the data into solution slots.

* G: per correlation, one slot per time interval over the selected channels.
* T: like G, but one gain shared by both correlations.
* B: per correlation and per channel, over (usually) all of the time.

Each term is solved by :func:`solve_term`, which pre-applies earlier tables,
divides by the model, bins, and hands the slots to :func:`solver.solve`.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import solver
from .kernels import accumulate_slots, average_channels, row_ratio_statistics
from ..errors import ParameterError
from ..heuristics.spectral_response import contiguous_mean_variance_factor, difference_scale
from .applycal import apply_tables
from .caltable import CalSolutions
from ..msio.ms import Vis, unique_rows


@dataclass
class SolveSpec:
    """The parameters of one solve, named as CASA's gaincal/bandpass name them."""
    kind: str = "G"            # 'G', 'T' or 'B'
    solint: str = "inf"        # 'int', 'inf', or seconds such as '30s'
    combine: str = ""          # '', 'scan', 'field' or 'scan,field'
    calmode: str = "ap"        # 'ap', 'p', 'a'
    refant: int | None = None
    minsnr: float = 3.0
    minblperant: int = 4
    chans: slice | None = None  # channels used (G/T); B uses all and flags outside
    solnorm: bool = False
    preapply: list = field(default_factory=list)  # CalSolutions applied first


def solint_seconds(solint: str) -> float:
    """A duration solint ('30s', '30sec', '1min') in seconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(s|sec|min)?\s*", str(solint))
    secs = float(m.group(1)) * (60 if m.group(2) == "min" else 1) if m else 0.0
    if secs <= 0:
        raise ParameterError(f"solint {solint!r}: expected 'int', 'scan', 'inf' or a duration like '30s'")
    return secs


def time_bins(vis: Vis, solint: str, combine: str) -> np.ndarray:
    """Solution-interval index per row.

    solint: 'int' (each integration), 'scan', 'inf' (per scan unless combine
    has 'scan'), or a duration such as '30s'. Intervals never span a field change unless combine has 'field', nor a
    scan change unless combine has 'scan' (CASA's rules).
    """
    comb = {c.strip() for c in combine.split(",") if c.strip()}
    key_field = np.zeros_like(vis.field_id) if "field" in comb else vis.field_id
    key_scan = np.zeros_like(vis.scan) if "scan" in comb else vis.scan
    if solint == "int":
        sub = np.unique(vis.time, return_inverse=True)[1]
    elif solint in ("inf", "scan"):   # 'scan': one solution per scan, whatever combine says
        if solint == "scan":
            key_scan = vis.scan
        sub = np.zeros(len(vis.time), int)
    else:
        secs = solint_seconds(solint)
        # bins of secs within each scan, counted from the scan's first time
        t0 = {s: vis.time[vis.scan == s].min() for s in np.unique(vis.scan)}
        start = np.array([t0[s] for s in vis.scan])
        sub = np.floor((vis.time - start) / secs + 1e-6).astype(int)
    return unique_rows(np.asarray(key_field, np.int64), np.asarray(key_scan, np.int64), np.asarray(sub, np.int64))[1]


def solve_term(vis: Vis, model: np.ndarray, spec: SolveSpec) -> CalSolutions:
    """Solve one gain term. model is (nrow, nchan) Jy for each row's field."""
    nrow, nchan, ncorr = vis.data.shape
    nant = vis.nant
    data, flag = vis.data, vis.flag        # read only: the accumulation does not change them
    if spec.preapply:
        data, flag, _ = apply_tables(vis, spec.preapply)
    chans = spec.chans if spec.chans is not None else slice(0, nchan)
    use_chan = np.zeros(nchan, bool)
    use_chan[chans] = True

    tbin = time_bins(vis, spec.solint, spec.combine)
    ntb = int(tbin.max()) + 1 if nrow else 0
    if spec.kind == "B":
        ncg, cgroup = nchan, np.arange(nchan)
    else:
        ncg, cgroup = 1, np.zeros(nchan, int)
    ncs = 1 if spec.kind == "T" else ncorr
    corr_slot = np.zeros(ncorr, int) if spec.kind == "T" else np.arange(ncorr)

    X, W = accumulate_slots(data, flag, vis.weight.astype(np.float64), model.astype(np.float64), use_chan,
                            tbin.astype(np.int64), cgroup.astype(np.int64), corr_slot.astype(np.int64),
                            vis.ant1.astype(np.int64), vis.ant2.astype(np.int64), ncg, ncs, ntb * ncg * ncs, nant)
    g, snr, ok = solver.solve(X, W, spec.calmode, spec.refant, min_baselines=spec.minblperant)
    g = g.reshape(ntb, ncg, ncs, nant)
    snr = snr.reshape(ntb, ncg, ncs, nant)
    ok = ok.reshape(ntb, ncg, ncs, nant)
    bad = ~ok | (snr < spec.minsnr)
    wsum = np.bincount(tbin, minlength=ntb).astype(float)
    t_sol = np.bincount(tbin, vis.time, ntb) / np.maximum(wsum, 1)
    if spec.refant is not None and spec.calmode != "a" and 0 <= spec.refant < nant:
        _continue_reference(g, bad, t_sol, spec.refant)
    if spec.kind == "T":   # one gain for both correlations: store it for each
        g, snr, bad = (np.repeat(a, ncorr, axis=2) for a in (g, snr, bad))
    if spec.kind == "B" and spec.solnorm:
        g = _normalise_bandpass(g, bad)
    elif spec.solnorm:
        amp = np.where(bad, np.nan, np.abs(g))
        g = g / np.nanmean(amp, axis=(0, 1, 3), keepdims=True)

    # One caltable row per (time slot, antenna), with params (nchan_sol, ncorr);
    # an interval without any usable data gets no rows at all (as in CASA).
    has_data = ok.reshape(ntb, -1).any(axis=1)
    first = np.full(ntb, -1)
    first[tbin[::-1]] = np.arange(nrow)[::-1]
    tmin = np.full(ntb, np.inf); np.minimum.at(tmin, tbin, vis.time - vis.interval / 2)
    tmax = np.full(ntb, -np.inf); np.maximum.at(tmax, tbin, vis.time + vis.interval / 2)
    cparam = np.transpose(g, (0, 3, 1, 2)).reshape(ntb * nant, ncg, ncorr)
    sol_freq = vis.freq if spec.kind == "B" else np.array([vis.freq[use_chan].mean()])
    keep = np.repeat(has_data, nant)
    return CalSolutions(
        kind=spec.kind, spw=vis.spw, freq=sol_freq,
        time=np.repeat(t_sol, nant), interval=np.repeat(tmax - tmin, nant),
        field_id=np.repeat(vis.field_id[first], nant), scan=np.repeat(vis.scan[first], nant),
        antenna=np.tile(np.arange(nant), ntb),
        cparam=cparam.astype(np.complex64),
        flag=np.transpose(bad, (0, 3, 1, 2)).reshape(ntb * nant, ncg, ncorr),
        snr=np.transpose(snr, (0, 3, 1, 2)).reshape(ntb * nant, ncg, ncorr).astype(np.float32),
        refant=-1 if spec.refant is None else int(spec.refant)).select(keep)


def channel_average(vis: Vis, model: np.ndarray, chans: slice | None = None, preapply: list = ()) -> Vis:
    """A G or T solve's data in one channel: the earlier tables applied, then per row and
    correlation the mean of V / M over the solve's channels with weights w |M|^2 (its
    model is then 1 and its weight that sum; kernels.average_channels). A solve on it
    (model unit_model, chans None) sums the same as one on vis (a G or T gain is one
    value across the channels), in 1/nchan of the memory; a gain that is also one value
    across the channels (phase-up phases) may be applied to it after. Solution frequency
    is the mean of the channels used, as solve_term gives it."""
    nrow, nchan, ncorr = vis.flag.shape
    data, flag = vis.data, vis.flag
    if preapply and nrow:
        data, flag, _ = apply_tables(vis, list(preapply))
    use_chan = np.zeros(nchan, bool)
    use_chan[chans if chans is not None else slice(0, nchan)] = True
    mean, wsum = average_channels(data, flag, vis.weight.astype(np.float64), model.astype(np.float64),
                                  use_chan)
    return dataclasses.replace(vis, data=mean, flag=(wsum <= 0)[:, None, :], weight=wsum,
                               freq=np.array([vis.freq[use_chan].mean()]))


def unit_model(vis: Vis) -> np.ndarray:
    """The model of a channel_average Vis: 1 in every row."""
    return np.ones((len(vis.time), 1))


def integration_snr(vis: Vis, model: np.ndarray, chans: slice | None = None,
                    rho: np.ndarray = np.zeros(0)) -> float:
    """The median antenna SNR of one integration, from the data themselves: each
    baseline's signal (channel mean of data / model) over its noise, the noise
    taken from the differences of adjacent channels (thermal, and blind to the
    smooth bandpass structure that does not close before a bandpass is applied),
    summed in quadrature over an antenna's baselines. An a-priori-like estimate
    for choosing solution intervals (the ALMA pipeline computes its SNR from
    fluxes and Tsys; this needs neither). rho: the noise correlation of neighbouring
    channels (heuristics.spectral_response), which hides part of the noise from the
    differences and adds to the channel mean's."""
    return antenna_snr(vis.time, vis.ant1, vis.ant2, row_snr2(vis, model, chans, rho))


def row_snr2(vis: Vis, model: np.ndarray, chans: slice | None = None, rho: np.ndarray = np.zeros(0)) -> np.ndarray:
    """Each row's squared SNR per correlation (integration_snr's baseline term); rows
    are independent, so a caller reading in row blocks concatenates these."""
    sel = slice(None) if chans is None else chans
    m = np.ascontiguousarray(model[:, sel], dtype=np.complex128)
    n, signal, median = row_ratio_statistics(vis.data[:, sel], vis.flag[:, sel], m, vis.ant1, vis.ant2)
    # |difference|^2 of complex Gaussian noise is exponential with mean 2 sigma^2; its
    # median (2 sigma^2 ln 2) ignores the odd spike of a bad channel
    d2 = median / np.log(2)
    d2 = np.nan_to_num(d2) * difference_scale(rho) ** 2
    # of the channel mean (the good channels taken as one run: a few flagged ones in a row
    # change its correlated share little)
    var_mean = d2 / 2 / np.maximum(n, 1) * contiguous_mean_variance_factor(n, rho)
    return np.where((n > 1) & (var_mean > 0), signal ** 2 / np.where(var_mean > 0, var_mean, 1), 0)


def antenna_snr(time: np.ndarray, ant1: np.ndarray, ant2: np.ndarray, snr2: np.ndarray) -> float:
    """integration_snr from the rows' squared SNRs: summed over each antenna's baselines
    per integration, the median of their square roots."""
    nant = int(max(ant1.max(), ant2.max()) + 1) if len(ant1) else 0
    times, tidx = np.unique(time, return_inverse=True)
    acc = np.zeros((len(times), nant, snr2.shape[1]))
    np.add.at(acc, (tidx, ant1), snr2)
    np.add.at(acc, (tidx, ant2), snr2)
    vals = np.sqrt(acc[acc > 0])
    return float(np.median(vals)) if vals.size else 0.0


def _continue_reference(g: np.ndarray, bad: np.ndarray, t_sol: np.ndarray, refant: int) -> None:
    """Where the reference antenna has no solution (flagged, off source), the solver
    referred that slot's phases to another antenna, which would make the phases
    jump. Rotate such a slot so that the antennas it shares with the nearest slot
    that has the reference keep, on average, their phases there (CASA's 'flex'
    reference mode in spirit). g, bad: (ntime, nchan, ncorr, nant), in place."""
    for c in range(g.shape[1]):
        for p in range(g.shape[2]):
            has_ref = ~bad[:, c, p, refant]
            if has_ref.all() or not has_ref.any():
                continue
            with_ref = np.flatnonzero(has_ref)
            for t in np.flatnonzero(~has_ref):
                near = with_ref[np.argmin(np.abs(t_sol[with_ref] - t_sol[t]))]
                common = ~bad[t, c, p] & ~bad[near, c, p]
                if not common.any():
                    continue
                ratio = g[near, c, p, common] * np.conj(g[t, c, p, common])
                rot = np.sum(ratio / np.maximum(np.abs(ratio), 1e-30))
                if abs(rot) > 0:
                    g[t, c, p] *= rot / abs(rot)


def _normalise_bandpass(g: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Scale each antenna/correlation bandpass to unit mean amplitude (solnorm)."""
    amp = np.where(bad, 0.0, np.abs(g))
    n_good = (~bad).sum(axis=1, keepdims=True)
    norm = amp.sum(axis=1, keepdims=True) / np.maximum(n_good, 1)   # mean over unflagged channels
    return g / np.where(norm > 0, norm, 1)


def point_model(vis: Vis, flux_of_field: dict) -> np.ndarray:
    """Model visibilities (nrow, nchan) of the calibrators at the phase centres.

    flux_of_field maps field id -> callable(freq_hz) -> flux density in Jy: a
    point source, the same on every baseline. A resolved source (a solar system
    body, calibration.solar_system.DiskModel) also has visibility(freq_hz,
    q_lambda) -> (nrow, nchan) Jy, q the uv distance in wavelengths; it is zero
    where the source is resolved out, which leaves those baselines out of a solve.
    Fields without a model get zero (their rows are not used in a solve).
    """
    model = np.zeros((len(vis.time), len(vis.freq)), np.float64)
    for fid, fn in flux_of_field.items():
        rows = vis.field_id == fid
        if not rows.any():
            continue
        if hasattr(fn, "visibility"):
            uvdist_m = np.hypot(vis.uvw[rows, 0], vis.uvw[rows, 1])
            q = uvdist_m[:, None] * np.asarray(vis.freq, float)[None, :] / 299792458.0
            model[rows] = fn.visibility(vis.freq, q)
        else:
            model[rows] = np.asarray(fn(vis.freq), float)[None, :]
    return model
