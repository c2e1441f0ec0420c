"""One image (mfs or cube) from calibrated visibilities: the tclean equivalent.

Stokes I is imaged by gridding both parallel-hand correlations as samples
of I. Each plane (the whole band for mfs, a channel for a cube) is weighted
(Briggs, per-plane density), cleaned with major/minor cycles down to a
threshold of nsigma times the plane's robust rms, restored with the beam
fitted to the PSF (a cube's common beam: the smallest enclosing every plane's),
and divided by the primary beam. A mosaic (several pointings of one source) is cleaned jointly
on one grid with its pointings' primary beams (measurement.JointMosaic).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from . import deconvolve, gridding, kernels
from .automask import AutomaskParams
from .measurement import JointMosaic, OnePointing
from .mosaic import Mosaic
from .products import mosaic_beam, primary_beam
from ..msio.ms import Vis


@dataclass
class ImageSpec:
    field: str
    specmode: str = "mfs"        # 'mfs' or 'cube'
    npix: int = 256
    cell_arcsec: float = 1.0
    robust: float | None = 0.5
    niter: int = 1000
    nsigma: float = 3.0
    threshold_jy: float = 0.0
    chans: np.ndarray | None = None   # boolean mask of channels used (mfs) / imaged (cube)
    gain: float = 0.1
    pb_limit: float = 0.2
    automask: bool = False              # auto-multithresh-style masks (imaging/automask.py)
    negative_threshold: float = 0.0     # automask: mask absorption below -this x rms too
    scales: list | None = None          # multiscale CLEAN scales in pixels ([0, 5, 15]); None: Hogbom
    # the cleaning threshold as a function of the plane's dirty peak (the ALMA
    # pipeline's dynamic-range correction); it replaces threshold_jy when given
    threshold_from_dirty: object = None
    mosaic: Mosaic | None = None        # several pointings imaged jointly; None: one field
    nterms: int = 1                     # Taylor terms of an mfs image (2: mtmfs, imaging/mtmfs.py)
    nbin: int = 1                       # a cube's plane: nbin adjacent channels (tclean's width)
    time_average: bool = False          # a cube's samples averaged in time per baseline (averaged_in_time)
    time_average_freq_hz: float = 0.0   # the frequency averaged_in_time takes (0: the planes' highest)


@dataclass
class ImageResult:
    image: np.ndarray      # (nplane, ny, nx) restored, Jy/beam
    residual: np.ndarray
    model: np.ndarray
    psf: np.ndarray
    pb: np.ndarray         # (ny, nx)
    pbcor: np.ndarray
    mask: np.ndarray       # (ny, nx) pb >= pb_limit
    freqs: np.ndarray      # plane frequencies
    beam: tuple            # (bmaj", bmin", bpa deg)
    plane_beams: list = field(default_factory=list)
    iterations: int = 0
    stop_reasons: list = field(default_factory=list)
    clean_mask: np.ndarray | None = None   # (nplane, ny, nx) when automasking


@dataclass
class StokesI:
    """The samples of Stokes I that an image grids: one per cross-correlation row
    with any unflagged data in the channels taken (the parallel hands' weighted
    mean; auto-correlations and fully flagged rows left out), or, averaged in time
    (averaged_in_time), one per run of a baseline's rows."""
    uvw: np.ndarray        # (nrow, 3) m
    data: np.ndarray       # (nrow, nchan) complex64
    weight: np.ndarray     # (nrow, nchan) float32 natural weights, 0 where flagged
    rows: np.ndarray       # (nrow,) the rows of the Vis they come from


def parallel_hands(corr_types: list) -> list:
    """The correlations Stokes I is made of: the parallel hands (or I itself)."""
    return [i for i, c in enumerate(corr_types) if c in ("RR", "LL", "XX", "YY", "I")] or [0]


def stokes_i(vis: Vis, chan_idx: np.ndarray) -> StokesI:
    """Stokes I samples of the given channels (kernels.stokes_i)."""
    rows = np.flatnonzero(vis.ant1 != vis.ant2)
    chan_idx = np.asarray(chan_idx, np.int64)
    data, w = kernels.stokes_i(vis.data, vis.flag, vis.weight, rows, chan_idx,
                               np.array(parallel_hands(vis.corr_types), np.int64))
    keep = w.any(axis=1)
    if not keep.all():
        rows, data, w = rows[keep], data[keep], w[keep]
    return StokesI(vis.uvw[rows], data, w, rows)


