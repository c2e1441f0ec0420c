"""Imaging stages (imager service): split, uvcontsub (with findcont), makeimages."""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402

from .base import (QA, Param, Score, StageError, StageIO, channel_rho, field_ids_with, field_name,  # noqa: E402
                   metric, require_intent, spw_info, stage, with_defaults)
from .ebs import as_group, eb_field_ids, member_blocks, read_group, spw_groups, view_name  # noqa: E402
from ..heuristics.callibrary import calibrator_ids  # noqa: E402
from ..heuristics.imaging import (PIXELS_PER_BEAM, cube_nbin, dr_correction, image_geometry,  # noqa: E402
                                  mitigate_size, uv_geometry)
from ..heuristics.robust import robust_rms  # noqa: E402
from ..heuristics.spectral_response import channel_noise_note, noise_from_differences  # noqa: E402
from ..imaging import gridding  # noqa: E402
from ..imaging.clean_kernels import threadsafe_layer  # noqa: E402
from ..imaging.findcont import CubeGeometry, continuum_from_spectra  # noqa: E402
from ..imaging.frames import channel_shifts, lsrk_factor, lsrk_factors, max_drift_channels  # noqa: E402
from ..imaging.imager import (ImageSpec, TaylorPlanes, aggregate_samples, clean_planes, clean_taylor,  # noqa: E402
                              cube_array, cube_planes, join_plane_files, per_plane, restore_planes,
                              restore_taylor_planes, restoring_beam, stokes_i)
from ..imaging.mtmfs import fractional_bandwidth, nterms_for  # noqa: E402
from ..imaging.kernels import shift_spectra  # noqa: E402
from ..imaging.mosaic import make_mosaic  # noqa: E402
from ..imaging.samples import (MedianSketch, WidthBinned, clean_mfs, read_aggregate_samples,  # noqa: E402
                                channel_bins, read_binned_stokes_i, read_mosaic_aggregate, reference_frequency,
                                uv_distances)
from ..imaging.products import (fits_header_bytes, fits_padding, image_header, mosaic_noise_factor,  # noqa: E402
                                obs_info, pipeline_version, plane_chunks, write_fits)
from ..imaging.kernels import channels_with_data, fit_continuum_rows, rows_with_data  # noqa: E402
from ..platform.visstore import CALIBRATION_GAIN, CALIBRATION_PAIR, has_corrected  # noqa: E402
from ..imaging.uvcontsub import format_channels, parse_channels  # noqa: E402
from ..msio import ms as msio  # noqa: E402
from ..platform import visstore as vst  # noqa: E402
from ..platform.store import Range, Repeat, Stream  # noqa: E402

# the largest image makeimages makes from its heuristics (per image kind: max_imsize)
MAX_IMSIZE = 4096
# the largest cube (pixels x channels x 4 bytes) makeimages makes from its heuristics
# (decision 19): its join holds the cube's models, residuals, PSFs, image and
# pb-corrected image in files (imager.cube_array) and writes 7 FITS products, so a cube
# of C bytes takes about 14 C of the worker's disk and 7 C of S3; ALMA's pipeline allows
# 40 GB (maxcubesize) on its cluster's nodes
MAX_CUBE_GB = 2.0
# channels at each end of a spw that a cube's reported peak never comes from (the
# bandpass rolls off there; an unflagged edge channel is the noisiest of the cube)
EDGE_CHANNELS = 1
# a streamed mfs image bins channels no wider than this fraction of 1 / npix of their
# frequency: at 1 / npix the smearing stays within half a pixel at the image's edge, but
# the Briggs weights (densities of the binned samples on the uv grid) moved the beam by
# up to 2.7 % on a 1024-channel spw; a quarter of it keeps them with the channels'
MFS_BIN_FRAC = 0.25
# The most a cube's piece should hold of its target visibilities (rows x its channels x
# correlations: complex64, with their flags and weights), for makeimages' automatic
# cube_chunks: a piece reads its channels of every row of its fields in one Vis, and its
# clean makes copies about as large again (the Stokes I samples and their weights, the
# rows moved onto the LSRK grid), so an imager worker at 1 GiB of visibilities stays
# within issue 10's 4 GB whatever the EB's size. ALMAPIPE_CUBE_PIECE_MB overrides it (a
# worker with more or less memory); a cube under it is cleaned in one piece.
CUBE_PIECE_MB = 1024
# the intent part of ALMA's product names (<field>_<intent>), by priority
INTENT_SUFFIX = {"TARGET": "sci", "BANDPASS": "bp", "FLUX": "flux", "PHASE": "ph", "CHECK": "ch"}


# ------------------------------------------------------------------ split

@stage("split", service="imager", topic="Line finding and imaging", reads=("fields", "partitions"),
       writes=("target_partitions",))
def split(ctx: dict, params: dict, io: StageIO) -> QA:
    """The target fields' calibrated data as partitions of their own (DATA = CORRECTED_DATA).

    A target partition is a *view* (decision 0015): the same arrays in the store, its
    rows those of the target fields (``field_ids``) and its VISIBILITY the calibrated
    version, so nothing is copied; what a later stage writes through it (uvcontsub,
    fluxconsistency) becomes versions of its own under the view's name."""
    qa = QA()
    targets = require_intent(ctx, "TARGET", "split")
    if not all(p.get("calibrated") for p in ctx["partitions"]):
        raise StageError("split: the partitions have no CORRECTED_DATA; run applycal first")
    out = []
    for part in ctx["partitions"]:
        arrays = dict(part["arrays"])
        if not has_corrected(part):
            raise StageError(f"split: {part['name']} has no CORRECTED_DATA in the store; run applycal first")
        view = {k: v for k, v in part.items() if k not in ("calibrated", "field_ids", "calibrated_column")}
        # as CASA's split(datacolumn='corrected'): the corrected data become DATA, and the
        # view has neither CORRECTED_DATA nor MODEL_DATA
        if "VISIBILITY_CORRECTED" in arrays:
            arrays["VISIBILITY"] = arrays.pop("VISIBILITY_CORRECTED")
            arrays.pop(CALIBRATION_GAIN, None), arrays.pop(CALIBRATION_PAIR, None)
        else:
            view["calibrated_column"] = "DATA"      # corrected on reading (decision 0021)
        arrays.pop("VISIBILITY_MODEL", None)
        view.update(arrays=arrays, field_ids=sorted(int(f) for f in (eb_field_ids(part, targets) or [])),
                    name=view_name(part, "target"))
        rows = io.vis(view).select()
        if not len(rows):
            raise StageError(f"split: no rows of the target fields in spw {part['spw']}")
        view["nrows"] = int(len(rows))
        io.count_visibilities(int(len(rows)) * part["nchan"] * part["ncorr"])
        out.append(view)
    ctx["target_partitions"] = out
    qa.note(f"Split {', '.join(field_name(ctx, f) for f in targets)} into {len(out)} partition(s) "
            "(views of the calibrated data in the store: nothing copied).")
    return qa


# ------------------------------------------------------------------ findcont + uvcontsub

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


def lsrk_margin(ctx: dict, spw: int, fid: int, freq: np.ndarray, times: np.ndarray, min_shift: float = 0.02) -> int:
    """Channels a cube's piece reads beyond its channel range on each side, so that
    moving its rows onto the LSRK grid (onto_lsrk_grid, at most the drift over the
    data's time span) finds its channels' neighbours: 0 when nothing is moved."""
    frame = _frame_geometry(ctx, spw, fid)[0]
    drift = max_drift_channels(freq, float(np.ptp(times))) if len(times) else 0.0
    if frame.upper() != "TOPO" or drift < min_shift:
        return 0
    return int(np.ceil(drift)) + 1


def lsrk_labels(ctx: dict, spw: int, fid: int, times: np.ndarray) -> tuple[float, str]:
    """(f_LSRK / f_data, frame) for relabelling a spw's channels of field fid in LSRK,
    as cubes and cont.dat are written (data already in LSRK: (1, 'LSRK'))."""
    frame, ra, dec, site = _frame_geometry(ctx, spw, fid)
    factor = lsrk_factor(frame, float(np.mean(times)), ra, dec, site) if len(times) else 1.0
    return factor, ("LSRK" if frame in ("TOPO", "LSRK") else frame)


def onto_lsrk_grid(ctx: dict, spw: int, fid: int, vis: msio.Vis, min_shift: float = 0.02,
                   spw_freq: np.ndarray | None = None) -> float:
    """Move every row of a cube's TOPO data onto the LSRK channel grid its axis is
    labelled with (lsrk_labels: the shift at the mean time), in place, so that a line
    stays in its channels while the Earth turns. Returns the largest move in
    channels; below min_shift channels (TDM channels, short blocks) nothing is moved.
    spw_freq: the whole spw's channels, when vis holds a channel range of it (a cube's
    piece): the shift is the whole spw's, so that the pieces move alike."""
    frame, ra, dec, site = _frame_geometry(ctx, spw, fid)
    freq = vis.freq if spw_freq is None else spw_freq
    if frame.upper() != "TOPO" or not len(vis.time) or \
            max_drift_channels(freq, float(np.ptp(vis.time))) < min_shift:
        return 0.0
    shift = channel_shifts(freq, lsrk_factors(frame, vis.time, ra, dec, site),
                           lsrk_labels(ctx, spw, fid, vis.time)[0])
    largest = float(np.abs(shift).max())
    if largest >= min_shift:
        vis.data, vis.flag = shift_spectra(vis.data, vis.flag, shift)
    return largest


def _ranges_ghz(freq: np.ndarray, mask: np.ndarray) -> list:
    idx = np.flatnonzero(mask)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if len(idx) else []
    return [(float(freq[r].min() / 1e9), float(freq[r].max() / 1e9)) for r in runs]


def continuum_channels(ctx: dict, params: dict, user: dict, freq: np.ndarray, times: np.ndarray, spw: int,
                       fids: list, findcont) -> tuple:
    """The continuum channels of one target (its fields fids; several: a mosaic) in one
    spw, and where they come from: a user's cont.dat (read in LSRK), the recipe's
    fitspw, or findcont() (the line-free channels of its coarse dirty cube). Returns
    (mask, frame, channel frequencies in the frame, origin)."""
    nchan = len(freq)
    # cont.dat is in LSRK, the data may be TOPO (ALMA's are)
    factor, frame = lsrk_labels(ctx, spw, fids[0], times)
    freq = freq * factor
    key = (field_name(ctx, fids[0]), spw)
    if key in user:
        mask = np.zeros(nchan, bool)
        for lo, hi in user[key]:
            mask |= (freq / 1e9 >= lo - 1e-9) & (freq / 1e9 <= hi + 1e-9)
        return mask, frame, freq, "user cont.dat"
    if params["fitspw"]:
        return parse_channels(params["fitspw"], nchan), frame, freq, "recipe fitspw"
    return findcont(), frame, freq, "findcont"


