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
