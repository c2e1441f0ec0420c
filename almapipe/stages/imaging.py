"""Imaging stages (imager service): split, uvcontsub (with findcont), makeimages."""
from __future__ import annotations

import dataclasses
import os

import casacore.tables as ct
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .base import QA, StageError, StageIO, field_ids_with, field_name, require_intent, spw_info, stage  # noqa: E402
from .calibration import calibrator_ids  # noqa: E402
from .ebs import as_group, read_group, read_member, spw_groups  # noqa: E402
from ..imaging import gridding  # noqa: E402
from ..imaging.deconvolve import robust_rms  # noqa: E402
from ..imaging.frames import channel_shifts, lsrk_factor, lsrk_factors, max_drift_channels  # noqa: E402
from ..imaging.imager import (ImageSpec, Planes, TaylorPlanes, aggregate_samples, clean_planes,  # noqa: E402
                              clean_taylor, join_planes, restore_planes, restore_taylor_planes, stokes_i)
from ..imaging.mtmfs import fractional_bandwidth, nterms_for  # noqa: E402
from ..imaging.kernels import shift_spectra  # noqa: E402
from ..imaging.mosaic import make_mosaic  # noqa: E402
from ..imaging.products import (image_header, mosaic_noise_factor, obs_info, pb_fwhm,  # noqa: E402
                                pipeline_version, write_fits)
from ..imaging.uvcontsub import format_channels, parse_channels, subtract_continuum  # noqa: E402
from ..msio import ms as msio  # noqa: E402

# the largest image makeimages makes from its heuristics (per image kind: max_imsize)
MAX_IMSIZE = 4096
# channels at each end of a spw that a cube's reported peak never comes from (the
# bandpass rolls off there; an unflagged edge channel is the noisiest of the cube)
EDGE_CHANNELS = 1
# the intent part of ALMA's product names (<field>_<intent>), by priority
INTENT_SUFFIX = {"TARGET": "sci", "BANDPASS": "bp", "FLUX": "flux", "PHASE": "ph", "CHECK": "ch"}


# ------------------------------------------------------------------ split

@stage("split", service="imager")
def split(ctx: dict, params: dict, io: StageIO) -> QA:
    """Target fields' calibrated data into their own MS (DATA = CORRECTED_DATA)."""
    qa = QA()
    targets = require_intent(ctx, "TARGET", "split")
    if not all(p.get("calibrated") for p in ctx["partitions"]):
        raise StageError("split: the partitions have no CORRECTED_DATA; run applycal first")
    out = []
    for part in ctx["partitions"]:
        ms = io.fetch_dir(part["key"])
        name = part["name"].replace(".ms", ".target.ms")
        dest = os.path.join(io.workdir, name)
        with ct.table(ms, ack=False) as t:
            sel = t.query(f"FIELD_ID IN {targets}")
            if sel.nrows() == 0:
                raise StageError(f"split: no rows of the target fields in spw {part['spw']}")
            sel.copy(dest, deep=True).close()
            sel.close()
        with ct.table(dest, readonly=False, ack=False) as t:
            t.putcol("DATA", t.getcol("CORRECTED_DATA"))
            t.removecols(["CORRECTED_DATA"])
            io.visibilities += t.nrows()
        entry = io.put_dir(dest, name)
        out.append({"spw": part["spw"], "key": entry["key"], "sha256": entry["sha256"], "name": name})
    ctx["target_partitions"] = out
    qa.note(f"Split {', '.join(field_name(ctx, f) for f in targets)} into {len(out)} MS(s).")
    return qa


# ------------------------------------------------------------------ findcont + uvcontsub

def line_spectrum(vis: msio.Vis, npix: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(per-channel peak SNR of the continuum-free dirty cube, channels with data).

    A coarse dirty cube (a few pixels per beam, covering the inner primary beam)
    is made; each pixel's median over channels (its continuum) is subtracted, and
    the peak of what is left in each channel is the spectrum in which line
    emission stands out wherever in the field it is (as ALMA's findcont works on
    the dirty cube rather than on visibilities). Every channel is gridded at one
    reference frequency, so all have the same PSF: with each channel's own, a bright
    source's sidelobes move across the band and what the median leaves looks like
    line emission. (Positions scale by f / f_ref instead, a small fraction of a
    coarse pixel near the centre of a spw a few percent wide.)"""
    nchan = len(vis.freq)
    cross = vis.ant1 != vis.ant2
    uvmax = np.percentile(np.hypot(vis.uvw[cross, 0], vis.uvw[cross, 1]), 95) * vis.freq.max() / 299792458.0
    cell = 1.0 / max(uvmax, 1e-9) / 3.0                      # radians: ~3 pixels per beam
    si = stokes_i(vis, np.arange(nchan))
    uvw, data, w = si.uvw, si.data, si.weight
    has_data = w.sum(axis=0) > 0
    f_ref = np.array([vis.freq[has_data].mean() if has_data.any() else vis.freq.mean()])
    cube = np.zeros((nchan, npix, npix))
    for c in np.flatnonzero(has_data):
        cube[c] = gridding.dirty(uvw, f_ref, data[:, c:c + 1], w[:, c:c + 1], npix, cell)
    cont = np.median(cube[has_data], axis=0)
    resid = (cube - cont[None]).reshape(nchan, -1)
    # peak signal-to-noise per channel: channels are noisier where the bandpass rolls off
    med = np.median(resid, axis=1, keepdims=True)
    rms = 1.4826 * np.median(np.abs(resid - med), axis=1)
    spec = resid.max(axis=1) / np.where(rms > 0, rms, np.inf)
    return np.where(has_data, spec, 0.0), has_data


def find_continuum(vis: msio.Vis, edge_frac: float = 0.05, nsigma: float = 5.0,
                   min_peak_snr: float = 6.0) -> np.ndarray:
    """Line-free channels: those whose continuum-free dirty-cube peak SNR (line_spectrum)
    is neither nsigma above the quiet channels' level nor above min_peak_snr (noise
    peaks in the coarse cube reach ~4), with line channels grown by two; the band
    edges and flagged channels are left out. A mosaic's pointings are looked at one
    by one (each is phased to its own centre), a channel's SNR the highest of them."""
    nchan = len(vis.freq)
    fields = np.unique(vis.field_id)
    spectra = [line_spectrum(vis)] if len(fields) < 2 else \
        [line_spectrum(vis.select(vis.field_id == f)) for f in fields]
    spec = np.max([sp for sp, _ in spectra], axis=0)
    has_data = np.any([h for _, h in spectra], axis=0)
    edge = max(1, int(round(edge_frac * nchan)))
    inner = has_data.copy()
    inner[:edge] = inner[nchan - edge:] = False
    if inner.sum() < 3:
        return inner
    # the baseline from the quietest 30 % of the channels: a line may cover most of
    # the band (NGC 5921's HI covers 60 %), so the median can sit on the line
    vals = np.sort(spec[inner])
    low = vals[:max(3, int(0.3 * len(vals)))]
    centre = np.median(low)
    sigma = 1.4826 * np.median(np.abs(low - centre)) or 1e-12
    threshold = max(centre + nsigma * sigma, min_peak_snr)
    line = (spec > threshold) & has_data
    line = np.convolve(line, np.ones(5), "same") > 0          # grown by two channels each side
    return inner & ~line