# Earth's rotation (rad/s): a baseline's uv point moves at most this times its length
EARTH_ROTATION = 7.2921e-5
# how far averaged_in_time joins integrations: the phase that a sample's move during one
# average may sweep at the image's corner (radians). A linear sweep of phi keeps
# sinc(phi / 2) of a source's amplitude: 0.35 rad keeps 99.5 % at the corner, more inside.
AVERAGING_PHASE = 0.35


def averaged_in_time(si: StokesI, vis: Vis, freq_max: float, radius_rad: float) -> StokesI:
    """Stokes I samples averaged in time per baseline (baseline-dependent averaging, as
    WSClean's -baseline-averaging): a baseline's integrations of a scan join while the
    phase that its uv point's move sweeps at radius_rad from the phase centre stays
    under AVERAGING_PHASE, and while they have the same channels flagged, so that short
    baselines are averaged over minutes and the longest over a few integrations or
    none. A cube grids its samples once a plane for the PSF, once for the dirty image
    and twice a major cycle: its gridding (most of a cube's time) falls with their
    number. The weights are summed, so the noise and the Briggs density are the
    integrations'. The samples come in baseline order; each one's row (rows) is its
    run's first. freq_max: the highest frequency of the image (of the whole cube, for a
    piece of it, so that every piece cuts its runs by the same rate)."""
    if not len(si.rows):
        return si
    rows = si.rows
    ant1, ant2, time = vis.ant1[rows], vis.ant2[rows], vis.time[rows]
    field, scan = vis.field_id[rows], vis.scan[rows]
    # a baseline's length in wavelengths (|uvw| is the same at every time) at the highest
    # frequency: its uv point moves at most EARTH_ROTATION x that, in wavelengths a second
    length = np.sqrt((np.asarray(si.uvw, np.float64) ** 2).sum(axis=1)) * (freq_max / 299792458.0)
    rate = 2 * np.pi * EARTH_ROTATION * length * radius_rad / AVERAGING_PHASE
    order = np.lexsort((time, scan, field, ant2, ant1))
    starts = kernels.time_groups(order, ant1.astype(np.int64), ant2.astype(np.int64), field.astype(np.int64),
                                 scan.astype(np.int64), time.astype(np.float64),
                                 vis.interval[rows].astype(np.float64), rate, si.weight)
    if len(starts) - 1 == len(rows):
        return si
    uvw, data, weight = kernels.average_groups(order, starts, np.ascontiguousarray(si.uvw, np.float64),
                                               si.data, si.weight)
    return StokesI(uvw, data, weight, rows[order[starts[:-1]]])


def aggregate_continuum(parts: list, width: int = 8) -> Vis:
    """One single-channel Vis from the continuum channels of several spws, so that one
    mfs image covers them all (the ALMA pipeline's aggregate 'cont' image): the Vis of
    aggregate_samples."""
    return aggregate_samples(parts, width)[0]


def aggregate_samples(parts: list, width: int = 8) -> tuple:
    """(one single-channel Vis, each of its rows' own frequency (nrow,) Hz) from the
    continuum channels of several spws.

    parts: [(Vis, channel mask)], the same rows' layout not required. The selected
    channels of each spw are averaged in bins of `width` (weighted, flags honoured;
    at 1e-3 fractional bandwidth per bin the smearing is negligible inside the
    primary beam), and each (row, bin) becomes a sample at the reference frequency
    with its uvw scaled by f_bin / f_ref: exact, because the gridder only ever
    uses uvw f / c. The bins' frequencies are what a multi-term image's Taylor
    weights need (imaging/mtmfs.py)."""
    bins = []
    for vis, mask in parts:
        chans = np.flatnonzero(mask)
        for k in range(0, len(chans), max(int(width), 1)):
            group = chans[k:k + width]
            w = np.where(vis.flag[:, group], 0.0, vis.weight[:, None, :])          # (nrow, nch, ncorr)
            wsum = w.sum(axis=1)
            data = (w * vis.data[:, group]).sum(axis=1) / np.maximum(wsum, 1e-30)
            bins.append((vis, float(vis.freq[group].mean()), data, wsum, wsum <= 0))
    if not bins:
        raise ValueError("aggregate_continuum: no channels selected")
    total_w = np.array([b[3].sum() for b in bins])
    fref = float(np.average([b[1] for b in bins], weights=np.maximum(total_w, 1e-30)))

    def stack(get):
        return np.concatenate([get(b) for b in bins])
    first = bins[0][0]
    vis = Vis(time=stack(lambda b: b[0].time), interval=stack(lambda b: b[0].interval),
              ant1=stack(lambda b: b[0].ant1), ant2=stack(lambda b: b[0].ant2),
              field_id=stack(lambda b: b[0].field_id), scan=stack(lambda b: b[0].scan),
              uvw=stack(lambda b: b[0].uvw * (b[1] / fref)),
              data=stack(lambda b: b[2][:, None, :]).astype(np.complex64),
              flag=stack(lambda b: b[4][:, None, :]),
              weight=stack(lambda b: b[3]).astype(np.float32), freq=np.array([fref]),
              corr_types=list(first.corr_types), spw=first.spw)
    return vis, stack(lambda b: np.full(len(b[0].time), b[1]))


