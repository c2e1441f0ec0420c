"""Imaging stages (imager service): split, uvcontsub (with findcont), makeimages."""
from __future__ import annotations

import os

import casacore.tables as ct
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .base import QA, StageError, StageIO, field_ids_with, field_name, require_intent, stage  # noqa: E402
from .calibration import calibrator_ids, read_part  # noqa: E402
from ..imaging import gridding  # noqa: E402
from ..imaging.deconvolve import robust_rms  # noqa: E402
from ..imaging.imager import ImageSpec, make_image  # noqa: E402
from ..imaging.products import image_header, write_fits  # noqa: E402
from ..imaging.uvcontsub import format_channels, parse_channels, subtract_continuum  # noqa: E402
from ..msio import ms as msio  # noqa: E402

INTENT_SUFFIX = {"BANDPASS": "bp", "FLUX": "flux", "PHASE": "ph", "CHECK": "check", "TARGET": "sci"}


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
    the dirty cube rather than on visibilities)."""
    from ..imaging.imager import _stokes_i_samples
    nchan = len(vis.freq)
    cross = vis.ant1 != vis.ant2
    uvmax = np.percentile(np.hypot(vis.uvw[cross, 0], vis.uvw[cross, 1]), 95) * vis.freq.max() / 299792458.0
    cell = 1.0 / max(uvmax, 1e-9) / 3.0                      # radians: ~3 pixels per beam
    uvw, data, w = _stokes_i_samples(vis, np.arange(nchan))
    has_data = w.sum(axis=0) > 0
    cube = np.zeros((nchan, npix, npix))
    for c in np.flatnonzero(has_data):
        cube[c] = gridding.dirty(uvw, vis.freq[c:c + 1], data[:, c:c + 1], w[:, c:c + 1], npix, cell)
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
    edges and flagged channels are left out."""
    nchan = len(vis.freq)
    spec, has_data = line_spectrum(vis)
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


def _ranges_ghz(freq: np.ndarray, mask: np.ndarray) -> list:
    idx = np.flatnonzero(mask)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if len(idx) else []
    return [(float(freq[r].min() / 1e9), float(freq[r].max() / 1e9)) for r in runs]


@stage("uvcontsub", service="imager")
def uvcontsub(ctx: dict, params: dict, io: StageIO) -> QA:
    """Fit and subtract the continuum per baseline and time over the line-free channels."""
    qa = QA()
    if not ctx.get("target_partitions"):
        raise StageError("uvcontsub: no target MS; run split first")
    user = parse_cont_dat(ctx["user"]["cont_dat"]) if ctx["user"].get("cont_dat") else {}
    spws = {s["id"]: s for s in ctx["observation"]["spws"]}
    entries, out = [], []
    target_name = field_name(ctx, field_ids_with(ctx, "TARGET")[0])
    for part in ctx["target_partitions"]:
        ms, vis = read_part(io, part)
        nchan = len(vis.freq)
        key = (target_name, part["spw"])
        if key in user:
            mask = np.zeros(nchan, bool)
            for lo, hi in user[key]:
                mask |= (vis.freq / 1e9 >= lo - 1e-9) & (vis.freq / 1e9 <= hi + 1e-9)
            origin = "user cont.dat"
        elif params.get("fitspw"):
            mask = parse_channels(params["fitspw"], nchan)
            origin = "recipe fitspw"
        else:
            mask = find_continuum(vis)
            origin = "findcont"
        if mask.sum() < params.get("fitorder", 0) + 2:
            raise StageError(f"uvcontsub: only {mask.sum()} continuum channels in spw {part['spw']}")
        line, model = subtract_continuum(vis.data, vis.flag, mask, params.get("fitorder", 0))
        msio.write_column(ms, vis.rows, "DATA", line)
        name = part["name"].replace(".ms", ".contsub.ms")
        dest = os.path.join(io.workdir, name)
        os.rename(ms, dest)
        entry = io.put_dir(dest, name)
        out.append(dict(part, key=entry["key"], sha256=entry["sha256"], name=name,
                        cont_chans=format_channels(mask)))
        entries.append({"field": target_name, "spw": part["spw"], "frame": spws[part["spw"]]["frame"],
                        "ranges_ghz": _ranges_ghz(vis.freq, mask), "channels": format_channels(mask),
                        "origin": origin})
        qa.note(f"spw {part['spw']}: continuum channels {format_channels(mask)} ({origin}), fit order "
                f"{params.get('fitorder', 0)}.")
        _plot_spectrum(io, vis, mask, part["spw"])
    text = cont_dat_text(entries)
    ctx["cont_dat_key"] = io.put_bytes(text.encode(), "cont.dat", "text/plain")["key"]
    ctx["continuum"] = entries
    ctx["contsub_partitions"] = out
    return qa