def cont_dat_text(entries: list) -> str:
    """ALMA cont.dat: per field and spw, frequency ranges in GHz with the frame."""
    out = []
    for field in dict.fromkeys(e["field"] for e in entries):
        out.append(f"Field: {field}\n")
        for e in (e for e in entries if e["field"] == field):
            out.append(f"\nSpectralWindow: {e['spw']}\n")
            for lo, hi in e["ranges_ghz"]:
                out.append(f"{lo:.6f}~{hi:.6f}GHz {e['frame']}\n")
        out.append("\n")
    return "".join(out)


def parse_cont_dat(text: str) -> dict:
    """{(field, spw): [(lo_ghz, hi_ghz), ...]} from an ALMA cont.dat."""
    out, field, spw = {}, None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Field:"):
            field = line.split(":", 1)[1].strip()
        elif line.startswith("SpectralWindow:"):
            spw = int(line.split(":", 1)[1].split()[0])
            out[(field, spw)] = []
        elif "~" in line and field is not None and spw is not None:
            rng = line.split()[0].replace("GHz", "")
            lo, hi = (float(x) for x in rng.split("~"))
            out[(field, spw)].append((min(lo, hi), max(lo, hi)))
    return out


def _frame_geometry(ctx: dict, spw: int, fid: int) -> tuple:
    """(frame of the spw's data, field ra, dec, observatory ITRF): what a frame
    conversion needs."""
    obs = ctx["observation"]
    fld = next(f for f in obs["fields"] if f["id"] == fid)
    site = np.mean([a["position"] for a in obs["antennas"] if a.get("has_data", True)], axis=0)
    return spw_info(ctx, spw)["frame"], fld["ra_rad"], fld["dec_rad"], site


def lsrk_labels(ctx: dict, spw: int, fid: int, times: np.ndarray) -> tuple[float, str]:
    """(f_LSRK / f_data, frame) for relabelling a spw's channels of field fid in LSRK,
    as cubes and cont.dat are written (data already in LSRK: (1, 'LSRK'))."""
    frame, ra, dec, site = _frame_geometry(ctx, spw, fid)
    factor = lsrk_factor(frame, float(np.mean(times)), ra, dec, site) if len(times) else 1.0
    return factor, ("LSRK" if frame in ("TOPO", "LSRK") else frame)


def onto_lsrk_grid(ctx: dict, spw: int, fid: int, vis: msio.Vis, min_shift: float = 0.02) -> float:
    """Move every row of a cube's TOPO data onto the LSRK channel grid its axis is
    labelled with (lsrk_labels: the shift at the mean time), in place, so that a line
    stays in its channels while the Earth turns. Returns the largest move in
    channels; below min_shift channels (TDM channels, short blocks) nothing is moved."""
    frame, ra, dec, site = _frame_geometry(ctx, spw, fid)
    if frame.upper() != "TOPO" or not len(vis.time) or \
            max_drift_channels(vis.freq, float(np.ptp(vis.time))) < min_shift:
        return 0.0
    shift = channel_shifts(vis.freq, lsrk_factors(frame, vis.time, ra, dec, site),
                           lsrk_labels(ctx, spw, fid, vis.time)[0])
    largest = float(np.abs(shift).max())
    if largest >= min_shift:
        vis.data, vis.flag = shift_spectra(vis.data, vis.flag, shift)
    return largest


def _ranges_ghz(freq: np.ndarray, mask: np.ndarray) -> list:
    idx = np.flatnonzero(mask)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if len(idx) else []
    return [(float(freq[r].min() / 1e9), float(freq[r].max() / 1e9)) for r in runs]


def continuum_channels(ctx: dict, params: dict, user: dict, vis: msio.Vis, spw: int, fids: list) -> tuple:
    """The continuum channels of one target (its fields fids; several: a mosaic) in one
    spw, and where they come from: a user's cont.dat (read in LSRK), the recipe's
    fitspw, or findcont. Returns (mask, frame, channel frequencies in the frame, origin)."""
    nchan = len(vis.freq)
    # cont.dat is in LSRK, the data may be TOPO (ALMA's are)
    factor, frame = lsrk_labels(ctx, spw, fids[0], vis.time)
    freq = vis.freq * factor
    key = (field_name(ctx, fids[0]), spw)
    if key in user:
        mask = np.zeros(nchan, bool)
        for lo, hi in user[key]:
            mask |= (freq / 1e9 >= lo - 1e-9) & (freq / 1e9 <= hi + 1e-9)
        return mask, frame, freq, "user cont.dat"
    if params.get("fitspw"):
        return parse_channels(params["fitspw"], nchan), frame, freq, "recipe fitspw"
    return find_continuum(vis), frame, freq, "findcont"