def uvcontsub_tables(ctx: dict) -> list:
    """The continuum ranges of each target and spw, as cont.dat has them."""
    if not ctx.get("continuum"):
        return []
    return [{"title": "Continuum ranges (cont.dat)", "evidence": "table-continuum",
             "header": ["Field", "spw", "Channels", "Ranges (GHz)", "Frame", "From"],
             "rows": [[e["field"], e["spw"], e["channels"],
                       "; ".join(f"{a:.6f}~{b:.6f}" for a, b in e["ranges_ghz"]), e.get("frame", ""), e["origin"]]
                      for e in ctx["continuum"]]}]


@metric("uvcontsub.continuum_fraction", "the channels the continuum is fitted on, as a fraction of the spw, per "
        "target and spw: 0.6 below `min_fraction` (the fit, extrapolated under the lines, is uncertain)",
        unit="fraction")
def continuum_fraction(name: str, spw: int, n_cont: int, nchan: int, min_fraction: float) -> Score | None:
    if n_cont < min_fraction * nchan:
        return Score(0.6, f"{name} spw {spw}: the continuum is fitted on {n_cont} of {nchan} channels "
                          f"({n_cont / max(nchan, 1):.0%}, under {min_fraction:.0%}): the subtraction is uncertain.",
                     evidence="table-continuum")
    return None


@stage("uvcontsub", service="imager", topic="Line finding and imaging", tables=uvcontsub_tables,
       qa=(continuum_fraction,),
       reads=("user", "fields", "observation", "target_partitions"),
       writes=("continuum", "contsub_partitions", "cont_dat_key"), params=(
           Param("fitspw", str, "", "continuum channels, CASA syntax (0:4~6;50~59); empty: cont.dat, else findcont"),
           Param("fitorder", int, 0, "polynomial order of the continuum fit", min=0, max=3),
           Param("min_fraction", float, 0.1, "fewer continuum channels than this fraction of the spw lower the "
                 "score", min=0.0, max=1.0)))
def uvcontsub(ctx: dict, params: dict, io: StageIO) -> QA:
    """Fit and subtract the continuum per baseline and time over the line-free channels
    of each target (its own ranges per spw, as cont.dat lists them per field). The
    result is ctx["contsub_partitions"]: the target views with a continuum fit (only
    CONTINUUM_FIT is written, a few coefficients a row), whose DATA the store reads as
    the target's minus the fitted polynomial."""
    qa = QA()
    if not ctx.get("target_partitions"):
        raise StageError("uvcontsub: no target partition; run split first")
    user = parse_cont_dat(ctx["user"]["cont_dat"]) if ctx["user"].get("cont_dat") else {}
    order = params["fitorder"]
    # the EBs of an MOUS together: one set of continuum ranges per target and spw, found
    # in all their data, and subtracted from each EB's own partition. Everything is read
    # in row blocks (bounded memory): the row indices first, then, when findcont is
    # needed, the flags and uvw for its cube's geometry and the data for its cube, then
    # the data again to subtract the continuum and write them. Two spws at a time, each
    # kernel on one thread: a spw's passes alone kept the 2-core machine 1.35 cores busy

    def one_spw(group):
        """The spw's continuum ranges and fit: (its cont.dat entries, its views, what its
        QA says in order, its spectra to plot)."""
        entries, out, said, plots = [], [], [], []
        # the continuum fit is an array of the new view's own, under its name (its other
        # arrays stay the target's)
        members = [(part, io.vis(dict(part, name=view_name(part, "contsub")))) for part in group]
        spw = group[0]["spw"]
        freq = _common_channels(members, spw)
        targets = []                         # (name, field ids, times) of the targets with rows here
        for fids in target_groups(ctx):
            times = np.concatenate([vp.index("TIME")[vp.select(eb_field_ids(part, fids))] for part, vp in members])
            if len(times):
                targets.append((field_name(ctx, fids[0]), fids, times))
        cubes = _findcont_cubes(io, members, freq, [fids for name, fids, _ in targets
                                                     if (name, spw) not in user and not params["fitspw"]])
        cont_chans, masks = {}, {}
        for name, fids, times in targets:
            mask, frame, cfreq, origin = continuum_channels(
                ctx, params, user, freq, times, spw, fids,
                lambda fids=fids: continuum_from_spectra([cubes[f].spectrum() for f in fids if f in cubes]))
            if mask.sum() < order + 2:
                raise StageError(f"uvcontsub: only {mask.sum()} continuum channels for {name} in spw {spw}")
            said.append(continuum_fraction(name, spw, int(mask.sum()), len(mask), params["min_fraction"]))
            masks[name] = (fids, mask)
            chans = format_channels(mask)
            cont_chans[name] = chans
            entries.append({"field": name, "spw": spw, "frame": frame, "ranges_ghz": _ranges_ghz(cfreq, mask),
                            "channels": chans, "origin": origin})
            said.append(f"{name} spw {spw}: continuum channels {chans} ({origin}), fit order {order}"
                        + (f", from {len(group)} EBs." if len(group) > 1 else "."))
        # the spectrum each target's plot shows: the weighted vector average of its data
        spectra = {name: [np.zeros(len(freq), complex), np.zeros(len(freq))] for name in masks}
        for part, vp in members:
            for blk in member_blocks(io, vp, part):
                data = np.ascontiguousarray(blk.data, dtype=np.complex64)
                flag, weight = np.ascontiguousarray(blk.flag), np.ascontiguousarray(blk.weight, dtype=np.float32)
                fit = np.zeros((len(blk.rows), vst.FIT_TERMS, data.shape[2]), np.complex64)
                for name, (fids, mask) in masks.items():
                    rows = np.isin(blk.field_id, fids)
                    if rows.any():          # the spectrum summed and the continuum fitted in one pass
                        fit_continuum_rows(data, flag, weight, rows, mask, order, fit, *spectra[name])
                # the view's DATA are read as its VISIBILITY minus this fit (visstore)
                vp.write(vst.CONTINUUM_FIT, blk.rows, fit)
            out.append(dict(vp.commit(), cont_chans=cont_chans))
        for name, (vsum, wsum) in spectra.items():
            plots.append((np.abs(vsum / np.maximum(wsum, 1e-30)), masks[name][1], spw, name))
        return entries, out, said, plots

    entries, out = [], []
    spws = gridding.side_by_side(one_spw, spw_groups(ctx["target_partitions"]), at_most=2)
    for spw_entries, spw_out, said, plots in spws:
        entries += spw_entries
        out += spw_out
        for item in said:
            qa.note(item) if isinstance(item, str) else qa.add(item)
        for spec, mask, spw, name in plots:
            _plot_spectrum(io, spec, mask, spw, name)
    text = cont_dat_text(entries)
    ctx["cont_dat_key"] = io.put_bytes(text.encode(), "cont.dat", "text/plain")["key"]
    ctx["continuum"] = entries
    ctx["contsub_partitions"] = out
    return qa


def _common_channels(members: list, spw: int) -> np.ndarray:
    """The channel frequencies of a spw's partitions from the EBs of an MOUS, which must
    agree to half a channel (msio.channels_differ, as msio.concat_vis requires)."""
    f0 = members[0][1].freq
    for _, vp in members[1:]:
        why = msio.channels_differ(f0, vp.freq, spw)
        if why:
            raise StageError(why)
    return f0


def _findcont_cubes(io: StageIO, members: list, freq: np.ndarray, targets: list) -> dict:
    """findcont's coarse dirty cube of each pointing (field id) of the given targets
    (lists of field ids), summed over row blocks of every EB's partition: the geometry
    from flags and uvw first, then the data."""
    fids = sorted({int(f) for t in targets for f in t})
    if not fids:
        return {}
    geometry = {f: CubeGeometry(len(freq)) for f in fids}
    for part, vp in members:
        for blk in member_blocks(io, vp, part, fields=fids, data=False):
            for f, rows in _by_field(blk):
                geometry[f].add(rows)
    cubes = {f: g.cube(freq) for f, g in geometry.items()}
    for part, vp in members:
        for blk in member_blocks(io, vp, part, fields=fids):
            for f, rows in _by_field(blk):
                cubes[f].add(rows)
    return cubes


def _by_field(blk: msio.Vis):
    """(field id, its rows) of a row block: the block itself where it holds one field
    (a single pointing's: most blocks), so that its data are not copied."""
    fids = np.unique(blk.field_id)
    if len(fids) == 1:
        yield int(fids[0]), blk
        return
    for f in fids:
        yield int(f), blk.select(blk.field_id == f)


def _plot_spectrum(io, spec, mask, spw, field):
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


# about the most pixels an image's rms is taken from: a cube's from every k-th plane, so
# that a large cube's rms is measured on a sample of its planes (one plane is never cut)
NOISE_PIXELS = 16 * 2**20


def _stats(res, spec: ImageSpec, cont_mask: np.ndarray | None, specmode: str,
           peak_ok: np.ndarray | None = None) -> dict:
    """Peak and rms of an image inside its pb limit: the peak from the planes peak_ok
    allows (a cube's: ImageJob.peak_planes), the rms from a cube's line-free planes
    among those (else the residual)."""
    inside = res.mask
    ok = np.ones(len(res.image), bool) if peak_ok is None or len(peak_ok) != len(res.image) else peak_ok
    if specmode == "cube" and cont_mask is not None and (cont_mask & ok).any():
        noise, which = res.image, np.flatnonzero(cont_mask & ok)
    else:
        noise, which = res.residual, np.arange(len(res.residual))
    # a plane at a time (a large cube's planes are on disk); at most NOISE_PIXELS of them,
    # from planes spread over the cube, for the MAD
    step = max(1, int(np.ceil(len(which) * max(int(inside.sum()), 1) / NOISE_PIXELS)))
    rms = robust_rms(np.concatenate([noise[k][inside] for k in which[::step]]))
    if not inside.any():
        return {"rms": rms, "peak": 0.0, "peak_plane": 0}
    per_plane = np.array([np.nanmax(np.where(inside, res.image[k], -np.inf)) if ok[k] else -np.inf
                          for k in range(len(res.image))])
    plane = int(np.argmax(per_plane))
    return {"rms": rms, "peak": float(per_plane[plane]), "peak_plane": plane}


def first_plane(chans: np.ndarray, nbin: int) -> np.ndarray:
    """The channels of the first whole plane of nbin adjacent ones among chans (a cube's
    plane, cube_planes), none if there is none: the plane a cube's theoretical noise is
    that of (its channels' correlation depends on their being adjacent)."""
    planes = cube_planes(chans, nbin)
    return planes[0] if planes else np.zeros(0, np.int64)


