"""Streaming data preparation for mfs images: the Stokes I samples of an spw read
from the visibility store in blocks of rows (its row chunks), weighted and averaged
over channel bins in one compiled pass per block (kernels.stokes_i_bins), so that
what an mfs image holds is (rows x bins) and one block, never (rows x channels x
correlations): its memory does not grow with the number of channels.

The bins are contiguous channels no wider than max_frac of their frequency; the
gridder takes the bins' frequencies as its frequency axis. Averaging a bin moves
each channel's uv point radially by at most max_frac of its length, which smears
a source at the image's edge (npix / 2 pixels out) by max_frac x npix / 2 pixels:
the default max_frac = 1 / npix keeps that within half a pixel (bandwidth smearing,
Thompson, Moran & Swenson ch. 6.3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import deconvolve, gridding, kernels
from .imager import parallel_hands
from .measurement import OnePointing

if TYPE_CHECKING:
    from .imager import Planes, TaylorPlanes

@dataclass
class BinnedStokesI:
    """Stokes I samples of one spw over channel bins: one per cross-correlation row
    with any unflagged data (auto-correlations left out)."""
    uvw: np.ndarray        # (nrow, 3) m
    freq: np.ndarray       # (nbin,) Hz, the mean frequency of each bin's channels
    data: np.ndarray       # (nrow, nbin) complex64
    weight: np.ndarray     # (nrow, nbin) float32, 0 where flagged
    # each sample's own frequency where the freq axis is not it (the aggregate continuum:
    # samples of several spws at one reference frequency, read_aggregate_samples); a
    # multi-term image's Taylor weights need it
    sample_freq: np.ndarray | None = None      # (nrow,) Hz


def channel_bins(freq: np.ndarray, chans: np.ndarray, max_frac: float) -> tuple:
    """Each channel's bin (-1 where not in chans) and the bins' mean frequencies:
    chans in channel order, a new bin wherever the next channel lies more than
    max_frac of the bin's first frequency from it."""
    chan_bin = np.full(len(freq), -1, np.int64)
    first, nbin = None, 0
    for c in sorted(int(c) for c in chans):
        if first is None or abs(freq[c] - first) > max_frac * abs(first):
            first, nbin = freq[c], nbin + 1
        chan_bin[c] = nbin - 1
    if not nbin:
        raise ValueError("channel_bins: no channels selected")
    fbin = np.array([freq[chan_bin == b].mean() for b in range(nbin)])
    return chan_bin, fbin


def width_bins(freq: np.ndarray, chans: np.ndarray, width: int) -> tuple:
    """channel_bins' (each channel's bin, the bins' mean frequencies) for bins of `width`
    consecutive selected channels (the aggregate continuum's, aggregate_samples')."""
    chans = np.sort(np.asarray(chans, np.int64))
    if not len(chans):
        raise ValueError("width_bins: no channels selected")
    width = max(int(width), 1)
    chan_bin = np.full(len(freq), -1, np.int64)
    chan_bin[chans] = np.arange(len(chans)) // width
    fbin = np.array([freq[chans[k:k + width]].mean() for k in range(0, len(chans), width)])
    return chan_bin, fbin


def read_binned_stokes_i(parts, field_ids, chans, max_frac: float, column: str = "DATA",
                         block_chunks: int = 1, on_block=None, bins: tuple | None = None) -> BinnedStokesI:
    """Stokes I over channel bins of the given channels of one spw and fields, read from
    the visibility store (platform.visstore.VisPartition) one row block at a time
    (VisPartition.blocks: `block_chunks` row chunks), and only the channel span the
    channels cover: what is held is the output (rows x bins) and one block, never the
    whole spw. parts: a VisPartition, or a list of (VisPartition, field ids) of one
    spectral setup (the EBs of an MOUS), their samples in that order. on_block(vis):
    called with each block (its channels the span of chans) while it is held, for what
    else a caller takes from the same pass."""
    if not isinstance(parts, (list, tuple)):
        parts = [(parts, field_ids)]
    freq = np.asarray(parts[0][0].freq, float)
    chans = np.flatnonzero(chans) if np.asarray(chans).dtype == bool else np.asarray(chans, np.int64)
    chan_bin, fbin = channel_bins(freq, chans, max_frac) if bins is None else bins
    nrow = _cross_rows(parts)
    uvw = np.zeros((nrow, 3))
    vis = np.zeros((nrow, len(fbin)), np.complex64)
    wgt = np.zeros((nrow, len(fbin)), np.float32)
    _bin_into(parts, chans, chan_bin, column, uvw, vis, wgt, block_chunks, on_block)
    return _rows_with_weight(uvw, fbin, vis, wgt)