@stage("uvcontsub", service="imager")
def uvcontsub(ctx: dict, params: dict, io: StageIO) -> QA:
    """Fit and subtract the continuum per baseline and time over the line-free channels
    of each target (its own ranges per spw, as cont.dat lists them per field)."""
    qa = QA()
    if not ctx.get("target_partitions"):
        raise StageError("uvcontsub: no target MS; run split first")
    user = parse_cont_dat(ctx["user"]["cont_dat"]) if ctx["user"].get("cont_dat") else {}
    order = params.get("fitorder", 0)
    entries, out = [], []
    # the EBs of an MOUS together: one set of continuum ranges per target and spw, found
    # in all their data, and subtracted from each EB's own partition
    for group in spw_groups(ctx["target_partitions"]):
        members = [read_member(io, part) for part in group]
        vis = msio.concat_vis([v for _, v in members]) if len(members) > 1 else members[0][1]
        spw = group[0]["spw"]
        cont_chans, masks = {}, {}
        for fids in target_groups(ctx):
            rows = np.isin(vis.field_id, fids)
            if not rows.any():
                continue
            name = field_name(ctx, fids[0])
            target = vis if rows.all() else vis.select(rows)
            mask, frame, freq, origin = continuum_channels(ctx, params, user, target, spw, fids)
            if mask.sum() < order + 2:
                raise StageError(f"uvcontsub: only {mask.sum()} continuum channels for {name} in spw {spw}")
            masks[name] = (fids, mask)
            chans = format_channels(mask)
            cont_chans[name] = chans
            entries.append({"field": name, "spw": spw, "frame": frame, "ranges_ghz": _ranges_ghz(freq, mask),
                            "channels": chans, "origin": origin})
            qa.note(f"{name} spw {spw}: continuum channels {chans} ({origin}), fit order {order}"
                    + (f", from {len(group)} EBs." if len(group) > 1 else "."))
            _plot_spectrum(io, target, mask, spw, name)
        for part, (ms, mvis) in zip(group, members):
            for fids, mask in masks.values():
                rows = np.isin(mvis.field_id, fids)
                if rows.any():
                    mvis.data[rows], _ = subtract_continuum(mvis.data[rows], mvis.flag[rows], mask, order)
            msio.write_column(ms, mvis.rows, "DATA", mvis.data)
            name = part["name"].replace(".ms", ".contsub.ms")
            if "eb" in part:
                name = f"{part['ms_name']}.{name}" if not name.startswith(part["ms_name"]) else name
            dest = os.path.join(io.workdir, name)
            os.rename(ms, dest)
            entry = io.put_dir(dest, name)
            out.append(dict(part, key=entry["key"], sha256=entry["sha256"], name=name, cont_chans=cont_chans))
    text = cont_dat_text(entries)
    ctx["cont_dat_key"] = io.put_bytes(text.encode(), "cont.dat", "text/plain")["key"]
    ctx["continuum"] = entries
    ctx["contsub_partitions"] = out
    return qa


def _plot_spectrum(io, vis, mask, spw, field):
    w = np.where(vis.flag, 0, vis.weight[:, None, :])
    spec = np.abs((w * vis.data).sum(axis=(0, 2)) / np.maximum(w.sum(axis=(0, 2)), 1e-30))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ch = np.arange(len(spec))
    ax.plot(ch, spec, "k-", lw=1)
    ax.fill_between(ch, 0, spec.max() * 1.05, where=mask, color="tab:green", alpha=0.2, label="continuum")
    ax.set_xlabel("channel")
    ax.set_ylabel("|vector average| (Jy)")
    ax.set_title(f"{field}: spectrum and continuum ranges, spw {spw}")
    ax.legend()
    io.plot(fig, f"findcont_{field.replace(' ', '_')}_spw{spw}.png")


# ------------------------------------------------------------------ makeimages

def image_heuristics(vis: msio.Vis, dish_m: float, telescope: str, chans: np.ndarray,
                     extent_rad: float = 0.0) -> tuple[float, int]:
    """(cell arcsec, npix): 5 pixels across the beam, image covering the primary
    beam down to 0.2 of its peak, rounded up to a fast FFT size (hif_makeimlist).
    A mosaic's image covers every pointing's beam to 0.2: extent_rad is its
    pointings' largest distance from the image centre."""
    cross = (vis.ant1 != vis.ant2) & ~vis.flag[:, chans].all(axis=(1, 2))
    fmax = vis.freq[chans].max()
    uvmax = np.percentile(np.hypot(vis.uvw[cross, 0], vis.uvw[cross, 1]), 95) * fmax / 299792458.0
    beam_arcsec = np.degrees(1.0 / max(uvmax, 1e-9)) * 3600 * 1.0
    cell = float(np.round(beam_arcsec / 5.0, 3 if beam_arcsec < 1 else 2))
    fwhm = pb_fwhm(vis.freq[chans].min(), dish_m, telescope)
    radius = fwhm * np.sqrt(np.log(5.0) / (4 * np.log(2)))   # where a Gaussian beam falls to 0.2
    npix = gridding.good_size(int(np.ceil(2 * np.degrees(radius + extent_rad) * 3600 / cell)))
    return cell, npix


def dr_correction(theoretical_rms: float, dirty_peak: float, calibrator: bool, dish_m: float,
                  tlimit: float = 2.0) -> tuple[float, float]:
    """The cleaning threshold from the theoretical noise, raised for dynamic range
    as the ALMA pipeline does (hif_makeimages' DR heuristic). Returns (threshold in
    Jy/beam, correction factor).

    The dirty dynamic range is dirty peak / theoretical rms. Targets (12 m): up to
    20 the threshold is tlimit x rms; above, x1.5 (20-50), x2 (50-100), x2.5 (100-150);
    beyond 150 at least the dirty peak / 150 (times tlimit). For 7 m dishes the steps
    are 4, 10, 20 and the limit 30. Calibrators are dynamic-range limited: at least
    dirty peak / 1000 (200 for 7 m), times tlimit."""
    base = tlimit * theoretical_rms
    if base <= 0:
        return 0.0, 1.0
    dr = dirty_peak / theoretical_rms
    aca = dish_m < 10.0
    if calibrator:
        new = max(base, dirty_peak / (200.0 if aca else 1000.0) * tlimit)
    else:
        steps, max_edr = ((4.0, 10.0, 20.0), 30.0) if aca else ((20.0, 50.0, 100.0), 150.0)
        if dr > max_edr:
            new = max(2.5 * base, dirty_peak / max_edr * tlimit)
        else:
            new = base * (1.0 if dr <= steps[0] else 1.5 if dr <= steps[1] else 2.0 if dr <= steps[2] else 2.5)
    return new, new / base


