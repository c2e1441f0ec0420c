"""Products as ALMA writes them: FITS headers with the keys CASA's exportfits writes
(checked with astropy against values computed independently from the observation),
a cube's common beam (the smallest ellipse enclosing every plane's beam), ALMA's
product names, the QA2 verdict, and a cube's reported peak (never from a flagged or
edge plane)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import EarthLocation
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from almapipe.imaging.imager import ImageResult, beam_matrix, beam_outline, enclosing_beam
from almapipe.imaging.products import image_header, obs_info, pipeline_version, write_fits
from almapipe.msio.ms import Vis
from almapipe.report.qa2 import qa2_section, qa2_verdict, requested_goals
from almapipe.stages.imaging import ImageJob, _stats, ous_name, product_name

# an ALMA-like observation summary (msio.listobs.summary's keys that headers use)
ALMA_SITE = EarthLocation.from_geodetic(-67.7548 * u.deg, -23.0236 * u.deg, 5050 * u.m)
OBS = {"telescope": "ALMA", "observer": "pi_name", "start": "2026-03-01T04:05:06.500",
       "direction_frame": "ICRS",
       "antennas": [{"position": [ALMA_SITE.x.value + dx, ALMA_SITE.y.value + dy, ALMA_SITE.z.value], "has_data": h}
                    for dx, dy, h in ((-100.0, 50.0, True), (100.0, -50.0, True), (5000.0, 5000.0, False))]}


def header(freqs, bandwidth=None, restfreq=None, obs=OBS, beam=(1.2, 0.8, 35.0), bunit="Jy/beam"):
    return image_header(np.radians(277.5), np.radians(-21.9), 64, np.radians(0.1 / 3600), np.asarray(freqs),
                        "LSRK", bunit, beam, "Target", obs["telescope"], restfreq=restfreq,
                        bandwidth_hz=bandwidth, obs=obs_info(obs, ("almapipe 0.1.0", "recipe alma_calimage version 1",
                                                                   "stage 21 makeimages")),
                        obs_radec=(np.radians(277.5), np.radians(-21.9)))


def test_header_has_every_key_exportfits_writes(tmp_path):
    h = header([230.0e9], bandwidth=1.875e9, restfreq=230.538e9)
    path = tmp_path / "x.fits"
    write_fits(str(path), np.zeros((1, 64, 64)), h)
    with fits.open(path) as f:
        hdr = f[0].header
    for key in ("DATE-OBS", "MJD-OBS", "TIMESYS", "OBSGEO-X", "OBSGEO-Y", "OBSGEO-Z", "OBSRA", "OBSDEC",
                "INSTRUME", "TELESCOP", "OBSERVER", "BTYPE", "BUNIT", "RESTFRQ", "SPECSYS", "RADESYS", "EQUINOX",
                "BMAJ", "BMIN", "BPA", "HISTORY"):
        assert key in hdr, key
    assert hdr["BTYPE"] == "Intensity" and hdr["BUNIT"] == "Jy/beam"
    assert hdr["INSTRUME"] == "ALMA" == hdr["TELESCOP"] and hdr["OBSERVER"] == "pi_name"
    # the observation's start, in UTC, as ISO and MJD that agree
    assert hdr["TIMESYS"] == "UTC"
    t = Time("2026-03-01T04:05:06.500", scale="utc")
    assert Time(hdr["DATE-OBS"], scale="utc") == t
    assert abs(hdr["MJD-OBS"] - t.mjd) < 1e-9
    # the array centre: the mean of the antennas with data (ITRF metres), on the ALMA site
    centre = np.mean([a["position"] for a in OBS["antennas"] if a["has_data"]], axis=0)
    assert np.allclose([hdr["OBSGEO-X"], hdr["OBSGEO-Y"], hdr["OBSGEO-Z"]], centre)
    loc = EarthLocation.from_geocentric(hdr["OBSGEO-X"], hdr["OBSGEO-Y"], hdr["OBSGEO-Z"], unit="m")
    assert abs(loc.lat.deg + 23.0236) < 1e-3 and abs(loc.lon.deg + 67.7548) < 1e-3
    assert hdr["OBSRA"] == pytest.approx(277.5) and hdr["OBSDEC"] == pytest.approx(-21.9)
    # ICRS data: RADESYS ICRS (exportfits writes FK5 only for J2000)
    assert hdr["RADESYS"] == "ICRS"
    # mfs: the centre and the width of the band, not 1 Hz
    assert hdr["CRVAL3"] == 230.0e9 and hdr["CDELT3"] == 1.875e9 and hdr["CUNIT3"] == "Hz"
    assert hdr["RESTFRQ"] == 230.538e9
    # the beam in degrees
    assert hdr["BMAJ"] * 3600 == pytest.approx(1.2) and hdr["BMIN"] * 3600 == pytest.approx(0.8)
    assert hdr["BPA"] == 35.0
    history = "\n".join(str(x) for x in hdr["HISTORY"])
    assert "almapipe" in history and "alma_calimage" in history and "makeimages" in history
    assert pipeline_version() in hdr["ORIGIN"]
    # astropy reads it: a celestial WCS in ICRS, a spectral axis with a rest frequency
    w = WCS(hdr)
    assert w.has_celestial and w.celestial.world_axis_physical_types[0] == "pos.eq.ra"
    assert w.wcs.radesys == "ICRS" and w.wcs.restfrq == 230.538e9
    assert w.wcs.dateobs.startswith("2026-03-01T04:05:06")


def test_fits_written_a_few_planes_at_a_time_are_the_bytes_astropy_writes(tmp_path, monkeypatch):
    """write_fits converts a few planes at a time to big-endian (a cube's join writes
    seven products of its size): the file is byte for byte astropy's writeto of the same
    planes and header, in memory or from a memmap, whatever the step, and its SHA-256 is
    taken as it is written."""
    from almapipe.imaging import products
    monkeypatch.setattr(products, "FITS_WRITE_BYTES", 3 * 61 * 63 * 4)       # 3 planes a step
    rng = np.random.default_rng(3)
    planes = rng.normal(size=(7, 61, 63)).astype(np.float32)
    mm = np.lib.format.open_memmap(str(tmp_path / "p.npy"), mode="w+", dtype=np.float32, shape=planes.shape)
    mm[:] = planes
    h = header([230.0e9, 230.1e9], restfreq=230.538e9)
    fits.PrimaryHDU(data=planes[None], header=h).writeto(tmp_path / "astropy.fits")
    for name, data in (("mem", planes), ("memmap", mm)):
        digest = write_fits(str(tmp_path / f"{name}.fits"), data, h)
        written = (tmp_path / f"{name}.fits").read_bytes()
        assert written == (tmp_path / "astropy.fits").read_bytes(), name
        assert digest == hashlib.sha256(written).hexdigest()      # what the upload records
    with fits.open(tmp_path / "mem.fits") as f:
        np.testing.assert_array_equal(f[0].data[0], planes)


def test_cube_header_gives_a_velocity_axis():
    """A cube with RESTFRQ converts to radio velocity; a lower-sideband cube descends."""
    f0, df = 230.6e9, -0.5e6
    freqs = f0 + df * np.arange(8)
    h = header(freqs, restfreq=230.538e9)
    assert h["CDELT3"] == df and h["CRVAL3"] == f0
    spectral = WCS(h).spectral
    assert spectral.wcs_pix2world([[0], [1]], 0)[:, 0] == pytest.approx([f0, f0 + df])
    assert spectral.wcs.restfrq == 230.538e9
    # radio velocity of the first plane from RESTFRQ, computed independently
    expected = 299792.458 * (1 - f0 / 230.538e9)
    got = (f0 * u.Hz).to(u.km / u.s, equivalencies=u.doppler_radio(h["RESTFRQ"] * u.Hz)).value
    assert got == pytest.approx(expected)


def test_header_frames_and_bad_input():
    vla = dict(OBS, telescope="VLA", direction_frame="J2000")
    h = header([1.4e9], bandwidth=1e6, obs=vla)
    assert h["RADESYS"] == "FK5" and h["EQUINOX"] == 2000.0 and h["INSTRUME"] == "VLA"
    # pb and mask images are not intensities
    assert "BTYPE" not in header([1.4e9], bandwidth=1e6, bunit="")
    with pytest.raises(ValueError, match="bandwidth"):
        header([1.4e9])


def inside(beam, points, slack=1e-6) -> bool:
    return bool((np.einsum("ij,jk,ik->i", points, beam_matrix(beam), points) <= 1 + slack).all())


def test_enclosing_beam_of_equal_beams_is_that_beam():
    assert enclosing_beam([(1.2, 0.8, 35.0)] * 5) == (1.2, 0.8, 35.0)
    # the largest enclosing the others; zero beams (planes without data) ignored
    assert enclosing_beam([(1.0, 0.5, 10.0), (1.2, 0.8, 10.0), (0.0, 0.0, 0.0)]) == (1.2, 0.8, 10.0)
    assert enclosing_beam([(0.0, 0.0, 0.0)]) == (0.0, 0.0, 0.0)


def test_enclosing_beam_of_crossed_ellipses_is_the_circle():
    b = enclosing_beam([(10.0, 5.0, 0.0), (10.0, 5.0, 90.0)])
    # by symmetry the smallest ellipse enclosing both is the circle through their tips
    assert b[0] == pytest.approx(10.0, rel=1e-4) and b[1] == pytest.approx(10.0, rel=1e-4)


@pytest.mark.parametrize("beams", [[(10.0, 5.0, 0.0), (9.0, 6.0, 40.0)],
                                   [(10.0, 5.0, 80.0), (10.0, 5.0, -80.0)],
                                   [(2.0, 1.0, 30.0), (2.1, 0.9, 45.0), (1.9, 1.1, 60.0), (2.05, 1.0, -5.0)]])
def test_enclosing_beam_encloses_every_beam_and_is_smallest(beams):
    b = enclosing_beam(beams)
    for beam in beams:           # every plane's outline inside, sampled densely
        assert inside(b, beam_outline(beam, 5000), 1e-5), (b, beam)
    # it touches (no slack), is no smaller than the largest, and smaller than the
    # largest beam stretched to enclose the others (the old common beam does not)
    assert not inside(tuple(x * (1 - 1e-3) if i < 2 else x for i, x in enumerate(b)),
                      np.concatenate([beam_outline(x, 2000) for x in beams]))
    largest = max(beams, key=lambda x: x[0] * x[1])
    assert b[0] * b[1] >= largest[0] * largest[1]
    assert not all(inside(largest, beam_outline(x, 2000)) for x in beams)
    circle = 2 * max(np.hypot(*beam_outline(x, 2000).T).max() for x in beams)
    assert b[0] * b[1] <= circle ** 2 + 1e-9
    assert -90 < b[2] <= 90


def test_product_names_are_almas():
    ctx = {"ms_name": "eb", "user": {}}
    assert ous_name(ctx) == "eb"
    ctx["user"]["mous_id"] = "uid://A001/X1234/X56"
    assert ous_name(ctx) == "uid___A001_X1234_X56"
    ous = ous_name(ctx)
    assert product_name(ous, 21, "Target", ["TARGET"], 5, "mfs") == "uid___A001_X1234_X56.s21_0.Target_sci.spw5.mfs.I"
    assert product_name(ous, 21, "NGC 628", ["TARGET"], "5_7", "cont") == \
        "uid___A001_X1234_X56.s21_0.NGC_628_sci.spw5_7.cont.I"
    assert product_name(ous, 21, "J1924-2914", ["BANDPASS", "FLUX"], 7, "mfs").endswith("J1924-2914_bp.spw7.mfs.I")
    assert product_name(ous, 21, "J1832-2039", ["PHASE"], 7, "mfs").endswith("J1832-2039_ph.spw7.mfs.I")
    assert product_name(ous, 21, "J1820-2528", ["CHECK"], 7, "mfs").endswith("J1820-2528_ch.spw7.mfs.I")
    assert product_name(ous, 21, "Target", ["TARGET"], 5, "cube").endswith(".cube.I")


def test_qa2_verdict_by_almas_criteria():
    assert qa2_verdict(1.05e-3, (1.0, 0.9, 0), 1e-3, 1.0)[0] == "Pass"
    assert qa2_verdict(1.3e-3, (1.0, 0.9, 0), 1e-3, 1.0)[0] == "SemiPass"      # noise 30 % over
    assert qa2_verdict(2.5e-3, (1.0, 0.9, 0), 1e-3, 1.0)[0] == "Fail"          # noise 2.5 x
    assert qa2_verdict(0.9e-3, (1.4, 1.3, 0), 1e-3, 1.0)[0] == "SemiPass"      # beam 35 % larger
    assert qa2_verdict(0.9e-3, (2.0, 2.0, 0), 1e-3, 1.0)[0] == "Fail"          # beam twice
    assert qa2_verdict(0.9e-3, (2.0, 2.0, 0), 1e-3, [1.5, 2.5])[0] == "Pass"   # inside a range
    assert qa2_verdict(0.9e-3, (1.0, 1.0, 0), None, None)[0] == ""             # nothing asked
    state, reasons = qa2_verdict(1.3e-3, (1.0, 0.9, 0), 1e-3, None)
    assert state == "SemiPass" and "1.30 x" in reasons[0]


def test_qa2_section_of_the_readme():
    goals = requested_goals({"user": {"requested_beam_arcsec": "1.0"}}, {"requested_rms_jy": "1e-3"})
    assert goals == {"requested_rms_jy": 1e-3, "requested_beam_arcsec": 1.0}
    images = [{"file": "x.Target_sci.spw5.cube.I.pbcor.fits", "intents": ["TARGET"], "specmode": "cube",
               "rms_jy_per_beam": 1.3e-3, "beam_arcsec": [1.0, 0.9, 10.0]},
              {"file": "x.Target_sci.spw5.mfs.I.pbcor.fits", "intents": ["TARGET"], "specmode": "cont",
               "rms_jy_per_beam": 0.2e-3, "beam_arcsec": [1.0, 0.9, 10.0]},
              {"file": "x.J1924_bp.spw5.mfs.I.pbcor.fits", "intents": ["BANDPASS"], "specmode": "mfs",
               "rms_jy_per_beam": 9e-3, "beam_arcsec": [1.0, 0.9, 10.0]}]
    text = qa2_section(images, goals)
    assert "proposed QA2 state: SemiPass (from the cube images)" in text
    assert "J1924" not in text
    assert "proposed QA2 state: Pass" in qa2_section(images, dict(goals, requested_specmode="cont"))
    assert "none given" in qa2_section(images, {})


def test_cube_peak_never_from_a_flagged_or_edge_plane():
    """A cube whose edge channel 0 is noisy (and flagged) and whose channel 1 has no data:
    the peak and its channel come from the good planes, and the rms from line-free ones."""
    nchan, npix = 8, 16
    rng = np.random.default_rng(1)
    image = rng.normal(0, 0.01, (nchan, npix, npix))
    image[0, 8, 8] = 0.1326                   # the noisy edge plane's 'peak'
    image[1, 5, 5] = 0.5                      # a plane without data (cannot happen; must not count)
    image[4, 8, 8] = 0.08                     # the line
    res = ImageResult(image=image, residual=image, model=image * 0, psf=image * 0, pb=np.ones((npix, npix)),
                      pbcor=image, mask=np.ones((npix, npix), bool), freqs=np.arange(nchan) * 1.0,
                      beam=(1, 1, 0))
    nrow = 6
    flag = np.zeros((nrow, nchan, 2), bool)
    flag[:, 1] = True                         # channel 1 flagged everywhere
    vis = Vis(time=np.zeros(nrow), interval=np.ones(nrow), ant1=np.zeros(nrow, int), ant2=np.arange(1, nrow + 1),
              field_id=np.zeros(nrow, int), scan=np.ones(nrow, int), uvw=np.zeros((nrow, 3)),
              data=np.zeros((nrow, nchan, 2), np.complex64), flag=flag, weight=np.ones((nrow, 2), np.float32),
              freq=np.arange(nchan) * 1.0, corr_types=["XX", "YY"], spw=5)
    job = ImageJob.__new__(ImageJob)
    job.vis, job.chans, job.specmode, job.nbin = vis, np.ones(nchan, bool), "cube", 1
    ok = job.peak_planes()
    assert list(ok) == [False, False, True, True, True, True, True, False]
    cont = np.array([True, True, True, False, False, False, True, True])
    stats = _stats(res, None, cont, "cube", ok)
    assert stats["peak"] == pytest.approx(0.08) and stats["peak_plane"] == 4
    assert stats["rms"] < 0.015               # the flagged plane's spike left out of the noise
    # an mfs image has one plane, always taken
    job.specmode = "mfs"
    assert list(job.peak_planes()) == [True]


def test_vla_recipes_flag_band_edges():
    """The generic VLA recipe (what NGC 5921 gets with an explicit path) and the NGC 5921
    one flag the band edges, so a cube's noisy channel 0 is flagged."""
    from almapipe import recipes
    for name in ("vla_calimage", "ngc5921"):
        flag = next(s for s in recipes.load(name)["stages"] if s["stage"] == "flagdata")
        assert flag["params"]["edge_fraction"] >= 1 / 63, name