def _bin_into(parts, chans, chan_bin, column, uvw, vis, wgt, block_chunks: int = 1, on_block=None) -> None:
    """read_binned_stokes_i's pass: the parts' cross-correlation rows, in order, binned
    into the rows of vis and wgt (nrow, nbin; views of larger arrays are fine) and their
    uvw into uvw (None: not taken)."""
    pols = _parallel_hands(parts[0][0])
    span = slice(int(chans.min()), int(chans.max()) + 1)        # the channels read
    span_bin = np.ascontiguousarray(chan_bin[span])
    start = 0
    for part, fids in parts:
        for blk in part.blocks(column=column, field_ids=fids, chan=span, cross_only=True,
                               block_chunks=block_chunks):
            start = _bin_block(blk, span_bin, pols, uvw, vis, wgt, start)
            if on_block is not None:
                on_block(blk)
            del blk


def _bin_block(blk, span_bin, pols, uvw, vis, wgt, start: int) -> int:
    """One row block (its channels the pass's span) binned into rows start.. of vis and
    wgt, its uvw into uvw (None: not taken); returns the next block's first row."""
    n = len(blk.rows)
    if uvw is not None:
        uvw[start:start + n] = blk.uvw
    kernels.stokes_i_bins(blk.data, blk.flag, blk.weight.astype(np.float32, copy=False), span_bin, pols,
                          vis, wgt, start)
    return start + n


def _parallel_hands(part) -> np.ndarray:
    return np.array(parallel_hands(part.corr_types), np.int64)


def _cross_rows(parts) -> int:
    """The cross-correlation rows of [(VisPartition, field ids)]."""
    return sum(len(p.select(f, cross_only=True)) for p, f in parts)


class WidthBinned:
    """One spw's channels binned as read_aggregate_samples bins them (bins of `width`
    selected channels, in ascending frequency), filled from the row blocks of another
    pass over the same rows and channels: a spw's own continuum image
    (read_binned_stokes_i's on_block), so that the aggregate continuum needs no pass of
    its own over the spws (it read the target's visibilities once more, 28 s of the
    realistic EB's 160 s of makeimages). parts, chans: as read_binned_stokes_i takes them."""

    def __init__(self, parts, chans, width: int):
        chans = np.flatnonzero(chans) if np.asarray(chans).dtype == bool else np.asarray(chans, np.int64)
        self.chan_bin, self.fbin = _ascending_bins(*width_bins(np.asarray(parts[0][0].freq, float), chans, width))
        self.span = slice(int(chans.min()), int(chans.max()) + 1)
        self.span_bin = np.ascontiguousarray(self.chan_bin[self.span])
        self.pols = _parallel_hands(parts[0][0])
        nrow = _cross_rows(parts)
        self.uvw = np.zeros((nrow, 3))
        self.vis = np.zeros((nrow, len(self.fbin)), np.complex64)
        self.wgt = np.zeros((nrow, len(self.fbin)), np.float32)
        self.rows = 0

    def add(self, blk) -> None:
        """The next row block of the pass (cross-correlations, the channels of span)."""
        if blk.data.shape[1] != self.span.stop - self.span.start or self.rows + len(blk.rows) > len(self.uvw):
            raise ValueError("WidthBinned: a block of other channels or rows than the pass it follows")
        self.rows = _bin_block(blk, self.span_bin, self.pols, self.uvw, self.vis, self.wgt, self.rows)

    @property
    def complete(self) -> bool:
        return self.rows == len(self.uvw)