def _stats(res, spec: ImageSpec, cont_mask: np.ndarray | None, specmode: str,
           peak_ok: np.ndarray | None = None) -> dict:
    """Peak and rms of an image inside its pb limit: the peak from the planes peak_ok
    allows (a cube's: ImageJob.peak_planes), the rms from a cube's line-free planes
    among those (else the residual)."""
    inside = res.mask
    ok = np.ones(len(res.image), bool) if peak_ok is None or len(peak_ok) != len(res.image) else peak_ok
    if specmode == "cube" and cont_mask is not None and (cont_mask & ok).any():
        noise_planes = res.image[cont_mask & ok]
    else:
        noise_planes = res.residual
    rms = robust_rms(noise_planes[:, inside])
    if not inside.any():
        return {"rms": rms, "peak": 0.0, "peak_plane": 0}
    per_plane = np.where(ok, np.nanmax(np.where(inside[None], res.image, -np.inf), axis=(1, 2)), -np.inf)
    plane = int(np.argmax(per_plane))
    return {"rms": rms, "peak": float(per_plane[plane]), "peak_plane": plane}


def _theoretical_rms(vis: msio.Vis, spec: ImageSpec, chans: np.ndarray | None, mfs: bool) -> float | None:
    """Image noise predicted from the visibility scatter and the imaging weights:
    sigma_vis * sqrt(sum w_im^2 / w_nat) / sum w_im, for one plane: a cube's (the
    first of the given channels, with its own Briggs weights) or an mfs image's (all
    of them). The scatter comes from differences of adjacent channels, which
    neither continuum nor a smooth line contributes to."""
    if chans is None or chans.sum() < 2:
        return None
    idx = np.flatnonzero(chans)
    cross = vis.ant1 != vis.ant2
    d = vis.data[cross][:, idx]
    ok = ~vis.flag[cross][:, idx]
    pair = ok[:, 1:] & ok[:, :-1] & (np.diff(idx) == 1)[None, :, None]
    w = np.broadcast_to(np.sqrt(vis.weight[cross])[:, None, :], pair.shape)
    diff = ((d[:, 1:] - d[:, :-1]).real * w)[pair]
    if diff.size < 10:
        return None
    sigma_unit = 1.4826 * np.median(np.abs(diff)) / np.sqrt(2)         # real part, weight 1
    plane = idx if mfs else idx[:1]
    si = stokes_i(vis, plane)
    uvw, wnat = si.uvw, si.weight
    wim = gridding.briggs_weights(uvw, vis.freq[plane], wnat, spec.npix, np.radians(spec.cell_arcsec / 3600),
                                  spec.robust)
    sel = wnat > 0
    if not sel.any():
        return None
    # var(V_i) = sigma_unit^2 / w_i (natural weights are inverse variances up to a scale)
    return float(sigma_unit * np.sqrt((wim[sel] ** 2 / wnat[sel]).sum()) / wim[sel].sum())


def ous_name(ctx: dict) -> str:
    """The OUS id products are named by, as the ALMA pipeline writes it ('uid://A001/X1/X2'
    -> 'uid___A001_X1_X2'): the run's MOUS id (a parameter, or the trigger's), else the
    MS's name."""
    raw = ctx.get("mous_id") or ctx.get("user", {}).get("mous_id") or ctx.get("ms_name") or "oussid"
    return str(raw).replace(":", "_").replace("/", "_")


def product_name(ous: str, stage_no: int, field: str, intents: list, spw, mode: str) -> str:
    """ALMA's image product name without its extension:
    <ous>.s<stage>_0.<field>_<intent>.spw<N>.<mode>.I, mode 'mfs' (a calibrator, or a
    target's continuum in one spw), 'cont' (the aggregate continuum of several spws,
    spw '5_7') or 'cube'."""
    intent = next((INTENT_SUFFIX[i] for i in INTENT_SUFFIX if i in intents), "sci")
    safe = field.replace(" ", "_")
    return f"{ous}.s{stage_no}_0.{safe}_{intent}.spw{spw}.{mode}.I"


def _product_name(ctx: dict, io: StageIO, field: str, intents: list, spw, specmode: str, aggregate: bool) -> str:
    """product_name of an image of makeimages (stage numbers count from 1, as ALMA's do)."""
    mode = "cube" if specmode == "cube" else "cont" if aggregate else "mfs"
    return product_name(ous_name(ctx), io.stage_index + 1, field, intents, spw, mode)


def target_groups(ctx: dict) -> list:
    """The targets to image, each a list of field ids: TARGET fields grouped by name,
    so that a mosaic's pointings (which share their source's name) make one image."""
    groups = {}
    for fid in field_ids_with(ctx, "TARGET"):
        groups.setdefault(field_name(ctx, fid), []).append(fid)
    return list(groups.values())


def _image_jobs(ctx: dict, params: dict) -> list:
    """What makeimages images: (specmode, field ids, partition or [partitions] for the
    aggregate, column, imaging parameters), in order. Several field ids: a mosaic."""
    # every image of an MOUS combines its EBs: a spw's partitions from all EBs in one group
    partitions = [as_group(g) for g in spw_groups(ctx["partitions"])]
    targets = [as_group(g) for g in spw_groups(ctx.get("target_partitions", []))]
    contsub = [as_group(g) for g in spw_groups(ctx.get("contsub_partitions", []))]
    jobs = []
    if params.get("calibrators", True):
        for fid in calibrator_ids(ctx):
            for part in partitions:
                jobs.append(("mfs", [fid], part, "CORRECTED_DATA", params.get("calibrator", {})))
    chans_of = {(e["field"], e["spw"]): e["channels"] for e in ctx.get("continuum", [])}
    if params.get("target_cont", False) and targets and ctx.get("continuum"):
        # specmode 'cont': the target's continuum from its line-free channels (cont.dat)
        for fids in target_groups(ctx):
            for part in targets:
                chans = chans_of.get((field_name(ctx, fids[0]), part["spw"]), "")
                jobs.append(("cont", fids, part, "DATA", dict(params.get("cont", {}), chans=chans)))
    if params.get("target_aggregate", False) and targets and ctx.get("continuum"):
        # the aggregate continuum: the line-free channels of every spw in one mfs image
        if len(targets) > 1:
            for fids in target_groups(ctx):
                parts = [dict(p, chans=chans_of.get((field_name(ctx, fids[0]), p["spw"]), "")) for p in targets]
                jobs.append(("cont", fids, parts, "DATA", dict(params.get("cont", {}), aggregate=True)))
    if params.get("target_cube", True) and contsub:
        for fids in target_groups(ctx):
            for part in contsub:
                jobs.append(("cube", fids, part, "DATA", params.get("cube", {})))
    return jobs