def _plot_spectrum(io, vis, mask, spw):
    w = np.where(vis.flag, 0, vis.weight[:, None, :])
    spec = np.abs((w * vis.data).sum(axis=(0, 2)) / np.maximum(w.sum(axis=(0, 2)), 1e-30))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ch = np.arange(len(spec))
    ax.plot(ch, spec, "k-", lw=1)
    ax.fill_between(ch, 0, spec.max() * 1.05, where=mask, color="tab:green", alpha=0.2, label="continuum")
    ax.set_xlabel("channel")
    ax.set_ylabel("|vector average| (Jy)")
    ax.set_title(f"Target spectrum and continuum ranges, spw {spw}")
    ax.legend()
    io.plot(fig, f"findcont_spw{spw}.png")


# ------------------------------------------------------------------ makeimages

def image_heuristics(vis: msio.Vis, dish_m: float, telescope: str, chans: np.ndarray) -> tuple[float, int]:
    """(cell arcsec, npix): 5 pixels across the beam, image covering the primary
    beam down to 0.2 of its peak, rounded up to a fast FFT size (hif_makeimlist)."""
    from ..imaging.products import PB_FWHM_FACTOR
    cross = (vis.ant1 != vis.ant2) & ~vis.flag[:, chans].all(axis=(1, 2))
    fmax = vis.freq[chans].max()
    uvmax = np.percentile(np.hypot(vis.uvw[cross, 0], vis.uvw[cross, 1]), 95) * fmax / 299792458.0
    beam_arcsec = np.degrees(1.0 / max(uvmax, 1e-9)) * 3600 * 1.0
    cell = float(np.round(beam_arcsec / 5.0, 3 if beam_arcsec < 1 else 2))
    fwhm = PB_FWHM_FACTOR.get(telescope.upper(), 1.13) * 299792458.0 / vis.freq[chans].min() / dish_m
    radius = fwhm * np.sqrt(np.log(5.0) / (4 * np.log(2)))   # where a Gaussian beam falls to 0.2
    npix = gridding.good_size(int(np.ceil(2 * np.degrees(radius) * 3600 / cell)))
    return cell, npix


def _stats(res, spec: ImageSpec, cont_mask: np.ndarray | None, specmode: str) -> dict:
    inside = res.mask
    if specmode == "cube" and cont_mask is not None and cont_mask.any():
        noise_planes = res.image[cont_mask]
    else:
        noise_planes = res.residual
    rms = robust_rms(noise_planes[:, inside])
    peak = float(np.nanmax(res.image[:, inside])) if inside.any() else 0.0
    return {"rms": rms, "peak": peak}


def _theoretical_rms(vis: msio.Vis, spec: ImageSpec, line_free: np.ndarray | None) -> float | None:
    """Image noise predicted from the visibility scatter and the imaging weights:
    sigma_vis * sqrt(sum w_im^2 / w_nat) / sum w_im, from line-free data, for one
    plane (the first line-free channel's Briggs weights)."""
    from ..imaging.imager import _stokes_i_samples
    if line_free is None or not line_free.any():
        return None
    cross = vis.ant1 != vis.ant2
    d = vis.data[cross][:, line_free]
    ok = ~vis.flag[cross][:, line_free]
    w = np.broadcast_to(vis.weight[cross][:, None, :], d.shape)
    resid = d[ok].real * np.sqrt(w[ok])
    if resid.size < 10:
        return None
    sigma_unit = 1.4826 * np.median(np.abs(resid - np.median(resid)))   # sigma for weight 1
    c0 = np.flatnonzero(line_free)[:1]
    uvw, _, wnat = _stokes_i_samples(vis, c0)          # auto-correlations get weight 0
    wim = gridding.briggs_weights(uvw, vis.freq[c0], wnat, spec.npix, np.radians(spec.cell_arcsec / 3600),
                                  spec.robust)
    wv, wi = wnat[:, 0], wim[:, 0]
    sel = wv > 0
    if not sel.any():
        return None
    # var(V_i) = sigma_unit^2 / w_i (natural weights are inverse variances up to a scale)
    return float(sigma_unit * np.sqrt((wi[sel] ** 2 / wv[sel]).sum()) / wi[sel].sum())