def read_aggregate_samples(spws: list, width: int, column: str = "DATA", on_block=None,
                           same_rows: bool | None = None, binned: list | None = None) -> BinnedStokesI:
    """The aggregate continuum of one pointing, streamed: for each spw its continuum
    channels read one row block at a time and averaged in bins of `width` selected
    channels as they are read (read_binned_stokes_i's pass with width_bins), so that
    what is held is the samples, never a spw's (rows x channels x correlations).

    spws: [(parts, channel mask)], parts as read_binned_stokes_i takes them (a list of
    (VisPartition, field ids), the EBs of one spw). The samples are those that
    imager.aggregate_samples then imager.stokes_i make from the whole spws in memory:

    * where every spw has the same rows (time and baseline, as ALMA's spws have), one
      row per cross-correlation with its uvw once and the bins of all spws as its
      channels (rows x all bins: a gridder's spectral axis, each bin at its frequency);
    * else one sample per (row, bin) with data, at one reference frequency (the bins'
      frequencies weighted by their weights) with its uvw scaled by f_bin / f_ref
      (exact: the gridder only uses uvw f / c) and its own frequency in sample_freq,
      as aggregate_samples makes them: three times the memory of the first.

    same_rows: which of the two (None: whether the spws' rows are the same).
    binned: per spw (as spws), its WidthBinned from an earlier pass, or None; where
    every spw has a complete one and their rows are the same, nothing is read."""
    binned = binned if binned is not None else [None] * len(spws)
    kept = [(parts, np.asarray(mask, bool), b) for (parts, mask), b in zip(spws, binned)
            if np.asarray(mask, bool).any()]
    spws, binned = [(parts, mask) for parts, mask, _ in kept], [b for _, _, b in kept]
    if not spws:
        raise ValueError("read_aggregate_samples: no channels selected")
    bins = [width_bins(parts[0][0].freq, np.flatnonzero(mask), width) for parts, mask in spws]
    if not (_same_rows([parts for parts, _ in spws]) if same_rows is None else same_rows):
        return _flat_aggregate(spws, bins, column, on_block)
    # the bins' frequencies ascending, spw by spw and the spws in frequency order, as the
    # gridder takes them without a reordered copy of the samples (spws that overlap in
    # frequency cost it one)
    bins = [_ascending_bins(*b) for b in bins]
    order = np.argsort([fbin[0] for _, fbin in bins], kind="stable")
    spws, bins, binned = [spws[k] for k in order], [bins[k] for k in order], [binned[k] for k in order]
    nbin = [len(fbin) for _, fbin in bins]
    fbin = np.concatenate([fbin for _, fbin in bins])
    if all(b is not None and b.complete for b in binned):
        # every spw's samples as its own pass binned them (WidthBinned): nothing is read
        uvw = binned[0].uvw
        vis = np.empty((len(uvw), len(fbin)), np.complex64)
        wgt = np.empty((len(uvw), len(fbin)), np.float32)
        col = 0
        for k, b in enumerate(binned):   # each spw's arrays let go once copied: one spw's held twice
            vis[:, col:col + nbin[k]], wgt[:, col:col + nbin[k]] = b.vis, b.wgt
            b.vis = b.wgt = None
            col += nbin[k]
        return _rows_with_weight(uvw, fbin, vis, wgt)
    nrow = _cross_rows(spws[0][0])
    uvw = np.zeros((nrow, 3))
    vis = np.zeros((nrow, sum(nbin)), np.complex64)
    wgt = np.zeros((nrow, sum(nbin)), np.float32)
    col = 0
    for k, ((parts, mask), (chan_bin, _)) in enumerate(zip(spws, bins)):
        cols = slice(col, col + nbin[k])
        _bin_into(parts, np.flatnonzero(mask), chan_bin, column, uvw if k == 0 else None, vis[:, cols],
                  wgt[:, cols], on_block=on_block)
        col += nbin[k]
    return _rows_with_weight(uvw, fbin, vis, wgt)


def _rows_with_weight(uvw, fbin, vis, wgt) -> BinnedStokesI:
    """The binned samples of the rows with weight in some bin (the others, flagged or
    empty, dropped)."""
    keep = wgt.any(axis=1)
    if not keep.all():
        uvw, vis, wgt = uvw[keep], vis[keep], wgt[keep]
    return BinnedStokesI(uvw, fbin, vis, wgt)