class ImageJob:
    """One image of makeimages: its data, parameters and heuristics, then its
    products. A cube may be cleaned in channel ranges on several workers
    (imagecube_chunk) and restored in one piece (joincube)."""

    def __init__(self, ctx: dict, io: StageIO, job: tuple, theoretical: dict):
        self.ctx, self.io = ctx, io
        self.specmode, self.fids, part, column, self.p = job
        self.fid = self.fids[0]          # a mosaic's first pointing names it
        obs = ctx["observation"]
        self.telescope = obs["telescope"]
        self.dish = float(np.median([a["diameter_m"] for a in obs["antennas"] if a["has_data"]]))
        self.field = next(f for f in obs["fields"] if f["id"] == self.fid)
        self.fctx = next(f for f in ctx["fields"] if f["id"] == self.fid)
        self.nterms_note = None         # why an image has fewer Taylor terms than its band calls for
        self.row_freq = None            # the aggregate's rows' own frequencies (aggregate_samples)
        if isinstance(part, list):      # aggregate: several spws in one single-channel Vis
            pieces = []
            for piece in part:
                v = read_group(io, piece, fields=self.fids, column=column)
                if len(v.time):
                    pieces.append((v, parse_channels(piece["chans"], len(v.freq)) if piece.get("chans")
                                   else np.ones(len(v.freq), bool)))
            # each row's own frequency: a multi-term image's Taylor weights need it
            self.vis, self.row_freq = aggregate_samples(pieces, int(self.p.get("width", 8))) if pieces \
                else (None, None)
            self.part = {"spw": "_".join(str(piece["spw"]) for piece in part), "frame_spw": part[0]["spw"]}
        else:
            self.vis = read_group(io, part, fields=self.fids, column=column)
            self.part = part
        self.theoretical = theoretical
        self.bands = []
        if isinstance(part, list):      # the aggregate's band: its spws' selected channels, edges included
            for v, m in (pc for pc in pieces if pc[1].any()):
                w = float(np.median(np.abs(np.diff(v.freq)))) if len(v.freq) > 1 else 0.0
                self.bands.append((float(v.freq[m].min() - w / 2), float(v.freq[m].max() + w / 2), w))
        self.dr_seen = {}
        self.lsrk_shift = 0.0           # the largest move of a cube's rows onto the LSRK grid, channels

    def label(self) -> str:
        return f"{self.field['name']} spw {self.part['spw']} ({self.specmode})"

    def prepare(self) -> str | None:
        """Heuristics, theoretical noise and threshold; a reason when there is nothing to image."""
        vis, p = self.vis, self.p
        if vis is None or not len(vis.time):
            return "no data"
        nchan = len(vis.freq)
        self.chans = parse_channels(p["chans"], nchan) if p.get("chans") else np.ones(nchan, bool)
        if vis.flag[:, self.chans].all():
            return "all data flagged"
        mosaic = self.mosaic() if len(self.fids) > 1 else None
        cell, npix = image_heuristics(vis, self.dish, self.telescope, self.chans,
                                      mosaic.extent_rad() if mosaic else 0.0)
        npix, max_imsize = int(p.get("imsize", npix)), int(p.get("max_imsize", MAX_IMSIZE))
        if npix > max_imsize:
            # a wide mosaic or long baselines: say so rather than run out of memory
            return (f"the image would be {npix} x {npix} pixels of {float(p.get('cell_arcsec', cell))}\" "
                    + (f"for a mosaic of {len(mosaic.pointings)} pointings " if mosaic else "")
                    + f"(max_imsize {max_imsize}); give imsize and cell_arcsec, or a larger max_imsize")
        self.spec = ImageSpec(
            field=self.field["name"], specmode="mfs" if self.specmode == "cont" else self.specmode,
            npix=npix, cell_arcsec=float(p.get("cell_arcsec", cell)),
            robust=p.get("robust", 0.5), niter=int(p.get("niter", 1000)), nsigma=float(p.get("nsigma", 3.0)),
            chans=self.chans, automask=bool(p.get("automask", False)),
            negative_threshold=float(p.get("negative_threshold", 15.0 if self.specmode == "cube" else 0.0)),
            # multiscale: scales of 0, 1 and 3 beams (the cell is a fifth of a beam)
            scales=p.get("scales") or ([0, 5, 15] if p.get("deconvolver") == "multiscale" else None),
            mosaic=mosaic, nterms=self.nterms(mosaic))
        if self.specmode == "cube":
            cont = self.part.get("cont_chans", {}).get(self.field["name"])
            self.theo = _theoretical_rms(vis, self.spec, parse_channels(cont, nchan) & self.chans if cont else None,
                                         mfs=False)
        elif p.get("aggregate"):
            # the spws' continuum images combine as independent measurements
            per_spw = [self.theoretical[(self.fid, int(s_))] for s_ in str(self.part["spw"]).split("_")
                       if self.theoretical.get((self.fid, int(s_)))]
            self.theo = float(np.sum(np.asarray(per_spw) ** -2.0) ** -0.5) if per_spw else None
        else:
            self.theo = _theoretical_rms(vis, self.spec, self.chans, mfs=True)
            self.theoretical[(self.fid, self.part["spw"])] = self.theo
        if self.theo and mosaic is not None:
            self.theo *= mosaic_noise_factor(self.spec.npix, np.radians(self.spec.cell_arcsec / 3600),
                                             float(vis.freq[self.chans].mean()), mosaic.dish_m, mosaic.telescope,
                                             [q.offset_lm for q in mosaic.pointings],
                                             [q.fraction for q in mosaic.pointings])
        # the threshold from the theoretical noise and the dirty dynamic range
        if self.theo and p.get("dr_threshold", True):
            is_cal = "TARGET" not in self.fctx["intents"] and "CHECK" not in self.fctx["intents"]

            def threshold(dirty_peak, theo=self.theo, seen=self.dr_seen):
                thr, factor = dr_correction(theo, dirty_peak, is_cal, self.dish, float(p.get("tlimit", 2.0)))
                if factor >= seen.get("factor", 0.0):
                    seen.update(factor=factor, threshold=thr, dirty_dynamic_range=dirty_peak / theo)
                return thr
            self.spec.threshold_from_dirty = threshold
        return None

    def mosaic(self):
        """The mosaic of this job's fields: where each pointing lies and its share of
        the (unflagged) weight."""
        vis, fields = self.vis, {f["id"]: f for f in self.ctx["observation"]["fields"]}
        w = np.where(vis.flag[:, self.chans], 0.0, vis.weight[:, None, :]).sum(axis=(1, 2))
        have = [f for f in self.fids if w[vis.field_id == f].sum() > 0]
        return make_mosaic([(f, fields[f]["ra_rad"], fields[f]["dec_rad"]) for f in have],
                           [w[vis.field_id == f].sum() for f in have], self.dish, self.telescope)

    def clean(self, chans: np.ndarray | None = None):
        """Clean all planes, or (a piece of a cube) the given channels only."""
        spec = self.spec if chans is None else dataclasses.replace(self.spec, chans=self.chans & chans)
        if self.specmode == "cube":
            # here, where the planes are made (a cube's join needs none of it), and after
            # prepare() took the theoretical noise from the data as observed: moving rows
            # between channels mixes neighbours
            self.lsrk_shift = onto_lsrk_grid(self.ctx, self.part["spw"], self.fid, self.vis)
        self.io.visibilities += self.vis.data.size
        if spec.nterms > 1:
            return clean_taylor(self.vis, spec, self.row_freq)
        return clean_planes(self.vis, spec)

    def nterms(self, mosaic) -> int:
        """Taylor terms of an mfs image: the ALMA pipeline's heuristic (2 when the band
        imaged is wider than 10 % of its centre, mtmfs.nterms_for) or the parameter
        nterms. Cubes have one; so have mosaics here (joint multi-term mosaics are not
        built: such an image is made with one term, and the QA says so)."""
        if self.specmode == "cube":
            return 1
        lo, hi, _ = self.band()
        n = nterms_for(lo, hi, self.p.get("nterms"))
        if n > 1 and mosaic is not None:
            self.io.log("%s: fractional bandwidth %.3f calls for nterms=%d, but a mosaic is imaged with one term",
                        self.label(), fractional_bandwidth(lo, hi), n)
            self.nterms_note = f"{self.label()}: a mosaic is imaged with nterms=1 (multi-term mosaics not built)."
            return 1
        return n

    def band(self) -> tuple:
        """(lowest, highest frequency, channel width) of the channels imaged, edges of the
        channels included, in the data's frame: an mfs image's centre and bandwidth."""
        if self.bands:                  # the aggregate: the spws' continuum channels together
            return min(b[0] for b in self.bands), max(b[1] for b in self.bands), self.bands[0][2]
        f = self.vis.freq
        width = float(np.median(np.diff(f))) if len(f) > 1 else \
            float(spw_info(self.ctx, self.part["spw"]).get("chan_width_hz", 0.0))
        sel = f[self.chans]
        return float(sel.min() - abs(width) / 2), float(sel.max() + abs(width) / 2), width

    def peak_planes(self) -> np.ndarray:
        """The planes a cube's peak may be reported from: not the spw's edge channels
        (EDGE_CHANNELS at each end, where the bandpass rolls off and the noise is
        highest) and not planes without unflagged data. All planes of an mfs image."""
        idx = np.flatnonzero(self.chans)
        if self.specmode != "cube":
            return np.ones(1, bool)
        nchan = len(self.vis.freq)
        cross = self.vis.ant1 != self.vis.ant2
        has_data = ~self.vis.flag[cross][:, idx].all(axis=(0, 2)) if cross.any() else np.zeros(len(idx), bool)
        inner = (idx >= EDGE_CHANNELS) & (idx < nchan - EDGE_CHANNELS)
        ok = has_data & inner
        return ok if ok.any() else has_data if has_data.any() else np.ones(len(idx), bool)

    def products(self, planes, qa: QA) -> dict:
        """Restore, write the FITS products, measure and score: the image's record."""
        ctx, io, spec, p, part, fid = self.ctx, self.io, self.spec, self.p, self.part, self.fid
        taylor = None
        if isinstance(planes, TaylorPlanes):
            res, taylor = restore_taylor_planes(planes, spec, self.dish, self.telescope)
        else:
            res = restore_planes(planes, spec, self.dish, self.telescope)
        if self.nterms_note:
            qa.note(self.nterms_note)
        nchan = len(self.vis.freq)
        base = _product_name(ctx, io, spec.field, self.fctx["intents"], part["spw"], self.specmode,
                             bool(p.get("aggregate", False)))
        cont_mask = None
        cont = part.get("cont_chans", {}).get(self.field["name"]) if self.specmode == "cube" else None
        if cont:
            cont_mask = parse_channels(cont, nchan)[self.chans]
        peak_ok = self.peak_planes()
        stats = _stats(res, spec, cont_mask, self.specmode, peak_ok)
        # images are labelled in LSRK, as the ALMA pipeline makes them
        factor, frame = lsrk_labels(ctx, part.get("frame_spw", part["spw"]), fid, self.vis.time)
        ra, dec = spec.mosaic.centre if spec.mosaic else (self.field["ra_rad"], self.field["dec_rad"])
        lo, hi, width = self.band()
        if self.specmode == "cube":     # the planes' frequencies; a one-plane cube's width is its channel's
            freqs, bandwidth = res.freqs * factor, width * factor
        else:                           # the centre and the width of the band taken, as tclean's mfs
            freqs, bandwidth = np.array([0.5 * (lo + hi) * factor]), (hi - lo) * factor
        # the line's rest frequency from the SOURCE table, else the centre of the band (tclean's default)
        restfreq = self.field.get("rest_freq_hz") or 0.5 * (lo + hi) * factor
        recipe = ctx.get("recipe", {})
        obs = obs_info(ctx["observation"], history=(
            f"almapipe {pipeline_version()}",
            f"recipe {recipe.get('name', 'custom')} version {recipe.get('version', 1)}",
            f"stage {io.stage_index + 1} makeimages" + (f" ({io.stage})" if io.stage != "makeimages" else "")
            + f": {self.label()}"))
        files = {}
        outputs = (("image", res.image, "Jy/beam"), ("pbcor", res.pbcor, "Jy/beam"),
                   ("pb", np.repeat(res.pb[None], len(res.freqs), 0), ""),
                   ("mask", res.clean_mask.astype(np.float32) if res.clean_mask is not None
                    else np.repeat(res.mask[None].astype(np.float32), len(res.freqs), 0), ""),
                   ("residual", res.residual, "Jy/beam"))
        if taylor is not None:
            outputs = _taylor_outputs(outputs, taylor)
        for suffix, planes_, unit in outputs:
            hdr = image_header(ra, dec, spec.npix, np.radians(spec.cell_arcsec / 3600), freqs, frame, unit,
                               res.beam, spec.field, self.telescope, restfreq=restfreq, bandwidth_hz=bandwidth,
                               obs=obs, obs_radec=(self.field["ra_rad"], self.field["dec_rad"]))
            path = os.path.join(io.workdir, f"{base}.{suffix}.fits")
            write_fits(path, planes_, hdr)
            files[suffix] = io.put_file(path)["key"]
        theo = self.theo
        pbcor_name = f"{base}.tt0.pbcor.fits" if taylor is not None else f"{base}.pbcor.fits"
        rec = {"file": pbcor_name, "files": files, "field": spec.field, "spw": part["spw"],
               "specmode": self.specmode, "intents": self.fctx["intents"], "imsize": spec.npix,
               "cell_arcsec": spec.cell_arcsec, "robust": spec.robust, "nchan": int(len(res.freqs)),
               "niter_done": res.iterations, "peak_jy_per_beam": stats["peak"], "rms_jy_per_beam": stats["rms"],
               "theoretical_rms_jy_per_beam": theo,
               "dynamic_range": stats["peak"] / stats["rms"] if stats["rms"] > 0 else None,
               "beam_arcsec": [round(res.beam[0], 3), round(res.beam[1], 3), round(res.beam[2], 2)],
               "stop_reasons": sorted(set(res.stop_reasons)),
               "thumbnail": _thumbnail(io, res, base, self.specmode, stats["peak_plane"]),
               "aggregate": bool(p.get("aggregate", False)),
               "pointings": len(spec.mosaic.pointings) if spec.mosaic else 1,
               "dr_correction": self.dr_seen.get("factor", 1.0), "threshold_jy": self.dr_seen.get("threshold"),
               "dirty_dynamic_range": self.dr_seen.get("dirty_dynamic_range"), "nterms": spec.nterms}
        if taylor is not None:
            rec.update(_taylor_record(taylor, planes.nu0 * factor))
            qa.note(f"{rec['file']}: nterms={spec.nterms} (fractional bandwidth {fractional_bandwidth(lo, hi):.3f}); "
                    + (f"alpha {rec['alpha']:.2f} +- {rec['alpha_error']:.2f} at the peak."
                       if rec.get("alpha") is not None else "no pixel bright enough for alpha."))
        if self.specmode == "cube":
            rec["lsrk_shift_channels"] = round(self.lsrk_shift, 3)
            if self.lsrk_shift >= 0.02:
                qa.note(f"{rec['file']}: rows moved onto the LSRK channel grid by up to {self.lsrk_shift:.2f} "
                        "channels.")
            rec["chans"] = p.get("chans", "")
            rec["peak_channel"] = int(np.flatnonzero(self.chans)[stats["peak_plane"]])
            rec["spectrum_png"] = _cube_spectrum(io, res, base, np.flatnonzero(self.chans), peak_ok)
        rec["qa_score"] = _image_qa(rec)
        if rec["qa_score"] < 0.9:
            qa.lower(rec["qa_score"], f"{rec['file']}: rms {stats['rms'] * 1e3:.2f} mJy/beam"
                     + (f" vs theoretical {theo * 1e3:.2f}" if theo else "") + ".")
        io.log("%s: peak %.4f Jy/beam, rms %.5f Jy/beam, beam %s", rec["file"], stats["peak"], stats["rms"],
               rec["beam_arcsec"])
        return rec