def test_observation_summary_carries_frame_and_rest_frequencies(ngc5921_ms):
    """From NGC 5921's UVFITS: J2000 directions (FIELD.PHASE_DIR's MEASINFO) and the HI
    line of every source (AIPS SU RESTFREQ, written to the SOURCE table), which the
    cube's RESTFRQ takes; the start and observer the header takes."""
    from almapipe.msio.listobs import summary
    obs = summary(ngc5921_ms)
    assert obs["direction_frame"] == "J2000"
    assert [f["rest_freq_hz"] for f in obs["fields"]] == [1420405752.0] * 3
    assert obs["start"].startswith("1995-04-13T09:19") and obs["observer"] == "TEST"
    h = header([1.413e9], bandwidth=24414.0625 * 63, obs=obs, restfreq=obs["fields"][2]["rest_freq_hz"])
    assert h["RADESYS"] == "FK5" and h["RESTFRQ"] == 1420405752.0 and h["INSTRUME"] == "VLA"


def test_a_needle_beam_of_a_nearly_empty_plane_does_not_set_the_common_beam():
    from almapipe.imaging.imager import enclosing_beam, typical_beams
    beams = [(1.9, 1.2, -69.0 + k) for k in range(10)] + [(10.5, 0.25, 20.0), (0.0, 0.0, 0.0)]
    common = enclosing_beam(typical_beams(beams))
    assert 1.9 <= common[0] < 2.0 and 1.2 <= common[1] < 1.3