def _theoretical_rms(vis: msio.Vis, spec: ImageSpec, chans: np.ndarray | None, mfs: bool,
                     rho: np.ndarray = np.zeros(0)) -> float | None:
    """Image noise predicted from the visibility scatter and the imaging weights:
    sigma_vis * sqrt(sum w_im^2 / w_nat) / sum w_im, for one plane: a cube's (the
    first spec.nbin of the given channels, with their own Briggs weights) or an mfs
    image's (all of them). The scatter comes from differences of adjacent channels, which
    neither continuum nor a smooth line contributes to; rho, the noise correlation of
    neighbouring channels (ALMA's Hanning-smoothed spws), corrects both that scatter and
    the sum over the plane's channels (heuristics.spectral_response)."""
    if chans is None or chans.sum() < 2:
        return None
    idx = np.flatnonzero(chans)
    cross = np.flatnonzero(vis.ant1 != vis.ant2)
    # the differences' median from a fine histogram (MedianSketch, as a streamed image
    # takes it), counted in one compiled pass: all of them at once would be as large as
    # the spw's data, twice over
    sketch = MedianSketch()
    sketch.add_adjacent_differences(vis.data, vis.flag, vis.weight, idx, rows=cross)
    if sketch.n < 10:
        return None
    # the MAD about zero (not about the median, as mad_std takes it): a difference of
    # neighbouring channels has zero mean by construction
    sigma_unit = 1.4826 * sketch.median() / np.sqrt(2)         # real part, weight 1
    plane = idx if mfs else first_plane(idx, spec.nbin)
    if not len(plane):
        return None
    si = stokes_i(vis, plane)
    uvw, wnat = si.uvw, si.weight
    wim = gridding.briggs_weights(uvw, vis.freq[plane], wnat, spec.npix, np.radians(spec.cell_arcsec / 3600),
                                  spec.robust)
    sel = wnat > 0
    if not sel.any():
        return None
    # var(V_i) = sigma_unit^2 / w_i (natural weights are inverse variances up to a scale)
    return float(sigma_unit * np.sqrt((wim[sel] ** 2 / wnat[sel]).sum()) / wim[sel].sum()) * \
        noise_from_differences(plane, rho)


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
    if params["calibrators"]:
        for fid in calibrator_ids(ctx):
            for part in partitions:
                jobs.append(("mfs", [fid], part, "CORRECTED_DATA", params["calibrator"]))
    chans_of = {(e["field"], e["spw"]): e["channels"] for e in ctx.get("continuum", [])}
    if params["target_cont"] and targets and ctx.get("continuum"):
        # specmode 'cont': the target's continuum from its line-free channels (cont.dat)
        for fids in target_groups(ctx):
            for part in targets:
                chans = chans_of.get((field_name(ctx, fids[0]), part["spw"]), "")
                jobs.append(("cont", fids, part, "DATA", dict(params["cont"], chans=chans)))
    if params["target_aggregate"] and targets and ctx.get("continuum"):
        # the aggregate continuum: the line-free channels of every spw in one mfs image
        if len(targets) > 1:
            for fids in target_groups(ctx):
                parts = [dict(p, chans=chans_of.get((field_name(ctx, fids[0]), p["spw"]), "")) for p in targets]
                jobs.append(("cont", fids, parts, "DATA", dict(params["cont"], aggregate=True)))
    if params["target_cube"] and contsub:
        for fids in target_groups(ctx):
            for part in contsub:
                jobs.append(("cube", fids, part, "DATA", params["cube"]))
    return jobs


