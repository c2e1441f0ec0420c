"""Compiled kernels of the automask's morphology (imaging/automask.py): the sizes of a
mask's connected regions, and a mask grown through the pixels another allows.

Both are breadth-first walks over 4-connected pixels, the connectivity of
scipy.ndimage's default structure in two dimensions, and give what scipy.ndimage's
label (with sum) and binary_dilation(iterations=n, mask=...) give, pixel for pixel
(tests/test_imaging.py). They replace scipy.ndimage so that the imager imports no
scipy (imaging/fourier.py says why); the walk also grows a mask by 75 steps in one
pass over the pixels it reaches, where iterated dilation passes over the whole image
75 times.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def region_sizes(mask: np.ndarray) -> np.ndarray:
    """Each True pixel's 4-connected region's size in pixels; 0 where mask is False."""
    ny, nx = mask.shape
    # int32 (an image has fewer than 2**31 pixels): at 4096² each of these is 64 MiB
    size = np.zeros((ny, nx), np.int32)       # 0: not reached yet (or not in the mask)
    queue = np.empty(ny * nx, np.int32)       # one region's pixels (flat indices), reused
    for start in range(ny * nx):
        sy, sx = start // nx, start % nx
        if not mask[sy, sx] or size[sy, sx]:
            continue
        size[sy, sx] = -1                     # reached: its size is written once the region is
        queue[0] = start
        head, tail = 0, 1
        while head < tail:
            y, x = queue[head] // nx, queue[head] % nx
            head += 1
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                v, u = y + dy, x + dx
                if 0 <= v < ny and 0 <= u < nx and mask[v, u] and not size[v, u]:
                    size[v, u] = -1
                    queue[tail] = v * nx + u
                    tail += 1
        for k in range(tail):
            size[queue[k] // nx, queue[k] % nx] = tail
    return size


@numba.njit(cache=True, nogil=True)
def grow_within(seed: np.ndarray, allowed: np.ndarray, steps: int) -> np.ndarray:
    """seed grown by up to `steps` 4-connected steps, each onto pixels that allowed holds:
    the pixels of allowed within `steps` of seed along paths through allowed, and seed
    itself (scipy.ndimage.binary_dilation(seed, iterations=steps, mask=allowed)); with
    steps < 1, as far as allowed reaches (as scipy's iterations < 1: until nothing changes)."""
    if seed.shape != allowed.shape:
        raise ValueError("grow_within: seed and allowed differ in shape")
    ny, nx = seed.shape
    if steps < 1:
        steps = ny * nx
    dist = np.full((ny, nx), -1, np.int32)
    queue = np.empty(ny * nx, np.int32)
    tail = 0
    for y in range(ny):
        for x in range(nx):
            if seed[y, x]:
                dist[y, x] = 0
                queue[tail] = y * nx + x
                tail += 1
    head = 0
    while head < tail:                 # breadth first: each pixel reached at its distance
        y, x = queue[head] // nx, queue[head] % nx
        head += 1
        d = dist[y, x]
        if d >= steps:
            continue
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            v, u = y + dy, x + dx
            if 0 <= v < ny and 0 <= u < nx and allowed[v, u] and dist[v, u] < 0:
                dist[v, u] = d + 1
                queue[tail] = v * nx + u
                tail += 1
    return dist >= 0
