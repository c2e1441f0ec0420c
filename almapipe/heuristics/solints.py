"""Solution intervals chosen from the data: the bandpass phase-up's (hifa_bandpass's SNR
heuristic)."""
from __future__ import annotations

import numpy as np


def phaseup_interval(snr_int: float, int_s: float, scan_s: float, target_snr: float,
                     min_solutions: int = 2) -> tuple[int, float]:
    """How many integrations the bandpass phase-up averages (hifa_bandpass's SNR
    heuristic): the fewest that reach target_snr, the SNR growing as the square
    root of the time, but no more than leave min_solutions per scan.
    Returns (integrations, expected SNR)."""
    need = int(np.ceil((target_snr / max(snr_int, 1e-6)) ** 2))
    most = max(int(scan_s // (int_s * min_solutions)), 1)
    n = int(np.clip(need, 1, most))
    return n, float(snr_int * np.sqrt(n))
