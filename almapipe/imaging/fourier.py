"""Real 2-D FFTs of images (restoring, the minor cycle's PSF subtraction, multiscale
and multi-term convolutions) with ducc0, which the gridder already loads.

These replace scipy.fft so that making an image imports no scipy: any scipy submodule
costs a process 17-47 MiB of resident memory before an image exists (scipy._lib alone
17, scipy.optimize 47), against 66 MiB for the whole of WSClean at 512² (decision 25).
ducc0's FFT is pocketfft's successor: the same lengths and results to rounding."""
from __future__ import annotations

import ducc0
import numpy as np

from . import gridding


def good_size(n: int) -> int:
    """The smallest length >= n that a real FFT is fast at (scipy.fft.next_fast_len(n, True))."""
    return int(ducc0.fft.good_size(int(n), True))


def _real(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if np.iscomplexobj(a):
        raise TypeError("rfft2: a real array is transformed, not a complex one")
    if a.dtype in (np.float32, np.float64):
        return a
    return a.astype(np.float32 if a.dtype == np.float16 else np.float64)


def rfft2(a: np.ndarray, shape: tuple | None = None) -> np.ndarray:
    """The real FFT of a's last two axes, zero-padded to shape (scipy.fft.rfft2(a, s=shape));
    float32 in, complex64 out."""
    a = _real(a)
    if shape is not None and tuple(a.shape[-2:]) != tuple(shape):
        if a.shape[-2] > shape[0] or a.shape[-1] > shape[1]:
            raise ValueError(f"rfft2: shape {tuple(shape)} smaller than the array's {a.shape[-2:]}")
        padded = np.zeros(a.shape[:-2] + tuple(shape), a.dtype)
        padded[..., :a.shape[-2], :a.shape[-1]] = a
        a = padded
    return ducc0.fft.r2c(a, axes=(-2, -1), forward=True, nthreads=gridding.nthreads())


def irfft2(ft: np.ndarray, shape: tuple, overwrite: bool = False) -> np.ndarray:
    """The inverse of rfft2 onto a real array of shape (its last two axes), normalised by
    the number of pixels (scipy.fft.irfft2(ft, s=shape)). overwrite: ft may be used as
    scratch (its values lost), sparing a copy of it (150 MB for a 4096² image's grid)."""
    if ft.shape[-2] != shape[0] or ft.shape[-1] != shape[1] // 2 + 1:
        raise ValueError(f"irfft2: a transform of shape {ft.shape[-2:]} is not one of a {tuple(shape)} array")
    return ducc0.fft.c2r(ft, axes=(-2, -1), lastsize=int(shape[1]), forward=False, inorm=2,
                         nthreads=gridding.nthreads(), allow_overwriting_input=overwrite)