@dataclass
class Planes:
    """Cleaned but not yet restored planes of an image (a cube may be made of
    several, cleaned on different workers, and joined: join_planes)."""
    models: list
    residuals: list
    psfs: list
    beams: list            # fitted per plane
    freqs: np.ndarray
    reasons: list
    iterations: int
    masks: list            # clean masks (automask) or zeros

    def save(self, path: str, dense: bool = True) -> None:
        """To an .npz file (a piece of a cube, handed from one worker to the join).

        Stored, not deflated: the residuals and PSFs are noise to zlib (it took a quarter
        of a piece's time and saved little), and what does compress is kept small by its
        form: the models as their clean components (index, value), the masks as bits.
        The residuals and PSFs go as lists: savez stacks one at a time as it writes, so
        the piece is never held twice over. dense=False: without the residuals and
        PSFs (a piece that stored them as FITS data of their own, joincube)."""
        shape = (len(self.models), *np.shape(self.models[0])) if self.models else (0, 0, 0)
        plane = int(np.prod(shape[1:]))
        where = [np.flatnonzero(m) for m in self.models]
        planes = {"residuals": self.residuals, "psfs": self.psfs} if dense else {}
        np.savez(path, **planes, shape=np.array(shape),
                 model_index=np.concatenate([w + k * plane for k, w in enumerate(where)] or [np.zeros(0, int)]),
                 model_value=np.concatenate([np.ravel(m)[w] for m, w in zip(self.models, where)]
                                            or [np.zeros(0, np.float32)]).astype(np.float32),
                 mask_bits=np.concatenate([np.packbits(np.ravel(m) > 0) for m in self.masks]
                                          or [np.zeros(0, np.uint8)]),
                 beams=np.array(self.beams), freqs=self.freqs, iterations=self.iterations,
                 reasons=np.array(self.reasons))

    @staticmethod
    def load(path: str) -> "Planes":
        """Planes.save's file; without the residuals and PSFs (empty lists) where it was
        saved without them."""
        with np.load(path) as z:
            if "models" in z:           # deflated whole, as pieces were saved before
                models, masks = z["models"], z["masks"]
            else:
                shape = tuple(int(n) for n in z["shape"])
                models = np.zeros(shape, np.float32)
                models.reshape(-1)[z["model_index"]] = z["model_value"]
                plane = int(np.prod(shape[1:]))
                bits = z["mask_bits"].reshape(shape[0], -1) if shape[0] else np.zeros((0, 0), np.uint8)
                masks = np.unpackbits(bits, axis=1, count=plane).astype(bool).reshape(shape)
            dense = {k: list(z[k]) if k in z else [] for k in ("residuals", "psfs")}
            return Planes(list(models), dense["residuals"], dense["psfs"], [tuple(b) for b in z["beams"]],
                          z["freqs"], [str(r) for r in z["reasons"]], int(z["iterations"]), list(masks))


def _pointing_samples(vis: Vis, mosaic: Mosaic, samples: StokesI) -> list:
    """Per pointing of a mosaic: (uvw, data, natural weights, the path in metres
    whose phase moves its phase centre to the image centre). Each pointing keeps
    its own uvw: the error is second order in the pointing offsets (a few
    arcminutes cost ~1e-7 of a turn per wavelength of baseline)."""
    field = vis.field_id[samples.rows]
    out = []
    for p in mosaic.pointings:
        sel = field == p.field_id
        out.append(pointing_samples(p, samples.uvw[sel], samples.data[sel], samples.weight[sel]))
    return out


