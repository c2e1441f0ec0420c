"""ALMA calibration stages (calibrator service): tsyscal, tsysflag, antpos, wvrgcal,
fluxcalflag, lowgainflag.

Each writes a table into the calibration library (field-independent, applied
before every later solve and by applycal):

* tsyscal (hifa_tsyscal): Tsys spectra from the SYSCAL table, mapped from the
  Tsys spws to the science spws by frequency, as CASA's 'B TSYS' table;
  applying it multiplies the data by sqrt(Tsys_1 Tsys_2).
* antpos (hifa_antpos): phase corrections exp(2 pi i nu (delta . s) / c) for
  the antenna position offsets delta of antennapos.csv.
* wvrgcal (hifa_wvrgcalflag): atmospheric path per antenna and integration from
  the 183 GHz radiometers, scaled to phase with a factor fitted on the
  calibrators; antennas whose radiometer does not follow their phases get the
  path of their nearest neighbours.
"""
from __future__ import annotations

import csv
import io as _io
import os
import warnings

import casacore.tables as ct
import numpy as np  # noqa: E402
from astropy.time import Time  # noqa: E402

from .base import (CAL_READS, QA, Param, Score, StageError, StageIO, field_ids_with, field_name, metric,  # noqa: E402
                   require_intent, spw_info, stage, with_defaults)
from .calibration import preapply, read_averaged, save_table  # noqa: E402
from ..heuristics.callibrary import calibrator_ids, field_models, refant_id, register  # noqa: E402
from ..heuristics.robust import robust_sigma  # noqa: E402
from ..calibration.caltable import CalSolutions  # noqa: E402
from ..calibration import solar_system  # noqa: E402
from ..calibration.terms import SolveSpec, solve_term, unit_model  # noqa: E402
from ..msio import ms as msio  # noqa: E402
from ..report.plots import antenna_grid, label_panel, require_finite  # noqa: E402

C = 299792458.0


def delay_table(kind: str, spw: int, freq: np.ndarray, times: np.ndarray, fields: np.ndarray,
                delay_m: np.ndarray) -> CalSolutions:
    """A phase table from per-antenna excess path delay_m (ntime, nant) in metres:
    g = exp(2 pi i nu delay / c) per channel, the same for both correlations.
    Used for antenna position offsets and for the WVR atmospheric path."""
    nt, nant = delay_m.shape
    phase = 2 * np.pi * delay_m[:, :, None] * freq[None, None, :] / C          # (nt, nant, nchan)
    g = np.repeat(np.exp(1j * phase)[..., None], 2, axis=3).reshape(-1, len(freq), 2)
    n = nt * nant
    return CalSolutions(kind, spw, freq, np.repeat(times, nant), np.zeros(n), np.repeat(fields, nant),
                        np.zeros(n, int), np.tile(np.arange(nant), nt), g.astype(np.complex64),
                        np.zeros(g.shape, bool), np.full(g.shape, 100.0, np.float32))


# ------------------------------------------------------------------ tsyscal

def tsys_spw_map(ms: str, science_spw: int, tsys_spws: list) -> int | None:
    """The Tsys spw for a science spw (tsysspwmap): among those of its baseband when the
    spw names give basebands (ALMA's), the one whose frequency range overlaps it most."""
    spws = msio.spw_table(ms)
    f = np.array(spws[science_spw]["chan_freq_hz"])
    lo, hi = f.min(), f.max()
    bb = spws[science_spw].get("baseband")
    same_bb = [t for t in tsys_spws if bb is not None and spws[t].get("baseband") == bb]
    best, best_overlap = None, 0.0
    for t in same_bb or tsys_spws:
        ft = np.array(spws[t]["chan_freq_hz"])
        overlap = max(0.0, min(hi, ft.max()) - max(lo, ft.min()))
        if overlap > best_overlap:
            best, best_overlap = t, overlap
    return best


def fields_at(times: np.ndarray, scans: list) -> np.ndarray:
    """The field observed at each time, from the observation's scan list (the scan
    that contains it, else the nearest): a Tsys measurement's scan has data in the Tsys
    spws only, so a science spw's own rows cannot say where it was made."""
    start = np.array([sc["start_mjd_s"] for sc in scans])
    end = np.array([sc["end_mjd_s"] for sc in scans])
    fid = np.array([sc["field_id"] for sc in scans])
    t = np.asarray(times, float)[:, None]
    dist = np.where((t >= start) & (t <= end), 0.0, np.minimum(np.abs(t - start), np.abs(t - end)))
    return fid[np.argmin(dist, axis=1)]


class NoTsys(Exception):
    """The EB has no usable Tsys measurements at all (the message says why)."""


def tsys_solutions(ms_path: str, science_spw: int, scans: list) -> tuple[CalSolutions, int] | None:
    """Tsys spectra of the SYSCAL table, mapped to a science spw by frequency and
    interpolated onto its channels, as a 'B TSYS' table (gain 1/sqrt(Tsys), so
    applying it multiplies the data by sqrt(Tsys_1 Tsys_2)); each measurement is
    labelled with the field observed at its time. Returns (table, Tsys spw), None
    when no Tsys spw covers this spw; raises NoTsys when the EB has none."""
    syscal = os.path.join(ms_path, "SYSCAL")
    if not os.path.exists(syscal):
        raise NoTsys("No SYSCAL (Tsys) table in the data: the amplitudes are not corrected for Tsys, "
                     "so fluxes transferred between calibrators at different elevations are biased.")
    with ct.table(syscal, ack=False) as t:
        if "TSYS_SPECTRUM" not in t.colnames() or t.nrows() == 0:
            raise NoTsys("The SYSCAL table holds no Tsys spectra: Tsys not applied.")
        ant, spw, time, tsys = (t.getcol(c) for c in ("ANTENNA_ID", "SPECTRAL_WINDOW_ID", "TIME", "TSYS_SPECTRUM"))
        interval = t.getcol("INTERVAL")
    tspw = tsys_spw_map(ms_path, science_spw, sorted(set(spw.tolist())))
    if tspw is None:
        return None
    field = fields_at(time, scans)             # the field each Tsys measurement was made on
    spws = msio.spw_table(ms_path)
    f_sci = np.array(spws[science_spw]["chan_freq_hz"])
    f_tsys = np.array(spws[tspw]["chan_freq_hz"])
    order = np.argsort(f_tsys)
    rows = np.flatnonzero(spw == tspw)
    t_on = np.stack([np.stack([np.interp(f_sci, f_tsys[order], tsys[r][order, p]) for p in range(tsys.shape[2])],
                              axis=1) for r in rows])                          # (nrow, nchan_sci, ncorr)
    bad = ~np.isfinite(t_on) | (t_on <= 0)
    g = 1.0 / np.sqrt(np.where(bad, 1.0, t_on))
    sol = CalSolutions("TSYS", science_spw, f_sci, time[rows], interval[rows], field[rows],
                       np.zeros(len(rows), int), ant[rows], g.astype(np.complex64), bad,
                       np.full(t_on.shape, 100.0, np.float32))
    return sol, int(tspw)