class ImageJob:
    """One image of makeimages: its data, parameters and heuristics, then its
    products. A cube may be cleaned in channel ranges on several workers
    (imagecube_chunk) and restored in one piece (joincube)."""

    def __init__(self, ctx: dict, io: StageIO, job: tuple, theoretical: dict, chan: slice | None = None,
                 data: bool = True, prep: dict | None = None, heuristics_only: bool = False,
                 feeds: dict | None = None):
        """chan: read only these channels of the spw (a cube's piece); data: False reads
        flags, weights and uvw but no visibilities (a cube's join); prep: the image's
        heuristics as makeimages took them from the whole spw (ImageJob.heuristics), which
        a piece or a join, seeing part of the data, uses instead of its own;
        heuristics_only: a cube that makeimages hands out in pieces: read nothing now, and
        prepare() takes its heuristics in row blocks (never the spw's rows x channels; a
        mosaic's pointing by pointing), for ImageJob.heuristics only. feeds: where a spw's
        continuum image leaves its samples binned for the aggregate continuum that follows
        it in makeimages (samples.WidthBinned, by feed_key), and the aggregate takes them."""
        self.ctx, self.io = ctx, io
        self.feeds = feeds
        self.prep = prep
        self.streamed = False           # see below: an mfs image (a mosaic: pointing by pointing)
        self.heuristics_only = False
        self.samples = None
        self.chan0 = chan.start if chan is not None else 0      # the Vis's first channel in the spw
        self.spw_freq = None            # the whole spw's channels, when the Vis holds a range of them
        self.specmode, self.fids, part, column, p = job
        self.p = with_defaults(IMAGE_PARAMS, p)      # the image kind's parameters, declared below
        self.fid = self.fids[0]          # a mosaic's first pointing names it
        obs = ctx["observation"]
        self.telescope = obs["telescope"]
        self.dish = float(np.median([a["diameter_m"] for a in obs["antennas"] if a["has_data"]]))
        self.field = next(f for f in obs["fields"] if f["id"] == self.fid)
        self.fctx = next(f for f in ctx["fields"] if f["id"] == self.fid)
        self.nterms_note = None         # why an image has fewer Taylor terms than its band calls for
        self.row_freq = None            # the aggregate's rows' own frequencies (aggregate_samples)
        self.spws = None                # a streamed aggregate's spws: [(members, continuum channels)]
        band_pieces = []                # the aggregate's spws: (channel frequencies, continuum channels)
        if isinstance(part, list) and data and bool(self.p["streamed"]):
            # the aggregate continuum is streamed (issue 15): each spw's continuum
            # channels are read in row blocks and binned as they are read
            # (samples.read_aggregate_samples, in prepare), never a spw's (rows x
            # channels); a mosaic's pointing by pointing (samples.read_mosaic_aggregate)
            self.streamed, self.column, self.vis, self.spws = True, column, None, []
            self.spw_pieces = []            # each spw's partition (group), for a mosaic's pointings
            times = []
            for piece in part:
                members = self._members(piece, self.fids)
                t = np.concatenate([vp.index("TIME")[vp.select(f)] for vp, f in members])
                if len(t):
                    freq = members[0][0].freq
                    mask = parse_channels(piece["chans"], len(freq)) if piece.get("chans") \
                        else np.ones(len(freq), bool)
                    self.spws.append((members, mask))
                    self.spw_pieces.append(piece)
                    band_pieces.append((freq, mask))
                    times.append(t)
            self._times = np.concatenate(times) if times else np.zeros(0)
            self._freq = None           # the reference frequency, once the samples are read
            self.part = {"spw": "_".join(str(piece["spw"]) for piece in part), "frame_spw": part[0]["spw"]}
        elif isinstance(part, list):    # the aggregate with streamed=False: one single-channel Vis
            # that holds every spw's continuum channels as aggregate_samples takes them
            pieces = []
            for piece in part:
                v = read_group(io, piece, fields=self.fids, column=column)
                if len(v.time):
                    pieces.append((v, parse_channels(piece["chans"], len(v.freq)) if piece.get("chans")
                                   else np.ones(len(v.freq), bool)))
                    band_pieces.append((v.freq, pieces[-1][1]))
            # each row's own frequency: a multi-term image's Taylor weights need it
            self.vis, self.row_freq = aggregate_samples(pieces, int(self.p["width"])) if pieces \
                else (None, None)
            self.part = {"spw": "_".join(str(piece["spw"]) for piece in part), "frame_spw": part[0]["spw"]}
        else:
            self.part = part
            # an mfs image is streamed (issue 15): its Stokes I samples are read one row
            # block at a time and binned in channels as they are read, so it holds the
            # image and one block, never the spw's (rows x channels) cube; a mosaic's
            # samples are read pointing by pointing, each pointing's rows its own samples
            self.streamed = self.specmode in ("mfs", "cont") and chan is None and data \
                and bool(self.p["streamed"])
            self.heuristics_only = heuristics_only and self.specmode == "cube" and chan is None
            if self.streamed or self.heuristics_only:
                self.column = column
                self.group = part
                self.members = self._members(part, self.fids)
                self.vis = None
                self._freq = self.members[0][0].freq
                self._times = np.concatenate([vp.index("TIME")[vp.select(f)] for vp, f in self.members])
            else:
                self.vis = read_group(io, part, fields=self.fids, column=column, chan=chan, data=data)
            if chan is not None:
                self.spw_freq = io.vis(part.get("members", [part])[0]).freq
        self.theoretical = theoretical
        self.bands = []
        # the aggregate's band: its spws' selected channels, edges included
        for f, m in (pc for pc in band_pieces if pc[1].any()):
            w = float(np.median(np.abs(np.diff(f)))) if len(f) > 1 else 0.0
            self.bands.append((float(f[m].min() - w / 2), float(f[m].max() + w / 2), w))
        self.dr_seen = {}
        self.mitigation = ""            # how the image was narrowed to fit its size limits (mitigate_size)
        self.pixels_per_beam = PIXELS_PER_BEAM     # its cell's (5; 3 when narrowed that far)
        self.nbin = 1                   # a cube's channels a plane (prepare: nbin, or binned to fit)
        self.channel_has_data = None    # a cube in pieces: the spw's channels with unflagged data
        self.lsrk_shift = 0.0           # the largest move of a cube's rows onto the LSRK grid, channels

    @property
    def freq(self) -> np.ndarray:
        """The channels of the data imaged (a streamed image holds no Vis)."""
        return self._freq if self.streamed or self.heuristics_only else self.vis.freq

    @property
    def times(self) -> np.ndarray:
        return self._times if self.streamed or self.heuristics_only else self.vis.time

    def label(self) -> str:
        return f"{self.field['name']} spw {self.part['spw']} ({self.specmode})"

    def prepare(self) -> str | None:
        """Heuristics, theoretical noise and threshold; a reason when there is nothing to image."""
        vis, p = self.vis, self.p
        if self.streamed and self.spws is not None:
            # the aggregate: its samples first (one pass), its cell and size from their uv
            # distances (uvw scaled to the reference frequency, as the Vis of aggregate_samples)
            if not len(self._times) or not any(m.any() for _, m in self.spws):
                return "no data"
            self._read_aggregate()
            self.chans = parse_channels(p["chans"], 1) if p.get("chans") else np.ones(1, bool)
            pointings = self.samples if isinstance(self.samples, list) else [self.samples]
            if not any(len(s.uvw) for s in pointings):
                return "all data flagged"
            mosaic = None
            if len(self.fids) > 1:          # the pointings with data, in the mosaic's order
                have = [k for k, s in enumerate(pointings) if s.weight.sum() > 0]
                mosaic = self._make_mosaic([self.fids[k] for k in have],
                                           [float(pointings[k].weight.sum()) for k in have])
                self.samples = pointings = [pointings[k] for k in have]
            uvdist = np.concatenate([uv_distances(s, float(self._freq[0])) for s in pointings])
            geom = uv_geometry(uvdist, self._freq, self.dish, self.telescope, mosaic.extent_rad() if mosaic else 0.0)
            del uvdist
        elif self.streamed or self.heuristics_only:
            if not len(self._times):
                return "no data"
            nchan = len(self._freq)
            self.chans = chans_or_all(p.get("chans"), nchan)
            if self.heuristics_only:        # a cube in pieces: cut by where its data are
                self.channel_has_data = np.zeros(nchan, bool)
            uvdist, weights = self._uv_distances()
            if not len(uvdist):
                return "all data flagged"
            mosaic = None
            if len(self.fids) > 1:
                have = [f for f in self.fids if weights.get(f, 0.0) > 0]
                mosaic = self._make_mosaic(have, [weights[f] for f in have])
            geom = uv_geometry(uvdist, self._freq[self.chans], self.dish, self.telescope,
                               mosaic.extent_rad() if mosaic else 0.0)
            del uvdist
        elif vis is None or not len(vis.time):
            return "no data"
        else:
            nchan = len(vis.freq)
            nchan_spw = len(self.spw_freq) if self.spw_freq is not None else nchan
            chans = chans_or_all(p["chans"], nchan_spw)
            self.chans = chans[self.chan0:self.chan0 + nchan]      # in the Vis's channels
            if self.prep is None and not rows_with_data(vis.flag, self.chans).any():
                return "all data flagged"
            mosaic = self.mosaic() if len(self.fids) > 1 else None
            # a cube's piece or join takes makeimages' size (prep), not its own heuristics
            geom = None if self.prep is not None else image_geometry(vis, self.dish, self.telescope, self.chans,
                                                                      mosaic.extent_rad() if mosaic else 0.0)
        max_imsize = int(p["max_imsize"])
        self.nbin = int(p["nbin"] or 1) if self.specmode == "cube" else 1
        if geom is None:
            cell, npix = self.prep["cell_arcsec"], self.prep["npix"]
            self.mitigation = self.prep.get("mitigation", "")
            self.nbin = int(self.prep.get("nbin", 1))
            self.pixels_per_beam = int(self.prep.get("pixels_per_beam", PIXELS_PER_BEAM))
        else:
            if p["imsize"] or p["cell_arcsec"]:
                # the user's size: no narrowing (ALMAPIPE_MAX_IMSIZE caps it server-wide)
                cell, npix = geom.cell_npix()
                npix = int(p["imsize"] or npix)
                if npix > max_imsize:
                    return (f"the image would be {npix} x {npix} pixels (max_imsize {max_imsize}); give a smaller "
                            "imsize or a larger max_imsize")
            else:
                # long baselines, a large cube: narrowed as hif_checkproductsize narrows it,
                # an FDM spw's cube first binned by two channels unless nbin is given (a
                # mosaic's cube too; a mosaic is never narrowed, and its cube, if binning
                # does not bring it under max_cube_gb, is made as large as it is)
                cube = self.specmode == "cube"
                may_bin = 1
                if cube and p["nbin"] is None:
                    info = spw_info(self.ctx, int(self.part["spw"]))
                    may_bin = cube_nbin(int(info["nchan"]), info.get("chan_width_hz", 0.0),
                                        info.get("effective_bw_hz"))
                planes = len(cube_planes(np.flatnonzero(self.chans), self.nbin)) if cube else 1
                sized = mitigate_size(geom, max_imsize, float(p["max_cube_gb"]) * 1e9 if cube else 0.0, planes,
                                      mosaic=mosaic is not None, nbin=may_bin)
                if sized.refused and cube and mosaic is not None:
                    sized = mitigate_size(geom, max_imsize, 0.0, planes, mosaic=True)
                if sized.refused:
                    return sized.refused
                cell, npix, self.mitigation = sized.cell_arcsec, sized.npix, sized.mitigation
                self.pixels_per_beam = sized.pixels_per_beam
                self.nbin *= sized.nbin
        if self.specmode == "cube" and not cube_planes(np.flatnonzero(self.chans), self.nbin):
            return f"no {self.nbin} adjacent channels selected to make a plane of (nbin {self.nbin})"
        self.spec = ImageSpec(
            field=self.field["name"], specmode="mfs" if self.specmode == "cont" else self.specmode,
            npix=npix, cell_arcsec=float(p["cell_arcsec"] or cell),
            robust=p["robust"], niter=int(p["niter"]), nsigma=float(p["nsigma"]),
            chans=self.chans, automask=bool(p["automask"]),
            negative_threshold=float(p["negative_threshold"] if p["negative_threshold"] is not None
                                     else 15.0 if self.specmode == "cube" else 0.0),
            # multiscale: scales of 0, 1 and 3 beams
            scales=p["scales"] or ([0, self.pixels_per_beam, 3 * self.pixels_per_beam]
                                   if p["deconvolver"] == "multiscale" else None),
            mosaic=mosaic, nterms=self.nterms(mosaic), nbin=self.nbin,
            time_average=self.specmode == "cube" and bool(p["time_average"]),
            # the spw's highest frequency: a cube's pieces average as the whole cube does
            time_average_freq_hz=float(np.max(self.spw_freq if self.spw_freq is not None else self.freq))
            if self.specmode == "cube" else 0.0)
        if self.streamed and self.spws is None:
            self.theo = self._read_samples()
            self.theoretical[(self.fid, self.part["spw"])] = self.theo
        elif self.prep is not None:
            self.theo = self.prep.get("theo")
        elif self.specmode == "cube":
            cont = self.part.get("cont_chans", {}).get(self.field["name"])
            cont_chans = parse_channels(cont, nchan) & self.chans if cont else None
            self.theo = self._cube_theoretical(cont_chans) if self.heuristics_only else \
                _theoretical_rms(vis, self.spec, cont_chans, mfs=False, rho=channel_rho(self.ctx, self.part["spw"]))
        elif p["aggregate"]:
            # the spws' continuum images combine as independent measurements
            per_spw = [self.theoretical[(self.fid, int(s_))] for s_ in str(self.part["spw"]).split("_")
                       if self.theoretical.get((self.fid, int(s_)))]
            self.theo = float(np.sum(np.asarray(per_spw) ** -2.0) ** -0.5) if per_spw else None
        else:
            self.theo = _theoretical_rms(vis, self.spec, self.chans, mfs=True, rho=channel_rho(self.ctx, self.part["spw"]))
            self.theoretical[(self.fid, self.part["spw"])] = self.theo
        if self.theo and mosaic is not None and self.prep is None:
            self.theo *= mosaic_noise_factor(self.spec.npix, np.radians(self.spec.cell_arcsec / 3600),
                                             float(self.freq[self.chans].mean()), mosaic.dish_m, mosaic.telescope,
                                             [q.offset_lm for q in mosaic.pointings],
                                             [q.fraction for q in mosaic.pointings])
        # the threshold from the theoretical noise and the dirty dynamic range
        if self.theo and p["dr_threshold"]:
            is_cal = "TARGET" not in self.fctx["intents"] and "CHECK" not in self.fctx["intents"]

            # no reference to self: the spec holds this function, and an ImageJob in a
            # reference cycle keeps its data until the garbage collector runs
            def threshold(dirty_peak, theo=self.theo, seen=self.dr_seen, dish=self.dish):
                thr, factor = dr_correction(theo, dirty_peak, is_cal, dish, float(p["tlimit"]))
                if factor >= seen.get("factor", 0.0):
                    seen.update(factor=factor, threshold=thr, dirty_dynamic_range=dirty_peak / theo)
                return thr
            self.spec.threshold_from_dirty = threshold
        return None

    def _uv_distances(self) -> tuple[np.ndarray, dict]:
        """The first pass of a streamed mfs image: flags, weights and uvw (no
        visibilities) of the cross-correlation rows, in row blocks. Returns the uv
        distances (m) of the rows with data in the channels imaged, for the image's cell
        and size, and each field's sum of unflagged weights there (a mosaic's shares);
        a cube in pieces notes which channels have data (channel_has_data: its pieces
        are cut by it)."""
        idx = np.flatnonzero(self.chans)
        if not len(idx):
            return np.zeros(0), {}
        span = slice(int(idx[0]), int(idx[-1]) + 1)
        sel = self.chans[span]
        out, weights = [], {}
        for (vp, fids), part in zip(self.members, self.group.get("members", [self.group])):
            # a mosaic's pointings (the first EB's field ids) by their ids in this EB
            pointings = [(f, eb_field_ids(part, [f])) for f in self.fids] if len(self.fids) > 1 else []
            for blk in vp.blocks(column=self.column, field_ids=fids, chan=span, data=False, cross_only=True):
                if self.channel_has_data is not None and len(blk.flag):
                    self.channel_has_data[span] |= channels_with_data(blk.flag)
                ok = rows_with_data(blk.flag, sel)
                out.append(np.hypot(blk.uvw[ok, 0], blk.uvw[ok, 1]))
                if pointings:
                    w = np.where(blk.flag[:, sel], 0.0, blk.weight[:, None, :]).sum(axis=(1, 2))
                    for f, ids in pointings:
                        weights[f] = weights.get(f, 0.0) + float(w[np.isin(blk.field_id, ids)].sum())
        return (np.concatenate(out) if out else np.zeros(0)), weights

    def _read_samples(self) -> float | None:
        """The second pass of a streamed mfs image: its binned Stokes I samples
        (samples.read_binned_stokes_i, bins of 1 / npix fractional width) and, from the
        same blocks, its theoretical noise as _theoretical_rms takes it: the scatter of
        adjacent channels' differences (their median from a fine histogram, not from
        all of them at once) and the Briggs weights of the samples."""
        feed = None
        if self.feeds is not None and self.specmode == "cont" and self.spec.mosaic is None and \
                not self.p["aggregate"] and self.chans.any():
            feed = WidthBinned(self.members, self.chans, int(self.p["width"]))
        self.samples, sigma_unit = self._read_with_scatter(self.chans, MFS_BIN_FRAC / self.spec.npix,
                                                           pointings=self._pointing_members(), also=feed)
        if feed is not None and feed.complete:
            self.feeds[self.feed_key(self.part["spw"], self.p["chans"])] = feed
        return self._noise(self.samples, sigma_unit, np.flatnonzero(self.chans))

    def feed_key(self, spw, chans: str) -> tuple:
        """What a spw's continuum samples for the aggregate are found by: the fields, spw,
        channels, bin width and column, all of which the aggregate's must equal."""
        return tuple(self.fids), int(spw), chans or "", int(self.p["width"]), self.column

    def _pointing_members(self) -> list | None:
        """A mosaic's members (as self.members) pointing by pointing, in its order; None
        for one pointing."""
        if self.spec.mosaic is None:
            return None
        return [self._members(self.group, [p.field_id]) for p in self.spec.mosaic.pointings]

    def _cube_theoretical(self, cont: np.ndarray | None) -> float | None:
        """A cube's theoretical noise as _theoretical_rms takes it (the scatter of the
        continuum channels' adjacent differences, the Briggs weights of the first nbin
        of them: one plane), read in row blocks: what makeimages hands on to a cube's
        pieces."""
        if cont is None or cont.sum() < 2:
            return None
        idx = first_plane(np.flatnonzero(cont), self.nbin)     # one plane: the first of continuum channels
        if not len(idx):
            return None
        first = np.full(len(self._freq), -1, np.int64)
        first[idx] = 0
        samples, sigma_unit = self._read_with_scatter(cont, 0.0, bins=(first, np.array([self._freq[idx].mean()])),
                                                      pointings=self._pointing_members())
        return self._noise(samples, sigma_unit, idx)

    def _read_with_scatter(self, chans: np.ndarray, max_frac: float, bins: tuple | None = None,
                           pointings: list | None = None, also: WidthBinned | None = None) -> tuple:
        """(binned Stokes I samples of the channels chans, the scatter of a visibility of
        unit weight from adjacent channels' differences, or None where too few).
        pointings: a mosaic's members per pointing (as self.members): a list of samples,
        one per pointing, with the same bins, and one scatter from all of them. also:
        binned from the same blocks too (one pointing)."""
        idx = np.flatnonzero(chans)
        rel = idx - int(idx[0])              # the channels in the span a block holds
        sketch = MedianSketch()

        def scatter(blk):
            self.io.count_visibilities(blk.data.size)
            sketch.add_adjacent_differences(blk.data, blk.flag, blk.weight, rel)
            if also is not None:
                also.add(blk)

        if pointings is None:
            samples = read_binned_stokes_i(self.members, None, chans, max_frac, self.column, on_block=scatter,
                                           bins=bins)
        else:
            if bins is None:
                bins = channel_bins(np.asarray(self._freq, float), idx, max_frac)
            samples = [read_binned_stokes_i(members, None, chans, max_frac, self.column, on_block=scatter,
                                            bins=bins) for members in pointings]
        if len(idx) < 2 or sketch.n < 10:
            return samples, None
        return samples, 1.4826 * sketch.median() / np.sqrt(2)

    def _noise(self, samples, sigma_unit: float | None, plane: np.ndarray) -> float | None:
        """The image noise of binned samples (a mosaic's: a list, one per pointing, taken
        together) of the channels plane, whose visibilities of unit weight scatter by
        sigma_unit as adjacent channels' differences show it, with their Briggs weights
        (as _theoretical_rms)."""
        spec = self.spec
        pointings = samples if isinstance(samples, list) else [samples]
        if sigma_unit is None or not any(len(s.uvw) for s in pointings):
            return None
        uvw = pointings[0].uvw if len(pointings) == 1 else np.concatenate([s.uvw for s in pointings])
        wnat = pointings[0].weight if len(pointings) == 1 else np.concatenate([s.weight for s in pointings])
        wim = gridding.briggs_weights(uvw, pointings[0].freq, wnat, spec.npix,
                                      np.radians(spec.cell_arcsec / 3600), spec.robust)
        sel = wnat > 0
        if not sel.any():
            return None
        return float(sigma_unit * np.sqrt((wim[sel] ** 2 / wnat[sel]).sum()) / wim[sel].sum()) * \
            noise_from_differences(plane, channel_rho(self.ctx, self.part["spw"]))

    def _read_aggregate(self) -> None:
        """The one pass of a streamed aggregate continuum: its samples
        (samples.read_aggregate_samples, bins of `width` continuum channels)."""
        blocks = []

        def count(blk):
            self.io.count_visibilities(blk.data.size)
            blocks.append(None)
        if len(self.fids) > 1:              # a mosaic: each pointing's samples, with the same bins
            self.samples = read_mosaic_aggregate(
                [[(self._members(piece, [f]), mask) for piece, (_, mask) in zip(self.spw_pieces, self.spws)]
                 for f in self.fids], int(self.p["width"]), self.column, on_block=count)
        else:
            # the spws' samples as their own continuum images binned them, where they did
            binned = [self.feeds.pop(self.feed_key(piece["spw"], piece.get("chans", "")), None)
                      for piece in self.spw_pieces] if self.feeds is not None else None
            self.samples = read_aggregate_samples(self.spws, int(self.p["width"]), self.column, on_block=count,
                                                  binned=binned)
            del binned
            if not blocks:
                self.io.log("%s: its samples binned beside its spws' own continuum images, not read again",
                            self.label())
        # the image's one plane: as aggregate_samples' Vis, at the reference frequency
        self._freq = np.array([reference_frequency(self.samples)])

    def heuristics(self) -> dict:
        """What prepare() took from the whole spw, for the pieces and the join of a cube."""
        return {"npix": self.spec.npix, "cell_arcsec": self.spec.cell_arcsec, "theo": self.theo,
                "mitigation": self.mitigation, "pixels_per_beam": self.pixels_per_beam, "nbin": self.nbin}

    def mosaic(self):
        """The mosaic of this job's fields: where each pointing lies and its share of
        the (unflagged) weight."""
        vis = self.vis
        w = np.where(vis.flag[:, self.chans], 0.0, vis.weight[:, None, :]).sum(axis=(1, 2))
        have = [f for f in self.fids if w[vis.field_id == f].sum() > 0]
        return self._make_mosaic(have, [w[vis.field_id == f].sum() for f in have])

    def _make_mosaic(self, fids: list, weights: list):
        """The mosaic of the given fields (those with data) and their weight sums."""
        fields = {f["id"]: f for f in self.ctx["observation"]["fields"]}
        return make_mosaic([(f, fields[f]["ra_rad"], fields[f]["dec_rad"]) for f in fids], weights, self.dish,
                           self.telescope)

    def _members(self, group: dict, fids: list) -> list:
        """[(VisPartition, the EB's own ids of the fields fids)] of each EB's partition of
        a spw (group: a partition, or an MOUS's group of them)."""
        return [(self.io.vis(m), eb_field_ids(m, fids)) for m in group.get("members", [group])]

    def clean(self, chans: np.ndarray | None = None):
        """Clean all planes, or (a piece of a cube) the given channels only."""
        spec = self.spec if chans is None else dataclasses.replace(self.spec, chans=self.chans & chans)
        if self.specmode == "cube":
            # here, where the planes are made (a cube's join needs none of it), and after
            # prepare() took the theoretical noise from the data as observed: moving rows
            # between channels mixes neighbours
            self.lsrk_shift = onto_lsrk_grid(self.ctx, self.part["spw"], self.fid, self.vis,
                                             spw_freq=self.spw_freq)
        if self.streamed:
            return clean_mfs(self.samples, spec)
        self.io.count_visibilities(self.vis.data.size)
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
        n = nterms_for(lo, hi, self.p["nterms"])
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
        f = self.freq
        width = float(np.median(np.diff(f))) if len(f) > 1 else \
            float(spw_info(self.ctx, self.part["spw"]).get("chan_width_hz", 0.0))
        sel = f[self.chans]
        return float(sel.min() - abs(width) / 2), float(sel.max() + abs(width) / 2), width

    def peak_planes(self) -> np.ndarray:
        """The planes a cube's peak may be reported from: not those of the spw's edge
        channels (EDGE_CHANNELS at each end, where the bandpass rolls off and the noise
        is highest) and not planes without unflagged data. All planes of an mfs image."""
        idx = np.flatnonzero(self.chans)
        if self.specmode != "cube":
            return np.ones(1, bool)
        nchan = len(self.vis.freq)
        cross = self.vis.ant1 != self.vis.ant2
        has_data = np.zeros(nchan, bool)
        if cross.any():
            has_data[idx] = channels_with_data(self.vis.flag, cross)[idx]
        has_data = per_plane(has_data, idx, self.nbin, np.any)
        channel = np.arange(nchan)
        inner = per_plane((channel >= EDGE_CHANNELS) & (channel < nchan - EDGE_CHANNELS), idx, self.nbin, np.all)
        ok = has_data & inner
        return ok if ok.any() else has_data if has_data.any() else np.ones(len(ok), bool)

    def products(self, planes, qa: QA, scratch: str | None = None, slabs: dict | None = None) -> dict:
        """Restore, write the FITS products, measure and score: the image's record.
        scratch: a directory where a large cube's arrays are held on disk (cube_array).
        slabs: {product: [Range]}: products whose planes a cube's pieces stored (FITS
        data, in channel order; joincube): assembled in the store from them, not
        written here."""
        ctx, io, spec, p, part, fid = self.ctx, self.io, self.spec, self.p, self.part, self.fid
        slabs = slabs or {}
        multi_term = isinstance(planes, TaylorPlanes)
        if self.nterms_note:
            qa.note(self.nterms_note)
        nchan = len(self.freq)
        base = _product_name(ctx, io, spec.field, self.fctx["intents"], part["spw"], self.specmode,
                             bool(p["aggregate"]))
        # the headers first (they need the restoring beam and the planes' frequencies, not
        # the restored planes), so that the products the pieces stored are assembled in
        # the store while the cube is restored here
        beam = restoring_beam(planes)
        plane_freqs = np.array([planes.nu0]) if multi_term else np.asarray(planes.freqs)
        # images are labelled in LSRK, as the ALMA pipeline makes them
        factor, frame = lsrk_labels(ctx, part.get("frame_spw", part["spw"]), fid, self.times)
        ra, dec = spec.mosaic.centre if spec.mosaic else (self.field["ra_rad"], self.field["dec_rad"])
        lo, hi, width = self.band()
        if self.specmode == "cube":     # the planes' frequencies; a one-plane cube's width is its plane's
            freqs, bandwidth = plane_freqs * factor, width * self.nbin * factor
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

        def header(unit: str):
            return image_header(ra, dec, spec.npix, np.radians(spec.cell_arcsec / 3600), freqs, frame, unit,
                                beam, spec.field, self.telescope, restfreq=restfreq, bandwidth_hz=bandwidth,
                                obs=obs, obs_radec=(self.field["ra_rad"], self.field["dec_rad"]))
        shape = (len(plane_freqs), spec.npix, spec.npix)
        padding = fits_padding(4 * int(np.prod(shape)))

        def fits_file(unit: str, data: list) -> list:
            """A FITS product as ObjectStore.assemble's segments: its header, data, padding."""
            return [fits_header_bytes(shape, header(unit)), *data, padding]
        # uploaded behind, while the next product is made: a large cube's join is
        # otherwise mostly waiting for S3, one file at a time
        with io.puts_behind(threads=4 if slabs else 2) as up:
            for suffix, ranges in slabs.items():
                up.assemble(f"{base}.{suffix}.fits", fits_file(PRODUCT_UNITS[suffix], ranges))
            if multi_term:
                res, taylor = restore_taylor_planes(planes, spec, self.dish, self.telescope)
            else:
                res, taylor = restore_planes(planes, spec, self.dish, self.telescope, scratch, beam), None
            # pb (and the mask of a cube cleaned without automasking) is one plane, the same
            # in every channel: stored once, repeated by the store (ObjectStore.assemble)
            outputs = (("image", res.image), ("pbcor", res.pbcor), ("pb", res.pb),
                       ("mask", res.clean_mask if res.clean_mask is not None else res.mask),
                       ("residual", res.residual),
                       # as tclean writes them: the PSF (a cube's per plane, peak 1) and the clean
                       # components, so the WebLog can show what was deconvolved with what
                       ("psf", res.psf), ("model", res.model))
            if taylor is not None:
                outputs = _taylor_outputs(outputs, taylor)
            for suffix, planes_ in outputs:
                if suffix in slabs:
                    continue
                unit = PRODUCT_UNITS[suffix.split(".")[0]]
                name = f"{base}.{suffix}.fits"
                if np.ndim(planes_) == 2:
                    up.assemble(name, fits_file(unit, [Repeat(np.ascontiguousarray(planes_, ">f4").tobytes(),
                                                              shape[0])]))
                elif suffix.split(".")[0] in ("model", "mask"):     # mostly empty planes
                    up.assemble(name, fits_file(unit, sparse_plane_segments(planes_)))
                else:
                    path = os.path.join(io.workdir, name)
                    up.put_file(path, sha256=write_fits(path, planes_, header(unit)))
            cont_mask = None
            cont = part.get("cont_chans", {}).get(self.field["name"]) if self.specmode == "cube" else None
            if cont:                        # a plane is line-free if all its channels are
                cont_mask = per_plane(parse_channels(cont, nchan), np.flatnonzero(self.chans), self.nbin, np.all)
            peak_ok = self.peak_planes()
            stats = _stats(res, spec, cont_mask, self.specmode, peak_ok)
            written = {e["name"]: e["key"] for e in up.entries()}
        files = {suffix: written[f"{base}.{suffix}.fits"] for suffix, _ in outputs}
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
               "aggregate": bool(p["aggregate"]),
               "pointings": len(spec.mosaic.pointings) if spec.mosaic else 1,
               "dr_correction": self.dr_seen.get("factor", 1.0), "threshold_jy": self.dr_seen.get("threshold"),
               "dirty_dynamic_range": self.dr_seen.get("dirty_dynamic_range"), "nterms": spec.nterms,
               "size_mitigation": self.mitigation}
        qa.add(size_mitigated(rec["file"], self.mitigation))
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
            rec["chans"] = p["chans"]
            rec["nbin"] = self.nbin
            # a plane's channel: its first (nbin of them averaged)
            first = np.array([b[0] for b in cube_planes(np.flatnonzero(self.chans), self.nbin)])
            rec["peak_channel"] = int(first[stats["peak_plane"]])
            rec["spectrum_png"] = _cube_spectrum(io, res, base, first, peak_ok)
        rec["qa_score"] = _image_qa(rec)
        qa.add((image_rms if theo else image_dynamic_range)(rec, f"{base}.png"))
        io.log("%s: peak %.4f Jy/beam, rms %.5f Jy/beam, beam %s", rec["file"], stats["peak"], stats["rms"],
               rec["beam_arcsec"])
        return rec