def _product_name(ctx: dict, field: str, intents: list, spw: int, specmode: str) -> str:
    intent = next((INTENT_SUFFIX[i] for i in ("TARGET", "BANDPASS", "FLUX", "PHASE", "CHECK") if i in intents), "sci")
    safe = field.replace(" ", "_")
    return f"{ctx.get('ms_name', 'oussid')}.{safe}_{intent}.spw{spw}.{specmode}.I"


@stage("makeimages", service="imager")
def makeimages(ctx: dict, params: dict, io: StageIO) -> QA:
    """Per-spw mfs images of the calibrators and the cube of the target (hif_makeimages)."""
    qa = QA()
    obs = ctx["observation"]
    telescope = obs["telescope"]
    dish = float(np.median([a["diameter_m"] for a in obs["antennas"] if a["has_data"]]))
    fields = {f["id"]: f for f in obs["fields"]}
    images = []
    jobs = []
    if params.get("calibrators", True):
        for fid in calibrator_ids(ctx):
            for part in ctx["partitions"]:
                jobs.append(("mfs", fid, part, "CORRECTED_DATA", params.get("calibrator", {})))
    if params.get("target_cont", False) and ctx.get("target_partitions") and ctx.get("continuum"):
        # specmode 'cont': the target's continuum from its line-free channels (cont.dat)
        chans_of = {e["spw"]: e["channels"] for e in ctx["continuum"]}
        for fid in field_ids_with(ctx, "TARGET"):
            for part in ctx["target_partitions"]:
                jobs.append(("cont", fid, part, "DATA", dict(params.get("cont", {}),
                                                              chans=chans_of.get(part["spw"], ""))))
    if params.get("target_cube", True) and ctx.get("contsub_partitions"):
        for fid in field_ids_with(ctx, "TARGET"):
            for part in ctx["contsub_partitions"]:
                jobs.append(("cube", fid, part, "DATA", params.get("cube", {})))
    if not jobs:
        raise StageError("makeimages: nothing to image (no calibrators, no continuum-subtracted target)")
    for specmode, fid, part, column, p in jobs:
        _, vis = read_part(io, part, fields=[fid], column=column)
        if not len(vis.time):
            continue
        nchan = len(vis.freq)
        chans = parse_channels(p["chans"], nchan) if p.get("chans") else np.ones(nchan, bool)
        if vis.flag[:, chans].all():
            qa.lower(0.5, f"{fields[fid]['name']} spw {part['spw']} ({specmode}): all data flagged; not imaged.")
            continue
        cell, npix = image_heuristics(vis, dish, telescope, chans)
        cell = float(p.get("cell_arcsec", cell))
        npix = int(p.get("imsize", npix))
        spec = ImageSpec(field=fields[fid]["name"], specmode="mfs" if specmode == "cont" else specmode,
                         npix=npix, cell_arcsec=cell,
                         robust=p.get("robust", 0.5), niter=int(p.get("niter", 1000)),
                         nsigma=float(p.get("nsigma", 3.0)), chans=chans, automask=bool(p.get("automask", False)))
        res = make_image(vis, spec, dish, telescope)
        io.visibilities += vis.data.size
        fctx = next(f for f in ctx["fields"] if f["id"] == fid)
        base = _product_name(ctx, spec.field, fctx["intents"], part["spw"], specmode)
        cont_mask = None
        if specmode == "cube" and part.get("cont_chans"):
            cont_mask = parse_channels(part["cont_chans"], nchan)[chans]
        stats = _stats(res, spec, cont_mask, specmode)
        line_free = parse_channels(part["cont_chans"], nchan) & chans if part.get("cont_chans") else None
        theo = _theoretical_rms(vis, spec, line_free) if specmode == "cube" else None
        frame = next(s["frame"] for s in obs["spws"] if s["id"] == part["spw"])
        fld = fields[fid]
        files = {}
        for suffix, planes, unit in (("image", res.image, "Jy/beam"), ("pbcor", res.pbcor, "Jy/beam"),
                                     ("pb", np.repeat(res.pb[None], len(res.freqs), 0), ""),
                                     ("mask", res.clean_mask.astype(np.float32) if res.clean_mask is not None
                                      else np.repeat(res.mask[None].astype(np.float32), len(res.freqs), 0), ""),
                                     ("residual", res.residual, "Jy/beam")):
            hdr = image_header(fld["ra_rad"], fld["dec_rad"], npix, np.radians(cell / 3600), res.freqs, frame,
                               unit, res.beam, spec.field, telescope,
                               restfreq=1.420405752e9 if telescope.upper() in ("VLA", "EVLA") else None)
            path = os.path.join(io.workdir, f"{base}.{suffix}.fits")
            write_fits(path, planes, hdr)
            files[suffix] = io.put_file(path)["key"]
        thumb = _thumbnail(io, res, base, specmode)
        rec = {"file": f"{base}.pbcor.fits", "files": files, "field": spec.field, "spw": part["spw"],
               "specmode": specmode, "intents": fctx["intents"], "imsize": npix, "cell_arcsec": cell,
               "robust": spec.robust, "nchan": int(len(res.freqs)), "niter_done": res.iterations,
               "peak_jy_per_beam": stats["peak"], "rms_jy_per_beam": stats["rms"],
               "theoretical_rms_jy_per_beam": theo,
               "dynamic_range": stats["peak"] / stats["rms"] if stats["rms"] > 0 else None,
               "beam_arcsec": [round(res.beam[0], 3), round(res.beam[1], 3), round(res.beam[2], 2)],
               "stop_reasons": sorted(set(res.stop_reasons)), "thumbnail": thumb}
        if specmode == "cube":
            rec["chans"] = p.get("chans", "")
            rec["peak_channel"] = int(np.flatnonzero(chans)[int(np.nanargmax(np.nanmax(res.image, axis=(1, 2))))])
            rec["spectrum_png"] = _cube_spectrum(io, res, base, np.flatnonzero(chans))
        images.append(rec)
        qa_score = _image_qa(rec)
        rec["qa_score"] = qa_score
        if qa_score < 0.9:
            qa.lower(qa_score, f"{rec['file']}: rms {stats['rms'] * 1e3:.2f} mJy/beam"
                     + (f" vs theoretical {theo * 1e3:.2f}" if theo else "") + ".")
        io.log("%s: peak %.4f Jy/beam, rms %.5f Jy/beam, beam %s", rec["file"], stats["peak"], stats["rms"],
               rec["beam_arcsec"])
    if not images:
        raise StageError("makeimages: no image could be made: all data of the fields to image are flagged")
    ctx["images"] = images
    qa.note(f"Made {len(images)} image(s).")
    return qa


