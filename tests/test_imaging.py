"""Imaging kernels against injected truth: positions, fluxes, beams, continuum subtraction, FITS."""
import dataclasses
import os
from unittest import mock

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from almapipe.imaging import deconvolve, gridding
from almapipe.imaging.imager import ImageSpec, make_image
from almapipe.imaging.products import image_header, write_fits
from almapipe.imaging.uvcontsub import format_channels, parse_channels, subtract_continuum
from conftest import simulate

ARCSEC = np.pi / 180 / 3600


def test_point_sources_land_where_injected_with_their_flux(tmp_path):
    # 1 Jy at the centre and 0.5 Jy 160" east, 80" north (east is RA increasing: to the left);
    # at 1.4 GHz with 500 m baselines the beam is about 45", sampled by 8" pixels
    vis = simulate(nant=12, ntime=40, nchan=4, noise=0.001, flux=1.0,
                   offsets=[(0.5, 160 * ARCSEC, 80 * ARCSEC)], baseline_m=500.0)
    spec = ImageSpec(field="sim", specmode="mfs", npix=128, cell_arcsec=8.0, robust=0.5, niter=500)
    res = make_image(vis, spec, dish_m=12.0, telescope="ALMA")
    img = res.image[0]
    c = 64
    assert abs(img[c, c] - 1.0) < 0.05
    # 160" east = 20 pixels towards smaller x; 80" north = 10 pixels up
    y, x = c + 10, c - 20
    win = img[y - 2:y + 3, x - 2:x + 3]
    assert np.unravel_index(np.argmax(win), win.shape) == (2, 2)
    assert abs(win.max() - 0.5) < 0.03
    # and its position in the FITS WCS is the injected one
    hdr = image_header(np.radians(150.0), np.radians(20.0), 128, 8 * ARCSEC, np.array([1.4e9]), "LSRK",
                       "Jy/beam", res.beam, "sim", "ALMA", bandwidth_hz=4e6)
    path = tmp_path / "x.fits"
    write_fits(str(path), res.image, hdr)
    with fits.open(path) as h:
        w = WCS(h[0].header).celestial
        assert h[0].header["BMAJ"] > 0 and h[0].header["BUNIT"] == "Jy/beam"
        assert WCS(h[0].header).has_celestial and WCS(h[0].header).wcs.spec >= 0
    ra, dec = w.wcs_pix2world([[x, y]], 0)[0]
    assert abs((ra - 150.0) * np.cos(np.radians(20.0)) * 3600 - 160.0) < 2.0
    assert abs((dec - 20.0) * 3600 - 80.0) < 2.0


def test_a_large_images_psf_is_the_images_size_and_its_sources_come_back_as_with_twice(monkeypatch):
    """Above deconvolve.FULL_PSF_MAX_NPIX the minor cycle's PSF is the image's size (as
    tclean's and WSClean's), not twice it: a component's far sidelobes then wait for the
    major cycle. The same two point sources and 500 components as above, with the
    threshold lowered so that this 128-pixel image takes that path: the fluxes, the
    beam and the residual's rms are those of the PSF of twice the image."""
    vis = simulate(nant=12, ntime=40, nchan=4, noise=0.001, flux=1.0,
                   offsets=[(0.5, 160 * ARCSEC, 80 * ARCSEC)], baseline_m=500.0)
    spec = ImageSpec(field="sim", specmode="mfs", npix=128, cell_arcsec=8.0, robust=0.5, niter=500)
    sizes, original = [], gridding.psf

    def psf_recording_its_size(uvw, freq, wgt, npix, *args, **kwargs):
        sizes.append(npix)
        return original(uvw, freq, wgt, npix, *args, **kwargs)
    monkeypatch.setattr(gridding, "psf", psf_recording_its_size)
    twice = make_image(vis, spec, dish_m=12.0, telescope="ALMA")
    monkeypatch.setattr(deconvolve, "FULL_PSF_MAX_NPIX", 64)          # 128 pixels is then large
    same = make_image(vis, spec, dish_m=12.0, telescope="ALMA")
    assert sizes == [256, 128]
    for y, x, flux in ((64, 64, 1.0), (74, 44, 0.5)):
        assert abs(same.image[0][y, x] - flux) < 0.03
        assert abs(same.image[0][y, x] - twice.image[0][y, x]) < 1e-3
    assert np.allclose(same.beam, twice.beam)
    assert np.std(same.residual) == pytest.approx(np.std(twice.residual), rel=0.01)


def test_beam_fit_of_a_known_gaussian():
    beam = (10.0, 6.0, 30.0)
    kern = deconvolve.gaussian_kernel(128, 1 * ARCSEC, beam)
    got = deconvolve.fit_beam(kern, 1 * ARCSEC)
    assert abs(got[0] - 10.0) < 0.1 and abs(got[1] - 6.0) < 0.1 and abs(got[2] - 30.0) < 1.0


def test_main_lobe_walks_each_ray_only_to_its_edge():
    """main_lobe samples its rays in growing stretches, each ray until its first sample
    below the cutoff: the lobe it finds is, pixel for pixel, the one found by sampling
    every ray out to the array's edge, for a lobe of a few pixels, one longer than the
    first stretch (40 pixels along its major axis), a PSF whose sidelobes rise above the
    cutoff beyond a dip, and a peak off the centre."""
    from scipy import ndimage

    def every_sample(psf, cutoff=deconvolve.PSF_CUTOFF, nrays=720):
        py, px = np.unravel_index(np.argmax(psf), psf.shape)
        theta = np.linspace(0, 2 * np.pi, nrays, endpoint=False)
        rmax = float(min(py, px, psf.shape[0] - 1 - py, psf.shape[1] - 1 - px))
        steps = np.arange(0.25, max(rmax, 0.25) + 0.25, 0.25)
        yy = py + np.sin(theta)[:, None] * steps[None, :]
        xx = px + np.cos(theta)[:, None] * steps[None, :]
        below = ndimage.map_coordinates(psf, [yy.ravel(), xx.ravel()], order=1).reshape(yy.shape) < cutoff
        return np.where(below.any(axis=1), steps[np.argmax(below, axis=1)], steps[-1])

    rng = np.random.default_rng(2)
    n = 256
    yy, xx = np.mgrid[:n, :n] - n // 2
    r = np.hypot(xx, yy)
    psfs = [np.exp(-(xx / 3.0) ** 2 - (yy / 2.0) ** 2),
            np.exp(-(xx / 40.0) ** 2 - (yy / 4.0) ** 2),
            np.exp(-(r / 4.0) ** 2) + 0.6 * np.exp(-((r - 30.0) / 3.0) ** 2),
            np.roll(np.exp(-(xx / 5.0) ** 2 - (yy / 3.0) ** 2), (90, -100), (0, 1))]
    for k, psf in enumerate(psfs):
        psf = (psf + 0.002 * rng.normal(size=psf.shape)).astype(np.float32)
        psf /= psf.max()
        dy, dx, val = deconvolve.main_lobe(psf)
        py, px = np.unravel_index(np.argmax(psf), psf.shape)
        edge = every_sample(psf)
        theta = np.linspace(0, 2 * np.pi, 720, endpoint=False)
        h = int(np.ceil(edge.max())) + 1
        gy, gx = np.mgrid[-h:h + 1, -h:h + 1]
        edge_at = np.interp(np.mod(np.arctan2(gy, gx), 2 * np.pi), np.append(theta, 2 * np.pi),
                            np.append(edge, edge[0]))
        inside = (np.hypot(gy, gx) < edge_at) & (py + gy >= 0) & (py + gy < n) & (px + gx >= 0) & (px + gx < n)
        np.testing.assert_array_equal(dy, gy[inside], err_msg=str(k))
        np.testing.assert_array_equal(dx, gx[inside], err_msg=str(k))
        np.testing.assert_array_equal(val, psf[py + gy[inside], px + gx[inside]])
    assert len(deconvolve.main_lobe((psfs[1] / psfs[1].max()).astype(np.float32))[0]) > 400   # past 16 pixels


def test_clean_residual_is_noise_like():
    vis = simulate(nant=10, ntime=30, nchan=2, noise=0.01, flux=2.0, baseline_m=400)
    spec = ImageSpec(field="s", npix=64, cell_arcsec=12.0, niter=300)
    res = make_image(vis, spec, 12.0, "ALMA")
    assert np.abs(res.residual).max() < 0.05 * 2.0
    assert res.iterations > 0


def test_briggs_weights_between_natural_and_uniform():
    vis = simulate(nant=10, ntime=30, nchan=1, baseline_m=400)
    w = np.ones((len(vis.time), 1))
    nat = gridding.briggs_weights(vis.uvw, vis.freq, w, 64, 12 * ARCSEC, None)
    rob = gridding.briggs_weights(vis.uvw, vis.freq, w, 64, 12 * ARCSEC, 0.5)
    uni = gridding.briggs_weights(vis.uvw, vis.freq, w, 64, 12 * ARCSEC, -5)
    assert np.allclose(nat, 1)
    assert uni.std() / uni.mean() > rob.std() / rob.mean() > 0