def _taylor_outputs(single: tuple, taylor) -> tuple:
    """The FITS products of a multi-term image, named as ALMA names them: the single-term
    products of tt0 with .tt0 (image as .tt0, .tt0.pbcor, .pb.tt0, .residual.tt0; the
    mask as it is), then .tt1, .residual.tt1, .alpha and .alpha.error."""
    names = {"image": "tt0", "pbcor": "tt0.pbcor", "pb": "pb.tt0", "mask": "mask", "residual": "residual.tt0"}
    out = [(names[s], planes, unit) for s, planes, unit in single]
    out += [("tt1", taylor.tt[1:2], "Jy/beam"), ("residual.tt1", taylor.residual[1:2], "Jy/beam"),
            ("alpha", taylor.alpha[None], ""), ("alpha.error", taylor.alpha_error[None], "")]
    return tuple(out)


def _taylor_record(taylor, reffreq_hz: float) -> dict:
    """What an image's record says of its Taylor terms: the reference frequency (in the
    images' frame), and alpha and its error at the tt0 peak of the pixels alpha is given at."""
    rec = {"reffreq_hz": float(reffreq_hz), "alpha_threshold_jy_per_beam": float(taylor.alpha_threshold),
           "alpha": None, "alpha_error": None}
    if np.isfinite(taylor.alpha).any():
        tt0 = np.where(np.isfinite(taylor.alpha), taylor.tt[0], -np.inf)
        y, x = np.unravel_index(np.argmax(tt0), tt0.shape)
        rec["alpha"], rec["alpha_error"] = float(taylor.alpha[y, x]), float(taylor.alpha_error[y, x])
    return rec