def _image_qa(rec: dict) -> float:
    """ALMA-style: the ratio of measured to theoretical rms decides the score;
    without a theoretical value (calibrators) the dynamic range does."""
    theo = rec.get("theoretical_rms_jy_per_beam")
    if theo:
        ratio = rec["rms_jy_per_beam"] / theo
        return float(np.clip(1.0 - max(ratio - 1.2, 0) * 0.5, 0.0, 1.0))
    dr = rec.get("dynamic_range") or 0
    return 1.0 if dr > 100 else 0.8 if dr > 20 else 0.5


def _thumbnail(io, res, base, specmode) -> str:
    plane = res.image[0] if specmode == "mfs" else res.image[int(np.nanargmax(np.nanmax(res.image, axis=(1, 2))))]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(plane, origin="lower", cmap="inferno")
    ax.contour(res.pb, levels=[0.2, 0.5], colors="w", linewidths=0.5)
    fig.colorbar(im, ax=ax, label="Jy/beam")
    ax.set_title(base.split(".", 1)[1] + (" (peak channel)" if specmode == "cube" else ""), fontsize=7)
    ax.set_xlabel("x (RA decreasing)")
    ax.set_ylabel("y (Dec)")
    return io.plot(fig, f"{base}.png")["key"]


def _cube_spectrum(io, res, base, chan_numbers) -> str:
    fig, ax = plt.subplots(figsize=(7, 3))
    peak = np.nanmax(res.image, axis=(1, 2))
    ax.plot(chan_numbers, peak * 1e3, "k.-", ms=3)
    ax.set_xlabel("channel")
    ax.set_ylabel("peak (mJy/beam)")
    ax.set_title("Peak flux density per channel")
    return io.plot(fig, f"{base}.spectrum.png")["key"]
