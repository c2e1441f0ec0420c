"""Antenna-based gain solving: the numerical kernel, independent of gain type.

Every gain term (G, T, B) is solved the same way: the visibilities of one
solution slot (a time interval, a channel or channel range, a correlation)
are divided by the model and averaged per baseline into a Hermitian matrix
X[a, b] ~ g_a conj(g_b), with weights W[a, b] (kernels.accumulate_slots).
:func:`solve` then finds the
g that minimise sum W |X - g g^H|^2 with the StEFCal iteration (Salvini &
Wijnholds 2014), for all slots at once. Gain terms differ only in how they
bin the data into slots (see :mod:`almapipe.calibration.terms`).
"""
from __future__ import annotations

import numpy as np


def solve(X: np.ndarray, W: np.ndarray, mode: str = "ap", refant: int | None = None,
          max_iter: int = 200, tol: float = 1e-9, min_baselines: int = 4):
    """Solve X[s, a, b] ~ g[s, a] conj(g[s, b]) for g, for every slot s.

    mode: 'ap' amplitude and phase, 'p' phase only (|g| = 1), 'a' amplitude only.
    Returns (g, snr, ok): gains (nslot, nant), a per-antenna SNR estimate and a
    mask of antennas that had enough unflagged baselines to be solved.
    """
    nslot, nant, _ = X.shape
    nbl = (W > 0).sum(axis=2)
    ok = nbl >= min(min_baselines, max(nant - 1, 1))
    Wk = W * (ok[:, :, None] & ok[:, None, :])
    g = np.where(ok, 1.0 + 0j, 0)
    # Amplitude start: from the mean of |X| per antenna, so convergence is quick.
    mean_amp = np.sqrt(np.abs((Wk * np.abs(X)).sum(2) / np.maximum(Wk.sum(2), 1e-30)))
    if mode != "p":
        g = g * np.where(ok, mean_amp, 0)
    for it in range(max_iter):
        num = np.einsum("sab,sab,sb->sa", Wk, X, g)
        den = np.einsum("sab,sb->sa", Wk, np.abs(g) ** 2)
        g_new = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
        if mode == "p":
            g_new = np.exp(1j * np.angle(g_new)) * ok
        elif mode == "a":
            g_new = np.abs(g_new) + 0j
        if it % 2 == 1:
            g_new = 0.5 * (g_new + g)
        delta = np.abs(g_new - g).max() if g.size else 0.0
        g = g_new
        if delta < tol:
            break
    if refant is not None and 0 <= refant < nant and mode != "a":
        g = _reference(g, ok, refant)
    # A phase-only solution is judged with each antenna's amplitude in the model
    # (raw data are far from the model's unit amplitude, and antennas differ): the
    # amplitudes of an amplitude-and-phase solve of the same slots, so that the
    # SNR measures the noise and not the amplitude mismatch.
    if mode == "p":
        g_ap, _, _ = solve(X, W, "ap", None, max_iter=60, tol=1e-6, min_baselines=min_baselines)
        snr = _snr(X, Wk, g * np.abs(g_ap), ok)
    else:
        snr = _snr(X, Wk, g, ok)
    return g, snr, ok


def _reference(g: np.ndarray, ok: np.ndarray, refant: int) -> np.ndarray:
    """Rotate phases so the reference antenna has zero phase (or the first good one)."""
    ref = np.where(ok[:, refant], refant, ok.argmax(axis=1))
    gr = g[np.arange(len(g)), ref]
    rot = np.where(np.abs(gr) > 0, np.conj(gr) / np.maximum(np.abs(gr), 1e-30), 1)
    return g * rot[:, None]


def _snr(X, W, g, ok) -> np.ndarray:
    """Per-antenna SNR: |g| over its formal error, with the weights rescaled to the
    scatter of the residuals (the data's weights need not be 1/sigma^2 in Jy)."""
    model = g[:, :, None] * np.conj(g[:, None, :])
    resid2 = W * np.abs(X - model) ** 2
    nvis = (W > 0).sum(axis=(1, 2)) / 2
    npar = 2 * ok.sum(axis=1)
    chi2 = resid2.sum(axis=(1, 2)) / 2 / np.maximum(nvis - npar, 1)
    chi2 = np.where(chi2 > 0, chi2, 1.0)
    fisher = np.einsum("sab,sb->sa", W, np.abs(g) ** 2) / chi2[:, None]
    return np.where(ok, np.abs(g) * np.sqrt(fisher), 0.0)