@metric("tsyscal.coverage", "whether every science spw has Tsys: 0.3 when the EB has none (no SYSCAL table) "
        "or no Tsys spw covers a science spw (Tsys not applied there)")
def tsys_coverage(spw: int | None = None, missing: str = "") -> Score:
    """missing: why the EB has no Tsys at all; spw: a science spw no Tsys spw covers."""
    return Score(0.3, missing or f"No Tsys spw covers science spw {spw}: Tsys not applied there.")


@metric("tsyscal.median_tsys", "each science spw's median Tsys against max_median_tsys_k: 0.6 above it", unit="K")
def median_tsys(spw: int, median_k: float, max_k: float) -> Score | None:
    if median_k > max_k:
        return Score(0.6, f"spw {spw}: median Tsys {median_k:.0f} K is very high.")
    return None


@stage("tsyscal", service="calibrator", topic="Calibration",
       reads=("observation", "fields", "partitions", "callibrary", "ms_name"),
       qa=(tsys_coverage, median_tsys),
       writes=("tsys", "caltables", "callibrary"), params=(
           Param("max_median_tsys_k", float, 1000.0, "a spw whose median Tsys is above this is named", unit="K",
                 min=0.0),))
def tsyscal(ctx: dict, params: dict, io: StageIO) -> QA:
    qa = QA()
    sols, ms_path, summary = [], None, []
    for part in ctx["partitions"]:
        ms_path = io.fetch_meta(part["meta"])         # SYSCAL and the spw table
        try:
            found = tsys_solutions(ms_path, part["spw"], ctx["observation"]["scans"])
        except NoTsys as exc:
            qa.add(tsys_coverage(missing=str(exc)))
            return qa
        if found is None:
            qa.add(tsys_coverage(part["spw"]))
            continue
        sol, tsys_spw = found
        t_on = 1 / np.abs(sol.cparam) ** 2
        good = ~sol.flag
        sols.append(sol)
        med = float(np.median(t_on[good])) if good.any() else 0.0
        summary.append({"spw": part["spw"], "tsys_spw": tsys_spw, "median_tsys_k": med})
        qa.note(f"spw {part['spw']}: Tsys from spw {tsys_spw}, median {med:.0f} K.")
        qa.add(median_tsys(part["spw"], med, params["max_median_tsys_k"]))
        _plot_tsys(io, np.where(good, t_on, np.nan), sol.antenna, sol.freq, part["spw"], ctx["observation"]["antennas"])
    if not sols:
        return qa
    save_table(io, ctx, "tsyscal", sols, ms_path)
    # as ALMA applies it: each calibrator its own Tsys, the target its phase calibrator's
    register(ctx, "tsyscal", "TSYS", "linear", "nearest-calibrator")
    ctx["tsys"] = summary
    return qa