def pointing_samples(p, uvw: np.ndarray, data: np.ndarray, weight: np.ndarray) -> tuple:
    """One pointing's samples as plane_measurement takes them: (uvw, data, natural
    weights, the delay in metres towards the image centre, whose phase per channel is
    2 pi delay f / c)."""
    l0, m0 = p.centre_lm
    lmn = np.array([l0, m0, np.sqrt(1 - l0 * l0 - m0 * m0) - 1])
    return uvw, data, weight, uvw @ lmn


def plane_measurement(spec: ImageSpec, samples, f, ci, npix: int, cell: float):
    """The measurement of one plane: one pointing, or the joint mosaic of several."""
    if spec.mosaic is None:
        uvw, data, w_nat = samples
        w = gridding.briggs_weights(uvw, f, w_nat[:, ci], npix, cell, spec.robust).astype(np.float32)
        return OnePointing(uvw, f, data[:, ci], w, npix, cell)
    ops, beams = [], []
    for p, (uvw, data, w_nat, path_m) in zip(spec.mosaic.pointings, samples):
        # Briggs density per pointing, as the ALMA pipeline weights mosaics (mosweight)
        w = gridding.briggs_weights(uvw, f, w_nat[:, ci], npix, cell, spec.robust).astype(np.float32)
        rot = np.exp(-2j * np.pi * path_m[:, None] * (f / 299792458.0)[None, :]).astype(np.complex64)
        ops.append(OnePointing(uvw, f, data[:, ci] * rot, w, npix, cell))
        beams.append(primary_beam(npix, cell, float(f.mean()), spec.mosaic.dish_m, spec.mosaic.telescope,
                                  p.offset_lm))
    return JointMosaic(ops, beams, [p.fraction for p in spec.mosaic.pointings], spec.pb_limit)


def clean_planes(vis: Vis, spec: ImageSpec) -> Planes:
    """Weight and clean every plane of the image: the whole band for mfs, each
    channel for a cube (with its own Briggs density), or each nbin of its channels in
    turn (spec.nbin: gridded together, each channel at its own frequency)."""
    npix = spec.npix
    cell = np.radians(spec.cell_arcsec / 3600.0)
    nchan = len(vis.freq)
    chans = np.flatnonzero(spec.chans if spec.chans is not None else np.ones(nchan, bool))
    planes = [chans] if spec.specmode == "mfs" else cube_planes(chans, spec.nbin)
    si = stokes_i(vis, chans)
    if spec.time_average and spec.mosaic is None:
        # out to the image's corner, at the whole cube's highest frequency
        si = averaged_in_time(si, vis, spec.time_average_freq_hz or float(vis.freq[chans].max()),
                              npix * cell / np.sqrt(2))
    samples = (si.uvw, si.data, si.weight) if spec.mosaic is None else _pointing_samples(vis, spec.mosaic, si)
    col = {c: i for i, c in enumerate(chans)}
    out = Planes([], [], [], [], np.array([vis.freq[pl].mean() for pl in planes]), [], 0, [])

    def clean_plane(pl):
        op = plane_measurement(spec, samples, vis.freq[pl], [col[c] for c in pl], npix, cell)
        res = deconvolve.clean(op, spec.niter, spec.threshold_jy, gain=spec.gain,
                               nsigma=spec.nsigma, automask=spec.automask,
                               threshold_from_dirty=spec.threshold_from_dirty,
                               automask_params=AutomaskParams(negative_threshold=spec.negative_threshold),
                               scales=spec.scales)
        # a cube holds every plane's until it is restored (a piece's planes until the
        # join, the join the whole cube's): single precision, as the FITS products are,
        # and the masks as booleans, so a plane costs 3.25 x npix^2 x 4 bytes, not 4 x 8
        return (res.mask > 0 if res.mask is not None else np.zeros((npix, npix), bool),
                deconvolve.fit_beam(res.psf, cell) if res.psf.max() > 0 else (0.0, 0.0, 0.0),
                res.residual.astype(np.float32), res.model.astype(np.float32), res.psf.astype(np.float32),
                res.stop_reason, res.iterations)
    cleaned = gridding.side_by_side(clean_plane, planes) if npix <= PLANE_PARALLEL_NPIX else map(clean_plane, planes)
    for mask, beam, residual, model, psf, reason, iterations in cleaned:
        out.masks.append(mask)
        out.beams.append(beam)
        out.residuals.append(residual)
        out.models.append(model)
        out.psfs.append(psf)
        out.reasons.append(reason)
        out.iterations += iterations
    return out