def read_mosaic_aggregate(pointing_spws: list, width: int, column: str = "DATA", on_block=None) -> list:
    """The aggregate continuum of a mosaic, streamed: read_aggregate_samples of each
    pointing (pointing_spws: one spws list per pointing, as read_aggregate_samples takes
    it), all of them with the same bins, so that they are imaged jointly (samples.
    clean_mfs). Where the spws' rows differ in any pointing, every pointing's samples
    are one per (row, bin), scaled to one reference frequency: the weighted mean of all
    the pointings' sample frequencies, as aggregate_samples takes it from all the rows."""
    same = all(_same_rows([parts for parts, _ in spws]) for spws in pointing_spws)
    out = [read_aggregate_samples(spws, width, column, on_block, same_rows=same) for spws in pointing_spws]
    if not same:
        wsum = sum(float(s.weight.sum()) for s in out)
        fsum = sum(float((s.weight[:, 0] * s.sample_freq).sum()) for s in out)
        fref = fsum / wsum if wsum > 0 else float(np.mean([s.freq[0] for s in out]))
        for s in out:                  # each was scaled to its own: uvw f / c is what counts
            s.uvw *= s.freq[0] / fref
            s.freq = np.array([fref])
    return out


def _ascending_bins(chan_bin: np.ndarray, fbin: np.ndarray) -> tuple:
    """width_bins' bins numbered in ascending frequency (a spw's channels may descend)."""
    if len(fbin) > 1 and fbin[0] > fbin[-1]:
        return np.where(chan_bin >= 0, len(fbin) - 1 - chan_bin, -1), fbin[::-1].copy()
    return chan_bin, fbin


def _same_rows(spw_parts: list, tol_m: float = 1e-3) -> bool:
    """Whether the spws' selected cross-correlation rows are the same rows: EB by EB the
    same times and baselines, and the same uvw (to tol_m)."""
    def rows(p, f):
        r = p.select(f, cross_only=True)
        return r, p.index("TIME")[r], p.index("ANTENNA1")[r], p.index("ANTENNA2")[r]
    first = [rows(p, f) for p, f in spw_parts[0]]
    for parts in spw_parts[1:]:
        if len(parts) != len(first):
            return False
        for (p, f), (r0, t0, a0, b0), (p0, _) in zip(parts, first, spw_parts[0]):
            r, t, a, b = rows(p, f)
            if len(r) != len(r0) or not (np.array_equal(t, t0) and np.array_equal(a, a0) and np.array_equal(b, b0)):
                return False
            if len(r) and np.abs(p.row_array("UVW")[r] - p0.row_array("UVW")[r0]).max() > tol_m:
                return False
    return True


def _flat_aggregate(spws: list, bins: list, column: str, on_block) -> BinnedStokesI:
    """read_aggregate_samples where the spws' rows differ: one sample per (row, bin)."""
    # room for every (cross-correlation row, bin) of the spws; flagged ones are dropped
    bound = sum(len(fbin) * _cross_rows(parts)
                for (parts, _), (_, fbin) in zip(spws, bins))
    uvw = np.empty((bound, 3))
    data = np.empty(bound, np.complex64)
    weight = np.empty(bound, np.float32)
    sample_freq = np.empty(bound)
    n, wsum, fsum = 0, 0.0, 0.0
    for (parts, mask), spw_bins in zip(spws, bins):
        s = read_binned_stokes_i(parts, None, np.flatnonzero(mask), 0.0, column, on_block=on_block, bins=spw_bins)
        for b in range(len(s.freq)):           # bin-major, as aggregate_samples stacks them
            r = np.flatnonzero(s.weight[:, b] > 0)
            k = len(r)
            uvw[n:n + k] = s.uvw[r]
            data[n:n + k] = s.data[r, b]
            weight[n:n + k] = s.weight[r, b]
            sample_freq[n:n + k] = s.freq[b]
            n += k
        per_bin = s.weight.sum(axis=0, dtype=float)
        wsum += float(per_bin.sum())
        fsum += float((per_bin * s.freq).sum())
        del s
    fref = fsum / wsum if wsum > 0 else float(np.mean([fbin.mean() for _, fbin in bins]))
    uvw, data, weight, sample_freq = uvw[:n], data[:n], weight[:n], sample_freq[:n]
    uvw *= (sample_freq / fref)[:, None]
    return BinnedStokesI(uvw, np.array([fref]), data[:, None], weight[:, None], sample_freq)