def chunk_masks(chans: np.ndarray, n: int) -> list:
    """n channel masks splitting the selected channels into contiguous, nearly equal ranges."""
    idx = np.flatnonzero(chans)
    out = []
    for part in np.array_split(idx, max(1, min(n, len(idx)))):
        m = np.zeros(len(chans), bool)
        m[part] = True
        out.append(m)
    return out


@stage("makeimages", service="imager")
def makeimages(ctx: dict, params: dict, io: StageIO) -> QA:
    """Per-spw mfs images of the calibrators, the target's continuum (per spw and
    aggregate) and its cubes (hif_makeimages). With cube_chunks > 1 each cube is
    cleaned in that many channel ranges by the imager workers in parallel
    (imagecube_chunk) and joined into one FITS cube (joincube)."""
    qa = QA()
    jobs = _image_jobs(ctx, params)
    if not jobs:
        raise StageError("makeimages: nothing to image (no calibrators, no continuum-subtracted target)")
    chunks = int(params.get("cube_chunks", 1))
    theoretical = {}          # (field, spw) -> theoretical rms of its mfs image, for the aggregate
    images, pieces = [], []
    for j, job in enumerate(jobs):
        if job[0] == "cube" and chunks > 1:
            pieces += [{"job": j, "chunk": k, "nchunks": chunks} for k in range(chunks)]
            continue
        im = ImageJob(ctx, io, job, theoretical)
        why = im.prepare()
        if why:
            if why != "no data":
                qa.lower(0.5, f"{im.label()}: {why}; not imaged.")
            continue
        images.append(im.products(im.clean(), qa))
    if pieces:
        ctx["fanout"] = {"piece_stage": "imagecube_chunk", "join_stage": "joincube", "items": pieces}
        qa.note(f"{len(pieces) // chunks} cube(s) cleaned in {chunks} channel ranges by the imager workers.")
    elif not images:
        raise StageError("makeimages: no image could be made: all data of the fields to image are flagged")
    ctx["images"] = images
    qa.note(f"Made {len(images)} image(s)" + (", cubes to follow." if pieces else "."))
    return qa