# a cube's planes are cleaned several at a time (gridding.side_by_side), each on one
# thread, up to images of PLANE_PARALLEL_NPIX pixels a side: a channel's gridding and its
# minor cycles over a few hundred thousand samples parallelise poorly inside (a cube
# alone kept the 2-core machine 1.3 cores busy); larger planes parallelise well inside
# the gridder, and two of them would hold two planes' grids
PLANE_PARALLEL_NPIX = 1024


def cube_planes(chans: np.ndarray, nbin: int) -> list:
    """A cube's planes: its channels (indices, ascending) nbin adjacent ones at a time,
    each run of a selection with gaps binned on its own, and the channels left at a
    run's end that do not fill a plane not imaged (as tclean's width with nchan = the
    channels / width). A cube's piece holds whole planes (stages/imaging.py's
    chunk_masks), so its planes are the whole cube's."""
    chans = np.asarray(chans)
    nbin = max(1, int(nbin))
    runs = np.split(chans, np.flatnonzero(np.diff(chans) > 1) + 1) if len(chans) else []
    return [run[k:k + nbin] for run in runs for k in range(0, len(run) - nbin + 1, nbin)]


def per_plane(per_channel: np.ndarray, chans: np.ndarray, nbin: int, how=np.all) -> np.ndarray:
    """A property of a cube's channels (per_channel, indexed by channel number) as its
    planes have it: how (np.all, np.any) over each plane's channels (cube_planes of
    chans, the channels imaged)."""
    per_channel = np.asarray(per_channel, bool)
    return np.array([bool(how(per_channel[p])) for p in cube_planes(chans, nbin)], bool)


def join_planes(parts: list) -> Planes:
    """Planes cleaned in pieces (channel ranges of a cube), in channel order."""
    return Planes(*(sum((getattr(p, k) for p in parts), []) for k in ("models", "residuals", "psfs", "beams")),
                  np.concatenate([p.freqs for p in parts]), sum((p.reasons for p in parts), []),
                  sum(p.iterations for p in parts), sum((p.masks for p in parts), []))


# a cube's arrays above this size are held in files (np.memmap in the worker's work
# directory, given as scratch) rather than in memory: a join holds a whole cube's
# models, residuals, PSFs and masks, then its restored image and pb-corrected image,
# about 8 x (planes x npix^2 x 4 bytes); a 3840-channel cube of 256^2 (1 GB) took a
# worker past 21 GB in double precision. In files, the worker's own memory stays at a
# piece and a plane; the page cache holds what the disk is not yet written.
CUBE_IN_MEMORY_BYTES = 256 * 2**20


