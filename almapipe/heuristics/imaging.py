"""Image heuristics as hif_makeimlist and hif_makeimages take them: cell and image size
from the uv coverage and the primary beam, narrowed when the image would be too large
(hif_checkproductsize's mitigation), and the cleaning threshold raised for dynamic
range."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..imaging import gridding
from ..imaging.kernels import rows_with_data
from ..imaging.products import pb_fwhm
from ..msio import ms as msio

# the primary-beam level an image covers (hif_makeimlist: 0.2), and the highest level a
# too large single-field image may be narrowed to (hif_checkproductsize caps it at 0.7)
PB_LEVEL = 0.2
MAX_MITIGATED_PB_LEVEL = 0.7
# pixels across the synthesized beam, and hif_checkproductsize's coarser fallback
PIXELS_PER_BEAM = 5
MITIGATED_PIXELS_PER_BEAM = 3


@dataclass(frozen=True)
class ImageGeometry:
    """What an image is sized from (hif_makeimlist): the synthesized beam (1 / the 95th
    percentile uv distance at the highest frequency), the primary beam's FWHM at the
    lowest frequency, and a mosaic's pointings' largest distance from its centre."""
    beam_arcsec: float
    pb_fwhm_arcsec: float
    extent_arcsec: float = 0.0

    def cell_npix(self, pb_level: float = PB_LEVEL, pixels_per_beam: int = PIXELS_PER_BEAM) -> tuple[float, int]:
        """(cell arcsec, npix): pixels_per_beam across the beam, the image covering the
        primary beam down to pb_level of its peak, rounded up to a fast FFT size."""
        beam = self.beam_arcsec
        cell = float(np.round(beam / pixels_per_beam, 3 if beam < 1 else 2))
        radius = self.pb_fwhm_arcsec * np.sqrt(np.log(1.0 / pb_level) / (4 * np.log(2)))
        return cell, gridding.good_size(int(np.ceil(2 * (radius + self.extent_arcsec) / cell)))

    def pb_level_at_edge(self, npix: int, cell_arcsec: float) -> float:
        """The primary beam's level at the middle of an image's side (single field)."""
        return float(np.exp(-4 * np.log(2) * (npix * cell_arcsec / 2 / self.pb_fwhm_arcsec) ** 2))


def image_geometry(vis: msio.Vis, dish_m: float, telescope: str, chans: np.ndarray,
                   extent_rad: float = 0.0) -> ImageGeometry:
    """uv_geometry of a Vis's cross-correlation rows with data in chans."""
    cross = (vis.ant1 != vis.ant2) & rows_with_data(vis.flag, chans)
    return uv_geometry(np.hypot(vis.uvw[cross, 0], vis.uvw[cross, 1]), vis.freq[chans], dish_m, telescope,
                       extent_rad)


def uv_geometry(uvdist_m: np.ndarray, freq: np.ndarray, dish_m: float, telescope: str,
                extent_rad: float = 0.0) -> ImageGeometry:
    """The ImageGeometry from the uv distances (m) of the cross-correlation rows with
    data and the frequencies of the channels imaged."""
    uvmax = np.percentile(uvdist_m, 95) * freq.max() / 299792458.0
    return ImageGeometry(beam_arcsec=float(np.degrees(1.0 / max(uvmax, 1e-9)) * 3600),
                         pb_fwhm_arcsec=float(np.degrees(pb_fwhm(freq.min(), dish_m, telescope)) * 3600),
                         extent_arcsec=float(np.degrees(extent_rad) * 3600))


def image_heuristics(vis: msio.Vis, dish_m: float, telescope: str, chans: np.ndarray,
                     extent_rad: float = 0.0) -> tuple[float, int]:
    """(cell arcsec, npix): 5 pixels across the beam, image covering the primary
    beam down to 0.2 of its peak, rounded up to a fast FFT size (hif_makeimlist).
    A mosaic's image covers every pointing's beam to 0.2: extent_rad is its
    pointings' largest distance from the image centre."""
    return image_geometry(vis, dish_m, telescope, chans, extent_rad).cell_npix()


def fast_size_below(n: int) -> int:
    """The largest even FFT-fast size <= n (gridding.good_size rounds up), at least 2."""
    n = max(2, int(n) - int(n) % 2)
    while n > 2 and gridding.good_size(n) != n:
        n -= 2
    return n


# ALMA's FDM spws whose cubes hif_checkproductsize bins by two channels when they are too
# large: 3840 or 7680 channels, or 1920, 960 or 480 whose effective bandwidth is 2.667
# channel widths (not averaged online, so neighbouring channels are not independent)
BINNED_NCHAN = (7680, 3840)
BINNED_IF_UNAVERAGED_NCHAN = (1920, 960, 480)
UNAVERAGED_EBW_RATIO = 2.667