@stage("imagecube_chunk", service="imager")
def imagecube_chunk(ctx: dict, params: dict, io: StageIO) -> QA:
    """One channel range of one cube of makeimages: cleaned planes, not yet restored
    (the join restores the whole cube with its common beam)."""
    qa = QA()
    item = params["piece"]
    im = ImageJob(ctx, io, _image_jobs(ctx, params)[item["job"]], {})
    why = im.prepare()
    if why:
        ctx["piece"] = dict(item, skipped=why)
        return qa
    mask = chunk_masks(im.chans, item["nchunks"])[item["chunk"]]
    io.log("%s: cleaning channels %s", im.label(), format_channels(mask))
    planes = im.clean(mask)
    path = os.path.join(io.workdir, f"planes_{item['job']}_{item['chunk']}.npz")
    planes.save(path)
    ctx["piece"] = dict(item, key=io.put_file(path)["key"], dr=im.dr_seen, lsrk_shift=im.lsrk_shift)
    qa.note(f"{im.label()}: channels {format_channels(mask)} cleaned ({planes.iterations} components).")
    return qa


@stage("joincube", service="imager")
def joincube(ctx: dict, params: dict, io: StageIO) -> QA:
    """Join the channel ranges of each cube into one image and write its products."""
    qa = QA()
    pieces = [io.store.get_json(k)["piece"] for k in params["pieces"]]
    jobs = _image_jobs(ctx, params)
    for j in sorted({p["job"] for p in pieces}):
        mine = sorted((p for p in pieces if p["job"] == j and "key" in p), key=lambda p: p["chunk"])
        if not mine:
            continue
        im = ImageJob(ctx, io, jobs[j], {})
        if im.prepare():
            continue
        parts = []
        for p in mine:
            parts.append(Planes.load(io.fetch_file(p["key"])))
            dr = p.get("dr") or {}
            if dr.get("factor", 0) >= im.dr_seen.get("factor", 0):
                im.dr_seen.update(dr)
            im.lsrk_shift = max(im.lsrk_shift, p.get("lsrk_shift", 0.0))
        ctx["images"].append(im.products(join_planes(parts), qa))
    qa.note(f"Joined {len(pieces)} channel ranges into {len({p['job'] for p in pieces})} cube(s).")
    return qa


def _image_qa(rec: dict) -> float:
    """ALMA-style: for targets and check sources the ratio of measured rms to the
    theoretical rms times the dynamic-range correction decides the score; bright
    calibrators are limited by dynamic range, not noise, so their dynamic range does."""
    theo = rec.get("theoretical_rms_jy_per_beam")
    science = {"TARGET", "CHECK"} & set(rec.get("intents", []))
    if theo and science:
        # against the noise expected once dynamic range limits it, as the ALMA pipeline scores
        ratio = rec["rms_jy_per_beam"] / (theo * rec.get("dr_correction", 1.0))
        return float(np.clip(1.0 - max(ratio - 1.2, 0) * 0.5, 0.0, 1.0))
    dr = rec.get("dynamic_range") or 0
    return 1.0 if dr > 100 else 0.8 if dr > 20 else 0.5


def _thumbnail(io, res, base, specmode, peak_plane: int = 0) -> str:
    plane = res.image[0] if specmode == "mfs" else res.image[peak_plane]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(plane, origin="lower", cmap="inferno")
    ax.contour(res.pb, levels=[0.2, 0.5], colors="w", linewidths=0.5)
    fig.colorbar(im, ax=ax, label="Jy/beam")
    ax.set_title(base.split(".", 1)[1] + (" (peak channel)" if specmode == "cube" else ""), fontsize=7)
    ax.set_xlabel("x (RA decreasing)")
    ax.set_ylabel("y (Dec)")
    return io.plot(fig, f"{base}.png")["key"]


def _cube_spectrum(io, res, base, chan_numbers, peak_ok) -> str:
    fig, ax = plt.subplots(figsize=(7, 3))
    peak = np.nanmax(res.image, axis=(1, 2))
    ax.plot(chan_numbers, peak * 1e3, "k.-", ms=3)
    if not peak_ok.all():              # edge and flagged planes, which the peak is not taken from
        ax.plot(chan_numbers[~peak_ok], peak[~peak_ok] * 1e3, "x", color="tab:red", label="edge / flagged")
        ax.legend()
    ax.set_xlabel("channel")
    ax.set_ylabel("peak (mJy/beam)")
    ax.set_title("Peak flux density per channel")
    return io.plot(fig, f"{base}.spectrum.png")["key"]