def _plot_tsys(io, tsys, ant, freq, spw, antennas):
    """The Tsys spectrum of each antenna (mean over time), one panel per antenna
    (flagged values are NaN and left out)."""
    require_finite(f"Tsys plot of spw {spw}", tsys)
    ids = [int(a) for a in np.unique(ant)]
    fig, axes = antenna_grid(len(ids), f"Tsys (K) vs frequency (GHz) per antenna, spw {spw} (lines: correlations)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # an all-flagged channel
        for ax, a in zip(axes, ids):
            spec = np.nanmean(tsys[ant == a], axis=0)            # (nchan, ncorr)
            for p in range(spec.shape[1]):
                ax.plot(freq / 1e9, spec[:, p], lw=0.8, color=f"C{p}")
            label_panel(ax, antennas[a]["name"], "" if np.isfinite(spec).any() else "flagged")
    io.plot(fig, f"tsys_spw{spw}.png")


# ------------------------------------------------------------------ antpos

def parse_antennapos(text: str) -> dict:
    """antennapos.csv -> {antenna name: (dx, dy, dz) in m}; header line required."""
    rows = list(csv.reader(_io.StringIO(text)))
    if not rows:
        return {}
    header = [h.strip().lower() for h in rows[0]]
    try:
        ia, ix, iy, iz = (header.index(k) for k in ("antenna", "xoffset_m", "yoffset_m", "zoffset_m"))
    except ValueError:
        raise StageError("antennapos.csv: expected columns antenna, xoffset_m, yoffset_m, zoffset_m") from None
    out = {}
    for n, r in enumerate(rows[1:], 2):
        if not r or r[0].startswith("#"):
            continue
        try:
            out[r[ia].strip()] = (float(r[ix]), float(r[iy]), float(r[iz]))
        except (ValueError, IndexError):
            raise StageError(f"antennapos.csv line {n}: cannot read {r}") from None
    return out


def source_vectors(times: np.ndarray, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Earth-fixed unit vectors (n, 3) towards (ra, dec) at the given MJD-second times."""
    gast = Time(times / 86400, format="mjd", scale="utc").sidereal_time("apparent", "greenwich").rad
    hg = gast - ra
    return np.stack([np.cos(dec) * np.cos(hg), -np.cos(dec) * np.sin(hg), np.sin(dec)], axis=1)


def sample_times(time: np.ndarray, field: np.ndarray, scan: np.ndarray, step_s: float) -> tuple:
    """(times, fields) at which to tabulate a slowly varying, direction-dependent
    correction: per field and scan the first and last integration and one every
    step_s between (linear interpolation does the rest)."""
    group = field.astype(np.int64) * 10_000_000 + scan.astype(np.int64)
    order = np.lexsort((time, group))                      # one sort of the rows, not one per scan
    g, t = group[order], time[order]
    first = np.r_[True, (g[1:] != g[:-1]) | (t[1:] != t[:-1])]
    g, t = g[first], t[first]                              # the distinct (field, scan, time)
    out_t, out_f = [], []
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(g)]):
        ts = t[start:stop]
        keep = [ts[0]]
        for x in ts[1:]:
            if x - keep[-1] >= step_s:
                keep.append(x)
        if keep[-1] != ts[-1]:
            keep.append(ts[-1])
        out_t += keep
        out_f += [int(g[start] // 10_000_000)] * len(keep)
    order = np.argsort(out_t, kind="stable")
    return np.asarray(out_t)[order], np.asarray(out_f)[order]


@metric("antpos.large_corrections", "antennas whose position correction is longer than `threshold` wavelengths "
        "at the highest science frequency (hif_antpos highlights them): 0.9 when any, to look at")
def large_corrections(offsets: dict, wavelength_m: float, threshold: float) -> Score | None:
    """offsets: antenna -> (dx, dy, dz) in m."""
    large = {a: float(np.linalg.norm(d)) for a, d in offsets.items()
             if np.linalg.norm(d) > threshold * wavelength_m}
    if large:
        return Score(0.9, f"Position correction longer than {threshold:g} wavelength(s) "
                          f"({threshold * wavelength_m * 1e3:.2f} mm): "
                          + ", ".join(f"{a} {v * 1e3:.1f} mm" for a, v in sorted(large.items())) + ".")
    return None


@stage("antpos", service="calibrator", topic="Calibration", qa=(large_corrections,),
       reads=("user", "observation", "partitions", "callibrary", "ms_name"),
       writes=("antpos", "caltables", "callibrary"), params=(
           Param("csv", str, "", "antenna position corrections (antennapos.csv); empty: the one beside the MS"),
           Param("sample_s", float, 60.0, "the correction is tabulated this often", unit="s", min=1.0),
           Param("threshold", float, 1.0, "a correction longer than this is named", unit="wavelengths at the "
                 "highest science frequency", min=0.0)))
def antpos(ctx: dict, params: dict, io: StageIO) -> QA:
    qa = QA()
    text = params["csv"] or ctx["user"].get("antennapos") or ""
    offsets = parse_antennapos(text) if text else {}
    if not offsets:
        qa.note("No antenna position corrections given (antennapos.csv): nothing to correct.")
        return qa
    ants = ctx["observation"]["antennas"]
    by_name = {a["name"]: a["id"] for a in ants}
    unknown = sorted(set(offsets) - set(by_name))
    if unknown:
        raise StageError(f"antpos: antennapos.csv names antennas not in the data: {', '.join(unknown)}")
    delta = np.zeros((len(ants), 3))
    for name, d in offsets.items():
        delta[by_name[name]] = d
    fields = {f["id"]: f for f in ctx["observation"]["fields"]}
    sols, ms_path = [], None
    for part in ctx["partitions"]:
        p = io.vis(part)
        ms_path = p.meta
        times, fids = sample_times(p.index("TIME"), p.index("FIELD_ID"), p.index("SCAN_NUMBER"),
                                   params["sample_s"])
        ra = np.array([fields[f]["ra_rad"] for f in fids])
        dec = np.array([fields[f]["dec_rad"] for f in fids])
        s = source_vectors(times, ra, dec)                                   # (nt, 3)
        freq = np.array(msio.spw_table(ms_path)[part["spw"]]["chan_freq_hz"])
        sols.append(delay_table("ANTPOS", part["spw"], freq, times, fids, s @ delta.T))
    save_table(io, ctx, "antpos", sols, ms_path)
    # each field its own corrections (they depend on its direction), linear in time
    register(ctx, "antpos", "ANTPOS", "linear", "own", calwt=False)
    ctx["antpos"] = {k: list(v) for k, v in offsets.items()}
    for name, d in offsets.items():
        qa.note(f"{name}: position corrected by ({d[0] * 1e3:.1f}, {d[1] * 1e3:.1f}, {d[2] * 1e3:.1f}) mm.")
    f_max = max(max(spw_info(ctx, p["spw"])["chan_freq_hz"]) for p in ctx["partitions"])
    qa.add(large_corrections(offsets, 299_792_458.0 / f_max, params["threshold"]))
    return qa


# ------------------------------------------------------------------ wvrgcal

def read_wvr(ms: str, spw: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times (nt,), antenna ids, brightness temperatures (nt, nant, 4)) of the WVR spw:
    auto-correlation rows whose (real) DATA are the four channels' temperatures in K,
    as importasdm writes ALMA's radiometer data. A sample with a flag is NaN."""
    with ct.table(ms, ack=False) as t:
        dd = [d for d, s in msio.spw_of_ddid(ms).items() if s == spw]
        sel = t.query(f"DATA_DESC_ID IN {dd} AND ANTENNA1 == ANTENNA2")
        time, ant = sel.getcol("TIME"), sel.getcol("ANTENNA1")
        data, flag = sel.getcol("DATA"), sel.getcol("FLAG")
        sel.close()
    return wvr_temperatures(time, ant, data, flag, f"{ms} spw {spw}")


def wvr_temperatures(time, ant, data, flag, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """read_wvr's cube from the WVR spw's auto-correlation rows (time, antenna, DATA, FLAG)."""
    if not len(time):
        raise FileNotFoundError(f"{where}: no WVR auto-correlations")
    tb = np.where(flag[:, :, 0], np.nan, data[:, :, 0].real)                  # (nrow, 4)
    times = np.unique(time)
    nant = int(ant.max()) + 1
    cube = np.full((len(times), nant, tb.shape[1]), np.nan)
    cube[np.searchsorted(times, time), ant] = tb
    return times, np.arange(nant), cube


def nearest_index(grid: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Index of the nearest grid time for each t (grid sorted)."""
    i = np.searchsorted(grid, t).clip(1, len(grid) - 1)
    return np.where(np.abs(grid[i - 1] - t) <= np.abs(grid[i] - t), i - 1, i)


def wvr_proxy(tb: np.ndarray) -> np.ndarray:
    """A path proxy (nt, nant) from the four channels: the projection of the
    brightness fluctuations on their common direction (first principal component),
    which is the water-vapour signature whatever the absolute calibration. The
    direction is the median over antennas of each antenna's own, so a broken
    radiometer (noise in every channel) does not tilt everyone's."""
    fluct = tb - np.nanmean(tb, axis=0, keepdims=True)
    dirs = []
    for a in range(tb.shape[1]):
        x = fluct[:, a][np.isfinite(fluct[:, a]).all(axis=1)]
        if len(x) < 3:
            continue
        _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
        dirs.append(vt[0] * np.sign(vt[0].sum()))
    direction = np.median(dirs, axis=0)
    direction /= np.linalg.norm(direction)
    return np.einsum("tak,k->ta", np.nan_to_num(fluct), direction)


def circular_residual(phase: np.ndarray, groups: np.ndarray, use: np.ndarray) -> np.ndarray:
    """Phases (wrapped) less their circular mean in each group (antenna and scan)."""
    out = np.zeros_like(phase)
    for k in np.unique(groups[use]):
        r = use & (groups == k)
        out[r] = np.angle(np.exp(1j * phase[r]) * np.conj(np.exp(1j * phase[r]).mean()))
    return out


NO_WVR = "no WVR correction; phases keep the atmospheric fluctuations."


@metric("wvrgcal.availability", "whether the EB has WVR data to correct with: 0.5 when it has no WVR spw or "
        "its data cannot be read")
def wvr_availability(missing: str = "") -> Score:
    """missing: why the WVR data cannot be read; none: the EB has no WVR spw."""
    return Score(0.5, f"{missing}: {NO_WVR}" if missing else f"No WVR spw in the EB: {NO_WVR}")


@metric("wvrgcal.calibrator_phases", "the calibrator phases left to fit the WVR path scale on (the reference "
        "antenna's integrations, radiometers that follow the phases): 0.4 below 10, no WVR correction")
def wvr_fit_phases(n_phases: int) -> Score | None:
    if n_phases < 10:
        return Score(0.4, "Too few calibrator phases to fit the WVR scale: no WVR correction.")
    return None


@metric("wvrgcal.radiometer", "antennas whose WVR does not follow their phases (correlation below "
        "min_correlation): 0.8 when any, their path interpolated from the nearest antennas")
def wvr_radiometers(bad_names: list) -> Score | None:
    if bad_names:
        return Score(0.8, f"WVR of {', '.join(bad_names)} does not follow the phases: "
                          f"their path interpolated from the nearest antennas.", evidence="wvr_path.png")
    return None


@metric("wvrgcal.improvement_ratio", "the calibrators' phase rms before / after the WVR correction: 0.5 below "
        "min_ratio")
def wvr_improvement(ratio: float, min_ratio: float) -> Score | None:
    if ratio < min_ratio:
        return Score(0.5, f"WVR correction does not improve the phases (ratio {ratio:.2f}).", evidence="wvr_path.png")
    return None


def wvrgcal_outliers(ctx: dict, link) -> list:
    """Home's triage: each antenna whose radiometer does not follow its phases."""
    return [{"what": f"antenna {a}", "why": "its radiometer does not follow the phases: path taken from "
                                            "its neighbours (wvrgcal)",
             "href": link("wvrgcal", "wvr_path.png"), "also": ""}
            for a in (ctx.get("wvr") or {}).get("bad_antennas", [])]


@stage("wvrgcal", service="calibrator", topic="Calibration",
       qa=(wvr_availability, wvr_fit_phases, wvr_radiometers, wvr_improvement), outliers=wvrgcal_outliers,
       reads=CAL_READS + ("aux_partitions", "ms_name"),
       writes=("wvr", "caltables", "callibrary"), params=(
           Param("minsnr", float, 3.0, "per-integration phase solutions below this SNR are not used", min=0.0),
           Param("min_correlation", float, 0.5, "an antenna whose WVR follows its phases less is interpolated",
                 min=0.0, max=1.0),
           Param("min_ratio", float, 1.0, "a phase rms improvement below this ratio lowers the score", min=0.0)))
def wvrgcal(ctx: dict, params: dict, io: StageIO) -> QA:
    qa = QA()
    ants = ctx["observation"]["antennas"]
    pos = np.array([a["position"] for a in ants])
    ref = refant_id(ctx)
    # the scale is fitted and the improvement measured on the bandpass and phase
    # calibrators, as hifa_wvrgcalflag does: bright, and often observed
    cal_ids = sorted(set(field_ids_with(ctx, "BANDPASS")) | set(field_ids_with(ctx, "PHASE"))) or calibrator_ids(ctx)
    part0 = ctx["partitions"][0]
    wvr_part = ctx.get("aux_partitions", {}).get("wvr")
    if wvr_part is None:
        qa.add(wvr_availability())
        return qa
    try:
        w = io.vis(wvr_part).read()
        autos = w.ant1 == w.ant2
        wtimes, _, tb = wvr_temperatures(w.time[autos], w.ant1[autos], w.data[autos], w.flag[autos],
                                         f"{wvr_part['name']}")
    except FileNotFoundError as exc:
        qa.add(wvr_availability(str(exc)))
        return qa
    proxy = wvr_proxy(tb)                                                     # (nt, nant)
    # Fit the path scale on the calibrators: per-integration antenna phases
    # (relative to the reference antenna) against the proxy differences.
    _, vis = read_averaged(io, part0, cal_ids, field_models(ctx, unit_for=cal_ids), preapply(ctx, io, part0["spw"]))
    nu0 = float(vis.freq[0])                       # the mean of the spw's channels
    # per polarisation (G): before the bandpass the X and Y phases are unrelated
    ph = solve_term(vis, unit_model(vis), SolveSpec(kind="G", solint="int", calmode="p", refant=ref,
                                                    minsnr=params["minsnr"]))
    idx = nearest_index(wtimes, ph.time)
    # only slots with the reference antenna: elsewhere the phases are relative to
    # another antenna, whose path the proxy differences below would not follow
    ref_times = ph.time[(ph.antenna == ref) & ~ph.flag[:, 0, 0]]
    ok = ~ph.flag[:, 0, 0] & np.isin(ph.time, ref_times)
    obs_phase = np.angle(ph.cparam[:, 0, 0])
    dproxy = proxy[idx, ph.antenna] - proxy[idx, ref]
    # remove per-antenna and per-scan means: slow phases belong to the gain solves
    key = ph.antenna * 100000 + ph.scan
    resid_phase, resid_proxy = circular_residual(obs_phase, key, ok), dproxy.copy()
    for k in np.unique(key[ok]):
        r = ok & (key == k)
        resid_proxy[r] -= dproxy[r].mean()
    # per-antenna fit quality: an antenna whose radiometer does not follow its phases is bad
    bad_ants, corr = [], {}
    for a in range(len(ants)):
        r = ok & (ph.antenna == a)
        if a == ref or not np.isfinite(tb[:, a]).all():
            continue
        if r.sum() < 5:   # a radiometer that cannot be checked against phases is not trusted
            bad_ants.append(int(a))
            continue
        c = np.corrcoef(resid_phase[r], resid_proxy[r])[0, 1] if resid_proxy[r].std() > 0 else 0.0
        corr[int(a)] = float(c)
        if not np.isfinite(c) or abs(c) < params["min_correlation"]:
            bad_ants.append(int(a))
    good = ok & ~np.isin(ph.antenna, bad_ants) & (ph.antenna != ref)
    too_few = wvr_fit_phases(int(good.sum()))
    if too_few:
        qa.add(too_few)
        return qa
    # the scale (rad per proxy unit): a least-squares start, then the value that
    # minimises the phase rms left after correction. Wrapped phases make the linear
    # fit slightly off when the atmosphere moves the phase by tens of degrees.
    from scipy.optimize import minimize_scalar
    first = float((resid_phase[good] * resid_proxy[good]).sum() / (resid_proxy[good] ** 2).sum())

    def rms_after(s):
        return np.sqrt(np.mean(circular_residual(obs_phase - s * dproxy, key, good)[good] ** 2))
    scale = float(minimize_scalar(rms_after, bounds=sorted((0.5 * first, 1.5 * first)), method="bounded").x)
    path_m = proxy * scale * C / (2 * np.pi * nu0)                               # (nt, nant) metres
    # bad radiometers: the mean path of the three nearest good antennas
    good_ants = [a for a in range(len(ants)) if a not in bad_ants and np.isfinite(tb[:, a]).all()]
    for a in bad_ants:
        near = sorted(good_ants, key=lambda b: np.linalg.norm(pos[a] - pos[b]))[:3]
        path_m[:, a] = path_m[:, near].mean(axis=1)
    before = np.sqrt(np.mean(resid_phase[good] ** 2))
    after = rms_after(scale)
    ratio = float(before / after) if after > 0 else 1.0
    sols, ms_path = [], None
    for part in ctx["partitions"]:
        ms_path = io.fetch_meta(part["meta"])
        freq = np.array(msio.spw_table(ms_path)[part["spw"]]["chan_freq_hz"])
        # one phase per spw, at its mean frequency, as CASA's wvrgcal tabulates it: per
        # channel the table was 128x larger (2.3 GB on a 23 GB EB) for a phase that
        # differs across a 2 GHz spw by 2 pi dL dnu / c, under a degree for 0.5 mm of path
        sols.append(delay_table("WVR", part["spw"], np.array([freq.mean()]), wtimes, np.zeros(len(wtimes), int),
                                path_m))
    save_table(io, ctx, "wvrgcal", sols, ms_path)
    register(ctx, "wvrgcal", "WVR", "linear", "all", calwt=False)
    ctx["wvr"] = {"phase_rms_before_deg": float(np.degrees(before)), "phase_rms_after_deg": float(np.degrees(after)),
                  "improvement_ratio": ratio, "bad_antennas": [ants[a]["name"] for a in bad_ants],
                  "scale_rad_per_unit": scale, "correlation": {ants[a]["name"]: c for a, c in corr.items()}}
    qa.note(f"Phase rms on the calibrators {np.degrees(before):.1f} -> {np.degrees(after):.1f} deg "
            f"(improvement ratio {ratio:.2f}).")
    qa.add(wvr_radiometers([ants[a]["name"] for a in bad_ants]))
    qa.add(wvr_improvement(ratio, params["min_ratio"]))
    _plot_wvr(io, wtimes, path_m, ants, bad_ants)
    return qa


def _plot_wvr(io, times, path_m, ants, bad_ants=()):
    """The path from each antenna's radiometer vs time, one panel per antenna; the
    antennas whose radiometer did not follow the phases (path interpolated from the
    nearest antennas) are framed as outliers."""
    require_finite("WVR path plot", path_m)
    fig, axes = antenna_grid(path_m.shape[1], "Path from the 183 GHz radiometers (mm) vs minutes, per antenna "
                                              "(red frame: radiometer replaced by its neighbours')")
    for a, ax in enumerate(axes):
        ax.plot((times - times[0]) / 60, path_m[:, a] * 1e3, lw=0.6, color="k")
        label_panel(ax, ants[a]["name"], "outlier" if a in bad_ants else "")
    io.plot(fig, "wvr_path.png")


# ------------------------------------------------------------------ fluxcalflag

# Rest frequencies (GHz) of the molecular lines that show in the spectra of solar
# system flux calibrators, and the half-width (GHz) flagged around each for each
# body (pressure-broadened: Neptune's CO absorption is GHz wide, Titan's lines are
# narrower). A recipe can replace the table with fluxcalflag.lines. The other bodies
# setjy models (calibration.solar_system.BODIES: the Galilean moons, the asteroids)
# have no entry: they have no atmosphere with lines to flag (Io's thin SO2
# atmosphere aside, whose weak lines are not in this table).
LINE_FREQS_GHZ = {
    "CO": [115.271, 230.538, 345.796, 461.041, 576.268, 691.473, 806.652, 921.800],
    "HCN": [88.632, 177.261, 265.886, 354.505, 443.116, 531.716, 620.304, 708.877, 797.433, 885.971],
    "H2O": [183.310, 325.153, 380.197, 448.001, 556.936, 752.033, 916.172],
}
SOLAR_SYSTEM_LINES = {      # body: [(molecule, half-width GHz)]
    "titan": [("CO", 0.15), ("HCN", 0.15)],
    "neptune": [("CO", 1.0)],
    "uranus": [("CO", 0.3)],
    "mars": [("CO", 0.1), ("H2O", 0.1)],
    "venus": [("CO", 0.5), ("H2O", 0.5)],
}


def line_channels(body: str, freq_hz: np.ndarray, table: dict | None = None) -> np.ndarray:
    """Channels (nchan,) of a spectrum that fall on a known line of a solar system
    body (case-insensitive name); none for any other source."""
    table = SOLAR_SYSTEM_LINES if table is None else table
    out = np.zeros(len(freq_hz), bool)
    # the body setjy models (its name as solar_system.body_name reads it: 'Titan_1' is Titan)
    key = solar_system.body_name(body) or body.strip().lower()
    for molecule, half_width in table.get(key, []):
        for f0 in LINE_FREQS_GHZ[molecule]:
            out |= np.abs(freq_hz / 1e9 - f0) <= half_width
    return out


@metric("fluxcalflag.line_fraction", "the fraction of a solar system flux calibrator's channels in a spw that "
        "lie on its lines: 0.5 above max_fraction (its flux scale there rests on the channels left)",
        unit="fraction")
def line_fraction(name: str, spw: int, on_lines, max_fraction: float) -> Score | None:
    """on_lines: the spw's channel mask of the body's lines."""
    frac = on_lines.mean()
    if frac > max_fraction:
        return Score(0.5, f"{name} spw {spw}: {frac:.0%} of the channels lie on its lines; "
                          f"its flux scale in that spw rests on {int((~on_lines).sum())} channels.")
    return None


def fluxcalflag_reasons(ctx: dict) -> list:
    return [f"{name} spw {spw}: {len(ch)} channels on its lines"
            for name, spws in (ctx.get("flags", {}).get("fluxcalflag") or {}).items() for spw, ch in spws.items()]


@stage("fluxcalflag", service="calibrator", topic="Flagging", qa=(line_fraction,), flag_reasons=fluxcalflag_reasons,
       reads=("fields", "observation", "partitions", "flags"), writes=("partitions", "flags"), params=(
           Param("lines", dict, None, "lines by body: {\"titan\": [[\"CO\", 0.5], ...]} (molecule, half width "
                 "in GHz); none: the built-in table"),
           Param("max_fraction", float, 0.75, "a spw with more of its channels on lines is named", min=0.0, max=1.0)))
def fluxcalflag(ctx: dict, params: dict, io: StageIO) -> QA:
    """Flag the channels of solar system flux calibrators that lie on their
    atmospheric lines (hifa_fluxcalflag), so the continuum model of setjy holds on
    what is left; a spw left with too few channels is named."""
    qa = QA()
    flux_ids = require_intent(ctx, "FLUX", "fluxcalflag")
    table = params["lines"]
    if table is not None:
        table = {k.lower(): [tuple(x) for x in v] for k, v in table.items()}
    found, new_parts = {}, []
    for part in ctx["partitions"]:
        freq = np.array(spw_info(ctx, part["spw"])["chan_freq_hz"])
        bad = {f: line_channels(field_name(ctx, f), freq, table) for f in flux_ids}
        bad = {f: m for f, m in bad.items() if m.any()}
        if bad:
            p = io.vis(part)
            for vis in p.blocks(field_ids=list(bad), data=False, block_chunks=4):   # the flux calibrators' rows
                flag = vis.flag.copy()
                for f, m in bad.items():
                    flag |= (vis.field_id == f)[:, None, None] & m[None, :, None]
                p.write_flags(vis.rows, flag)
            for f, m in bad.items():
                name = field_name(ctx, f)
                found.setdefault(name, {})[str(part["spw"])] = np.flatnonzero(m).tolist()
                qa.note(f"{name} spw {part['spw']}: {m.sum()} channels on lines flagged.")
                qa.add(line_fraction(name, part["spw"], m, params["max_fraction"]))
            part = p.commit()
        new_parts.append(part)
    ctx["partitions"] = new_parts
    ctx["flags"]["fluxcalflag"] = found
    if not found:
        qa.note(f"No known lines in {', '.join(field_name(ctx, f) for f in flux_ids)} in these spws "
                f"(only solar system flux calibrators have them): nothing flagged.")
    return qa


# ------------------------------------------------------------------ flagging on solutions

def _flag_antennas_in_data(io: StageIO, ctx: dict, ant_ids: list) -> None:
    """Flag every row of the given antennas in every partition (a new FLAG version)."""
    new_parts = []
    for part in ctx["partitions"]:
        p = io.vis(part)
        p.flag_antennas(ant_ids)
        new_parts.append(p.commit())
    ctx["partitions"] = new_parts


@metric("lowgainflag.antennas_flagged", "antennas with data whose gain amplitude on the bandpass calibrator is "
        "below `fraction` of the array's median, all their data flagged: 1 - their share of the antennas")
def low_gain_antennas(names: list, n_with_data: int, fraction: float, unsolved: list = ()) -> Score | None:
    """names: every antenna flagged; unsolved: those of them with no unflagged data on the
    bandpass calibrator (shadowed or flagged there), which no gain could be solved for."""
    if names:
        low = [a for a in names if a not in unsolved]
        why = ([f"{', '.join(low)}: gain amplitude below {fraction:.0%} of the array's median"] if low else []) + \
            ([f"{', '.join(unsolved)}: no unflagged data on the bandpass calibrator (shadowed or flagged before), "
              "so no gain and no bandpass"] if unsolved else [])
        return Score(1 - len(names) / max(n_with_data, 1), f"Flagged antenna(s) {'; '.join(why)}.",
                     evidence="table-low-gain")
    return None


def lowgainflag_tables(ctx: dict) -> list:
    if not ctx["flags"].get("lowgainflag"):
        return []
    return [{"title": "Antennas flagged for low gain", "evidence": "table-low-gain",
             "header": ["Antenna", "Why"],
             "rows": [[a, ("no unflagged data on the bandpass calibrator (shadowed or flagged before): no gain or "
                           "bandpass to calibrate it with" if a in ctx["flags"].get("lowgainflag_unsolved", []) else
                           "gain amplitude on the bandpass calibrator far below the array's median")
                          + ": all its data flagged"] for a in ctx["flags"]["lowgainflag"]]}]


def lowgainflag_outliers(ctx: dict, link) -> list:
    """Home's triage: each antenna flagged for low gain, with bandpass's table beside."""
    return [{"what": f"antenna {a}", "why": "gain amplitude far below the array's: flagged (lowgainflag)",
             "href": link("lowgainflag", "table-low-gain"),
             "also": link("bandpass", "table-bandpass-antennas"), "also_label": "bandpass"}
            for a in ctx.get("flags", {}).get("lowgainflag") or []]


def lowgainflag_reasons(ctx: dict) -> list:
    return [f"antenna {a}: gain amplitude far below the array's (all data)"
            for a in ctx.get("flags", {}).get("lowgainflag") or []]


@stage("lowgainflag", service="calibrator", topic="Flagging", qa=(low_gain_antennas,), tables=lowgainflag_tables,
       outliers=lowgainflag_outliers, flag_reasons=lowgainflag_reasons,
       reads=CAL_READS + ("flags",),
       writes=("partitions", "flags"), params=(
           Param("fraction", float, 0.3, "an antenna whose gain is below this fraction of the median is flagged",
                 min=0.0, max=1.0),))
def lowgainflag(ctx: dict, params: dict, io: StageIO) -> QA:
    """Flag antennas whose gain amplitude on the bandpass calibrator is far below the
    array's (hif_lowgainflag): a dead or badly pointed antenna."""
    qa = QA()
    bp_ids = require_intent(ctx, "BANDPASS", "lowgainflag")
    ants = ctx["observation"]["antennas"]
    low, unsolved = set(), set()
    for part in ctx["partitions"]:
        _, vis = read_averaged(io, part, bp_ids, field_models(ctx, unit_for=bp_ids), preapply(ctx, io, part["spw"]))
        g = solve_term(vis, unit_model(vis), SolveSpec(kind="G", solint="inf", calmode="ap", refant=refant_id(ctx),
                                                       minsnr=0.0))
        amp = np.where(g.flag, np.nan, np.abs(g.cparam))[:, 0, :]
        per_ant = {int(a): np.nanmedian(amp[g.antenna == a]) for a in np.unique(g.antenna)
                   if np.isfinite(amp[g.antenna == a]).any()}
        med = np.median(list(per_ant.values()))
        for a, v in per_ant.items():
            if v < params["fraction"] * med:
                low.add(a)
        # an antenna with data but no usable gain at all is the lowest gain there is
        unsolved |= {a["id"] for a in ants if a["has_data"]} - set(per_ant)
    low |= unsolved
    has = {a["id"] for a in ants if a["has_data"]}
    low &= has
    if low:
        _flag_antennas_in_data(io, ctx, sorted(low))
        qa.add(low_gain_antennas([ants[a]["name"] for a in sorted(low)], len(has), params["fraction"],
                                 [ants[a]["name"] for a in sorted(unsolved & has)]))
    else:
        qa.note("No low-gain antennas.")
    ctx["flags"]["lowgainflag"] = [ants[a]["name"] for a in sorted(low)]
    ctx["flags"]["lowgainflag_unsolved"] = [ants[a]["name"] for a in sorted(unsolved & has)]
    return qa


TSYSFLAG_PARAMS = (
    Param("antenna_nsigma", float, 6.0, "robust sigmas of an outlier antenna's median Tsys", min=0.0),
    Param("derivative_factor", float, 5.0, "a spectrum rougher than this factor of the typical one", min=0.0),
    Param("derivative_floor", float, 0.005, "plus this (relative roughness)", min=0.0),
    Param("edge_factor", float, 3.0, "edge channels above this factor of the median Tsys", min=0.0),
    Param("channel_nsigma", float, 10.0, "robust sigmas of a birdie", min=0.0),
    Param("birdie_fraction", float, 0.15, "and above this fraction of the smoothed spectrum", min=0.0))


def tsys_outliers(tsys: np.ndarray, antenna: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray, list]:
    """The tests of hifa_tsysflag, in brief, on the Tsys spectra (nrow, nchan, ncorr)
    of one spw. Returns (rows to flag, channels to flag, what was found):

    * antenna: an antenna whose median Tsys is far from the array's;
    * derivative: a spectrum much rougher than the others (channel-to-channel
      jumps, relative to its level; a bad correlator or a loose IF);
    * edges: channels at either end rising far above the spectrum's median (the
      roll-off of the baseband filter);
    * birdies: one or two channels that do not survive a 5-channel median filter,
      while an atmospheric line (smooth) does."""
    from scipy.signal import medfilt      # here: scipy.signal takes half a second to import
    params = with_defaults(TSYSFLAG_PARAMS, params)       # also called with a few parameters (tests)
    nrow, nchan, _ = tsys.shape
    rows, chans, found = np.zeros(nrow, bool), np.zeros(nchan, bool), []
    med_ant = {int(a): np.median(tsys[antenna == a]) for a in np.unique(antenna)}
    vals = np.array(list(med_ant.values()))
    centre = np.median(vals)
    mad = robust_sigma(vals) or 0.05 * centre
    for a, v in med_ant.items():
        if abs(v - centre) > params["antenna_nsigma"] * mad and abs(v / centre - 1) > 0.5:
            rows |= antenna == a
            found.append(("antenna", a, f"median Tsys {v:.0f} K vs array {centre:.0f} K"))
    rough = np.median(np.abs(np.diff(tsys, axis=1)), axis=1) / np.maximum(np.median(tsys, axis=1), 1e-9)
    typical = np.median(rough)
    limit = params["derivative_factor"] * typical + params["derivative_floor"]
    for r, p in zip(*np.nonzero(rough > limit)):
        if not rows[r]:
            rows[r] = True
            found.append(("derivative", int(antenna[r]), f"spectrum {rough[r, p]:.3f} rough vs typical {typical:.3f}"))
    spec = np.median(tsys, axis=(0, 2))
    level = np.median(spec)
    factor = params["edge_factor"]
    for edge in (range(nchan), range(nchan - 1, -1, -1)):
        n = 0
        for ch in edge:
            if spec[ch] <= factor * level or n >= nchan // 4:
                break
            chans[ch] = True
            n += 1
        if n:
            found.append(("edges", -1, f"{n} edge channel(s) above {factor:g} x the median Tsys"))
    smooth = medfilt(spec, 5)
    resid = spec - smooth
    s = robust_sigma(resid) or 1e-9
    birdies = np.flatnonzero((np.abs(resid) > params["channel_nsigma"] * s) &
                             (np.abs(resid) > params["birdie_fraction"] * smooth))
    if len(birdies):
        chans[birdies] = True
        found.append(("birdie", -1, f"channel(s) {', '.join(map(str, birdies))}"))
    return rows, chans, found


@metric("tsysflag.flags", "Tsys spectra flagged (outlier antennas, rough spectra, band edges, birdies): 0.9 "
        "when any (the outlier antennas framed red on the per-antenna plot)")
def tsys_flags(report: list, evidence: str = "") -> Score | None:
    """evidence: the per-antenna plot of the spw with the most flags."""
    if report:
        return Score(0.9, f"{len(report)} Tsys flag(s).", evidence=evidence)
    return None


def tsysflag_outliers(ctx: dict, link) -> list:
    """Home's triage: each Tsys flag ("antenna: why"), with tsyscal's plots beside."""
    return [{"what": r.split(":")[0], "why": "Tsys: " + r.split(":", 1)[-1].strip(),
             "href": link("tsysflag"), "also": link("tsyscal", anchor="plots"), "also_label": "Tsys plots"}
            for r in ctx.get("flags", {}).get("tsysflag") or []]


def tsysflag_reasons(ctx: dict) -> list:
    return list(ctx.get("flags", {}).get("tsysflag") or [])


def _plot_tsysflag(io, tsys, ant, freq, spw, antennas, outliers: set, chans: np.ndarray) -> str | None:
    """The Tsys spectra as tsysflag found them (mean over time), one panel per antenna:
    the antennas it flagged (outliers: ids) framed red, the channels it flagged (band
    edges, birdies) shaded. The plot's name, or None when nothing is unflagged."""
    if not np.isfinite(tsys).any():
        return None
    ids = [int(a) for a in np.unique(ant)]
    name = f"tsysflag_spw{spw}.png"
    fig, axes = antenna_grid(len(ids), f"Tsys (K) vs frequency (GHz) per antenna, spw {spw}, before tsysflag; "
                                       "red: antennas flagged, grey: channels flagged")
    ghz = freq / 1e9
    runs = np.flatnonzero(np.diff(np.concatenate([[0], chans.astype(int), [0]])))     # flagged channel ranges
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # an all-flagged channel
        for ax, a in zip(axes, ids):
            spec = np.nanmean(tsys[ant == a], axis=0)            # (nchan, ncorr)
            for p in range(spec.shape[1]):
                ax.plot(ghz, spec[:, p], lw=0.8, color=f"C{p}")
            for lo, hi in zip(runs[::2], runs[1::2]):
                ax.axvspan(ghz[lo], ghz[hi - 1], color="0.8", lw=0)
            label_panel(ax, antennas[a]["name"], "outlier" if a in outliers else
                        "" if np.isfinite(spec).any() else "flagged")
    io.plot(fig, name)
    return name


@stage("tsysflag", service="calibrator", topic="Flagging", reads=("caltables", "observation", "partitions"),
       qa=(tsys_flags,), outliers=tsysflag_outliers, flag_reasons=tsysflag_reasons,
       writes=("caltables", "flags"), params=TSYSFLAG_PARAMS)
def tsysflag(ctx: dict, params: dict, io: StageIO) -> QA:
    """Flag Tsys spectra of outlier antennas, rough spectra, band edges and birdies
    (hifa_tsysflag; see tsys_outliers)."""
    from ..calibration.caltable import read_caltable, write_caltable
    qa = QA()
    entry = ctx["caltables"].get("tsyscal")
    if entry is None:
        qa.note("No Tsys table: nothing to flag.")
        return qa
    path = io.fetch_dir(entry["key"])
    sols = read_caltable(path)
    ants = ctx["observation"]["antennas"]
    report, evidence, most = [], "", 0
    for sol in sols:
        tsys = 1 / np.maximum(np.abs(sol.cparam), 1e-12) ** 2                 # (nrow, nchan, ncorr)
        rows, chans, found = tsys_outliers(tsys, sol.antenna, params)
        plot = _plot_tsysflag(io, np.where(sol.flag, np.nan, tsys), sol.antenna, sol.freq, sol.spw, ants,
                              {a for _, a, _ in found if a >= 0}, chans)
        if plot and len(found) > most:
            evidence, most = plot, len(found)
        sol.flag[rows] = True
        sol.flag[:, chans] = True
        report += [f"spw {sol.spw}: {test}" + (f" {ants[a]['name']}" if a >= 0 else "") + f": {what}"
                   for test, a, what in found]
    if report:
        ms0 = io.fetch_meta(ctx["partitions"][0]["meta"])
        new_path = os.path.join(io.workdir, "flagged", os.path.basename(path))   # same name, new object
        os.makedirs(os.path.dirname(new_path), exist_ok=True)
        write_caltable(sols, new_path, ms0)
        e = io.put_dir(new_path, os.path.basename(new_path))
        ctx["caltables"]["tsyscal"] = dict(entry, key=e["key"], sha256=e["sha256"])
        for r in report:
            qa.note(r)
        qa.add(tsys_flags(report, evidence))
    else:
        qa.note("No outlier Tsys spectra.")
    ctx["flags"]["tsysflag"] = report
    return qa