def cube_array(shape: tuple, dtype, scratch: str | None, name: str) -> np.ndarray:
    """An uninitialised array of shape: in memory, or a file-backed np.memmap under
    scratch when it is larger than CUBE_IN_MEMORY_BYTES."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if scratch is None or nbytes <= CUBE_IN_MEMORY_BYTES:
        return np.empty(shape, dtype)
    os.makedirs(scratch, exist_ok=True)
    return np.lib.format.open_memmap(os.path.join(scratch, f"{name}.npy"), mode="w+", dtype=dtype, shape=shape)


def join_plane_files(paths: list, scratch: str | None = None, residuals: list | None = None) -> Planes:
    """join_planes of pieces saved by Planes.save, read one piece at a time into the
    cube's arrays (cube_array: on disk under scratch when large).

    residuals: where the pieces saved their planes without the residuals and PSFs
    (dense=False), each piece's residual planes as FITS data (big-endian float32 in
    chunks of bytes, ObjectStore.chunks); the joined planes then have no PSFs."""
    n = 0
    for path in paths:                  # the planes of every piece, from their frequencies alone
        with np.load(path) as z:
            n += len(z["freqs"])
    beams, freqs, reasons, iterations, k = [], [], [], 0, 0
    for i, path in enumerate(paths):
        piece = Planes.load(path)
        m = len(piece.freqs)
        if k == 0:                      # the cube's arrays, once a piece gives the planes' shape
            shape = (n, *np.shape(piece.models[0]))
            models, residual_cube = (cube_array(shape, np.float32, scratch, name) for name in ("models", "residuals"))
            psfs = cube_array(shape, np.float32, scratch, "psfs") if residuals is None else []
            masks = cube_array(shape, bool, scratch, "masks")
        pairs = [(models, piece.models), (masks, piece.masks)]
        pairs += [(residual_cube, piece.residuals), (psfs, piece.psfs)] if residuals is None else \
            [(residual_cube, fits_planes(residuals[i], shape[1:]))]
        for dst, src in pairs:
            got = 0
            for j, plane in enumerate(src):     # a plane at a time (a mask's 0/1 cast to bool)
                if j >= m:
                    raise ValueError(f"{path}: more planes stored than its {m} frequencies")
                dst[k + j] = plane
                got += 1
            if got != m:
                raise ValueError(f"{path}: {got} planes stored for its {m} frequencies")
        beams += piece.beams
        freqs.append(piece.freqs)
        reasons += piece.reasons
        iterations += piece.iterations
        k += m
        del piece
    return Planes(models, residual_cube, psfs, beams, np.concatenate(freqs), reasons, iterations, masks)


def fits_planes(chunks, plane_shape: tuple):
    """The planes in FITS data given as chunks of bytes (big-endian float32, the chunks'
    ends anywhere), one (ny, nx) plane at a time in native float32."""
    size = int(np.prod(plane_shape)) * 4
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        whole = len(buf) // size * size
        for off in range(0, whole, size):
            yield np.frombuffer(buf, ">f4", size // 4, off).astype(np.float32).reshape(plane_shape)
        del buf[:whole]
    if buf:
        raise ValueError(f"FITS planes: {len(buf)} bytes left over, not a whole plane of {plane_shape}")


def _beam_axes(beam: tuple) -> tuple:
    """Unit vectors (east, north) along a beam's major and minor axes; the position
    angle runs from north through east."""
    pa = np.radians(beam[2])
    return np.array([np.sin(pa), np.cos(pa)]), np.array([np.cos(pa), -np.sin(pa)])


def beam_outline(beam: tuple, n: int = 360) -> np.ndarray:
    """n points (east, north) on the half-power ellipse of a beam (bmaj, bmin, bpa)."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    u, v = _beam_axes(beam)
    return np.outer(0.5 * beam[0] * np.cos(t), u) + np.outer(0.5 * beam[1] * np.sin(t), v)


def beam_matrix(beam: tuple) -> np.ndarray:
    """A with x^T A x = 1 on the beam's half-power ellipse (x east, north)."""
    u, v = _beam_axes(beam)
    return np.outer(u, u) / (0.5 * beam[0]) ** 2 + np.outer(v, v) / (0.5 * beam[1]) ** 2


def _beam_of_matrix(a: np.ndarray) -> tuple:
    w, vec = np.linalg.eigh(a)               # ascending: the first is the major axis'
    e, n = vec[:, 0]
    pa = float(np.degrees(np.arctan2(e, n)))
    pa = pa - 180.0 if pa > 90.0 else pa + 180.0 if pa <= -90.0 else pa
    return (float(2 / np.sqrt(w[0])), float(2 / np.sqrt(w[1])), pa)