def reference_frequency(samples) -> float:
    """The one frequency an aggregate's samples are imaged at (read_aggregate_samples):
    its bins' frequencies weighted by their weights, as aggregate_samples takes it.
    samples: a BinnedStokesI, or a mosaic's list of them (read_mosaic_aggregate)."""
    samples = list(samples) if isinstance(samples, (list, tuple)) else [samples]
    if samples[0].sample_freq is not None:          # already at it
        return float(samples[0].freq[0])
    per_bin = np.sum([s.weight.sum(axis=0, dtype=float) for s in samples], axis=0)
    freq = samples[0].freq
    return float(np.average(freq, weights=per_bin)) if per_bin.sum() > 0 else float(freq.mean())


def uv_distances(samples: BinnedStokesI, fref: float) -> np.ndarray:
    """The uv distance (m at fref) of every sample with data: what the image heuristics
    take from the single-channel Vis at fref of aggregate_samples."""
    uvdist = np.hypot(samples.uvw[:, 0], samples.uvw[:, 1])
    if samples.sample_freq is not None:          # scaled to fref already, only samples with data
        return uvdist
    return np.concatenate([uvdist[samples.weight[:, b] > 0] * (f / fref) for b, f in enumerate(samples.freq)])


class MedianSketch:
    """The median of many non-negative values seen a block at a time, from a histogram
    of their float32 bit patterns in bounded memory: a bin is an exponent and the top
    MANTISSA_BITS bits of the mantissa, 2048 bins an octave (the median within 0.025 %).
    The bin is a shift of the bits, where a logarithm per value took 8.5 s of the
    imager's thread time on the realistic EB (py-spy)."""
    MANTISSA_BITS = 11
    SHIFT = 23 - MANTISSA_BITS
    LO, HI = 1e-15, 1e10                 # bin 0: zeros and below LO; the last bin: HI and above
    FIRST = int(np.float32(LO).view(np.uint32)) >> SHIFT     # the first inner bin's bits

    def __init__(self):
        last = (int(np.float32(self.HI).view(np.uint32)) >> self.SHIFT) - self.FIRST + 1
        self.counts = np.zeros(last + 1, np.int64)
        self.n = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, float).ravel()
        self.n += len(values)
        last = len(self.counts) - 1
        inner = (values > 0) & (values < self.HI)          # (NaN: neither)
        bits = values[inner].astype(np.float32).view(np.uint32)
        b = np.zeros(len(values), np.int64)
        b[inner] = np.clip((bits >> self.SHIFT).astype(np.int64) - self.FIRST + 1, 0, last)
        b[values >= self.HI] = last                        # (inf included)
        self.counts += np.bincount(b, minlength=len(self.counts))

    def add_adjacent_differences(self, data, flag, weight, idx, rows=None) -> None:
        """Add |Re(V[c + 1] - V[c])| sqrt(w) of every row (or the given rows) and
        correlation of data (rows, channels, correlations), for each pair of adjacent
        channels c, c + 1 among the channels idx that are both unflagged: the scatter of
        a visibility of unit weight (times sqrt 2), which neither continuum nor a smooth
        line contributes to. One compiled pass, as add() of the same values."""
        rows = np.arange(len(data), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        self.n += int(kernels.adjacent_difference_counts(data, flag, weight, rows, np.asarray(idx, np.int64),
                                                         self.counts, self.SHIFT, self.FIRST, self.HI))

    def median(self) -> float:
        if not self.n:
            return float("nan")
        b = int(np.searchsorted(np.cumsum(self.counts), (self.n + 1) / 2.0))
        if b == 0:
            return 0.0
        # the bin's centre: its edges are float32 numbers, evenly spaced within an octave
        lo, hi = (np.array([b - 1 + self.FIRST, b + self.FIRST], np.uint32) << self.SHIFT).view(np.float32)
        return 0.5 * (float(lo) + float(hi))


def clean_mfs(samples, spec) -> Planes | TaylorPlanes:
    """The one plane of an mfs image (imager.ImageSpec) from binned samples: weighted
    (Briggs over all bins), cleaned and its beam fitted, as imager.clean_planes does for
    a Vis; restore with imager.restore_planes. samples: a BinnedStokesI, or for a mosaic
    (spec.mosaic) a list of them, one per pointing in the mosaic's order, with the same
    bins (cleaned jointly, each pointing weighted on its own, as clean_planes does). With
    spec.nterms > 1 (one pointing) its Taylor terms, as imager.clean_taylor makes them
    (each sample's frequency its bin's, or its sample_freq); restore with
    imager.restore_taylor_planes."""
    from .automask import AutomaskParams
    from .imager import Planes, TaylorPlanes
    mosaic = spec.mosaic is not None
    if spec.specmode != "mfs" or mosaic != isinstance(samples, (list, tuple)) or (mosaic and spec.nterms > 1):
        raise ValueError("clean_mfs: one mfs plane, of one pointing's samples or of one list of samples per "
                         f"pointing of a single-term mosaic (got specmode {spec.specmode!r}, mosaic {mosaic}, "
                         f"nterms {spec.nterms}, {type(samples).__name__})")
    npix = spec.npix
    cell = np.radians(spec.cell_arcsec / 3600.0)
    if mosaic:
        from .imager import plane_measurement, pointing_samples
        freqs = samples[0].freq
        op = plane_measurement(spec, [pointing_samples(p, s.uvw, s.data, s.weight)
                                       for p, s in zip(spec.mosaic.pointings, samples)],
                                freqs, slice(None), npix, cell)
        wsum = np.sum([s.weight.sum(axis=0) for s in samples], axis=0)
    elif spec.nterms > 1:
        from . import mtmfs
        w = gridding.briggs_weights(samples.uvw, samples.freq, samples.weight, npix, cell, spec.robust)
        nu = samples.sample_freq[:, None] if samples.sample_freq is not None else samples.freq[None, :]
        used = np.broadcast_to(nu, samples.weight.shape)[samples.weight > 0]
        # the expansion's reference: the middle of the frequencies imaged (tclean's reffreq)
        reffreq = 0.5 * float(used.min() + used.max()) if used.size else float(samples.freq.mean())
        op = mtmfs.TaylorPointing(samples.uvw, samples.freq, samples.data, w.astype(np.float32, copy=False), nu,
                                  reffreq, npix, cell, spec.nterms)
        del w, used
        res = mtmfs.clean_mt(op, spec.niter, spec.threshold_jy, gain=spec.gain, nsigma=spec.nsigma,
                             automask=spec.automask, threshold_from_dirty=spec.threshold_from_dirty,
                             automask_params=AutomaskParams(negative_threshold=spec.negative_threshold))
        beam = deconvolve.fit_beam(res.psfs[0], cell) if res.psfs[0].max() > 0 else (0.0, 0.0, 0.0)
        return TaylorPlanes(res, beam, reffreq)
    else:
        freqs = samples.freq
        w = gridding.briggs_weights(samples.uvw, samples.freq, samples.weight, npix, cell, spec.robust)
        op = OnePointing(samples.uvw, samples.freq, samples.data, w.astype(np.float32, copy=False), npix, cell)
        wsum = samples.weight.sum(axis=0)
        del w
    res = deconvolve.clean(op, spec.niter, spec.threshold_jy, gain=spec.gain, nsigma=spec.nsigma,
                           automask=spec.automask, threshold_from_dirty=spec.threshold_from_dirty,
                           automask_params=AutomaskParams(negative_threshold=spec.negative_threshold),
                           scales=spec.scales)
    beam = deconvolve.fit_beam(res.psf, cell) if res.psf.max() > 0 else (0.0, 0.0, 0.0)
    freq = np.array([np.average(freqs, weights=np.maximum(wsum, 1e-30))])
    return Planes([res.model], [res.residual], [res.psf], [beam], freq, [res.stop_reason], res.iterations,
                  [res.mask if res.mask is not None else np.zeros((npix, npix))])