def cube_nbin(nchan: int, chan_width_hz: float, effective_bw_hz: float | None) -> int:
    """The channels a too large cube of this spw may be binned by (hif_checkproductsize's
    first step): 2 for the FDM modes above, else 1."""
    if nchan in BINNED_NCHAN:
        return 2
    if nchan in BINNED_IF_UNAVERAGED_NCHAN and chan_width_hz and effective_bw_hz and \
            abs(abs(effective_bw_hz / chan_width_hz) - UNAVERAGED_EBW_RATIO) < 1e-3:
        return 2
    return 1


@dataclass(frozen=True)
class SizedImage:
    """An image's size after the product-size limits: cell and npix, and why they are not
    the heuristics' (empty: they are), or why no image fits (refused); a cube's planes
    the average of nbin channels each."""
    cell_arcsec: float
    npix: int
    mitigation: str = ""
    refused: str = ""
    pixels_per_beam: int = PIXELS_PER_BEAM
    nbin: int = 1


def mitigate_size(geom: ImageGeometry, max_imsize: int, max_cube_bytes: float = 0.0, nchan: int = 1,
                  mosaic: bool = False, nbin: int = 1) -> SizedImage:
    """hif_checkproductsize's cascade for one image: the heuristics' size if it is at
    most max_imsize pixels a side and (a cube of nchan planes, 4-byte pixels) at most
    max_cube_bytes (0: no cube limit); else, a cube that may be binned (nbin > 1,
    cube_nbin) first with its channels binned by nbin; else, for a single field, the
    largest fast size within both limits if it still covers the primary beam to 0.7 of
    its peak; else the same at 3 pixels across the beam; else refused. A mosaic is never
    narrowed (its image must cover its pointings: hif_checkproductsize narrows single
    fields only)."""
    cell0, npix0 = geom.cell_npix()
    planes = nchan

    def fits(n: int) -> bool:
        return n <= max_imsize and (max_cube_bytes <= 0 or 4.0 * n * n * planes <= max_cube_bytes)
    if fits(npix0):
        return SizedImage(cell0, npix0)
    limits = f"max_imsize {max_imsize}" + (f", max_cube_gb {max_cube_bytes / 1e9:.3g} for {nchan} planes"
                                           if max_cube_bytes > 0 and nchan > 1 else "")
    wanted = f"the image would be {npix0} x {npix0} pixels of {cell0}\" ({limits})"
    # first the channels binned, if the spw's may be (the planes fewer, the pixels as they were)
    binned, nbin_kept = "", 1
    if nbin > 1 and max_cube_bytes > 0 and nchan > 1:
        planes, nbin_kept = max(1, nchan // nbin), nbin      # the channels left over are not imaged
        binned = f"channels binned by {nbin} ({planes} planes)"
        if fits(npix0):
            return SizedImage(cell0, npix0, mitigation=f"{wanted}: {binned}", nbin=nbin)
        binned += ", "
    if mosaic:
        return SizedImage(cell0, npix0, refused=f"{wanted}; a mosaic is not narrowed: give imsize and cell_arcsec, "
                          "or larger limits")
    largest = max_imsize if max_cube_bytes <= 0 else min(max_imsize, int(np.sqrt(max_cube_bytes / (4.0 * planes))))
    side = fast_size_below(largest)
    if side > largest:                  # limits below the smallest image (2 pixels)
        return SizedImage(cell0, npix0, refused=f"{wanted}: no image fits the limits")
    for ppb in (PIXELS_PER_BEAM, MITIGATED_PIXELS_PER_BEAM):
        cell, full = geom.cell_npix(pixels_per_beam=ppb)
        if fits(full):
            return SizedImage(cell, full, mitigation=f"{wanted}: {binned}made {full} x {full} pixels of {cell}\" "
                              f"({ppb} across the beam)", pixels_per_beam=ppb, nbin=nbin_kept)
        _, least = geom.cell_npix(pb_level=MAX_MITIGATED_PB_LEVEL, pixels_per_beam=ppb)
        if least <= side:
            return SizedImage(cell, side, mitigation=(
                f"{wanted}: {binned}made {side} x {side} pixels of {cell}\" ({ppb} across the beam), covering "
                f"the primary beam to {geom.pb_level_at_edge(side, cell):.2f} of its peak"), pixels_per_beam=ppb,
                nbin=nbin_kept)
    return SizedImage(cell0, npix0, refused=(
        f"{wanted}, and {least} x {least} even {'with ' + binned.rstrip(', ') + ' and ' if binned else ''}narrowed to "
        f"{MAX_MITIGATED_PB_LEVEL} of the primary beam at {MITIGATED_PIXELS_PER_BEAM} pixels a beam: give imsize and "
        "cell_arcsec, or larger limits"))


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