def test_uvcontsub_removes_continuum_and_keeps_line():
    nrow, nchan = 50, 40
    x = np.arange(nchan)
    cont = (2.0 + 0.01 * x)[None, :, None] * np.ones((nrow, 1, 2))
    line = np.zeros_like(cont)
    line[:, 18:22] = 0.5
    data = (cont + line).astype(np.complex64)
    mask = parse_channels("0~10;30~39", nchan)
    out, _ = subtract_continuum(data, np.zeros(data.shape, bool), mask, order=1)
    np.testing.assert_allclose(out[:, mask].real, 0, atol=1e-5)
    np.testing.assert_allclose(out[:, 18:22].real, 0.5, atol=1e-5)
    assert format_channels(mask) == "0~10;30~39"
    with pytest.raises(ValueError, match="outside"):
        parse_channels("0~99", nchan)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_continuum_subtraction_is_the_least_squares_fit_of_each_row(order):
    """uvcontsub's compiled pass (kernels.subtract_continuum_rows): for each selected row
    and correlation the polynomial fitted by least squares to its unflagged continuum
    channels is subtracted from every channel (rows with too few such channels and rows
    not selected are left alone), and the weighted spectrum of the selected rows is
    summed before the subtraction."""
    from almapipe.imaging.kernels import subtract_continuum_rows
    rng = np.random.default_rng(order)
    nrow, nchan, ncorr = 60, 24, 2
    data = (rng.normal(size=(nrow, nchan, ncorr)) + 1j * rng.normal(size=(nrow, nchan, ncorr))).astype(np.complex64)
    flag = rng.random(data.shape) < 0.2
    flag[3, :, 0] = True                                   # a correlation with nothing to fit
    flag[4, 2:, 1] = True                                  # ... or too little
    weight = rng.uniform(0.5, 2, (nrow, ncorr)).astype(np.float32)
    mask = np.ones(nchan, bool)
    mask[9:15] = False
    rows = rng.random(nrow) < 0.7
    rows[3] = rows[4] = True
    out, vsum, wsum = data.copy(), np.zeros(nchan, complex), np.zeros(nchan)
    subtract_continuum_rows(out, flag, weight, rows, mask, order, vsum, wsum)
    x = np.linspace(-1, 1, nchan)
    basis = np.stack([x ** k for k in range(order + 1)], axis=1)
    want = data.astype(np.complex128)
    for r in np.flatnonzero(rows):
        for p in range(ncorr):
            use = mask & ~flag[r, :, p]
            if use.sum() > order:
                coef = np.linalg.lstsq(basis[use], want[r, use, p], rcond=None)[0]
                want[r, :, p] -= basis @ coef
    np.testing.assert_allclose(out, want, atol=2e-6)
    np.testing.assert_array_equal(out[~rows], data[~rows])
    np.testing.assert_array_equal(out[3, :, 0], data[3, :, 0])
    w = np.where(flag[rows], 0, weight[rows][:, None, :])
    np.testing.assert_allclose(vsum, (w * data[rows]).sum(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(wsum, w.sum(axis=(0, 2)), rtol=1e-6)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_the_compiled_passes_give_the_array_expressions_bits(order):
    """kernels.subtract_polynomial (a continuum-subtracted view's read) and
    MedianSketch.add_adjacent_differences (the noise's scatter) give bit for bit what
    the numpy expressions they replaced gave, whole spw and channel range, NaNs, zeros,
    flags and float32 or float64 weights included."""
    from almapipe.imaging.samples import MedianSketch
    from almapipe.platform import visstore as vst
    rng = np.random.default_rng(order)
    nrow, nchan, ncorr = 3000, 48, 2
    data = (rng.normal(size=(nrow, nchan, ncorr)) + 1j * rng.normal(size=(nrow, nchan, ncorr))).astype(np.complex64)
    data[5, 3, 0], data[7, 10:12, 1] = np.nan, 0
    fit = np.zeros((nrow, vst.FIT_TERMS, ncorr), np.complex64)
    fit[:, :order + 1] = rng.normal(size=(nrow, order + 1, ncorr)) + 1j * rng.normal(size=(nrow, order + 1, ncorr))
    for chan in (None, slice(20, 33)):
        d = data if chan is None else data[:, chan]
        want = d.copy()
        x = vst.continuum_x(nchan)[chan if chan is not None else slice(None)]
        for i in range(order + 1):
            want -= fit[:, None, i, :] * ((x ** i).astype(np.float32)[None, :, None] if i else 1)
        got = vst.subtract_continuum_fit(d, fit, chan, nchan)
        np.testing.assert_array_equal(got, want)
        assert got is not d
    flag = rng.random(data.shape) < 0.1
    idx = np.r_[2:20, 25:40, 41:47]
    rows = np.sort(rng.choice(nrow, 2000, replace=False))
    for wdtype in (np.float32, np.float64):
        weight = rng.uniform(0.5, 2, (nrow, ncorr)).astype(wdtype)
        d, ok = data[rows[:, None], idx[None, :]], ~flag[rows[:, None], idx[None, :]]
        pair = ok[:, 1:] & ok[:, :-1] & (np.diff(idx) == 1)[None, :, None]
        want = MedianSketch()
        want.add(np.abs(((d[:, 1:] - d[:, :-1]).real * np.sqrt(weight[rows])[:, None, :])[pair]))
        got = MedianSketch()
        got.add_adjacent_differences(data, flag, weight, idx, rows=rows)
        assert got.n == want.n
        np.testing.assert_array_equal(got.counts, want.counts)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_a_stored_continuum_fit_subtracted_on_read_equals_the_subtraction(order):
    """uvcontsub keeps each row's fit (kernels.fit_continuum_rows) and the store
    subtracts it when the data are read (visstore.subtract_continuum_fit): the same
    data, to float precision, as the in-place subtraction, whole or in a channel range,
    with the same spectrum; rows not selected get no fit."""
    from almapipe.imaging.kernels import fit_continuum_rows, subtract_continuum_rows
    from almapipe.platform import visstore as vst
    rng = np.random.default_rng(10 + order)
    nrow, nchan, ncorr = 50, 40, 2
    x = np.linspace(-1, 1, nchan)
    cont = sum((rng.normal(size=(nrow, 1, ncorr)) + 1j * rng.normal(size=(nrow, 1, ncorr))) * x[None, :, None] ** k
               for k in range(order + 1))
    data = (cont + 0.1 * rng.normal(size=(nrow, nchan, ncorr))).astype(np.complex64)
    data[:, 15:20] += 3.0                                   # a line
    flag = rng.random(data.shape) < 0.1
    weight = rng.uniform(0.5, 2, (nrow, ncorr)).astype(np.float32)
    mask = np.ones(nchan, bool)
    mask[14:21] = False
    rows = rng.random(nrow) < 0.8
    want, vsum, wsum = data.copy(), np.zeros(nchan, complex), np.zeros(nchan)
    subtract_continuum_rows(want, flag, weight, rows, mask, order, vsum, wsum)
    fit = np.zeros((nrow, vst.FIT_TERMS, ncorr), np.complex64)
    kept, fsum, fwsum = data.copy(), np.zeros(nchan, complex), np.zeros(nchan)
    fit_continuum_rows(kept, flag, weight, rows, mask, order, fit, fsum, fwsum)
    np.testing.assert_array_equal(kept, data)               # the data are left as they are
    assert not fit[~rows].any() and not fit[:, order + 1:].any()
    np.testing.assert_allclose(fsum, vsum)
    np.testing.assert_allclose(fwsum, wsum)
    np.testing.assert_allclose(vst.subtract_continuum_fit(data, fit, None, nchan), want, atol=1e-5)
    piece = slice(12, 25)
    np.testing.assert_allclose(vst.subtract_continuum_fit(data[:, piece], fit, piece, nchan), want[:, piece],
                               atol=1e-5)
    with pytest.raises(ValueError, match="fit has shape"):
        fit_continuum_rows(kept, flag, weight, rows, mask, order, fit[:, :order], fsum, fwsum)


def test_the_compiled_flag_scans_equal_numpys():
    """rows_with_data and channels_with_data (which rows / channels have an unflagged
    sample) equal the numpy expressions they replace, at any flagged fraction, with
    whole rows and channels flagged."""
    from almapipe.imaging.kernels import channels_with_data, rows_with_data
    rng = np.random.default_rng(0)
    for p in (0.01, 0.5, 0.99, 1.0):
        f = rng.random((500, 32, 4)) < p
        f[:10] = True
        f[:, 5] = True
        chans, rows = rng.random(32) < 0.5, rng.random(500) < 0.3
        assert np.array_equal(rows_with_data(f, chans), ~f[:, chans].all(axis=(1, 2)))
        assert np.array_equal(rows_with_data(f), ~f.all(axis=(1, 2)))
        assert np.array_equal(channels_with_data(f, rows), ~f[rows].all(axis=(0, 2)))
        assert np.array_equal(channels_with_data(f), ~f.all(axis=(0, 2)))
    # the kernels index unchecked: a mask of another length or an index array is refused
    with pytest.raises(ValueError, match="chans"):
        rows_with_data(f, np.ones(33, bool))
    with pytest.raises(ValueError, match="rows"):
        channels_with_data(f, np.arange(10))


def test_findcont_finds_a_line_that_covers_most_of_the_band():
    """A line wider than half the band (as NGC 5921's HI is) must still be found."""
    from almapipe.imaging.findcont import find_continuum
    nchan = 40
    vis = simulate(nant=10, ntime=20, nchan=nchan, noise=0.02, flux=0.0, baseline_m=400,
                   offsets=[(1.0, 40 * ARCSEC, -30 * ARCSEC)])
    line = np.zeros(nchan)
    line[8:32] = 0.5
    ph = np.exp(2j * np.pi * (vis.uvw[:, 0:1] * 60 * ARCSEC) * vis.freq[None, :] / 299792458.0)
    vis.data += (line[None, :] * ph)[:, :, None].astype(np.complex64)
    cont = find_continuum(vis)
    assert not cont[8:32].any()
    assert cont[2:6].all() and cont[34:38].all()


@pytest.mark.parametrize("averaged", [False, True])
def test_findcont_cube_summed_over_row_blocks_equals_the_whole(monkeypatch, averaged):
    """uvcontsub reads in row blocks: findcont's coarse cube summed block by block (its
    geometry from flags and uvw only) gives the spectrum of the cube made at once. With
    each block's integrations averaged in time (decision 24), which the blocks' ends cut
    differently from the whole's, to within the smearing allowed."""
    from almapipe.imaging import imager
    from almapipe.imaging.findcont import CubeGeometry, continuum_from_spectra, line_spectrum
    if not averaged:
        monkeypatch.setattr(imager, "AVERAGING_PHASE", 1e-12)
    nchan = 24
    line = np.where((np.arange(nchan) >= 15) & (np.arange(nchan) < 18), 1.0, 0.0)
    vis = simulate(nant=10, ntime=30, nchan=nchan, noise=0.05, flux=0.2 + line, baseline_m=400,
                   offsets=[(0.5, 40 * ARCSEC, -30 * ARCSEC)], seed=3)
    vis.flag[:, 3] = True
    vis.flag[::7, 10:14] = True
    parts = [vis.select(np.isin(np.arange(len(vis.time)), idx)) for idx in np.array_split(np.arange(len(vis.time)), 4)]
    geometry = CubeGeometry(nchan)
    for b in parts:
        geometry.add(dataclasses.replace(b, data=np.zeros((0,) + b.flag.shape[1:], np.complex64)))
    cube = geometry.cube(vis.freq)
    for b in parts:
        cube.add(b)
    spec, has = cube.spectrum()
    whole, whole_has = line_spectrum(vis)
    assert (has == whole_has).all() and not has[3]
    if not averaged:
        np.testing.assert_allclose(spec, whole, rtol=1e-4, atol=1e-6)
    else:
        # blocks cut a baseline's runs where the whole does not: the noise peaks differ
        # (by up to ~20 % here), the line channels and the continuum found do not
        cont, whole_cont = continuum_from_spectra([(spec, has)]), continuum_from_spectra([(whole, whole_has)])
        np.testing.assert_array_equal(cont, whole_cont)
        assert not cont[15:18].any() and cont[5:10].all()


def test_findcont_planes_equal_the_gridder_channel_by_channel():
    """findcont grids a block's channels as the transforms of one NUFFT plan: each plane
    equals gridding.dirty of that channel at the reference frequency (no w-term), times
    its weight sum."""
    from almapipe.imaging import gridding
    from almapipe.imaging.findcont import dirty_planes
    rng = np.random.default_rng(4)
    n, nplane, npix, f_ref = 3000, 5, 64, 230e9
    uvw = rng.normal(0, 300, (n, 3))
    data = (rng.normal(size=(n, nplane)) + 1j * rng.normal(size=(n, nplane))).astype(np.complex64)
    weight = rng.uniform(0.5, 2, (n, nplane)).astype(np.float32)
    cell = 1 / (3 * np.percentile(np.hypot(uvw[:, 0], uvw[:, 1]), 95) * f_ref / 299792458.0)
    planes = dirty_planes(uvw, f_ref, data, weight, npix, cell)
    for c in range(nplane):
        ref = gridding.dirty(uvw, np.array([f_ref]), data[:, c:c + 1], weight[:, c:c + 1], npix, cell,
                             wgridding=False) * weight[:, c].sum()
        np.testing.assert_allclose(planes[c], ref, atol=1e-4 * np.abs(ref).max())


def test_automask_covers_the_sources_and_little_else():
    # 24 antennas: PSF sidelobes low enough (as an ALMA array's) for the sidelobe threshold
    vis = simulate(nant=24, ntime=60, nchan=2, noise=0.05, flux=1.0, baseline_m=500.0,
                   offsets=[(0.4, 200 * ARCSEC, 100 * ARCSEC)])
    spec = ImageSpec(field="s", npix=128, cell_arcsec=8.0, niter=1000, nsigma=2.0, automask=True)
    res = make_image(vis, spec, 12.0, "ALMA")
    mask = res.clean_mask[0]
    c = 64
    assert mask[c, c] and mask[c + 12, c - 25]            # both sources (200" east = 25 px, 100" north = 12 px)
    assert mask.mean() < 0.05                              # and not the noise
    assert np.abs(res.residual[0]).max() < 6 * deconvolve.robust_rms(res.residual[0])
    assert abs(res.image[0][c + 12, c - 25] - 0.4) < 0.04


def test_automask_with_a_negative_threshold_masks_absorption():
    """A source in absorption (negative flux, as a line against a continuum can be) is
    masked and cleaned only with negative_threshold set, as auto-multithresh does for cubes."""
    vis = simulate(nant=24, ntime=60, nchan=2, noise=0.05, flux=1.0, baseline_m=500.0,
                   offsets=[(-0.5, 200 * ARCSEC, 100 * ARCSEC)])
    c, y, x = 64, 64 + 12, 64 - 25
    masks = {}
    for neg in (0.0, 15.0):
        spec = ImageSpec(field="s", npix=128, cell_arcsec=8.0, niter=1000, nsigma=2.0, automask=True,
                         negative_threshold=neg)
        res = make_image(vis, spec, 12.0, "ALMA")
        masks[neg] = res.clean_mask[0]
        if neg:
            assert abs(res.image[0][y, x] + 0.5) < 0.05
    assert masks[0.0][c, c] and not masks[0.0][y, x]
    assert masks[15.0][c, c] and masks[15.0][y, x]


def test_multiscale_clean_recovers_extended_emission_better_than_hogbom():
    """A 2 Jy Gaussian of 3 beams FWHM: with the same number of components multiscale
    CLEAN puts most of its flux in the model and leaves a far flatter residual."""
    vis = simulate(nant=24, ntime=60, nchan=2, noise=0.01, flux=0.0, baseline_m=500.0)
    fwhm = 150 * ARCSEC                                   # the beam is ~45"
    uv = np.hypot(vis.uvw[:, 0:1], vis.uvw[:, 1:2]) * vis.freq[None, :] / 299792458.0
    vis.data += (2.0 * np.exp(-(np.pi * fwhm * uv) ** 2 / (4 * np.log(2))))[:, :, None].astype(np.complex64)
    out = {}
    for name, scales in (("hogbom", None), ("multiscale", [0, 6, 18])):
        spec = ImageSpec(field="s", npix=128, cell_arcsec=8.0, niter=300, nsigma=1.0, scales=scales)
        res = make_image(vis, spec, 12.0, "ALMA")
        out[name] = (res.model[0].sum(), np.abs(res.residual[0]).max())
    # after 300 components: Hogbom has a third of the flux, multiscale most of it
    assert out["multiscale"][0] > 0.8 * 2.0 and out["multiscale"][0] > 2 * out["hogbom"][0], out
    assert out["multiscale"][1] < 0.3 * out["hogbom"][1], out


def test_cube_cleaned_in_channel_ranges_and_joined_equals_one_pass(tmp_path, monkeypatch):
    """What several imager workers do to a cube (clean channel ranges, hand each over as a
    file, then restore the joined planes with the cube's common beam) gives exactly the
    one-worker cube, whether the join holds the cube in memory or (a large cube) in
    files. The planes a worker holds until the join are single precision and the masks
    booleans."""
    from almapipe.imaging import imager
    from almapipe.imaging.imager import Planes, clean_planes, join_plane_files, join_planes, restore_planes
    from almapipe.stages.imaging import chunk_masks
    vis = simulate(nant=10, ntime=20, nchan=7, noise=0.01, flux=1.0, baseline_m=500.0, dfreq=20e6)
    spec = ImageSpec(field="s", specmode="cube", npix=64, cell_arcsec=8.0, niter=50, nsigma=2.0)
    whole = make_image(vis, spec, 12.0, "ALMA")
    chans = np.ones(7, bool)
    pieces = [clean_planes(vis, ImageSpec(**{**spec.__dict__, "chans": m})) for m in chunk_masks(chans, 3)]
    for k, piece in enumerate(pieces):
        assert {a.dtype for a in piece.models + piece.residuals + piece.psfs} == {np.dtype(np.float32)}
        assert {a.dtype for a in piece.masks} == {np.dtype(bool)}
        piece.save(str(tmp_path / f"piece{k}.npz"))
    files = [str(tmp_path / f"piece{k}.npz") for k in range(len(pieces))]
    joined = restore_planes(join_planes([Planes.load(f) for f in files]), spec, 12.0, "ALMA")
    assert joined.image.dtype == np.float32
    monkeypatch.setattr(imager, "CUBE_IN_MEMORY_BYTES", 0)              # every array in a file
    on_disk = restore_planes(join_plane_files(files, str(tmp_path / "scratch")), spec, 12.0, "ALMA",
                             str(tmp_path / "scratch"))
    assert isinstance(on_disk.image, np.memmap) and isinstance(on_disk.residual, np.memmap)
    for a, b in ((on_disk.image, joined.image), (on_disk.pbcor, joined.pbcor), (on_disk.model, joined.model),
                 (on_disk.psf, joined.psf)):
        np.testing.assert_array_equal(a, b)
    assert [len(p.freqs) for p in pieces] == [3, 2, 2]
    assert joined.beam == pytest.approx(whole.beam, abs=1e-4)     # the same beam, to rounding
    np.testing.assert_allclose(joined.image, whole.image, atol=1e-6)   # float32 gridding rounding
    np.testing.assert_array_equal(joined.freqs, whole.freqs)


def test_a_piece_comes_back_from_its_file_as_it_was_saved(tmp_path):
    """A cube's piece is stored, not deflated: its models as their clean components and
    its masks as bits (a plane of 61 x 63 pixels, not a whole number of bytes) come back
    exactly, and so does a piece saved the old way (deflated whole arrays)."""
    from almapipe.imaging.imager import Planes
    rng = np.random.default_rng(5)
    n, ny, nx = 4, 61, 63
    models = [np.where(rng.random((ny, nx)) < 0.01, rng.normal(size=(ny, nx)), 0).astype(np.float32)
              for _ in range(n)]
    models[2][:] = 0                                     # a plane with no components
    piece = Planes(models, [rng.normal(size=(ny, nx)).astype(np.float32) for _ in range(n)],
                   [rng.normal(size=(ny, nx)).astype(np.float32) for _ in range(n)],
                   [(1.0, 0.5, 10.0)] * n, np.linspace(1e11, 1.001e11, n), ["niter"] * n, 77,
                   [rng.random((ny, nx)) < 0.3 for _ in range(n)])
    piece.save(str(tmp_path / "new.npz"))
    np.savez_compressed(tmp_path / "old.npz", models=piece.models, residuals=piece.residuals, psfs=piece.psfs,
                        beams=np.array(piece.beams), freqs=piece.freqs, masks=piece.masks,
                        iterations=piece.iterations, reasons=np.array(piece.reasons))
    for name in ("new.npz", "old.npz"):
        back = Planes.load(str(tmp_path / name))
        for field in ("models", "residuals", "psfs", "masks"):
            got, want = np.array(getattr(back, field)), np.array(getattr(piece, field))
            assert got.dtype == want.dtype, (name, field)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {field}")
        assert back.beams == piece.beams and back.reasons == piece.reasons and back.iterations == 77
        np.testing.assert_array_equal(back.freqs, piece.freqs)
    # the residuals and PSFs whole, the rest small
    assert (tmp_path / "new.npz").stat().st_size < 2 * n * ny * nx * 4 * 1.1


def simulate_mosaic(centre, pointing_offsets, sources, freq0=100e9, noise=0.002, dish_m=12.0):
    """The visibilities of a mosaic: each pointing (l, m offsets from the centre) sees
    the point sources [(flux, l, m)] through its own Gaussian primary beam, phased to
    its own direction. Returns the Vis of all pointings and their fields [(id, ra, dec)]."""
    from almapipe.imaging.mosaic import direction_of, sin_offset
    from almapipe.imaging.products import PB_FWHM_FACTOR
    from almapipe.msio.ms import Vis
    fwhm = PB_FWHM_FACTOR["ALMA"] * 299792458.0 / freq0 / dish_m
    src_dirs = [(s, *direction_of(l, m, *centre)) for s, l, m in sources]
    parts, fields = [], []
    for fid, (lp, mp) in enumerate(pointing_offsets):
        ra_p, dec_p = direction_of(lp, mp, *centre)
        fields.append((fid, ra_p, dec_p))
        seen = []
        for s, ra, dec in src_dirs:
            l, m = sin_offset(ra, dec, ra_p, dec_p)
            seen.append((s * np.exp(-4 * np.log(2) * (l * l + m * m) / fwhm ** 2), l, m))
        v = simulate(nant=12, ntime=24, nchan=2, noise=0.0, flux=0.0, offsets=seen, baseline_m=60.0,
                     freq0=freq0, dfreq=50e6, seed=1)
        rng = np.random.default_rng(100 + fid)
        v.data += (noise * (rng.normal(size=v.data.shape) + 1j * rng.normal(size=v.data.shape)) / np.sqrt(2)
                   ).astype(np.complex64)
        v.weight[:] = 1 / noise ** 2
        v.field_id = np.full(len(v.time), fid)
        parts.append(v)
    cat = {k: np.concatenate([getattr(p, k) for p in parts])
           for k in ("time", "interval", "ant1", "ant2", "field_id", "scan", "uvw", "data", "flag", "weight", "rows")}
    return Vis(**cat, freq=parts[0].freq, corr_types=parts[0].corr_types), fields


def test_mosaic_recovers_sources_across_its_pointings():
    """Seven pointings (a hexagon at half the primary beam's FWHM), imaged jointly: point
    sources at the centre, between pointings and towards the edge come back at their
    positions (within a tenth of a beam) with their fluxes (within 5 %) in the
    pb-corrected image; the mosaic's pb is flat where pointings overlap and covers
    what no single pointing does."""
    from almapipe.imaging.mosaic import hexagonal_offsets, make_mosaic
    centre = (np.radians(277.5), np.radians(-21.9))
    fwhm = 1.13 * 299792458.0 / 100e9 / 12.0
    cell = 1.0 * ARCSEC
    # sources on pixel centres: l = -(x - c) cell (x runs west), m = (y - c) cell
    sources = [(0.05, 0.0, 0.0), (0.03, -20 * cell, 12 * cell), (0.02, 38 * cell, -25 * cell)]
    vis, fields = simulate_mosaic(centre, hexagonal_offsets(7, 0.5 * fwhm), sources)
    weights = [vis.weight[vis.field_id == f[0]].sum() for f in fields]
    mosaic = make_mosaic(fields, weights, 12.0, "ALMA")
    assert np.allclose(mosaic.centre, centre, atol=1e-9)
    spec = ImageSpec(field="m", npix=160, cell_arcsec=1.0, niter=2000, nsigma=3.0, mosaic=mosaic)
    res = make_image(vis, spec, 12.0, "ALMA")
    beam_px = np.sqrt(res.beam[0] * res.beam[1])             # arcsec = pixels here
    c = spec.npix // 2
    for s, l, m in sources:
        x, y = c - int(round(l / cell)), c + int(round(m / cell))
        win = res.pbcor[0, y - 3:y + 4, x - 3:x + 4]
        dy, dx = np.unravel_index(np.nanargmax(win), win.shape)
        # sub-pixel peak: a parabola through the peak and its neighbours, per axis
        py, px = y - 3 + dy, x - 3 + dx
        row, col = res.pbcor[0, py, px - 1:px + 2], res.pbcor[0, py - 1:py + 2, px]
        sx = px + 0.5 * (row[0] - row[2]) / (row[0] - 2 * row[1] + row[2])
        sy = py + 0.5 * (col[0] - col[2]) / (col[0] - 2 * col[1] + col[2])
        assert np.hypot(sx - x, sy - y) < 0.1 * beam_px, (s, sx - x, sy - y, beam_px)
        assert abs(res.pbcor[0, py, px] / s - 1) < 0.05, (s, res.pbcor[0, py, px])
    # the joint beam: 1 at its peak, above 0.9 over the inner pointings' centres, and the
    # third source (where the central pointing's beam is 0.18) well inside the mosaic
    assert res.pb.max() == pytest.approx(1.0)
    x3, y3 = c - 38, c - 25
    assert res.pb[y3, x3] > 0.5 and np.isfinite(res.pbcor[0, y3, x3])


def test_noise_of_a_source_free_field_is_the_theoretical_noise():
    """No source: the image's rms is the theoretical noise from the visibilities'
    scatter and the imaging weights (within 20 %), for one pointing and for a joint
    mosaic (whose noise is flat, that of all its data over sqrt(max sum f PB^2))."""
    from almapipe.imaging.mosaic import hexagonal_offsets, make_mosaic
    from almapipe.imaging.products import mosaic_noise_factor
    from almapipe.stages.imaging import _theoretical_rms
    vis = simulate(nant=12, ntime=40, nchan=8, noise=0.05, flux=0.0, baseline_m=300.0)
    spec = ImageSpec(field="s", npix=128, cell_arcsec=8.0, niter=0)
    theo = _theoretical_rms(vis, spec, np.ones(8, bool), mfs=True)
    rms = float(np.std(make_image(vis, spec, 12.0, "ALMA").residual[0]))
    assert abs(rms / theo - 1) < 0.2, (rms, theo)

    centre = (np.radians(277.5), np.radians(-21.9))
    fwhm = 1.13 * 299792458.0 / 100e9 / 12.0
    vis, fields = simulate_mosaic(centre, hexagonal_offsets(7, 0.5 * fwhm), [], noise=0.05)
    mosaic = make_mosaic(fields, [vis.weight[vis.field_id == f[0]].sum() for f in fields], 12.0, "ALMA")
    spec = ImageSpec(field="m", npix=160, cell_arcsec=1.0, niter=0, mosaic=mosaic)
    theo = _theoretical_rms(vis, spec, np.ones(2, bool), mfs=True) * mosaic_noise_factor(
        160, ARCSEC, float(vis.freq.mean()), 12.0, "ALMA", [p.offset_lm for p in mosaic.pointings],
        [p.fraction for p in mosaic.pointings])
    res = make_image(vis, spec, 12.0, "ALMA")
    inner = res.residual[0][res.pb > 0.5]
    outer = res.residual[0][(res.pb > 0.2) & (res.pb < 0.5)]
    assert abs(np.std(inner) / theo - 1) < 0.2, (np.std(inner), theo)
    assert abs(np.std(outer) / np.std(inner) - 1) < 0.2            # flat across the mosaic


def test_noise_of_hanning_smoothed_channels_is_the_theoretical_noise():
    """ALMA's channels are Hanning-smoothed (EFFECTIVE_BW 2.667 widths): neighbouring
    channels share 2/3 of their noise, which hides it from adjacent channels' differences
    and adds to any sum of channels. Taken as independent, the theoretical noise came out
    sqrt(8) too low for an mfs image and sqrt(3) for one channel. With the correlation
    (heuristics.spectral_response), the rms of a source-free image is the theoretical noise
    within 20 % for an mfs image, a cube's planes of one channel and of two."""
    from almapipe.heuristics.spectral_response import channel_correlation
    from almapipe.stages.imaging import _theoretical_rms
    nchan = 32
    vis = simulate(nant=12, ntime=40, nchan=nchan, noise=0.0, flux=0.0, baseline_m=300.0)
    rng = np.random.default_rng(7)
    white = rng.normal(size=(len(vis.time), nchan + 2, 2)) + 1j * rng.normal(size=(len(vis.time), nchan + 2, 2))
    smoothed = 0.25 * white[:, :-2] + 0.5 * white[:, 1:-1] + 0.25 * white[:, 2:]    # the correlator's window
    vis = dataclasses.replace(vis, data=(0.05 * smoothed / np.sqrt(2)).astype(np.complex64))
    rho = channel_correlation(1e6, 2.667e6)
    everything = np.ones(nchan, bool)
    spec = ImageSpec(field="s", npix=128, cell_arcsec=8.0, niter=0)
    rms = float(np.std(make_image(vis, spec, 12.0, "ALMA").residual[0]))
    theo = _theoretical_rms(vis, spec, everything, mfs=True, rho=rho)
    assert abs(rms / theo - 1) < 0.2, (rms, theo)
    assert rms / _theoretical_rms(vis, spec, everything, mfs=True) > 2.4       # sqrt(8), were it ignored
    for nbin, ignored in ((1, np.sqrt(3)), (2, np.sqrt(5))):
        spec = ImageSpec(field="s", specmode="cube", npix=128, cell_arcsec=8.0, niter=0, nbin=nbin)
        planes = make_image(vis, spec, 12.0, "ALMA").residual
        rms = float(np.sqrt(np.mean([np.var(p) for p in planes])))
        theo = _theoretical_rms(vis, spec, everything, mfs=False, rho=rho)
        assert abs(rms / theo - 1) < 0.2, (nbin, rms, theo)
        assert abs(rms / _theoretical_rms(vis, spec, everything, mfs=False) / ignored - 1) < 0.2, nbin


def test_cube_rows_moved_onto_the_lsrk_grid_keep_a_line_in_its_channel():
    """Four hours of TOPO data of a line at one LSRK frequency, in 30 kHz channels at
    230 GHz: the Earth's rotation moves it by ~11 channels in TOPO. Moved onto the LSRK
    grid the cube's axis is labelled with, every row has it in the same channel, at
    its LSRK frequency and at (nearly) full height."""
    from almapipe.imaging.frames import lsrk_factors
    from almapipe.stages.imaging import lsrk_labels, onto_lsrk_grid
    nchan, df, f0 = 96, 30e3, 230e9
    site, ra, dec = (2225142.18, -5440307.37, -2481029.85), np.radians(277.5), np.radians(-21.9)
    vis = simulate(nant=6, ntime=25, nchan=nchan, noise=0.0, flux=0.0, freq0=f0 - nchan / 2 * df, dfreq=df)
    vis.time = 5284331824.0 + np.repeat(np.arange(25) * 600.0, 15)
    ctx = {"observation": {"spws": [{"id": 0, "frame": "TOPO"}], "fields": [{"id": 0, "ra_rad": ra, "dec_rad": dec}],
                           "antennas": [{"position": site, "has_data": True}]}}
    k_ref = lsrk_labels(ctx, 0, 0, vis.time)[0]
    j0 = nchan // 2
    line_lsrk = k_ref * vis.freq[j0]                        # on a labelled channel of the cube
    k = lsrk_factors("TOPO", vis.time, ra, dec, site)
    # each row sees, at TOPO channel frequency f, the LSRK frequency k f
    spectrum = np.exp(-0.5 * ((k[:, None] * vis.freq[None, :] - line_lsrk) / (2 * df)) ** 2)
    vis.data[:] = spectrum[:, :, None].astype(np.complex64)
    before = vis.data[..., 0].real.mean(axis=0)
    moved = onto_lsrk_grid(ctx, 0, 0, vis)
    after = np.where(vis.flag[..., 0], np.nan, vis.data[..., 0].real)
    assert moved > 4                                          # channels: the drift is real
    assert before.max() < 0.6                                 # smeared over the channels it crossed
    assert int(np.nanargmax(np.nanmean(after, axis=0))) == j0
    assert np.nanmin(after[:, j0]) > 0.95                     # every row, at its peak (interpolation: < 3 %)
    assert not vis.flag[:, 10:-10].any()                      # only edge channels can fall off the band


def test_descending_channels_grid_as_their_ascending_twins():
    """A lower-sideband spw stores its channels descending in frequency (about half of
    ALMA's): the dirty image, PSF and predicted visibilities are those of the same
    channels in ascending order, channel for channel, and a cube's planes keep the
    data's order (the line in the plane of its channel)."""
    vis = simulate(nant=8, ntime=10, nchan=6, noise=0.001, flux=1.0, offsets=[(0.5, 60 * ARCSEC, 0.0)],
                   freq0=230e9, dfreq=50e6, baseline_m=200.0)
    cell, npix = 0.3 * ARCSEC, 64
    w = np.ones(vis.data.shape[:2], np.float32)
    d = vis.data[:, :, 0]
    up = gridding.dirty(vis.uvw, vis.freq, d, w, npix, cell)
    down = gridding.dirty(vis.uvw, vis.freq[::-1], d[:, ::-1], w, npix, cell)
    np.testing.assert_allclose(down, up, atol=1e-5)
    shuffled = np.array([2, 0, 5, 1, 4, 3])
    np.testing.assert_allclose(gridding.dirty(vis.uvw, vis.freq[shuffled], d[:, shuffled], w, npix, cell), up,
                               atol=1e-5)
    model = np.zeros((npix, npix))
    model[40, 20] = 1.0
    fwd = gridding.predict(vis.uvw, vis.freq, model, cell)
    np.testing.assert_allclose(gridding.predict(vis.uvw, vis.freq[::-1], model, cell), fwd[:, ::-1], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(gridding.predict(vis.uvw, vis.freq[shuffled], model, cell), fwd[:, shuffled],
                               rtol=1e-5, atol=1e-6)
    # a cube of the reversed spw: plane k is channel k, with a line in one channel
    rev = simulate(nant=8, ntime=10, nchan=6, noise=0.001, flux=[0, 0, 0, 0, 2.0, 0],
                   freq0=230e9, dfreq=50e6, baseline_m=200.0)
    rev.freq = rev.freq[::-1].copy()
    res = make_image(rev, ImageSpec(field="sim", specmode="cube", npix=npix, cell_arcsec=0.3, niter=50),
                     dish_m=12.0, telescope="ALMA")
    assert int(np.argmax(res.image.max(axis=(1, 2)))) == 4 and np.all(np.diff(res.freqs) < 0)


@pytest.mark.parametrize("shape", [(128, 128), (96, 160)])
def test_restoring_and_scale_convolutions_are_scipys_linear_convolution(shape):
    """deconvolve.convolve (ducc0's FFT, imaging/fourier.py, so that the imager imports no
    scipy) equals scipy.signal.fftconvolve: the restoring beam's 'same' window, and a
    kernel of the image's size centred at its middle (multiscale's scales)."""
    from scipy.signal import fftconvolve
    rng = np.random.default_rng(5)
    image = rng.normal(size=shape)
    beam = deconvolve.gaussian_kernel(21, 1 * ARCSEC, (4.0, 3.0, 30.0))
    np.testing.assert_allclose(deconvolve.convolve(image, beam, (10, 10)), fftconvolve(image, beam, mode="same"),
                               atol=1e-12)
    kernel = deconvolve.scale_kernel(shape[0], 9.0)
    full = fftconvolve(image, kernel, mode="full")
    c = shape[0] // 2
    np.testing.assert_allclose(deconvolve.convolve(image, kernel, (c, c)), full[c:c + shape[0], c:c + shape[1]],
                               atol=1e-12)


def test_automask_morphology_is_scipy_ndimages():
    """The automask's region sizes and growth (imaging/mask_kernels.py, breadth-first
    walks) give what scipy.ndimage's label + sum and binary_dilation(iterations, mask)
    give, pixel for pixel: smooth random masks of odd shapes, seeds inside and outside
    the pixels allowed, 0 (until nothing changes), 1, 3 and 75 steps."""
    from scipy import ndimage
    from almapipe.imaging.mask_kernels import grow_within, region_sizes
    rng = np.random.default_rng(11)
    for _ in range(12):
        shape = tuple(rng.integers(5, 160, 2))
        field = ndimage.gaussian_filter(rng.normal(size=shape), rng.uniform(0.5, 4.0))
        mask = field > np.quantile(field, rng.uniform(0.3, 0.95))
        labels, n = ndimage.label(mask)
        sizes = np.zeros(n + 1)
        sizes[1:] = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        assert np.array_equal(region_sizes(mask), sizes[labels])
        allowed = field > np.quantile(field, 0.2)
        seed = mask & (rng.random(shape) < 0.02)
        for steps in (0, 1, 3, 75):
            assert np.array_equal(grow_within(seed, allowed | seed, steps),
                                  ndimage.binary_dilation(seed, iterations=steps, mask=allowed | seed))
        assert np.array_equal(grow_within(mask, allowed, 5), ndimage.binary_dilation(mask, iterations=5, mask=allowed))
    with pytest.raises(ValueError, match="differ in shape"):      # numba does not check bounds
        grow_within(mask, allowed[:-1], 1)


def test_beam_fit_reaches_least_squares_minimum():
    """fit_beam's Levenberg-Marquardt (deconvolve.fit_exp_quadratic, numpy: the imager
    imports no scipy) ends where scipy.optimize.least_squares ends, on main lobes of 2 to
    90 pixels across with sidelobes and float32 rounding: a cost no larger, the form's
    coefficients within 1e-5 of its."""
    from scipy.optimize import least_squares
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:256, :256] - 128
    for _ in range(12):
        smaj = rng.uniform(1.0, 40.0)
        smin, th = smaj * rng.uniform(0.3, 1.0), rng.uniform(0, np.pi)
        a_ax, b_ax = -xx * np.sin(th) + yy * np.cos(th), -xx * np.cos(th) - yy * np.sin(th)
        psf = np.exp(-0.5 * ((a_ax / smaj) ** 2 + (b_ax / smin) ** 2)) \
            + 0.05 * np.cos(xx / 3.0) * np.exp(-(xx ** 2 + yy ** 2) / (4 * smaj) ** 2)
        dy, dx, val = deconvolve.main_lobe((psf / psf.max()).astype(np.float32))
        x, y, val = dx.astype(float), dy.astype(float), val.astype(float)
        a0 = -np.log(deconvolve.PSF_CUTOFF) / max(float(np.mean(np.hypot(x, y))) * 1.5, 1.0) ** 2

        def resid(p):
            return np.exp(-(p[0] * x ** 2 + 2 * p[1] * x * y + p[2] * y ** 2)) - val
        ref = least_squares(resid, x0=[a0, 0.0, a0], x_scale=[a0, a0, a0]).x
        got = deconvolve.fit_exp_quadratic(x, y, val, [a0, 0.0, a0])
        assert resid(got) @ resid(got) <= resid(ref) @ resid(ref) * (1 + 1e-6)
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    val[len(val) // 2] = np.nan                     # named, as least_squares named it
    with pytest.raises(ValueError, match="not all finite"):
        deconvolve.fit_exp_quadratic(x, y, val, [a0, 0.0, a0])


_NO_SCIPY_CHILD = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import simulate
from almapipe.imaging.imager import ImageSpec, clean_taylor, make_image, restore_taylor_planes
vis = simulate(nant=8, ntime=10, nchan=4, offsets=[(0.5, 2e-4, 1e-4)])
for spec in (ImageSpec(field="sim", npix=64, cell_arcsec=4.0, niter=100, automask=True),
             ImageSpec(field="sim", npix=64, cell_arcsec=4.0, niter=100, scales=[0, 3])):
    make_image(vis, spec, dish_m=25.0, telescope="VLA")
spec = ImageSpec(field="sim", npix=64, cell_arcsec=4.0, niter=100, nterms=2)
restore_taylor_planes(clean_taylor(vis, spec), spec, 25.0, "VLA")
print(" ".join(sorted(m for m in sys.modules if m.split(".")[:2] in
      (["scipy", "optimize"], ["scipy", "ndimage"], ["scipy", "fft"], ["scipy", "signal"], ["scipy", "interpolate"]))))
"""


def test_making_an_image_imports_no_scipy():
    """An mfs image with automasking, a multiscale one and a multi-term one, in a fresh
    process, load none of scipy's optimize, ndimage, fft, signal or interpolate: each
    costs an imager process 17-47 MiB of resident memory before it holds an image
    (decision 25; numba itself loads scipy.linalg's BLAS)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _NO_SCIPY_CHILD, os.path.dirname(__file__)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == ""


def _reference_hogbom(residual, psf, gain, threshold, niter, mask):
    """Hogbom CLEAN as the textbook states it (and as almapipe did before its compiled
    minor cycle): the peak of |residual| x mask over the whole image, the whole PSF
    subtracted there, until niter or the peak is below threshold."""
    residual, model = residual.copy(), np.zeros(residual.shape)
    n = residual.shape[0]
    py, px = np.unravel_index(np.argmax(psf), psf.shape)
    for i in range(niter):
        y, x = np.unravel_index(np.argmax(np.abs(residual) * mask), residual.shape)
        if abs(residual[y, x]) * mask[y, x] < threshold:
            return i, model, residual
        comp = gain * residual[y, x]
        model[y, x] += comp
        residual -= comp * psf[py - y:py - y + n, px - x:px - x + n]
    return niter, model, residual


def _plane(extended: bool):
    """A 128-pixel plane with three point sources (or a 3-beam Gaussian): its
    measurement, dirty image and PSF of twice its size, gridded on one thread.

    One thread, because ducc0's threads add into the grid in the order they run:
    with two, the dirty image differs from run to run by ~3e-7 of its peak, enough
    to move a pixel across the tests' threshold (one component more or less)."""
    from almapipe.imaging.imager import stokes_i
    from almapipe.imaging.measurement import OnePointing
    vis = simulate(nant=12, ntime=40, nchan=2, noise=0.02, flux=0.0 if extended else 1.0,
                   offsets=[] if extended else [(0.5, 160 * ARCSEC, 80 * ARCSEC), (-0.3, -200 * ARCSEC, 40 * ARCSEC)],
                   baseline_m=500.0)
    if extended:
        uv = np.hypot(vis.uvw[:, 0:1], vis.uvw[:, 1:2]) * vis.freq[None, :] / 299792458.0
        vis.data += (2.0 * np.exp(-(np.pi * 150 * ARCSEC * uv) ** 2 / (4 * np.log(2))))[:, :, None].astype(
            np.complex64)
    si = stokes_i(vis, np.arange(2))
    w = gridding.briggs_weights(si.uvw, vis.freq, si.weight, 128, 8 * ARCSEC, 0.5).astype(np.float32)
    op = OnePointing(si.uvw, vis.freq, si.data, w, 128, 8 * ARCSEC)
    with mock.patch.dict(os.environ, {"ALMAPIPE_THREADS": "1"}):
        return op.dirty(), op.psf(256)


@pytest.mark.parametrize("extended", [False, True])
def test_compiled_hogbom_finds_the_components_of_a_whole_image_search(extended):
    """The sub-minor loop over candidate pixels (and the FFT update of the rest of
    the image, which the extended source's many components take) gives the
    components of the whole-image search: the same model and residual to float
    precision, with and without a mask or fractional weights, down to a threshold that
    leaves much of the image above it."""
    dirty, psf = _plane(extended)
    rng = np.random.default_rng(3)
    # no mask, a 0/1 mask, and fractional search weights (as a mosaic's would be)
    for mask in (None, (rng.random(dirty.shape) > 0.2).astype(float), 0.5 + 0.5 * rng.random(dirty.shape)):
        m = np.ones(dirty.shape) if mask is None else mask
        thr = 3e-4 * np.abs(dirty).max()
        n_ref, model_ref, res_ref = _reference_hogbom(dirty, psf, 0.1, thr, 1500, m)
        model, res = np.zeros(dirty.shape), dirty.copy()
        n = deconvolve.hogbom(res, psf, model, 0.1, thr, 1500, mask)
        assert n == n_ref and n > 200
        scale = np.abs(dirty).max()
        assert np.abs(model - model_ref).max() < 1e-5 * scale
        assert np.abs(res - res_ref).max() < 1e-5 * scale


def test_compiled_multiscale_finds_the_components_of_a_whole_image_search():
    """Multiscale over candidates against the whole-image search (the minor cycle of
    the previous implementation, restated here): the same components, the same model
    to float precision, after 100 and 400 components (with the list at exactly the
    threshold the 109th was a pixel outside it that had risen to be the peak)."""
    from almapipe.imaging.deconvolve import ScaleSet, _convolve_centred
    dirty, psf = _plane(True)
    ss = ScaleSet.make(psf, 128, [0, 6, 18])
    factor = ss.bias / np.sqrt(ss.peak)
    thr, c = 0.05 * np.abs(dirty).max(), 128
    for niter in (100, 400):
        res_s = [_convolve_centred(dirty, k) for k in ss.kernels]
        model_ref = np.zeros((384, 384))               # the image in the middle: kernels cut at its edges
        n_ref = 0
        for _ in range(niter):
            best = [np.unravel_index(np.argmax(np.abs(r)), r.shape) for r in res_s]
            vals = np.array([abs(r[b]) for r, b in zip(res_s, best)])
            if vals.max() < thr:
                break
            i = int(np.argmax(vals * factor))
            (y, x), amp = best[i], 0.1 * res_s[i][best[i]] / ss.peak[i]
            model_ref[128 + y - 64:128 + y + 64, 128 + x - 64:128 + x + 64] += amp * ss.kernels[i]
            for j in range(len(res_s)):
                res_s[j] -= amp * ss.psf_st[i][j][c - y:c - y + 128, c - x:c - x + 128]
            n_ref += 1
        model_ref = model_ref[128:256, 128:256]
        model = np.zeros(dirty.shape)
        n = deconvolve.multiscale(dirty.copy(), psf, model, 0.1, thr, niter, ss)
        assert n == n_ref == niter
        assert np.abs(model - model_ref).max() < 1e-5 * np.abs(model_ref).max()


_MFS_CHILD = """
import json, sys
import numpy as np
from almapipe.config import Config
from almapipe.imaging.imager import ImageSpec, restore_planes
from almapipe.imaging.samples import clean_mfs, read_binned_stokes_i
from almapipe.msio.ms import subtable
from almapipe.platform.visstore import VisPartition, VisStore
entry, shell = json.loads(sys.argv[1]), sys.argv[2]
part = VisPartition(VisStore(Config.from_env(), cache_dir=None, cache_limit=0), entry, "99_test",
                    lambda key: shell, "runs/test-samples/vis/" + entry["name"])
with subtable(shell, "FIELD") as t:
    target = list(t.getcol("NAME")).index("Target")
spec = ImageSpec(field="Target", npix=256, cell_arcsec=0.2, niter=200, nsigma=0.0)
samples = read_binned_stokes_i(part, [target], np.arange(entry["nchan"]), 1 / spec.npix)
res = restore_planes(clean_mfs(samples, spec), spec, 12.0, "ALMA")
print(len(samples.freq), samples.data.shape[0], float(res.image.max()))
"""


_LAUNCHER = """
import resource, subprocess, sys
child = subprocess.run([sys.argv[1], "-c", *sys.argv[2:]], capture_output=True, text=True)
sys.stderr.write(child.stderr)
print(child.stdout.strip(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(child.returncode)
"""


def test_mfs_image_peak_memory_does_not_grow_with_the_number_of_channels(stack, tmp_path):
    """An mfs image of the same observation recorded in 64 and in 512 channels (24000
    target rows: its DATA grows by 190 MB), each in its own process, read from the
    visibility store: the samples are read one row block (one ~8 MiB chunk) at a time
    and averaged over channel bins as they are read (samples.read_binned_stokes_i), so
    the process's peak RSS (its ru_maxrss) grows by less than 96 MiB, about half the
    data's growth.
    Measured: 246-251 and 285-311 MiB (304-307 and 311-314 while the imager imported
    scipy, decision 25; from the MS, before the store: 269 and 268 MiB); reading the
    whole spw and imaging it channel by channel (read_vis + make_image) took 347 and
    959 MiB. What grows is the read's block, held once and once more read ahead: the
    64-channel spw is one 25 MiB block, the 512-channel one is read in blocks of two
    256-channel chunks (19 MiB with their flags and weights); with the lower floor that
    shows (a run under load measured 64 MiB more), so the bound is about half the data's
    growth, a seventh of what reading the spw whole adds."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from almapipe.simulate.simulator import SimConfig, Simulator
    from conftest import store_partition
    _, cfg = stack
    rss, out = {}, {}
    for nchan in (64, 512):
        sim_cfg = SimConfig.preset("small", nant=16, nspw=1, nchan=nchan, target_scans=2, target_scan_s=600.0,
                                   dead_antenna=False, bad_channels=0)
        sim = Simulator(sim_cfg)
        ms = sim.write(str(tmp_path / f"eb{nchan}"))["ms"]
        entry, shell = store_partition(cfg, ms, sim.science_spw_ids[0], "test-samples", str(tmp_path),
                                       name=f"eb{nchan}")
        shutil.rmtree(tmp_path / f"eb{nchan}")
        # a small launcher runs the image in its own child and reports that child's peak
        # RSS: a child forked straight from this (large) process would count this
        # process's pages, which it holds until it execs, in its ru_maxrss
        # two malloc arenas: zarr decodes chunks in a pool of threads, and glibc's arena per
        # thread keeps the freed chunk buffers of each, which makes the peak RSS vary by
        # +-50 MiB from run to run with the number of chunks decoded, not with what is held
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, _MFS_CHILD, json.dumps(entry),
                               shell], capture_output=True, text=True, env=dict(os.environ, MALLOC_ARENA_MAX="2"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        *out[nchan], peak_kib = proc.stdout.split()
        rss[nchan] = float(peak_kib) / 1024.0
    print("peak RSS (MiB) by number of channels:", rss)
    assert out[64][1] == out[512][1] == "24000"        # the same rows, binned alike
    assert abs(float(out[512][2]) / float(out[64][2]) - 1) < 0.05
    assert rss[512] - rss[64] < 96, rss


def test_aggregate_continuum_streamed_holds_no_channel_axis_and_equals_the_whole_spw_one(stack, tmp_path,
                                                                                          monkeypatch):
    """The aggregate continuum of one pointing read in row blocks and binned as read
    (samples.read_aggregate_samples) gives the samples that the whole spws in memory give
    (imager.aggregate_samples, then stokes_i), each at its own frequency (rows x the bins
    of every spw where the spws share their rows, else a sample per row and bin); and the memory
    it allocates (tracemalloc's peak, after a first read that loads what is loaded once) is
    its samples and a few row blocks: recorded in 4x the channels (the bins 4x as wide, so
    the same samples; one channel chunk, so blocks of the same bytes), its peak grows by
    less than a quarter of what one spw's DATA grows by (reading the spws whole, it grows
    by twice that). Measured: 25.5 and 25.2 MiB for 64 and 256 channels (one spw's
    target DATA 13 and 53 MiB)."""
    import shutil
    import tracemalloc
    from almapipe.imaging.imager import aggregate_samples, stokes_i
    from almapipe.imaging import samples as samples_mod
    from almapipe.imaging.samples import read_aggregate_samples
    from almapipe.simulate.simulator import SimConfig, Simulator
    from conftest import open_partition, store_partition
    _, cfg = stack
    peak, nsamples, data_bytes = {}, {}, {}
    for nchan in (64, 256):
        sim = Simulator(SimConfig.preset("small", nant=16, nspw=2, nchan=nchan, target_scans=1,
                                         target_scan_s=600.0, dead_antenna=False, bad_channels=0))
        ms = sim.write(str(tmp_path / f"eb{nchan}"))["ms"]
        parts = [open_partition(cfg, store_partition(cfg, ms, spw, "test-aggregate", str(tmp_path),
                                                     name=f"eb{nchan}")[0], str(tmp_path))
                 for spw in sim.science_spw_ids]
        shutil.rmtree(tmp_path / f"eb{nchan}")
        from almapipe.msio.ms import subtable
        with subtable(parts[0].meta, "FIELD") as t:
            target = list(t.getcol("NAME")).index("Target")
        width = nchan // 16
        masks = []
        for k in range(len(parts)):           # continuum channels: all but a "line" and the edges
            m = np.zeros(nchan, bool)
            m[nchan // 16:-nchan // 16] = True
            m[nchan // 2 - nchan // 8 * k:nchan // 2 + nchan // 16] = False
            masks.append(m)
        spws = [([(p, [target])], m) for p, m in zip(parts, masks)]
        read_aggregate_samples(spws, width)
        tracemalloc.start()
        s = read_aggregate_samples(spws, width)
        peak[nchan] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        nrow = len(parts[0].select([target]))
        data_bytes[nchan] = nrow * nchan * parts[0].ncorr * 8 / 2**20
        if nchan == 64:
            vis, row_freq = aggregate_samples([(p.read(field_ids=[target]), m) for p, m in zip(parts, masks)], width)
            si = stokes_i(vis, np.array([0]))
            # the spws share their rows: rows x the bins of both spws, uvw once
            assert s.sample_freq is None and s.data.shape[1] == 13 + 11
            assert np.all(np.diff(s.freq) > 0)
            for b, f in enumerate(s.freq):
                mine = s.weight[:, b] > 0
                theirs = np.flatnonzero(np.isclose(row_freq[si.rows], f, rtol=0, atol=1.0))
                assert mine.sum() == len(theirs) > 0
                np.testing.assert_allclose(s.uvw[mine] * f, si.uvw[theirs] * vis.freq[0], rtol=1e-9, atol=1e-3)
                np.testing.assert_allclose(s.data[mine, b], si.data[theirs, 0], rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(s.weight[mine, b], si.weight[theirs, 0], rtol=1e-5)
            # binned beside each spw's own pass (its continuum image's: other bins), the same
            # samples, and the aggregate reads nothing more
            fed = []
            for parts_k, m in spws:
                feed = samples_mod.WidthBinned(parts_k, m, width)
                samples_mod.read_binned_stokes_i(parts_k, None, m, 1 / 256, on_block=feed.add)
                fed.append(feed)
            blocks = []
            again = read_aggregate_samples(spws, width, on_block=blocks.append, binned=fed)
            assert not blocks and np.array_equal(again.freq, s.freq)
            for a, b in ((again.uvw, s.uvw), (again.data, s.data), (again.weight, s.weight)):
                np.testing.assert_array_equal(a, b)
            # spws of rows of their own: one sample per (row, bin), at one frequency
            monkeypatch.setattr(samples_mod, "_same_rows", lambda parts: False)
            flat = read_aggregate_samples(spws, width)
            monkeypatch.undo()
            assert len(flat.uvw) == len(si.uvw)
            np.testing.assert_allclose(flat.sample_freq, row_freq[si.rows])
            # the reference frequencies differ (aggregate_samples weighs autocorrelations and
            # cross hands in): compare uvw f / c, what the gridder uses
            np.testing.assert_allclose(flat.uvw * flat.freq[0], si.uvw * vis.freq[0], rtol=1e-9, atol=1e-3)
            np.testing.assert_allclose(flat.data[:, 0], si.data[:, 0], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(flat.weight[:, 0], si.weight[:, 0], rtol=1e-5)
        nsamples[nchan] = int((s.weight > 0).sum())
    print("aggregate: traced peak (MiB)", peak, "one spw's DATA (MiB)", data_bytes, "samples", nsamples)
    assert nsamples[64] == nsamples[256]
    assert peak[256] - peak[64] < 0.25 * (data_bytes[256] - data_bytes[64]), (peak, data_bytes)


def test_a_poor_psf_still_cleans_several_components_a_cycle_and_reaches_its_threshold():
    """A snapshot of 7 antennas has a PSF whose largest sidelobe is above 0.53, so
    cyclefactor 1.5 x sidelobe is above tclean's cap: each major cycle cleans down to
    0.8 of its peak (deconvolve.MAX_PSF_FRACTION), several components, not one. The
    point source is then cleaned to the noise threshold within the major cycles,
    with its flux in the model; at 0.95 a cycle took one component, and 20 cycles
    left most of the source in the residual."""
    from almapipe.imaging.imager import stokes_i
    from almapipe.imaging.measurement import OnePointing
    vis = simulate(nant=7, ntime=1, nchan=2, noise=0.1, flux=1.0, baseline_m=200.0)
    si = stokes_i(vis, np.arange(2))
    w = gridding.briggs_weights(si.uvw, vis.freq, si.weight, 128, 8 * ARCSEC, 0.5).astype(np.float32)
    op = OnePointing(si.uvw, vis.freq, si.data, w, 128, 8 * ARCSEC)
    psf = op.psf(128)
    sidelobe = deconvolve._max_sidelobe(psf)
    assert sidelobe > deconvolve.MAX_PSF_FRACTION / 1.5
    # the bounds: tclean's minpsffraction and maxpsffraction, and the clean's threshold below
    assert deconvolve.cycle_threshold(0.0, 1.0, sidelobe, 1.5) == deconvolve.MAX_PSF_FRACTION == 0.8
    assert deconvolve.cycle_threshold(0.0, 1.0, 0.01, 1.5) == deconvolve.MIN_PSF_FRACTION == 0.05
    assert deconvolve.cycle_threshold(0.3, 1.0, 0.1, 1.5) == 0.3
    res = deconvolve.clean(op, niter=1000, threshold=0.0, nsigma=3.0)
    assert res.stop_reason == "threshold reached" and res.major_cycles < 20, (res.stop_reason, res.major_cycles)
    assert res.iterations > 2 * res.major_cycles
    assert abs(res.model.sum() - 1.0) < 0.05, res.model.sum()


def test_w_term_below_its_tolerance_costs_a_corner_source_under_half_the_tolerance_squared():
    """gridding.needs_wgridding leaves the w-term uncorrected up to WTERM_TOLERANCE_RAD
    of phase at the grid's corner (for the largest |w|). A point source in the
    corner pixel, gridded without the correction, loses at most the mean of phi^2 / 2
    over its samples, so less than tol^2 / 2 = 0.5 % of its peak (1.1e-3 here, where
    |w| spreads from 0 to its largest); the decision is taken on the largest grid
    imaged, the minor cycle's PSF (twice the image up to 512 pixels)."""
    from almapipe.imaging.deconvolve import minor_cycle_psf_size
    from almapipe.imaging.measurement import OnePointing
    vis = simulate(nant=10, ntime=30, nchan=1, noise=0.0, flux=0.0, baseline_m=3000.0, freq0=230e9)
    uvw, freq = vis.uvw.astype(float), vis.freq
    uvw[:, 2] = uvw[:, 2] * 20 + 500.0        # w as on a long baseline at low elevation
    npix = 256
    w_max = np.abs(uvw[:, 2]).max() * freq.max() / 299792458.0
    # the cell that puts the tolerance's phase at the corner of the image itself
    cell = np.sqrt(gridding.WTERM_TOLERANCE_RAD / (np.pi * w_max * 2)) / (npix / 2)
    assert not gridding.needs_wgridding(uvw, freq, npix, 0.99 * cell)
    assert gridding.needs_wgridding(uvw, freq, npix, 1.01 * cell)
    # an image's decision is its PSF's, a grid of 512 at 256 pixels: at 0.6 of that
    # cell the image's corner is below the tolerance (0.36 of it), its PSF's above (1.44)
    wgt = np.ones((len(uvw), 1), np.float32)
    assert not gridding.needs_wgridding(uvw, freq, npix, 0.6 * cell)
    assert OnePointing(uvw, freq, np.zeros((len(uvw), 1), np.complex64), wgt, npix, 0.6 * cell).wgridding
    assert minor_cycle_psf_size(npix) == 2 * npix
    model = np.zeros((npix, npix))
    model[1, 1] = 1.0
    vis_model = gridding.predict(uvw, freq, model, cell, True)
    peaks = [gridding.dirty(uvw, freq, vis_model, wgt, npix, cell, wg)[1, 1] for wg in (True, False)]
    assert peaks[0] == pytest.approx(1.0, abs=1e-4)
    assert 0 < 1 - peaks[1] / peaks[0] < gridding.WTERM_TOLERANCE_RAD ** 2 / 2, peaks


def _earth_rotating(nant=12, ntime=120, dt=6.0, nchan=4, freq0=230e9, baseline_m=150.0, source=(1.0, 0.0, 0.0),
                    noise=0.05, gap_after=60, seed=3, flag_blocks=0):
    """A Vis of one point source whose uv points turn at the Earth's rate (the test
    simulator's turn 3x faster), in two scans with a gap between them; flag_blocks: the
    first channel flagged in every other block of that many integrations."""
    from almapipe.imaging.imager import EARTH_ROTATION
    from almapipe.msio.ms import Vis
    rng = np.random.default_rng(seed)
    a1, a2 = np.triu_indices(nant, 1)
    pos = rng.uniform(-baseline_m, baseline_m, (nant, 3))
    pos[:, 2] *= 0.05
    steps = np.arange(ntime) * dt + np.where(np.arange(ntime) >= gap_after, 300.0, 0.0)
    t = np.repeat(steps, len(a1))
    ant1, ant2 = np.tile(a1, ntime), np.tile(a2, ntime)
    ang = EARTH_ROTATION * t
    c, s = np.cos(ang), np.sin(ang)
    d = pos[ant2] - pos[ant1]
    uvw = np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1], d[:, 2]], axis=1)
    freq = freq0 + np.arange(nchan) * 1e6
    flux, l, m = source
    ph = np.exp(2j * np.pi * (uvw[:, 0:1] * l + uvw[:, 1:2] * m) * freq[None, :] / 299792458.0)
    v = np.repeat((flux * ph)[:, :, None], 2, axis=2)
    v = v + noise * (rng.normal(size=v.shape) + 1j * rng.normal(size=v.shape)) / np.sqrt(2)
    flag = np.zeros(v.shape, bool)
    if flag_blocks:
        flag[(np.repeat(np.arange(ntime), len(a1)) // flag_blocks) % 2 == 0, 0] = True
    return Vis(time=t + 5e9, interval=np.full(len(t), dt), ant1=ant1, ant2=ant2, field_id=np.zeros(len(t), int),
               scan=np.where(np.repeat(np.arange(ntime), len(a1)) >= gap_after, 2, 1), uvw=uvw,
               data=v.astype(np.complex64), flag=flag,
               weight=np.full((len(t), 2), 1.0, np.float32), freq=freq, corr_types=["XX", "YY"],
               rows=np.arange(len(t)))


@pytest.mark.parametrize("flag_blocks", [0, 5])
def test_a_cube_averaged_in_time_per_baseline_keeps_its_source_at_the_corner(flag_blocks):
    """A cube's samples averaged in time per baseline (baseline-dependent averaging):
    far fewer samples, each baseline's and scan's weight kept (no run across a scan's
    end or two baselines), runs never mixing integrations with different flagged
    channels, and a source near the image's corner (where smearing is largest) keeping
    its flux to within the 0.5 % the averaging allows, with the first channel flagged
    in blocks of integrations or not."""
    from almapipe.imaging.imager import AVERAGING_PHASE, averaged_in_time, stokes_i
    npix, cell_arcsec = 64, 0.4
    cell = np.radians(cell_arcsec / 3600)
    corner = 26 * cell                               # l and m: 0.81 of the half-diagonal out, on a pixel
    vis = _earth_rotating(source=(1.0, corner, corner), flag_blocks=flag_blocks)
    chans = np.arange(len(vis.freq))
    si = stokes_i(vis, chans)
    avg = averaged_in_time(si, vis, float(vis.freq.max()), npix * cell / np.sqrt(2))
    assert len(avg.rows) < len(si.rows) / 3
    np.testing.assert_allclose(avg.weight.sum(axis=0), si.weight.sum(axis=0), rtol=1e-6)

    def per_baseline_and_scan(rows, w):
        key = np.stack([vis.ant1[rows], vis.ant2[rows], vis.scan[rows]], axis=1)
        u, inv = np.unique(key, axis=0, return_inverse=True)
        return u, np.bincount(inv.ravel(), weights=w)
    for a, b in zip(per_baseline_and_scan(si.rows, si.weight[:, 1]), per_baseline_and_scan(avg.rows, avg.weight[:, 1])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # a run's integrations all have the first channel flagged, or none has
    assert ((avg.weight[:, 0] == 0) | (avg.weight[:, 0] == avg.weight[:, 1])).all()
    length = np.hypot(avg.uvw[:, 0], avg.uvw[:, 1])
    runs = avg.weight[:, 1] / si.weight[0, 1]            # integrations a sample (each of weight 2)
    if not flag_blocks:
        assert runs.max() > 5
        assert runs[length < np.percentile(length, 20)].mean() > 2 * runs[length > np.percentile(length, 80)].mean()
    # the longest baseline's runs sweep at most AVERAGING_PHASE at the corner
    blen = np.sqrt((vis.uvw ** 2).sum(axis=1)).max() * vis.freq.max() / 299792458.0
    longest = runs[length > 0.98 * length.max()].max() * 6.0
    assert 2 * np.pi * 7.2921e-5 * blen * (npix * cell / np.sqrt(2)) * longest <= AVERAGING_PHASE * 1.01

    spec = ImageSpec(field="s", specmode="cube", npix=npix, cell_arcsec=cell_arcsec, niter=200, nsigma=2.0)
    each = make_image(vis, spec, 12.0, "ALMA")
    averaged = make_image(vis, dataclasses.replace(spec, time_average=True), 12.0, "ALMA")
    y, x = np.unravel_index(np.argmax(each.image[1]), each.image[1].shape)
    assert abs(x - npix // 2) > 20 and abs(y - npix // 2) > 20       # the source is near the corner
    for k in range(len(vis.freq)):
        peak_each, peak_avg = each.image[k][y, x], averaged.image[k][y, x]
        assert peak_avg == pytest.approx(peak_each, rel=0.005)
        assert peak_avg == pytest.approx(1.0, rel=0.005)
    np.testing.assert_allclose(averaged.beam[:2], each.beam[:2], rtol=0.02)
    assert abs((averaged.beam[2] - each.beam[2] + 90) % 180 - 90) < 2