def enclosing_beam(beams: list, tol: float = 1e-3) -> tuple:
    """The smallest beam (least area) whose half-power ellipse encloses every given
    beam's: a cube's common restoring beam, as tclean's restoringbeam='common' makes it
    (beams of zero size, planes without data, are ignored).

    When the largest beam already encloses the rest it is the answer. Otherwise the
    minimum-area ellipse centred on the origin that encloses points sampled on every
    outline: Khachiyan's algorithm (weights u on the points; X = sum u p p^T; move
    weight towards the point furthest outside X^-1 / d until none is by more than tol)
    comes close, then the ellipse's shape (axis ratio, angle) is polished to the least
    area once scaled to enclose the points (Khachiyan alone converges as 1/tol), and it
    is scaled so that a denser sampling of every outline lies inside too."""
    # a cube's planes share few distinct beams: each is tested once
    good = sorted({tuple(float(x) for x in b) for b in beams if b[0] > 0 and b[1] > 0})
    if not good:
        return (0.0, 0.0, 0.0)
    largest = max(good, key=lambda b: b[0] * b[1])
    a_big = beam_matrix(largest)
    dense = np.concatenate([beam_outline(b, 3600) for b in good])
    if np.einsum("ij,jk,ik->i", dense, a_big, dense).max() <= 1.0 + 1e-9:
        return largest
    from scipy.optimize import minimize
    from scipy.spatial import ConvexHull
    p = np.concatenate([beam_outline(b, 360) for b in good])
    # an ellipse encloses the points when it encloses their convex hull's corners: a few
    # hundred, not 360 per plane (on a cube of 128 planes this took most of makeimages)
    p = p[ConvexHull(p).vertices]
    d = 2
    u = np.full(len(p), 1.0 / len(p))
    for _ in range(20000):
        x = (p * u[:, None]).T @ p
        m = np.einsum("ij,jk,ik->i", p, np.linalg.inv(x), p)
        j = int(np.argmax(m))
        if m[j] <= d * (1 + tol):
            break
        step = (m[j] - d) / (d * (m[j] - 1))
        u *= 1 - step
        u[j] += step
    start = _beam_of_matrix(np.linalg.inv(x) / d)

    def scaled_area(shape):            # shape: log(minor / major), position angle (deg)
        q = np.einsum("ij,jk,ik->i", p, beam_matrix((1.0, np.exp(shape[0]), shape[1])), p).max()
        return q * np.exp(shape[0])    # the unit-major beam scaled by sqrt(q) to enclose p
    best = minimize(scaled_area, [np.log(start[1] / start[0]), start[2]], method="Nelder-Mead",
                    options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 4000}).x
    a = beam_matrix((1.0, float(np.exp(best[0])), float(best[1])))
    a /= np.einsum("ij,jk,ik->i", dense, a, dense).max()      # every outline inside, touching
    return _beam_of_matrix(a)


def typical_beams(beams: list, factor: float = 2.0) -> list:
    """The planes' beams less those of planes with almost no data: a channel whose data are
    nearly all flagged (band edges, a channel moved off the band by the LSRK regridding)
    has a PSF of a few baselines, and its fitted "beam" can be a needle many times longer
    than the others', which an enclosing beam would then have to contain. A beam whose
    axes are more than `factor` from the median plane's is left out of the common beam."""
    good = [b for b in beams if b[0] > 0 and b[1] > 0]
    if len(good) < 3:
        return good
    major, minor = np.median([b[0] for b in good]), np.median([b[1] for b in good])
    return [b for b in good if major / factor <= b[0] <= major * factor and minor / factor <= b[1] <= minor * factor]


def restoring_beam(planes) -> tuple:
    """The beam an image is restored with: a cube's common beam (the smallest enclosing
    every plane's but outliers, as tclean's restoringbeam='common'), a multi-term
    image's tt0 PSF's."""
    return planes.beam if isinstance(planes, TaylorPlanes) else enclosing_beam(typical_beams(planes.beams))


def restore_planes(pl: Planes, spec: ImageSpec, dish_m: float, telescope: str,
                   scratch: str | None = None, beam: tuple | None = None) -> ImageResult:
    """Restore every plane with one beam (a cube's common beam: the smallest enclosing
    every plane's, enclosing_beam), and add the primary beam and the pb-corrected image.
    scratch: where a large cube's arrays are held on disk (cube_array). beam: the
    restoring beam where the caller has it already (restoring_beam: half a second for a
    cube of a thousand planes)."""
    npix = spec.npix
    cell = np.radians(spec.cell_arcsec / 3600.0)
    common = beam if beam is not None else restoring_beam(pl)
    shape = (len(pl.models), npix, npix)
    image = cube_array(shape, np.float32, scratch, "image")         # filled a plane at a time
    for k, (m, r) in enumerate(zip(pl.models, pl.residuals)):
        image[k] = deconvolve.restore(m, r, cell, common) if common[0] > 0 else r
    freq = float(np.mean(pl.freqs))
    m = spec.mosaic
    pb = primary_beam(npix, cell, freq, dish_m, telescope) if m is None else \
        mosaic_beam(npix, cell, freq, dish_m, telescope, [p.offset_lm for p in m.pointings],
                    [p.fraction for p in m.pointings])
    mask = pb >= spec.pb_limit
    pbcor = cube_array(shape, np.float32, scratch, "pbcor")
    inverse = np.where(mask, 1.0 / np.maximum(pb, 1e-6), np.nan).astype(np.float32)
    for k in range(shape[0]):
        pbcor[k] = image[k] * inverse
    # asanyarray: a joined cube's arrays stay the files they are (cube_array)
    return ImageResult(image, np.asanyarray(pl.residuals), np.asanyarray(pl.models), np.asanyarray(pl.psfs), pb,
                       pbcor, mask, pl.freqs, common, list(pl.beams), pl.iterations, list(pl.reasons),
                       _bool_masks(pl.masks) if spec.automask else None)


