"""Per-sample arrays turned from row-major to channel-major on local disk.

A statistic over all rows of one channel (flagtargets' median per uv-distance bin) needs
every row of that channel at once, while the visibility store is read in row blocks.
Holding the partition in memory made flagtargets' memory grow with the EB (12.9 GB on a
23 GB EB). Instead the row blocks are written here, each into one file per slice of
channels, and read back one slice at a time: memory is one slice, whose width the caller
chooses from its budget; the disk holds the arrays once, in the stage's work directory.
When one slice holds every channel (most partitions: the budget is a slice's), the arrays
stay in memory instead, which is no more than that slice: writing them to files and
reading them back cost flagtargets about 3 s of its 15 on the realistic EB (py-spy).
What the reads return is read-only either way.
"""
from __future__ import annotations

import os

import numpy as np


class ChannelSlices:
    """Named arrays of shape (nrow, nchan, ncorr), written in row blocks (`write`) or in
    channel slices (`write_slice`), read back the other way (`read_slice`, `read_rows`)."""

    def __init__(self, directory: str, nrow: int, nchan: int, ncorr: int, width: int):
        self.directory, self.nrow, self.nchan, self.ncorr = directory, nrow, nchan, ncorr
        width = max(1, min(int(width), nchan))
        self.bounds = [(c, min(c + width, nchan)) for c in range(0, nchan, width)]
        self._fds: dict = {}
        self._dtypes: dict = {}
        # one slice of all channels: the arrays themselves, by name
        self._held: dict | None = {} if len(self.bounds) == 1 else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if self._held:
            self._held = {}

    def _dtype(self, name: str, dtype) -> np.dtype:
        """An array's dtype, the same at every write."""
        dtype = np.dtype(dtype)
        if self._dtypes.setdefault(name, dtype) != dtype:
            raise TypeError(f"spill {name}: written as {self._dtypes[name]}, not {dtype}")
        return dtype

    def _fd(self, name: str, i: int, dtype) -> int:
        self._dtype(name, dtype)
        key = (name, i)
        if key not in self._fds:
            self._fds[key] = os.open(os.path.join(self.directory, f"{name}.{i}"), os.O_RDWR | os.O_CREAT, 0o600)
        return self._fds[key]

    def _row_bytes(self, name: str, i: int) -> int:
        c0, c1 = self.bounds[i]
        return (c1 - c0) * self.ncorr * self._dtypes[name].itemsize

    def _array(self, name: str, dtype) -> np.ndarray:
        """The array `name` held in memory (one slice), made on its first write."""
        dtype = self._dtype(name, dtype)
        if name not in self._held:
            self._held[name] = np.zeros((self.nrow, self.nchan, self.ncorr), dtype)   # (as a file's holes read)
        return self._held[name]

    def write(self, name: str, row0: int, values: np.ndarray) -> None:
        """Rows row0 .. row0 + len(values) of every channel."""
        if self._held is not None:
            self._array(name, values.dtype)[row0:row0 + len(values)] = values
            return
        for i, (c0, c1) in enumerate(self.bounds):
            buf = np.ascontiguousarray(values[:, c0:c1])
            fd = self._fd(name, i, buf.dtype)
            os.pwrite(fd, buf, row0 * self._row_bytes(name, i))

    def write_slice(self, name: str, i: int, values: np.ndarray) -> None:
        """Every row of channel slice i."""
        if self._held is not None:
            self._array(name, values.dtype)[:] = values
            return
        buf = np.ascontiguousarray(values)
        os.pwrite(self._fd(name, i, buf.dtype), buf, 0)

    def _read(self, name: str, i: int, row0: int, row1: int) -> np.ndarray:
        if self._held is not None:
            view = self._held[name][row0:row1]
            view.flags.writeable = False
            return view
        c0, c1 = self.bounds[i]
        fd = self._fds[(name, i)]
        nbytes = (row1 - row0) * self._row_bytes(name, i)
        buf = bytearray(nbytes)
        view, got = memoryview(buf), 0
        while got < nbytes:          # pread may return less than asked (and 0 in a hole's end)
            n = os.preadv(fd, [view[got:]], row0 * self._row_bytes(name, i) + got)
            if n == 0:
                break
            got += n
        out = np.frombuffer(buf, self._dtypes[name]).reshape(row1 - row0, c1 - c0, self.ncorr)
        out.flags.writeable = False
        return out

    def read_slice(self, name: str, i: int) -> np.ndarray:
        """Every row of channel slice i: (nrow, width, ncorr)."""
        return self._read(name, i, 0, self.nrow)

    def read_rows(self, name: str, row0: int, row1: int) -> np.ndarray:
        """Rows row0 .. row1 of every channel: (row1 - row0, nchan, ncorr)."""
        if len(self.bounds) == 1:
            return self._read(name, 0, row0, row1)
        return np.concatenate([self._read(name, i, row0, row1) for i in range(len(self.bounds))], axis=1)
