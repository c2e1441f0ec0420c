"""The WebLog's image views, drawn from the FITS products themselves: sky axes (RA/Dec
from the header's WCS), the restoring beam, a colour bar, and the detail views that
exist for the image (residual, clean mask, primary beam, PSF, clean model, and for a
multi-term image the spectral index; for a cube the moment-0 map over its continuum
channels and the spectrum at the peak).
"""
from __future__ import annotations

import os
import warnings

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402
from astropy.wcs import WCS, FITSFixedWarning  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402

from .plots import require_finite  # noqa: E402

DPI = 72      # the page-weight budget: ~100-300 kB a view

# the views, each from the first of its FITS products an image has (files' keys: the
# suffixes of makeimages, a multi-term image's tt0 products named as ALMA names them)
VIEW_FILES = {"pbcor": ("pbcor", "tt0.pbcor"), "image": ("image", "tt0"), "residual": ("residual", "residual.tt0"),
              "mask": ("mask",), "pb": ("pb", "pb.tt0"), "psf": ("psf", "psf.tt0"),
              "model": ("model", "model.tt0"), "alpha": ("alpha",)}
# the detail views after the main one: (view, unit, colour map, beam drawn)
DETAIL_VIEWS = (("residual", "Jy/beam", "inferno", True), ("mask", "", "gray", False), ("pb", "", "gray", False),
                ("psf", "", "viridis", True), ("model", "Jy/pixel", "RdBu_r", False),
                ("alpha", "", "coolwarm", False))


def view_paths(files: dict, fetch) -> dict:
    """{view: local path} of an image's files ({suffix: object key}), fetched with fetch."""
    out = {}
    for view, names in VIEW_FILES.items():
        name = next((n for n in names if n in files), None)
        if name is not None:
            out[view] = fetch(files[name])
    return out


def read_planes(path: str) -> tuple[np.ndarray, fits.Header]:
    """A FITS image as (nplane, ny, nx) (the Stokes axis dropped) and its header. The
    planes stay in the file (memory-mapped, FITS's big-endian floats) and are read as
    they are used: a view draws a cube's planes one at a time, never the whole cube
    (a 3840-channel cube of 256² is 1 GB a product, and a view reads up to five)."""
    with fits.open(path, memmap=True) as hdul:
        data, hdr = hdul[0].data, hdul[0].header
    while data.ndim > 3:
        data = data[0]
    return (data[None] if data.ndim == 2 else data), hdr


def _model_plane(model: np.ndarray, panel_px: int = 200) -> np.ndarray:
    """A clean model for a panel about panel_px wide: each pixel the largest-magnitude
    component within the k x k pixels a screen pixel covers, so single components
    survive the panel's downsampling (the WCS is unchanged: same shape)."""
    k = int(np.ceil(model.shape[-1] / panel_px))
    if k <= 1:
        return model
    from scipy.ndimage import maximum_filter, minimum_filter
    m = np.nan_to_num(model)
    hi, lo = maximum_filter(m, size=k), minimum_filter(m, size=k)
    return np.where(hi >= -lo, hi, lo)


