"""Against CASA 6.7 on the real NGC 5921 data, with CASA's numbers recorded here
(CASA is never a dependency; the values come from running casatasks on the MS our
importer writes, which is column-for-column the MS CASA's importuvfits writes).

CASA steps: flagdata(autocorr=True); setjy(field='0', standard='Perley-Butler 2017');
bandpass(field='0', solint='inf', combine='scan', refant='VL14', solnorm=True);
tclean(field='2', spw='0:43', imsize=256, cell='15arcsec', weighting='natural', niter=0).
"""
import numpy as np

from almapipe.calibration.applycal import GainApply
from almapipe.calibration.fluxmodels import perley_butler_2017
from almapipe.calibration.terms import SolveSpec, point_model, solve_term
from almapipe.imaging import gridding
from almapipe.imaging.imager import _stokes_i_samples
from almapipe.msio.ms import read_vis

# CASA bandpass, correlation RR, channels 8, 16, ..., 48: phase (deg) and amplitude
CASA_BANDPASS = {
    1: ([4.701, 2.352, 1.657, -0.761, -1.753, -3.253], [1.0594, 1.0587, 1.0578, 1.0527, 1.0513, 1.052]),
    5: ([2.248, 1.35, 1.482, 0.095, -0.795, -2.22], [1.0243, 1.0512, 1.0585, 1.0691, 1.0701, 1.0712]),
    20: ([4.674, 1.406, 0.191, -1.381, -2.319, -3.76], [1.0643, 1.0744, 1.0751, 1.0659, 1.0536, 1.0398]),
}
CASA_DIRTY_PEAK_PIXEL = (218, 120)     # (y, x) of the channel-43 dirty image of N5921_2
CASA_DIRTY_PEAK = 1.7527e-3            # in the uncalibrated data's units


def test_bandpass_agrees_with_casa(ngc5921_ms):
    vis = read_vis(ngc5921_ms, field_ids=[0])
    vis.flag |= (vis.ant1 == vis.ant2)[:, None, None]
    model = point_model(vis, {0: lambda f: perley_butler_2017("3C286", f)})
    phaseup = solve_term(vis, model, SolveSpec(kind="G", solint="int", calmode="p", refant=13,
                                               chans=slice(6, 57)))
    bp = solve_term(vis, model, SolveSpec(kind="B", combine="scan", refant=13, solnorm=True,
                                          preapply=[GainApply(phaseup, interp="nearest", calwt=False)]))
    chans = np.arange(8, 56, 8)
    for ant, (phase, amp) in CASA_BANDPASS.items():
        g = bp.cparam[bp.antenna == ant][0, chans, 0]
        ours_phase = np.degrees(np.angle(g))
        # the phase-up moves a constant per-antenna phase into the gains: compare shapes
        d = ours_phase - np.array(phase)
        assert np.abs(d - d.mean()).max() < 0.3, (ant, ours_phase, phase)
        ratio = np.abs(g) / np.array(amp)
        assert np.abs(ratio / ratio.mean() - 1).max() < 0.003, (ant, np.abs(g), amp)


def test_dirty_image_matches_tclean_orientation_and_scale(ngc5921_ms):
    vis = read_vis(ngc5921_ms, field_ids=[2])
    uvw, data, w = _stokes_i_samples(vis, np.array([43]))
    img = gridding.dirty(uvw, vis.freq[[43]], data, w, 256, np.radians(15 / 3600))
    assert np.unravel_index(np.argmax(img), img.shape) == CASA_DIRTY_PEAK_PIXEL
    assert abs(img.max() / CASA_DIRTY_PEAK - 1) < 0.02


# CASA 6.7 measures: me.measure(me.frequency('TOPO', 230 GHz), 'LSRK') at MJD 5284331824 s (UTC),
# ITRF (2225142.18, -5440307.37, -2481029.85) m, J2000 (277.5, -21.9) deg
CASA_LSRK_HZ = 229971361491.4943


def test_topo_to_lsrk_agrees_with_casa_measures():
    from almapipe.imaging.frames import topo_to_lsrk
    got = topo_to_lsrk(np.array([230e9]), 5284331824.0, np.radians(277.5), np.radians(-21.9),
                       (2225142.18, -5440307.37, -2481029.85))[0]
    assert abs(got - CASA_LSRK_HZ) < 1e-9 * 230e9          # 0.3 m/s; the shift itself is 28.6 MHz
