"""Multi-term (Taylor) mfs imaging against injected spectral indices (imaging/mtmfs.py)."""
import numpy as np
import pytest

from almapipe.imaging import mtmfs
from almapipe.imaging.imager import ImageSpec, aggregate_samples, clean_taylor, make_image, restore_taylor_planes
from almapipe.imaging.products import pb_fwhm
from almapipe.msio.ms import Vis
from almapipe.simulate.alma_pads import ALMA_SITE
from almapipe.simulate.simulator import C, SimConfig, Simulator, antenna_uvw

ARCSEC = np.pi / 180 / 3600


def wideband_parts(sim: Simulator, noise_jy: float, ntime: int = 48, hours: float = 3.0, seed: int = 3) -> list:
    """[(Vis, all channels)] per science spw of the simulator's target as calibrated data
    would hold it: the simulator's own array and sky (sources with their spectral
    indices, seen through the primary beam at each channel's frequency) and thermal
    noise of noise_jy per visibility and correlation; no corruptions."""
    rng = np.random.default_rng(seed)
    fid = next(i for i, f in enumerate(sim.fields) if f[3] == "TARGET")
    ra, dec = np.radians(sim.fields[fid][1]), np.radians(sim.fields[fid][2])
    # local hour angles -hours/2 .. +hours/2 around transit (Greenwich HA = local HA - longitude)
    h = np.linspace(-hours / 2, hours / 2, ntime) * np.pi / 12
    per_ant = antenna_uvw(sim.xyz, ra + h + np.radians(ALMA_SITE[0]), ra, dec)     # (nt, nant, 3)
    a1, a2 = np.triu_indices(len(sim.xyz), 1)
    uvw = (per_ant[:, a1] - per_ant[:, a2]).reshape(-1, 3)
    ti = np.repeat(np.arange(ntime), len(a1))
    parts = []
    for s in range(sim.cfg.nspw):
        freq = sim.freqs[s]
        vis = np.zeros((len(uvw), len(freq)), complex)
        for flux, l, m in sim.sky(fid, freq):
            n1 = np.sqrt(1 - l * l - m * m) - 1
            vis += flux[None] * np.exp(2j * np.pi * (uvw[:, :1] * l + uvw[:, 1:2] * m + uvw[:, 2:] * n1)
                                       * freq[None] / C)
        shape = vis.shape + (2,)
        data = vis[:, :, None] + noise_jy * (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / np.sqrt(2)
        nrow = len(uvw)
        parts.append((Vis(time=ti * 60.0 + 5e9, interval=np.full(nrow, 60.0), ant1=np.tile(a1, ntime),
                          ant2=np.tile(a2, ntime), field_id=np.zeros(nrow, int), scan=np.ones(nrow, int), uvw=uvw,
                          data=data.astype(np.complex64), flag=np.zeros(data.shape, bool),
                          weight=np.full((nrow, 2), noise_jy ** -2, np.float32), freq=freq,
                          corr_types=["XX", "YY"], rows=np.arange(nrow), spw=sim.science_spw_ids[s]),
                      np.ones(len(freq), bool)))
    return parts


def apparent_spix(sim: Simulator, spix: float, east_arcsec: float, north_arcsec: float) -> float:
    """The spectral index an image without wide-band primary-beam correction shows (as
    tclean's mtmfs with the standard gridder): the Gaussian beam narrows as 1/nu, so
    at r from its centre it adds d ln PB / d ln nu = -8 ln2 r^2 / FWHM^2."""
    fwhm = pb_fwhm(sim.cfg.band_centre_hz, 12.0, "ALMA") / ARCSEC
    return spix - 8 * np.log(2) * (east_arcsec ** 2 + north_arcsec ** 2) / fwhm ** 2


@pytest.fixture(scope="module")
def wideband():
    sim = Simulator(SimConfig.preset("wideband", target_line_jy=0.0))
    vis, row_freq = aggregate_samples(wideband_parts(sim, noise_jy=0.5), width=8)
    return sim, vis, row_freq


def test_nterms_follows_the_fractional_bandwidth():
    assert mtmfs.nterms_for(229e9, 233e9) == 1              # 1.7 %: one term
    assert mtmfs.nterms_for(89.5e9, 105.5e9) == 2           # 16 %: two
    assert mtmfs.nterms_for(89.5e9, 105.5e9, nterms=1) == 1  # a parameter wins


def test_alpha_of_injected_spectral_indices(wideband):
    """tt0 recovers each source's flux at the reference frequency, alpha its (apparent)
    spectral index within 0.1 at SNR > 100, and alpha.error is the size of the errors.

    Over this band (x = (nu - nu0) / nu0 within +-8 %, rms 6 %) the error of alpha is
    about 1 / (SNR x rms x) = 16 / SNR: the sources here are at SNR ~1500 and ~600
    (measured alpha errors 0.01 and 0.02); at SNR 100 it would be ~0.16."""
    sim, vis, row_freq = wideband
    assert mtmfs.fractional_bandwidth(row_freq.min(), row_freq.max()) > 0.1
    spec = ImageSpec(field="Target", npix=128, cell_arcsec=0.6, robust=0.5, niter=1000, nsigma=3.0, nterms=2)
    tp = clean_taylor(vis, spec, row_freq)
    assert abs(tp.nu0 / 97.5e9 - 1) < 0.01
    res, ti = restore_taylor_planes(tp, spec, 12.0, "ALMA")
    c = spec.npix // 2
    sources = [(sim.cfg.target_cont_jy, 0.0, 0.0, sim.cfg.target_spix)] + list(sim.cfg.target_spix_sources)
    for flux, east, north, spix in sources:
        y, x = c + int(round(north / spec.cell_arcsec)), c - int(round(east / spec.cell_arcsec))
        win = (slice(y - 2, y + 3), slice(x - 2, x + 3))
        k = np.unravel_index(np.argmax(ti.tt[0][win]), (5, 5))
        py, px = y - 2 + k[0], x - 2 + k[1]
        snr = ti.tt[0][py, px] / ti.rms[0]
        want = apparent_spix(sim, spix, east, north)
        pb_flux = flux * (tp.nu0 / sim.cfg.band_centre_hz) ** spix * res.pb[py, px]
        assert snr > 100, (snr, flux)
        assert abs(ti.tt[0][py, px] / pb_flux - 1) < 0.05, (ti.tt[0][py, px], pb_flux)
        assert abs(ti.alpha[py, px] - want) < 0.1, (ti.alpha[py, px], want, spix)
        assert ti.alpha_error[py, px] < 0.1
        assert abs(ti.alpha[py, px] - want) < 4 * ti.alpha_error[py, px] + 0.02, (ti.alpha[py, px], want,
                                                                                   ti.alpha_error[py, px])
    # alpha only where tt0 is bright: most of the image is masked
    assert np.isnan(ti.alpha).mean() > 0.9


def test_one_term_is_the_single_term_image(wideband):
    """With nterms = 1 the Taylor imager is the ordinary mfs imager (same data, weights, clean)."""
    _, vis, row_freq = wideband
    spec = ImageSpec(field="Target", npix=64, cell_arcsec=0.6, robust=0.5, niter=200, nsigma=3.0, nterms=1)
    res, _ = restore_taylor_planes(clean_taylor(vis, spec, row_freq), spec, 12.0, "ALMA")
    one = make_image(vis, spec, 12.0, "ALMA")
    assert abs(res.image[0].max() / one.image[0].max() - 1) < 0.01
    assert np.allclose(res.beam, one.beam, rtol=1e-3, atol=0.05)


def synthetic_taylor_psfs(n: int, nuv: int = 400, xs=(-0.08, -0.03, 0.03, 0.08), seed: int = 1) -> np.ndarray:
    """P_k (k = 0, 1, 2; (3, 2n, 2n), float32 as the gridder's, P_0's peak 1 at (n, n)):
    a random uv coverage's PSF at each fractional frequency x (uv scaled by 1 + x),
    weighted by x^k, computed directly (no gridder)."""
    rng = np.random.default_rng(seed)
    uv = rng.normal(size=(nuv, 2)) * 0.06
    g = np.arange(2 * n) - n
    out = np.zeros((3, 2 * n, 2 * n))
    for x in xs:
        py, px = 2 * np.pi * (1 + x) * np.outer(g, uv[:, 1]), 2 * np.pi * (1 + x) * np.outer(g, uv[:, 0])
        psf = (np.cos(py) @ np.cos(px).T - np.sin(py) @ np.sin(px).T) / nuv
        for k in range(3):
            out[k] += x ** k * psf
    return (out / out[0].max()).astype(np.float32)


def taylor_residuals(psfs: np.ndarray, sources, noise: float, seed: int = 2) -> np.ndarray:
    """R_0, R_1 (float32) of point sources (y, x, flux, alpha: Taylor coefficients flux,
    alpha x flux) seen through the Taylor PSFs, plus white noise of rms noise."""
    n = psfs.shape[1] // 2
    res = np.zeros((2, n, n))
    for y, x, flux, alpha in sources:
        for t in range(2):
            res[t] += sum(a * psfs[t + s, n - y:2 * n - y, n - x:2 * n - x] for s, a in enumerate((flux, alpha * flux)))
    return (res + noise * np.random.default_rng(seed).normal(size=res.shape)).astype(np.float32)


def both_minor_cycles(res, psfs, weight, threshold, niter):
    """(count, models, residuals) of the whole-image pass and of the sub-minor loop."""
    n = res.shape[1]
    hinv = np.linalg.inv(mtmfs.hessian(psfs, 2))
    out = []
    for minor in (mtmfs.mt_hogbom_whole_image, mtmfs.mt_hogbom):
        r, m = res.copy(), np.zeros((2, n, n))
        out.append((minor(r, psfs, hinv, n, n, weight, 0.1, threshold, niter, m), m, r))
    return out


def listed_fraction(res, psfs, weight, threshold) -> float:
    """The fraction of the image in the sub-minor loop's first list."""
    hinv = np.linalg.inv(mtmfs.hessian(psfs, 2))
    m = mtmfs.SPAN_MARGIN
    return float(mtmfs.mt_candidates(res, weight, hinv, m * threshold,
                                     m * m * np.linalg.eigvalsh(hinv).min() * threshold ** 2).mean())


def test_subminor_loop_finds_the_whole_image_components_of_separate_sources():
    """Bright, well separated sources of different spectral indices, part of the image
    masked, a threshold that keeps the list sparse: the sub-minor loop (list,
    components subtracted at the listed pixels only, the whole residuals brought up to
    date after each loop) finds the whole-image pass's components.

    The picks are the same (same count, same pixels): at a listed pixel every
    subtraction is the whole-image pass's, term for term, so the coefficients differ
    only where a later loop starts from residuals brought up to date by the convolver
    instead of one component at a time, by float32 rounding (~1e-7 of the peak;
    measured 0 for the models, 2e-7 for the residuals). The tolerances, 1e-5 of the
    peak, are a hundred times that, and a thousand times below one component of
    gain 0.1 at the threshold (a different pick would show)."""
    n = 96
    psfs = synthetic_taylor_psfs(n)
    sources = [(30, 40, 1.0, -0.8), (70, 60, 0.6, 2.0), (50, 80, 0.4, 0.0), (80, 20, 0.3, 1.0)]
    res = taylor_residuals(psfs, sources, noise=1e-3)
    weight = np.ones((n, n))
    weight[:, :8] = 0.0
    for threshold in (0.2, 0.1):
        assert listed_fraction(res, psfs, weight, threshold) < mtmfs.DENSE_FRACTION
        (n_ref, m_ref, r_ref), (n_new, m_new, r_new) = both_minor_cycles(res, psfs, weight, threshold, 1000)
        assert 0 < n_new == n_ref < 1000
        assert np.array_equal(m_new != 0, m_ref != 0)
        assert np.abs(m_new - m_ref).max() <= 1e-5 * np.abs(m_ref).max()
        assert np.abs(r_new - r_ref).max() <= 1e-5 * np.abs(res).max()
        assert np.abs(r_new[0] * weight).max() < threshold       # the same stopping rule


def test_subminor_loop_over_a_noise_like_residual_is_the_whole_image_search():
    """A noise-like residual puts most pixels in the list, which then becomes the
    whole image: the components are the whole-image pass's (the models to rounding,
    as above; measured equal), to niter (the returned count) and to the threshold.
    The residuals are brought up to date by one float32 FFT convolution of hundreds
    of components instead of one component at a time: measured 2e-6 and 4e-6 of the
    peak apart, allowed 3e-5 (a component of gain 0.1 at the threshold is 0.05 of it)."""
    n = 64
    psfs = synthetic_taylor_psfs(n)
    res = taylor_residuals(psfs, [], noise=1.0)
    weight = np.ones((n, n))
    for threshold, niter in ((0.5, 300), (2.5, 1000)):
        assert listed_fraction(res, psfs, weight, threshold) > mtmfs.DENSE_FRACTION
        (n_ref, m_ref, r_ref), (n_new, m_new, r_new) = both_minor_cycles(res, psfs, weight, threshold, niter)
        assert n_new == n_ref > 0
        assert np.array_equal(m_new != 0, m_ref != 0)
        assert np.abs(m_new - m_ref).max() <= 1e-5 * np.abs(m_ref).max()
        assert np.abs(r_new - r_ref).max() <= 3e-5 * np.abs(res).max()


def test_two_term_kernel_is_the_general_one():
    """mt2_subminor (two terms, the pipeline's case) and mt_subminor (any number of
    terms, the one-term image's) give the same components over the same list."""
    from almapipe.imaging import clean_kernels
    n = 64
    psfs = synthetic_taylor_psfs(n)
    res = taylor_residuals(psfs, [(20, 30, 5.0, -0.8), (40, 44, 3.0, 1.5)], noise=1.0)
    hinv = np.linalg.inv(mtmfs.hessian(psfs, 2))
    weight = np.ones((n, n))
    weight[:8] = 0.0
    listed = (np.abs(res[0]) > 1.0).astype(np.float32)
    run_y, run_x0, run_start, _, _ = clean_kernels.spans(listed, np.ones((n, n), np.float32), 0.5, 32)
    w = mtmfs.gather(weight[None], run_y, run_x0, run_start)[0]
    out = []
    for kernel in (mtmfs.mt_subminor, mtmfs.mt2_subminor):
        vals = mtmfs.gather(res, run_y, run_x0, run_start)
        comp_k, comp_amp = np.zeros(200, np.int64), np.zeros((200, 2))
        count = kernel(vals, w, run_y, run_x0, run_start, clean_kernels.chunks(run_start, 2), psfs, n, n, hinv,
                       0.1, 1.5, 200, comp_k, comp_amp)
        out.append((count, comp_k, comp_amp, vals))
    assert out[0][0] == out[1][0] > 0
    for a, b in zip(out[0][1:], out[1][1:]):
        assert np.array_equal(a, b)


def test_taylor_psf_convolver_direct_and_fft_agree():
    """The whole-image update: the PSFs shifted onto each component (few pixels) and
    the FFT convolution (many) subtract the same sum_s a_s P_{t+s}."""
    n = 64
    psfs = synthetic_taylor_psfs(n)
    rng = np.random.default_rng(4)
    ys, xs = rng.integers(0, n, 40), rng.integers(0, n, 40)
    amps = rng.normal(size=(40, 2))
    direct = np.zeros((2, n, n))
    mtmfs.subtract_taylor_psfs(direct, psfs, n, n, ys, xs, amps)
    fft = np.zeros((2, n, n))
    conv = mtmfs.TaylorPsfConvolver(psfs, (n, n))
    conv.subtract(fft, ys, xs, amps)        # 40 pixels: past the direct path's crossover here
    assert conv._ft is not None
    assert np.abs(fft - direct).max() < 1e-9 * np.abs(direct).max() + 1e-12


@pytest.mark.skipif(not __import__("os").environ.get("ALMAPIPE_CASA_PYTHON"),
                    reason="CASA is never a dependency: set ALMAPIPE_CASA_PYTHON to a Python with casatasks")
@pytest.mark.timeout(1800)          # tclean's mtmfs takes minutes, more on a loaded machine
def test_mtmfs_agrees_with_tclean(tmp_path):
    """The wideband EB's target, as calibrated data (Simulator.calibrate_target_ideally):
    tclean's mtmfs (nterms=2, Briggs 0.5, Hogbom, the same image grid, 5 sigma) and ours give the same tt0 peak (2 %), the
    same alpha at it (0.05) and beam (2 %, 2 degrees)."""
    import json
    import os
    import subprocess
    from almapipe.msio import ms as msio
    # 8 channels per spw and one target scan: tclean's mtmfs grids every channel
    sim = Simulator(SimConfig.preset("wideband", target_line_jy=0.0, target_scans=1, nchan=8))
    res = sim.write(str(tmp_path / "eb"))
    ms = res["ms"]
    sim.calibrate_target_ideally(ms, noise_jy=0.25)
    fid = next(i for i, f in enumerate(sim.fields) if f[3] == "TARGET")
    npix, cell = 128, 0.6
    spws = ",".join(map(str, sim.science_spw_ids))
    script = f"""
import json, numpy as np
from casatasks import tclean
from casatools import image
tclean(vis={ms!r}, imagename='mt', field='{fid}', spw='{spws}', specmode='mfs', deconvolver='mtmfs', nterms=2,
       imsize={npix}, cell='{cell}arcsec', weighting='briggs', robust=0.5, niter=1000, nsigma=5.0, gain=0.1,
       gridder='standard', pbcor=False, restoringbeam='')
out = {{}}
ia = image()
for name in ('mt.image.tt0', 'mt.image.tt1', 'mt.alpha', 'mt.alpha.error'):
    ia.open(name)
    out[name] = ia.getchunk()[:, :, 0, 0].T.tolist()       # (y, x)
    if name.endswith('tt0'):
        b = ia.restoringbeam()
        out['beam'] = [b['major']['value'], b['minor']['value'], b['positionangle']['value']]
    ia.close()
json.dump(out, open('casa.json', 'w'))
"""
    subprocess.run([os.environ["ALMAPIPE_CASA_PYTHON"], "-c", script], check=True, cwd=tmp_path,
                   capture_output=True, timeout=900)
    casa = json.load(open(tmp_path / "casa.json"))
    parts = []
    for sid in sim.science_spw_ids:
        v = msio.read_vis(ms, sid, field_ids=[fid])
        parts.append((v, np.ones(len(v.freq), bool)))
    vis, row_freq = aggregate_samples(parts, width=1)
    spec = ImageSpec(field="Target", npix=npix, cell_arcsec=cell, robust=0.5, niter=1000, nsigma=5.0, nterms=2)
    tp = clean_taylor(vis, spec, row_freq)
    _, ti = restore_taylor_planes(tp, spec, 12.0, "ALMA")
    tt0 = np.array(casa["mt.image.tt0"])
    y, x = np.unravel_index(np.argmax(tt0), tt0.shape)
    ours_y, ours_x = np.unravel_index(np.argmax(ti.tt[0]), ti.tt[0].shape)
    casa_alpha = np.array(casa["mt.alpha"])[y, x]
    casa_err = np.array(casa["mt.alpha.error"])[y, x]
    print(f"tt0 peak ours {ti.tt[0].max():.4f} casa {tt0.max():.4f}; alpha ours {ti.alpha[ours_y, ours_x]:.3f} "
          f"+- {ti.alpha_error[ours_y, ours_x]:.3f}, casa {casa_alpha:.3f} +- {casa_err:.3f}; "
          f"beam ours {tp.beam} casa {casa['beam']}")
    assert (ours_y, ours_x) == (y, x)
    assert abs(ti.tt[0].max() / tt0.max() - 1) < 0.02
    assert abs(ti.alpha[y, x] - casa_alpha) < 0.05
    assert abs(tp.beam[0] / casa["beam"][0] - 1) < 0.02 and abs(tp.beam[1] / casa["beam"][1] - 1) < 0.02
    assert abs((tp.beam[2] - casa["beam"][2] + 90) % 180 - 90) < 2.0