def _taylor_outputs(single: tuple, taylor) -> tuple:
    """The FITS products of a multi-term image, named as ALMA names them: the single-term
    products of tt0 with .tt0 (image as .tt0, .tt0.pbcor, .pb.tt0, .residual.tt0, .psf.tt0,
    .model.tt0; the mask as it is), then .tt1, .residual.tt1, .model.tt1, .alpha and
    .alpha.error."""
    names = {"image": "tt0", "pbcor": "tt0.pbcor", "pb": "pb.tt0", "mask": "mask", "residual": "residual.tt0",
             "psf": "psf.tt0", "model": "model.tt0"}
    out = [(names[s], planes) for s, planes in single]
    out += [("tt1", taylor.tt[1:2]), ("residual.tt1", taylor.residual[1:2]), ("model.tt1", taylor.model[1:2]),
            ("alpha", taylor.alpha[None]), ("alpha.error", taylor.alpha_error[None])]
    return tuple(out)


def sparse_plane_segments(planes) -> list:
    """The FITS data of (n, ny, nx) planes as ObjectStore.assemble's segments: a run of
    empty planes (a cube's model and clean mask are empty wherever nothing was cleaned)
    a Repeat of one empty plane, stored once and copied by the server; a run of the
    others as their bytes."""
    n = len(planes)
    if not n:
        return []
    empty = np.array([not np.any(planes[i]) for i in range(n)], bool)
    plane_bytes = 4 * int(np.prod(np.shape(planes[0])))
    zero = bytes(plane_bytes)           # one for every run (a 4096^2 plane is 64 MiB)
    edges = [0, *(np.flatnonzero(np.diff(empty)) + 1).tolist(), n]
    return [Repeat(zero, b - a) if empty[a] else Stream(plane_chunks(planes[a:b]), plane_bytes * (b - a))
            for a, b in zip(edges[:-1], edges[1:])]