def _sky_panel(fig, pos, plane, hdr, title, unit, beam=True, cmap="inferno", contour=None, vrange=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(hdr).celestial
    ax = fig.add_subplot(*pos, projection=wcs)
    finite = plane[np.isfinite(plane)]
    lo, hi = vrange or (np.percentile(finite, [0.5, 99.9]) if finite.size else (0, 1))
    im = ax.imshow(plane, origin="lower", cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1)
    if contour is not None:
        ax.contour(contour, levels=[0.5], colors="c", linewidths=0.6)
    ax.coords[0].set_axislabel("RA (ICRS)", fontsize=7)
    ax.coords[1].set_axislabel("Dec (ICRS)", fontsize=7)
    for c in ax.coords:
        c.set_ticklabel(size=6)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label(unit, fontsize=7)
    if beam and hdr.get("BMAJ"):
        cell = abs(hdr["CDELT2"])
        ny, nx = plane.shape
        ax.add_patch(Ellipse((0.1 * nx, 0.1 * ny), hdr["BMIN"] / cell, hdr["BMAJ"] / cell, angle=hdr.get("BPA", 0.0),
                             facecolor="none", edgecolor="c", lw=1.2))
    return ax


def _continuum_channels(ctx: dict, img: dict, nchan: int) -> tuple[np.ndarray, str]:
    """The cube's planes in its field's continuum ranges (cont.dat), else all planes: its
    planes are those of the channels it imaged (the record's chans, nbin a plane), and
    a plane is in them if all its channels are."""
    from ..imaging.imager import per_plane
    from ..imaging.uvcontsub import parse_channels
    spw = next((s for s in ctx.get("observation", {}).get("spws", []) if s["id"] == int(img["spw"])), {})
    for e in ctx.get("continuum", []):
        if spw.get("nchan") and e["field"] == img["field"] and int(e["spw"]) == int(img["spw"]) and \
                e.get("channels"):
            try:
                imaged = parse_channels(img["chans"], spw["nchan"]) if img.get("chans") else \
                    np.ones(spw["nchan"], bool)
                sel = per_plane(parse_channels(e["channels"], spw["nchan"]), np.flatnonzero(imaged),
                                int(img.get("nbin") or 1), np.all)
            except (ValueError, IndexError):
                break
            if len(sel) == nchan and sel.any():        # else not this cube's planes: all of them
                return sel, "continuum channels"
    return np.ones(nchan, bool), "all channels"


def image_view(ctx: dict, img: dict, paths: dict, out_png: str) -> str:
    """One figure for one image: the pbcor (or image) plane with RA/Dec, beam and colour
    bar, and its detail views. paths: view (VIEW_FILES) -> local file. Returns the title."""
    main_kind = "pbcor" if "pbcor" in paths else "image"
    data, hdr = read_planes(paths[main_kind])
    cube = img.get("specmode") == "cube" and data.shape[0] > 1
    pplane, panels = 0, []
    # the peak is looked for where the primary beam is >= 0.5: a pbcor image's noise
    # grows towards its edge, where its largest values would otherwise be
    inner = np.ones(data.shape[1:], bool)
    if "pb" in paths:
        with np.errstate(invalid="ignore"):
            inner = read_planes(paths["pb"])[0][0] >= 0.5
    if cube:
        sel, what = _continuum_channels(ctx, img, data.shape[0])
        dv = abs(hdr.get("CDELT3", 1.0)) / 1e6          # MHz a channel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mom0 = np.zeros(data.shape[1:])
            for k in np.flatnonzero(sel):
                mom0 += np.nan_to_num(data[k])
            mom0 *= dv
            pplane = int(np.nanargmax([np.nanmax(np.where(inner, plane, np.nan)) for plane in data]))
        require_finite(f"image view of {img['file']}", data[pplane])
        panels.append(("sky", data[pplane], f"{main_kind}, peak plane {pplane}", "Jy/beam", {}))
        panels.append(("sky", mom0, f"moment 0 over {what}", "Jy/beam MHz", {}))
    else:
        require_finite(f"image view of {img['file']}", data[0])
        panels.append(("sky", data[0], main_kind, "Jy/beam", {}))
    for kind, unit, cmap, beam in DETAIL_VIEWS:
        if kind not in paths:
            continue
        d, _ = read_planes(paths[kind])
        plane, title, opts = d[min(pplane, d.shape[0] - 1)], kind, {"cmap": cmap, "beam": beam}
        if kind == "psf":                      # the whole PSF, its sidelobes against its peak of 1
            finite = plane[np.isfinite(plane)]
            opts["vrange"] = (float(finite.min()), float(finite.max())) if finite.size else None
        elif kind == "model":                  # the components, symmetric about zero
            n, total = int(np.count_nonzero(np.nan_to_num(plane))), float(np.nansum(plane))
            big = float(np.nanmax(np.abs(plane))) if n else 1.0
            plane, opts["vrange"] = _model_plane(plane), (-big, big)
            title = f"model: {n} component pixels, {total * 1e3:.2f} mJy"
        elif kind == "alpha":                  # given only where tt0 is bright: no panel without it
            if not np.isfinite(plane).any():
                continue
            title = f"spectral index (alpha {img['alpha']:.2f} at the peak)" if img.get("alpha") is not None \
                else "spectral index"
        if cube and d.shape[0] > 1 and kind in ("residual", "psf", "model"):
            title += f", plane {pplane}"
        panels.append(("sky", plane, title, unit, opts))
    if cube:
        y, x = np.unravel_index(np.nanargmax(np.where(inner, data[pplane], np.nan)), data[pplane].shape)
        panels.append(("spectrum", data[:, y, x], f"spectrum at the peak pixel ({x}, {y})", "Jy/beam", {}))
    # the planes' frequencies from the header's spectral axis (FITS pixels count from 1)
    freq_ghz = (hdr.get("CRVAL3", 0.0) + (np.arange(data.shape[0]) + 1 - hdr.get("CRPIX3", 1.0))
                * hdr.get("CDELT3", 1.0)) / 1e9
    ncol = 3
    nrow = (len(panels) + ncol - 1) // ncol
    fig = plt.figure(figsize=(4.2 * ncol, 3.6 * nrow))
    for i, (kind, d, title, unit, opts) in enumerate(panels):
        pos = (nrow, ncol, i + 1)
        if kind == "sky":
            _sky_panel(fig, pos, d, hdr, title, unit, **opts)
        else:
            ax = fig.add_subplot(*pos)
            ax.plot(freq_ghz, d * 1e3, "k-", lw=0.8)
            ax.set_xlabel(f"frequency (GHz, {hdr.get('SPECSYS', '')})", fontsize=7)
            ax.set_ylabel("mJy/beam", fontsize=7)
            ax.set_title(title, fontsize=8)
            ax.tick_params(labelsize=6)
            ax.locator_params(axis="x", nbins=4)
    title = img["file"].rsplit(".pbcor.fits", 1)[0]
    bm = img.get("beam_arcsec", [0, 0, 0])
    fig.suptitle(f"{title}: beam {bm[0]:.2f}\" x {bm[1]:.2f}\" at {bm[2]:.0f} deg, "
                 f"rms {img.get('rms_jy_per_beam', 0) * 1e3:.3f} mJy/beam, peak "
                 f"{img.get('peak_jy_per_beam', 0) * 1e3:.2f} mJy/beam", fontsize=9)
    # a fixed layout: tight_layout draws every WCS axis once more to measure its labels,
    # a third of a view's time, and the panels' labels are the same size in every view
    fig.subplots_adjust(left=0.06, right=0.95, bottom=0.08, top=0.88, wspace=0.45, hspace=0.4)
    fig.savefig(out_png, dpi=DPI)
    plt.close(fig)
    return title


def stage_index_of(img: dict) -> int | None:
    """The index of the stage that made an image (from its thumbnail's object key,
    runs/<run>/stages/<NN>_<stage>/...)."""
    key = img.get("thumbnail") or next(iter(img.get("files", {}).values()), "")
    parts = key.split("/stages/")
    if len(parts) < 2:
        return None
    head = parts[1].split("_", 1)[0]
    return int(head) if head.isdigit() else None


def image_views(ctx: dict, fetch, out_dir: str) -> list:
    """The view of every image in ctx['images'] written into out_dir as image<n>.png;
    fetch(key) -> local path. Returns [{id, n, title, stage_index, plot, page, record}].

    Every other view is drawn in the drawing helper (report/render.py) beside this
    thread's: the WebLog is a run's last stage, so the other core is free, and a view
    is 0.3-1 s of matplotlib (21 views took 12 s of the realistic EB's WebLog)."""
    from . import render
    # what image_view reads of the context, not the whole context, goes to the helper
    slim = {"observation": {"spws": ctx.get("observation", {}).get("spws", [])},
            "continuum": ctx.get("continuum", [])}
    views, titles = [], []
    for n, img in enumerate(ctx.get("images", [])):
        files = img.get("files", {})
        paths = view_paths(files, fetch)
        if not ({"pbcor", "image"} & set(paths)):
            continue
        png = f"image{n}.png"
        args = (slim, img, paths, os.path.join(out_dir, png))
        titles.append(render.Beside(image_view, args) if len(titles) % 2 == 0 else image_view(*args))
        views.append({"id": f"image{n}", "n": n, "stage_index": stage_index_of(img),
                      "plot": png, "page": f"image{n}.html", "record": img})
    for view, title in zip(views, titles):
        view["title"] = title.result() if isinstance(title, render.Beside) else title
    return views