def _bool_masks(masks) -> np.ndarray:
    """The planes' clean masks as one boolean array (no copy when they already are one)."""
    masks = np.asarray(masks)
    return masks if masks.dtype == bool else masks > 0


def make_image(vis: Vis, spec: ImageSpec, dish_m: float, telescope: str) -> ImageResult:
    """Clean and restore an image in one go."""
    return restore_planes(clean_planes(vis, spec), spec, dish_m, telescope)


@dataclass
class TaylorPlanes:
    """A multi-term mfs image cleaned but not yet restored (imaging/mtmfs.py)."""
    result: object          # mtmfs.MTCleanResult
    beam: tuple             # fitted to the tt0 PSF
    nu0: float              # the Taylor expansion's reference frequency, Hz


def clean_taylor(vis: Vis, spec: ImageSpec, row_freq: np.ndarray | None = None,
                 reffreq_hz: float | None = None) -> TaylorPlanes:
    """Weight and clean an mfs image in spec.nterms Taylor terms (one pointing).

    row_freq: each row's own frequency where the Vis's channel axis is not it (the
    aggregate continuum, aggregate_samples); else the channels' frequencies are.
    reffreq_hz: the expansion's reference; default the middle of the frequencies
    imaged, as tclean's reffreq."""
    from . import mtmfs
    if spec.mosaic is not None or spec.specmode != "mfs":
        raise ValueError("clean_taylor: one mfs plane of one pointing only")
    npix = spec.npix
    cell = np.radians(spec.cell_arcsec / 3600.0)
    chans = np.flatnonzero(spec.chans if spec.chans is not None else np.ones(len(vis.freq), bool))
    si = stokes_i(vis, chans)
    freq = vis.freq[chans]
    nu = row_freq[si.rows][:, None] if row_freq is not None else freq[None, :]
    if reffreq_hz is None:
        used = np.broadcast_to(nu, si.weight.shape)[si.weight > 0]
        reffreq_hz = 0.5 * float(used.min() + used.max()) if used.size else float(freq.mean())
    w = gridding.briggs_weights(si.uvw, freq, si.weight, npix, cell, spec.robust).astype(np.float32)
    op = mtmfs.TaylorPointing(si.uvw, freq, si.data, w, nu, reffreq_hz, npix, cell, spec.nterms)
    res = mtmfs.clean_mt(op, spec.niter, spec.threshold_jy, gain=spec.gain, nsigma=spec.nsigma,
                         automask=spec.automask, threshold_from_dirty=spec.threshold_from_dirty,
                         automask_params=AutomaskParams(negative_threshold=spec.negative_threshold))
    beam = deconvolve.fit_beam(res.psfs[0], cell) if res.psfs[0].max() > 0 else (0.0, 0.0, 0.0)
    return TaylorPlanes(res, beam, float(reffreq_hz))


def restore_taylor_planes(tp: TaylorPlanes, spec: ImageSpec, dish_m: float, telescope: str) -> tuple:
    """(ImageResult of tt0, mtmfs.TaylorImages): the restored Taylor terms, alpha and its
    error; the primary beam at the reference frequency, alpha given inside its limit."""
    from . import mtmfs
    npix = spec.npix
    cell = np.radians(spec.cell_arcsec / 3600.0)
    r = tp.result
    pb = primary_beam(npix, cell, tp.nu0, dish_m, telescope)
    mask = pb >= spec.pb_limit
    ti = mtmfs.restore_taylor(r.models, r.residuals, r.hessian, cell, tp.beam, inside=mask)
    pbcor = np.where(mask, ti.tt[0] / np.maximum(pb, 1e-6), np.nan)
    res = ImageResult(ti.tt[:1], ti.residual[:1], r.models[:1], r.psfs[:1], pb, pbcor[None], mask,
                      np.array([tp.nu0]), tp.beam, [tp.beam], r.iterations, [r.stop_reason],
                      (r.mask > 0)[None] if spec.automask and r.mask is not None else
                      (np.zeros((1, npix, npix), bool) if spec.automask else None))
    return res, ti