# the brightness unit of each FITS product (a Taylor term's by its first name: tt0, tt1...)
PRODUCT_UNITS = {"image": "Jy/beam", "pbcor": "Jy/beam", "tt0": "Jy/beam", "tt1": "Jy/beam", "residual": "Jy/beam",
                 "pb": "", "mask": "", "psf": "", "alpha": "", "model": "Jy/pixel"}


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


# The parameters of one kind of image (makeimages' calibrator, cont and cube); none:
# from the heuristics (image size and cell from the uv coverage, hif_makeimlist's).
IMAGE_PARAMS = (
    Param("robust", float, 0.5, "Briggs robust weighting", min=-2.0, max=2.0),
    Param("niter", int, 1000, "most clean iterations", min=0),
    Param("nsigma", float, 3.0, "clean down to this many times the residual rms", min=0.0),
    Param("automask", bool, False, "auto-multithresh masks (else a primary-beam mask)"),
    Param("imsize", int, None, "image side (even: the gridder's); none: from the heuristics", unit="pixels",
          min=2, multiple_of=2),
    Param("cell_arcsec", float, None, "pixel size; none: a fifth of the beam (a third when narrowed to fit "
          "max_imsize or max_cube_gb)", unit="arcsec", min=0.0),
    Param("max_imsize", int, MAX_IMSIZE, "the largest image side; a single field the heuristics make larger is "
          "narrowed (hif_checkproductsize: to the primary beam's 0.7 level, then 3 pixels a beam), a mosaic is "
          "not made", unit="pixels", min=1),
    Param("max_cube_gb", float, MAX_CUBE_GB, "cubes of a single field: the most pixels x channels x 4 bytes a "
          "cube from the heuristics may hold before it is narrowed as max_imsize (ALMA's maxcubesize); 0: no "
          "limit", unit="GB", min=0.0),
    Param("chans", str, "", "channels imaged, CASA syntax (5~50); empty: all"),
    Param("nbin", int, None, "cubes: channels averaged into each plane (tclean's width in channels); none: 1, or "
          "2 for ALMA's FDM spws whose cube would exceed max_cube_gb (hif_checkproductsize's first step)", min=1),
    Param("width", int, 8, "aggregate continuum: channels averaged", min=1),
    Param("time_average", bool, True, "cubes of one field: a baseline's consecutive integrations averaged "
          "while their smearing at the image's corner stays under 0.5 % (baseline-dependent averaging)"),
    Param("deconvolver", str, "hogbom", "minor cycle", choices=("hogbom", "multiscale")),
    Param("scales", list, None, "multiscale scales in pixels; none: 0, 1 and 3 beams"),
    Param("negative_threshold", float, None, "automask: negative-feature threshold; none: 15 for cubes, 0 else",
          min=0.0),
    Param("dr_threshold", bool, True, "raise the threshold where dynamic range limits (ALMA's DR correction)"),
    Param("tlimit", float, 2.0, "dynamic range correction: threshold limit", min=0.0),
    Param("streamed", bool, True, "an mfs image reads its samples (a mosaic pointing by pointing) in row "
          "blocks, binned in channels (bounded memory); false: the whole selection in memory"),
    Param("nterms", int, None, "Taylor terms of an mfs image (1 or 2); none: 2 when the band imaged is wider "
          "than 10 % of its centre (ALMA's heuristic), else 1", min=1, max=2),
    Param("aggregate", bool, False, "set by makeimages for the aggregate continuum", internal=True),
)
MAKEIMAGES_PARAMS = (
    Param("calibrators", bool, True, "image each calibrator per spw (mfs)"),
    Param("target_cont", bool, False, "image the target's continuum per spw (cont.dat channels)"),
    Param("target_aggregate", bool, False, "image the target's continuum over all spws"),
    Param("target_cube", bool, True, "image the target's continuum-subtracted cubes"),
    Param("calibrator", dict, {}, "the calibrators' image parameters", fields=IMAGE_PARAMS),
    Param("cont", dict, {}, "the continuum images' parameters", fields=IMAGE_PARAMS),
    Param("cube", dict, {}, "the cubes' parameters", fields=IMAGE_PARAMS),
    Param("cube_chunks", int, None, "clean each cube in this many channel ranges on the imager workers; none: "
          "as many as keep each range's visibilities under ALMAPIPE_CUBE_PIECE_MB (1024)", min=1),
)
IMAGING_READS = ("observation", "fields", "partitions", "target_partitions", "contsub_partitions", "continuum")


def cube_piece_budget() -> int:
    """The bytes of visibilities a cube's piece may hold (CUBE_PIECE_MB, or the
    environment's ALMAPIPE_CUBE_PIECE_MB)."""
    return int(float(os.environ.get("ALMAPIPE_CUBE_PIECE_MB", CUBE_PIECE_MB)) * 2**20)


def cube_piece_channels(nrow: int, ncorr: int, budget: int | None = None) -> int:
    """The most channels a cube's range may hold (nrow rows, ncorr correlations) for its
    visibilities (complex64) and flags (a byte each), with the rows' weights and uvw, to
    fit in budget bytes (cube_piece_budget()); at least one."""
    budget = cube_piece_budget() if budget is None else budget
    per_chan = nrow * ncorr * (8 + 1)
    per_rows = nrow * (ncorr * 4 + 3 * 8)
    return max(1, int((budget - per_rows) // per_chan)) if per_chan > 0 else 1 << 30


def cube_piece_count(nrow: int, nchan: int, ncorr: int, budget: int | None = None) -> int:
    """The fewest channel ranges of a cube (nrow rows, nchan channels imaged, ncorr
    correlations) of at most cube_piece_channels each; at most one channel a range."""
    if nchan <= 0 or nrow * ncorr <= 0:
        return 1
    return max(1, min(nchan, -(-nchan // cube_piece_channels(nrow, ncorr, budget))))


def chans_or_all(spec: str | None, nchan: int) -> np.ndarray:
    """The channel mask of a selection ('4~6;50~59'); every channel where none is given."""
    return parse_channels(spec, nchan) if spec else np.ones(nchan, bool)


def _group_rows(io: StageIO, group: dict, fids: list, cross_only: bool = False) -> int:
    """The rows of the fields fids in a spw's partition or MOUS group of them (every EB's
    partition), from the partitions' index arrays."""
    return sum(len(io.vis(m).select(eb_field_ids(m, fids), cross_only=cross_only))
               for m in group.get("members", [group]))


def aggregate_feeds(io: StageIO, jobs: list) -> dict | None:
    """Where each spw's continuum image leaves its samples binned for the aggregate
    continuum (ImageJob.feed_key): a dict when an aggregate follows and what it holds
    fits in the memory a cube's piece may hold; else None (the aggregate reads)."""
    aggregates = [job for job in jobs if job[0] == "cont" and job[4].get("aggregate")]
    if aggregates and max(_feed_bytes(io, job) for job in aggregates) <= cube_piece_budget():
        return {}
    return None


def _feed_bytes(io: StageIO, job: tuple) -> int:
    """What an aggregate continuum job's spws' samples take held for it (samples.
    WidthBinned: per cross-correlation row, a complex64 and a float32 a bin of `width`
    selected channels, and its uvw), from the partitions' index arrays."""
    _, fids, pieces, _, p = job
    total = 0
    for piece in pieces:
        nrow = _group_rows(io, piece, fids, cross_only=True)
        sel = chans_or_all(piece.get("chans"), int(piece["nchan"]))
        total += nrow * (-(-int(sel.sum()) // max(int(p.get("width") or 8), 1)) * 12 + 24)
    return total


def _cube_pieces(io: StageIO, job: tuple) -> tuple[int, int]:
    """cube_piece_count of a cube job of makeimages, and the most channels a piece may
    hold (cube_piece_channels): from its rows (of its fields, in every EB's partition)
    and its channels, from the partitions' index arrays (no visibilities read)."""
    _, fids, group, _, p = job
    nrow = _group_rows(io, group, fids)
    sel = chans_or_all(p.get("chans"), int(group["nchan"]))
    return cube_piece_count(nrow, int(sel.sum()), int(group["ncorr"])), \
        cube_piece_channels(nrow, int(group["ncorr"]))


def _image_score(rec: dict, evidence: str) -> Score | None:
    """An image record's score (_image_qa, rec["qa_score"]) when below 0.9, with its rms."""
    if rec["qa_score"] < 0.9:
        theo = rec.get("theoretical_rms_jy_per_beam")
        return Score(rec["qa_score"], f"{rec['file']}: rms {rec['rms_jy_per_beam'] * 1e3:.2f} mJy/beam"
                     + (f" vs theoretical {theo * 1e3:.2f}" if theo else "") + ".", evidence=evidence)
    return None


image_rms = metric("makeimages.rms", "an image with a theoretical rms, by _image_qa: a target's or check source's "
                   "measured rms over the theoretical rms times the DR correction, 1 - 0.5 (ratio - 1.2); a "
                   "calibrator's dynamic range as makeimages.dynamic_range; below 0.9 named")(_image_score)
image_dynamic_range = metric("makeimages.dynamic_range", "an image without a theoretical rms: its peak over its "
                             "rms, 1.0 above 100, 0.8 above 20, else 0.5 (_image_qa); below 0.9 named")(_image_score)


@metric("makeimages.not_imaged", "images not made (all their data flagged, larger than max_imsize or max_cube_gb "
        "even narrowed, a mosaic larger than max_imsize; a field without "
        "data in a spw excepted): 0.5 each")
def not_imaged(label: str, why: str) -> Score | None:
    if why and why != "no data":
        return Score(0.5, f"{label}: {why}; not imaged.")
    return None


@metric("makeimages.size_mitigated", "an image narrowed to fit max_imsize or max_cube_gb (fewer pixels across "
        "the beam, less of the primary beam: hif_checkproductsize's mitigation): 0.9 each, named")
def size_mitigated(label: str, how: str) -> Score | None:
    return Score(0.9, f"{label}: {how}.") if how else None


def makeimages_tables(ctx: dict) -> list:
    if not ctx.get("images"):
        return []
    return [{"title": "Images", "header": ["File", "Mode", "Beam (\")", "Peak (mJy/beam)", "rms (mJy/beam)",
                                           "Theoretical rms", "Dirty DR", "DR correction", "QA"],
             "rows": [[i["file"], i["specmode"] + (" (aggregate)" if i.get("aggregate") else "")
                       + (f", mosaic of {i['pointings']} pointings" if i.get("pointings", 1) > 1 else ""),
                       "{:.1f} x {:.1f} @ {:.0f}".format(*i["beam_arcsec"]),
                       f"{i['peak_jy_per_beam'] * 1e3:.2f}", f"{i['rms_jy_per_beam'] * 1e3:.3f}",
                       f"{i['theoretical_rms_jy_per_beam'] * 1e3:.3f}" if i.get("theoretical_rms_jy_per_beam") else "",
                       f"{i['dirty_dynamic_range']:.0f}" if i.get("dirty_dynamic_range") else "",
                       f"{i.get('dr_correction', 1.0):.2f}", f"{i['qa_score']:.2f}"] for i in ctx["images"]]}]


# what a plane none of whose channels has data costs its piece, against one with data:
# it is skipped (nothing to grid), but a piece of only such planes still reads and saves
EMPTY_PLANE_WORK = 0.02


def chunk_masks(chans: np.ndarray, n: int, nbin: int = 1, has_data: np.ndarray | None = None,
                most: int | None = None) -> list:
    """At most n channel masks splitting the selected channels into contiguous ranges of
    whole planes (nbin channels a plane: cube_planes) of nearly equal work: as many
    channels with data each (has_data, per channel of the spw; None: every channel
    has), so that a range of flagged band edge is not one piece's whole share. A piece
    reads every channel of its range, flagged ones too, so with `most` (the channels a
    piece's memory budget allows) the balanced ranges are taken only if none spans more
    channels than both `most` and the widest of the equal ranges; else the equal ones
    (np.array_split of the planes, as pieces were cut before they were balanced)."""
    planes = cube_planes(np.flatnonzero(chans), nbin)
    n = max(1, min(n, len(planes)))
    equal = np.array_split(np.arange(len(planes)), n)
    parts = equal
    if has_data is not None and len(planes) > 1:
        work = np.array([EMPTY_PLANE_WORK * len(p) + has_data[p].sum() for p in planes])
        cum = np.cumsum(work)
        # the boundaries: after the plane where the running work passes k / n of it
        cuts = np.unique(np.clip(np.searchsorted(cum, cum[-1] * np.arange(1, n) / n, side="left") + 1, 1,
                                 len(planes) - 1))
        balanced = np.split(np.arange(len(planes)), cuts)

        def widest(split):
            return max(int(planes[q[-1]][-1] - planes[q[0]][0]) + 1 for q in split)
        if most is None or widest(balanced) <= max(most, widest(equal)):
            parts = balanced
    out = []
    for part in parts:
        m = np.zeros(len(chans), bool)
        m[np.concatenate([planes[k] for k in part])] = True
        out.append(m)
    return out


def images_at_once() -> int:
    """How many images makeimages makes at the same time, in threads (run_in_lanes):
    ALMAPIPE_IMAGES_AT_ONCE, 2 (the default) or 1 (one at a time: the least memory). One
    where this process's threads may not call parallel kernels at once (numba's
    threading layer, clean_kernels.threadsafe_layer) or where it computes on one thread.
    Why two: one image at a time kept the 2-core machine's cores 1.2 busy (reading,
    binning and writing an image's products are mostly one thread)."""
    n = min(2, max(1, int(os.environ.get("ALMAPIPE_IMAGES_AT_ONCE", "2"))))
    if n > 1 and (gridding.nthreads() < 2 or not threadsafe_layer()):
        return 1
    return n


def run_in_lanes(tasks: list, at_once: int) -> list:
    """The results, in order, of tasks (fn, lane): the tasks of a lane run one after the
    other in their order, the lanes side by side in threads (at_once > 1; else every task
    in order). Once a task failed no other starts, and its error is raised when the tasks
    running have ended."""
    if at_once <= 1:
        return [fn() for fn, _ in tasks]
    lanes: dict = {}
    for k, (_, lane) in enumerate(tasks):
        lanes.setdefault(lane, []).append(k)
    results, errors, failed = [None] * len(tasks), {}, threading.Event()

    def run(indices):
        for k in indices:
            if failed.is_set():
                return
            try:
                results[k] = tasks[k][0]()
            except BaseException as exc:
                errors[k] = exc
                failed.set()
                return
    with ThreadPoolExecutor(len(lanes), thread_name_prefix="image") as pool:
        list(pool.map(run, lanes.values()))
    if errors:
        raise errors[min(errors)]
    return results


def _make_image(ctx: dict, io: StageIO, j: int, job: tuple, theoretical: dict, feeds: dict | None,
                nchunks: int, most: int | None) -> tuple:
    """makeimages' image j: (its QA, its record or None, the items of its pieces where a
    cube is cleaned in nchunks channel ranges of at most `most` channels by the imager
    workers)."""
    qa = QA()
    started = time.perf_counter()
    # a cube in pieces: its heuristics only, in row blocks (ImageJob's heuristics_only)
    im = ImageJob(ctx, io, job, theoretical, heuristics_only=nchunks > 1, feeds=feeds)
    why = im.prepare()
    if why:
        qa.add(not_imaged(im.label(), why))
        return qa, None, []
    if nchunks > 1:
        # the heuristics (image size, cell, theoretical noise) from the whole spw, once:
        # each piece reads only its channels, the join only flags; each piece's channels
        # chosen here for the same work each (chunk_masks)
        prep = im.heuristics()
        masks = chunk_masks(im.chans, nchunks, im.nbin, im.channel_has_data, most)
        return qa, None, [{"job": j, "chunk": k, "nchunks": len(masks), "prep": prep,
                           "piece_chans": format_channels(m)} for k, m in enumerate(masks)]
    # a cube cleaned here in one piece: as a join holds it (a large one in files)
    scratch = os.path.join(io.workdir, f"image{j}")
    try:
        rec = im.products(im.clean(), qa, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    io.log("%s: made in %.1f s", rec["file"], time.perf_counter() - started)
    return qa, rec, []


@stage("makeimages", service="imager", topic="Line finding and imaging", reads=IMAGING_READS,
       qa=(not_imaged, size_mitigated, image_rms, image_dynamic_range), tables=makeimages_tables,
       writes=("images", "fanout"), params=MAKEIMAGES_PARAMS)
def makeimages(ctx: dict, params: dict, io: StageIO) -> QA:
    """Per-spw mfs images of the calibrators, the target's continuum (per spw and
    aggregate) and its cubes (hif_makeimages). With cube_chunks > 1 each cube is
    cleaned in that many channel ranges by the imager workers in parallel
    (imagecube_chunk) and joined into one FITS cube (joincube); without cube_chunks,
    in as many as keep a range's visibilities within a budget (cube_piece_count)."""
    qa = QA()
    jobs = _image_jobs(ctx, params)
    if not jobs:
        raise StageError("makeimages: nothing to image (no calibrators, no continuum-subtracted target)")
    imaged_spws = {str(p["spw"]) for p in ctx.get("target_partitions", []) + ctx.get("partitions", [])}
    for info in ctx.get("observation", {}).get("spws", []):
        note = channel_noise_note(info["id"], info.get("chan_width_hz", 0.0), info.get("effective_bw_hz"))
        if note and str(info["id"]) in imaged_spws:
            qa.note(note)
    chunks = params["cube_chunks"]
    theoretical = {}          # (field, spw) -> theoretical rms of its mfs image, for the aggregate
    feeds = aggregate_feeds(io, jobs)
    tasks = []
    for j, job in enumerate(jobs):
        nchunks, most = 1, None
        if job[0] == "cube":
            # cube_chunks given, or as many as keep each piece within the memory budget
            nchunks, most = _cube_pieces(io, job)
            nchunks = int(chunks) if chunks is not None else nchunks
        # two lanes side by side: the cubes cleaned here in one piece, each of which holds
        # its spw's visibilities and all its planes, one at a time; the other images one
        # at a time beside them, in order (the aggregate after its spws' own images,
        # whose samples and noise it takes)
        lane = "cubes" if job[0] == "cube" and nchunks == 1 else "images"
        tasks.append((functools.partial(_make_image, ctx, io, j, job, theoretical, feeds, nchunks, most), lane))
    at_once = images_at_once()
    io.log("images made %s", "two at a time (the cubes one at a time beside the others)" if at_once > 1 else
           "one at a time" + ("" if threadsafe_layer() else " (numba's threading layer lets one thread call "
                                                             "its parallel kernels at a time)"))
    images, pieces = [], []
    for image_qa, image, its_pieces in run_in_lanes(tasks, at_once):
        qa.extend(image_qa)
        images += [image] if image is not None else []
        pieces += its_pieces
    if pieces:
        ctx["fanout"] = {"piece_stage": "imagecube_chunk", "join_stage": "joincube", "items": pieces}
        qa.note(f"{len({p['job'] for p in pieces})} cube(s) cleaned in {len(pieces)} channel ranges by the imager "
                "workers.")
    elif not images:
        raise StageError("makeimages: no image could be made: all data of the fields to image are flagged")
    ctx["images"] = images
    qa.note(f"Made {len(images)} image(s)" + (", cubes to follow." if pieces else "."))
    return qa


@stage("imagecube_chunk", service="imager", topic="Line finding and imaging", reads=IMAGING_READS,
       writes=("piece",), params=MAKEIMAGES_PARAMS + (
           Param("piece", dict, None, "the cube and channel range", internal=True),))
def imagecube_chunk(ctx: dict, params: dict, io: StageIO) -> QA:
    """One channel range of one cube of makeimages: cleaned planes, not yet restored
    (the join restores the whole cube with its common beam)."""
    qa = QA()
    item = params["piece"]
    job = _image_jobs(ctx, params)[item["job"]]
    chan, mask = None, None
    if item.get("prep"):
        # only this piece's channels are read (and the few beyond its ends that the
        # move onto the LSRK grid needs)
        group, p = job[2], job[4]
        members = group.get("members", [group])
        nchan = int(group["nchan"])
        sel = chans_or_all(p.get("chans"), nchan)
        mask = parse_channels(item["piece_chans"], nchan) if item.get("piece_chans") else \
            chunk_masks(sel, item["nchunks"], int(item["prep"].get("nbin", 1)))[item["chunk"]]
        idx = np.flatnonzero(mask)
        first = io.vis(members[0])
        times = np.concatenate([io.vis(m).index("TIME") for m in members])
        margin = lsrk_margin(ctx, group["spw"], job[1][0], first.freq, times)
        chan = slice(max(0, int(idx[0]) - margin), min(nchan, int(idx[-1]) + 1 + margin))
    im = ImageJob(ctx, io, job, {}, chan=chan, prep=item.get("prep"))
    why = im.prepare()
    if why:
        ctx["piece"] = dict(item, skipped=why)
        return qa
    if mask is None:                # a piece of a makeimages from before the heuristics were handed on
        mask = chunk_masks(im.chans, item["nchunks"], im.nbin)[item["chunk"]]
    own = mask if chan is None else mask[chan]          # in the channels the Vis holds
    io.log("%s: cleaning channels %s (read channels %d-%d)", im.label(), format_channels(mask), im.chan0,
           im.chan0 + len(im.vis.freq) - 1)
    planes = im.clean(own)
    name = f"planes_{item['job']}_{item['chunk']}"
    # the residual and PSF planes as FITS data (big-endian float32): the join assembles
    # those cubes from every piece's in the store, and reads only the residuals back (to
    # restore); the rest (beams, the clean components, the masks' bits) in an .npz (the
    # model and mask cubes, mostly empty planes, are the join's to write: decision 0020)
    own_planes = {"residual": planes.residuals, "psf": planes.psfs}
    nbytes = 4 * len(planes.freqs) * im.spec.npix ** 2
    with io.puts_behind() as up:
        for suffix, src in own_planes.items():
            up.put_stream(f"{name}.{suffix}", plane_chunks(src), nbytes)
        path = os.path.join(io.workdir, f"{name}.npz")
        planes.save(path, dense=False)
        up.put_file(path)
        keys = {e["name"]: e["key"] for e in up.entries()}
    slabs = {suffix: keys[f"{name}.{suffix}"] for suffix in own_planes}
    ctx["piece"] = dict(item, key=keys[f"{name}.npz"], slabs=slabs, slab_bytes=nbytes, dr=im.dr_seen,
                        lsrk_shift=im.lsrk_shift)
    moved = io.bytes_moved()
    if moved:
        io.log("read %d B of visibility store objects", moved["s3_read"] + moved["cache_read"])
    qa.note(f"{im.label()}: channels {format_channels(mask)} cleaned ({planes.iterations} components).")
    return qa


@stage("joincube", service="imager", topic="Line finding and imaging", reads=IMAGING_READS + ("images",),
       qa=(size_mitigated, image_rms, image_dynamic_range),
       writes=("images",), params=MAKEIMAGES_PARAMS + (
           Param("pieces", list, None, "the keys of the pieces' results", internal=True),))
def joincube(ctx: dict, params: dict, io: StageIO) -> QA:
    """Join the channel ranges of each cube into one image and write its products."""
    qa = QA()
    pieces = [io.store.get_json(k)["piece"] for k in params["pieces"]]
    jobs = _image_jobs(ctx, params)
    for j in sorted({p["job"] for p in pieces}):
        mine = sorted((p for p in pieces if p["job"] == j and "key" in p), key=lambda p: p["chunk"])
        if not mine:
            continue
        # the pieces were cleaned with makeimages' heuristics: the join reads flags, not data
        im = ImageJob(ctx, io, jobs[j], {}, data=mine[0].get("prep") is None, prep=mine[0].get("prep"))
        if im.prepare():
            continue
        for p in mine:
            dr = p.get("dr") or {}
            if dr.get("factor", 0) >= im.dr_seen.get("factor", 0):
                im.dr_seen.update(dr)
            im.lsrk_shift = max(im.lsrk_shift, p.get("lsrk_shift", 0.0))
        # the pieces read one at a time into the cube's arrays, a large cube's on disk:
        # the join holds a piece and a plane, not the cube several times over
        scratch = os.path.join(io.workdir, f"cube{j}")
        # pieces that stored their residual and PSF planes as FITS data (all, but those
        # of a makeimages before decision 0020): the residuals read back to restore, the
        # residual and PSF cubes assembled from them in the store
        stored = all("slabs" in p for p in mine)
        if not stored and any("slabs" in p for p in mine):
            raise StageError(f"joincube: the pieces of cube {j} were cleaned by two versions of the pipeline "
                             "(some stored their planes for the store to assemble, some did not): run makeimages "
                             "again")
        residuals = [io.store.chunks(p["slabs"]["residual"]) for p in mine] if stored else None
        slabs = {suffix: [Range(p["slabs"][suffix], 0, p["slab_bytes"]) for p in mine]
                 for suffix in mine[0]["slabs"]} if stored else None
        try:
            planes = join_plane_files([io.fetch_file(p["key"]) for p in mine], scratch, residuals)
            ctx["images"].append(im.products(planes, qa, scratch, slabs))
            del planes
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
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
    # a Figure of its own, not pyplot's: two images are made at once, in threads
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    im = ax.imshow(plane, origin="lower", cmap="inferno")
    ax.contour(res.pb, levels=[0.2, 0.5], colors="w", linewidths=0.5)
    fig.colorbar(im, ax=ax, label="Jy/beam")
    ax.set_title(base.split(".", 1)[1] + (" (peak channel)" if specmode == "cube" else ""), fontsize=7)
    ax.set_xlabel("x (RA decreasing)")
    ax.set_ylabel("y (Dec)")
    return io.plot(fig, f"{base}.png")["key"]


def _cube_spectrum(io, res, base, chan_numbers, peak_ok) -> str:
    fig = Figure(figsize=(7, 3))            # not pyplot's (as _thumbnail)
    ax = fig.subplots()
    peak = np.nanmax(res.image, axis=(1, 2))
    ax.plot(chan_numbers, peak * 1e3, "k.-", ms=3)
    if not peak_ok.all():              # edge and flagged planes, which the peak is not taken from
        ax.plot(chan_numbers[~peak_ok], peak[~peak_ok] * 1e3, "x", color="tab:red", label="edge / flagged")
        ax.legend()
    ax.set_xlabel("channel")
    ax.set_ylabel("peak (mJy/beam)")
    ax.set_title("Peak flux density per channel")
    return io.plot(fig, f"{base}.spectrum.png")["key"]
