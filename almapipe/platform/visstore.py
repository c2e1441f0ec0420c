"""The visibility store: every spectral window of every EB as chunked zarr arrays in S3.

Why (decision 0015): a stage reads the arrays and chunks it needs and writes only the
arrays it changes, instead of moving whole MS partitions through S3 and the worker
cache at every stage.

Layout. A *partition* is one spectral window of one execution block. Its arrays
follow CASA's MSv4 names where they fit (VISIBILITY, VISIBILITY_CORRECTED,
VISIBILITY_MODEL, FLAG, WEIGHT, UVW, TIME, BASELINE_ANTENNA1_ID, ...) but keep the
MS's row axis: rows sorted by (TIME, ANTENNA1, ANTENNA2), so "chunked in rows" is
"chunked in time". ALMA's baseline sets change within an EB (antennas drop out,
sub-arrays), which a dense (time, baseline) grid would pad; the kernels are row-based.

* Each array is a zarr v3 array at ``runs/<run>/vis/<partition>/<ARRAY>/<NN_stage>``:
  the stage that wrote that version. An array is never overwritten; a stage that
  changes an array writes a new version under its own key (a retry rewrites the same
  keys with the same bytes), and the partition's entry in the context points at the
  version each array is at. Flag versions (before/after a flagging stage) are pointers.
* Chunks: (rows, channels, correlations) of ~8 MiB of complex64 (``chunking``), so a
  cube piece reads its channel range and a flag stage's FLAG chunks compress to a few
  kB. The per-row index arrays (TIME, antennas, FIELD_ID, ...) have 16x longer chunks:
  they are read whole to select rows.
* The subtables (ANTENNA, FIELD, SPECTRAL_WINDOW, SYSCAL, FLAG_CMD, ...) stay an MS:
  the *shell*, the input MS with no rows, one small tar per EB (``entry["meta"]``).
  Exporting an MS (``export_ms``) is the shell plus rows streamed from the arrays.

* A continuum-subtracted view (uvcontsub) has one array more, CONTINUUM_FIT: the
  coefficients of each row's fitted continuum polynomial (nrow, FIT_TERMS, ncorr).
  Its DATA are read as VISIBILITY minus that polynomial (``subtract_continuum_fit``):
  uvcontsub writes a few numbers a row, not a second copy of the target's data.
* Calibrated data are corrected on reading (decision 0021). applycal writes FLAG and
  WEIGHT, and two arrays in place of VISIBILITY_CORRECTED: CALIBRATION_GAIN, the
  product of the calibration tables' gains at each (time, field) of the partition, per
  antenna, channel and correlation (npair, nant, nchan, ncorr; a flagged gain is 0),
  and CALIBRATION_PAIR, each row's pair (nrow,). CORRECTED_DATA (in a split view:
  DATA, ``entry["calibrated_column"]``) reads as VISIBILITY / (g[a1] conj(g[a2])):
  about nant/2 times fewer bytes than the corrected cube, which no stage then writes,
  uploads or caches. A stage that writes that column makes it a stored array again.

A partition entry (JSON, in ``ctx["partitions"]``):
``{"name", "spw", "meta", "nrow", "nchan", "ncorr", "chunks": [rows, chans],
"arrays": {ARRAY: key}, "field_ids": [...] (optional: a view of some fields' rows)}``.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .cache import BoundedCache
from .store import s3_object_store

# MS column -> store array, for the visibility cubes (nrow, nchan, ncorr)
CUBE_OF_COLUMN = {"DATA": "VISIBILITY", "CORRECTED_DATA": "VISIBILITY_CORRECTED",
                  "MODEL_DATA": "VISIBILITY_MODEL", "FLAG": "FLAG"}
COLUMN_OF_CUBE = {v: k for k, v in CUBE_OF_COLUMN.items()}
CUBE_DTYPE = {"VISIBILITY": "complex64", "VISIBILITY_CORRECTED": "complex64",
              "VISIBILITY_MODEL": "complex64", "FLAG": "bool"}
# MS column -> (store array, dtype, per-row trailing shape: "ncorr", 3 or none)
ROW_ARRAYS = {
    "UVW": ("UVW", "float64", 3),
    "WEIGHT": ("WEIGHT", "float32", "ncorr"),
    "SIGMA": ("SIGMA", "float32", "ncorr"),
}
INDEX_ARRAYS = {
    "TIME": ("TIME", "float64"),
    "INTERVAL": ("INTEGRATION_TIME", "float64"),
    "EXPOSURE": ("EFFECTIVE_INTEGRATION_TIME", "float64"),
    "TIME_CENTROID": ("TIME_CENTROID", "float64"),
    "ANTENNA1": ("BASELINE_ANTENNA1_ID", "int32"),
    "ANTENNA2": ("BASELINE_ANTENNA2_ID", "int32"),
    "FIELD_ID": ("FIELD_ID", "int32"),
    "SCAN_NUMBER": ("SCAN_NUMBER", "int32"),
    "STATE_ID": ("STATE_ID", "int32"),
    "OBSERVATION_ID": ("OBSERVATION_ID", "int32"),
    "ARRAY_ID": ("ARRAY_ID", "int32"),
    "FEED1": ("FEED1", "int32"),
    "FEED2": ("FEED2", "int32"),
    "PROCESSOR_ID": ("PROCESSOR_ID", "int32"),
}
# uvcontsub's continuum fit (nrow, FIT_TERMS, ncorr), complex64: term i multiplies x**i,
# x = -1 .. 1 across the spw (continuum_x); orders up to 3, uvcontsub.fitorder's maximum
CONTINUUM_FIT, FIT_TERMS = "CONTINUUM_FIT", 4
# applycal's calibration, applied on reading (decision 0021): the gains of each
# (time, field) pair (npair, nant, nchan, ncorr) complex64, and each row's pair (nrow,)
CALIBRATION_GAIN, CALIBRATION_PAIR = "CALIBRATION_GAIN", "CALIBRATION_PAIR"
# importdata's list of the rows (ascending) that hold a visibility exactly zero, for the
# VISIBILITY version named by the entry's "zero_rows_of": flagdata's clipping of zeros
# reads the data of these rows only (VisPartition.zero_rows)
ZERO_ROWS = "VISIBILITY_ZERO_ROWS"
ARRAY_OF_COLUMN = {**CUBE_OF_COLUMN, **{c: v[0] for c, v in ROW_ARRAYS.items()},
                   **{c: v[0] for c, v in INDEX_ARRAYS.items()}, CONTINUUM_FIT: CONTINUUM_FIT,
                   CALIBRATION_PAIR: CALIBRATION_PAIR}
INDEX_FACTOR = 16          # index arrays' chunks are this many data chunks long
OPENED_ARRAYS = 256        # arrays a VisStore keeps open to read (VisStore.open)
WRITES_IN_FLIGHT = 2       # chunk row-ranges of one array being written behind the stage
CHUNK_BYTES = 8 << 20      # a VISIBILITY chunk's size, uncompressed
MAX_CHUNK_CHANS = 256      # wider spws (FDM) are chunked in channels too


class VisStoreError(RuntimeError):
    """The visibility store cannot do what was asked; the message says what and where."""


def calibrated_on_read(entry: dict) -> str | None:
    """The MS column of a partition entry that reads as its VISIBILITY corrected by
    applycal's gains (CORRECTED_DATA; DATA in a split view), or None: the entry has no
    calibration applied on reading, or that column is a stored array of its own."""
    arrays = entry["arrays"]
    if CALIBRATION_GAIN not in arrays:
        return None
    column = entry.get("calibrated_column", "CORRECTED_DATA")
    if column == "CORRECTED_DATA" and CUBE_OF_COLUMN[column] in arrays:
        return None
    return column


def has_corrected(entry: dict) -> bool:
    """Whether a partition entry has CORRECTED_DATA, stored or applied on reading."""
    return "VISIBILITY_CORRECTED" in entry["arrays"] or calibrated_on_read(entry) == "CORRECTED_DATA"


def chunking(nchan: int, ncorr: int) -> tuple[int, int]:
    """(rows, channels) of a chunk. Channels: the whole spw up to MAX_CHUNK_CHANS, so a
    TDM spw is one channel chunk and an FDM cube piece reads only its channel range.
    Rows: what makes a complex64 chunk ~CHUNK_BYTES (at least 256, a multiple of 64)."""
    nchan_chunk = nchan if nchan <= MAX_CHUNK_CHANS else MAX_CHUNK_CHANS
    rows = CHUNK_BYTES // max(1, nchan_chunk * ncorr * 8)
    return max(256, (rows // 64) * 64), nchan_chunk


# ------------------------------------------------------------------ the zarr store

class ByteCounter:
    """Bytes that went to and from S3 and the local cache, per stage execution."""

    def __init__(self):
        self.lock = threading.Lock()
        self.s3_read = self.cache_read = self.s3_written = 0
        self.objects_read = self.objects_written = 0
        # read amplification: the (uncompressed) bytes of the elements a stage asked
        # for, against those of the whole chunks that had to be decoded to give them
        self.requested = self.decoded = 0

    def add(self, attr: str, n: int, objects: str | None = None) -> None:
        with self.lock:
            setattr(self, attr, getattr(self, attr) + n)
            if objects:
                setattr(self, objects, getattr(self, objects) + 1)

    def as_dict(self) -> dict:
        return {"s3_read": self.s3_read, "cache_read": self.cache_read, "s3_written": self.s3_written,
                "objects_read": self.objects_read, "objects_written": self.objects_written,
                "requested": self.requested, "decoded": self.decoded}


def _zarr_store(cfg, cache_dir: str | None, cache_limit: int, counter: ByteCounter):
    """Two zarr stores on the S3 bucket (obstore) with one bounded local cache: every key
    is immutable, so a cached object never goes stale. The first keeps what it reads and
    writes in the cache; the second (a pass over more visibilities than the cache holds)
    reads cached objects but keeps nothing: least-recently-used, the pass would only
    evict what it and everything else had cached before a second read came."""
    import obstore
    from zarr.storage import ObjectStore, WrapperStore
    from zarr.core.buffer import default_buffer_prototype

    s3 = s3_object_store(cfg, cfg.bucket)
    inner = ObjectStore(s3, read_only=False)
    cache = BoundedCache(cache_dir, cache_limit) if cache_dir and cache_limit > 0 else None

    class CountingCachedStore(WrapperStore):
        keep = True

        async def get(self, key, prototype=None, byte_range=None):
            prototype = prototype or default_buffer_prototype()
            if cache is not None and byte_range is None:
                data = await asyncio.to_thread(cache.get, key)
                if data is not None:
                    counter.add("cache_read", len(data))
                    return prototype.buffer.from_bytes(data)
            buf = await self._store.get(key, prototype, byte_range)
            if buf is not None:
                raw = buf.to_bytes()
                counter.add("s3_read", len(raw), "objects_read")
                if cache is not None and byte_range is None and self.keep:
                    await asyncio.to_thread(cache.fill, key, raw)
            return buf

        async def set(self, key, value):
            raw = value.to_bytes()
            await self._store.set(key, value)
            counter.add("s3_written", len(raw), "objects_written")
            if cache is None:
                return
            if self.keep:
                await asyncio.to_thread(cache.put, key, raw)
            else:       # not kept: an older copy of the key (a chunk written twice) must not stay
                await asyncio.to_thread(cache.discard, key)

        def get_many_sync(self, keys: list) -> list:
            """The objects under keys (None where there is none), as get() fetches them,
            for the chunk reader of this module (_read_chunks): cached ones from the
            cache, the others from S3 concurrently, each counted as get() counts it."""
            out, missing = [], []
            for i, key in enumerate(keys):
                data = cache.get(key) if cache is not None else None
                if data is not None:
                    counter.add("cache_read", len(data))
                else:
                    missing.append(i)
                out.append(data)
            if missing:
                for i, data in zip(missing, _fetch_pool().map(self._fetch, [keys[i] for i in missing])):
                    out[i] = data
            return out

        def _fetch(self, key: str):
            try:
                raw = obstore.get(s3, key).bytes()
            except FileNotFoundError:
                return None
            counter.add("s3_read", len(raw), "objects_read")
            if cache is not None and self.keep:
                cache.fill(key, raw)
            return raw

    class PassingStore(CountingCachedStore):
        keep = False

    return CountingCachedStore(inner), PassingStore(inner), s3, cache


class VisStore:
    """The store of one worker process: the zarr store on S3 and its local cache."""

    def __init__(self, cfg, cache_dir: str | None = None, cache_limit: int | None = None):
        import zarr
        from ..config import CHUNK_CACHE_SHARE
        self.counter = ByteCounter()
        if cache_limit is None:     # the chunks' share of the worker cache (ALMAPIPE_CACHE_MB)
            cache_limit = int(cfg.cache_bytes * CHUNK_CACHE_SHARE)
        self.zstore, self.passing_zstore, self.s3, self.cache = _zarr_store(cfg, cache_dir, cache_limit,
                                                                            self.counter)
        self.cache_limit = cache_limit if self.cache is not None else 0
        self.zarr = zarr
        # read a block ahead and write behind the stage (VisPartition.blocks, _ArrayWriter);
        # off (ALMAPIPE_IO_OVERLAP=0): one block at a time in the stage's thread
        self.overlap = getattr(cfg, "io_overlap", True)
        self._opened = collections.OrderedDict()     # (key, keep) -> array opened to read (open)
        self._opened_lock = threading.Lock()

    def begin_stage(self) -> None:
        """A stage execution starts using this store: the cache keeps what it uses
        (BoundedCache.begin_stage)."""
        if self.cache is not None:
            self.cache.begin_stage()

    def warm(self, keys: list, should_stop) -> int:
        """Fetch into the cache, one at a time, the chunk objects of the arrays under
        `keys` that it does not hold (platform/warmup.py's process, whose store this is:
        counted in no stage's bytes); stops when should_stop() is true. Returns the bytes
        fetched."""
        if self.cache is None:
            return 0
        before = self.counter.s3_read
        for key in keys:
            z = self.open(key)
            for rel in _chunk_keys(z.shape, z.chunks, range(-(-z.shape[0] // z.chunks[0]))):
                if should_stop():
                    return self.counter.s3_read - before
                chunk = f"{z.store_path.path}/{rel}"
                if chunk not in self.cache:
                    self.zstore.get_many_sync([chunk])      # from S3 into the cache, as a stage's read
        return self.counter.s3_read - before

    def keeps(self, nbytes: int) -> bool:
        """Whether a pass over nbytes of visibilities goes into the cache: not if it is
        larger than the cache (_zarr_store says why)."""
        return nbytes <= self.cache_limit

    # --- arrays
    def create(self, key: str, shape: tuple, chunks: tuple, dtype: str, keep: bool = True, compressors=None):
        """A new array; compressors: those of the version it follows (its unchanged chunk
        objects are copied into it as they are), else compressor_for(dtype)."""
        import zarr
        with self._opened_lock:          # (a retried stage creates its keys again)
            for memo in [m for m in self._opened if m[0] == key]:
                del self._opened[memo]
        # write_empty_chunks: a version holds every chunk it was given, also all-False
        # FLAG chunks, so that a chunk missing from a new version means "not written"
        return zarr.create_array(self.zstore if keep else self.passing_zstore, name=key, shape=shape,
                                 chunks=chunks, dtype=dtype,
                                 compressors=compressor_for(dtype) if compressors is None else compressors,
                                 fill_value=_fill(dtype), overwrite=True, config={"write_empty_chunks": True})

    def open(self, key: str, mode: str = "r", keep: bool = True):
        """An array to read (mode "r"), opened once per store: a key is immutable, and
        opening reads its zarr.json through zarr's event loop, which every block of
        every column did (5 s of the imager's time on the realistic EB, py-spy)."""
        memo = (key, keep)
        if mode == "r":
            with self._opened_lock:
                if memo in self._opened:
                    self._opened.move_to_end(memo)
                    return self._opened[memo]
        try:
            z = self.zarr.open_array(self.zstore if keep else self.passing_zstore, path=key, mode=mode)
        except Exception as exc:   # FileNotFoundError, zarr's NodeNotFound...
            raise VisStoreError(f"visibility array s3://{self.s3.config.get('bucket', '')}/{key} "
                                f"cannot be opened: {exc}") from exc
        if mode == "r":
            with self._opened_lock:
                self._opened[memo] = z
                while len(self._opened) > OPENED_ARRAYS:
                    self._opened.popitem(last=False)
        return z

    def copy_chunk_objects(self, src: str, dst: str, keys: list) -> None:
        """Server-side copies (S3 CopyObject): chunks that did not change go into a new
        version without passing through the worker."""
        import obstore
        for k in keys:
            obstore.copy(self.s3, f"{src}/{k}", f"{dst}/{k}")


def _fill(dtype: str):
    return False if dtype == "bool" else 0


def compressor_for(dtype: str):
    """A new array's codec (decision 0015). Visibilities, weights and uvw (floating
    point, mostly noise in their low bytes): LZ4 after a byte shuffle, which packs the
    same bytes of every value together. It stores them a little smaller than zstd (the
    realistic EB's store 8.23 GB against 8.42 GB) and decodes 3-5x faster; the stages
    decode every chunk they read. Flags and integer columns (long runs of equal
    values): zstd, ~50x smaller."""
    from zarr.codecs import BloscCodec, ZstdCodec
    if np.dtype(dtype).kind in "fc":
        return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    return ZstdCodec(level=1)


# ------------------------------------------------------------------ one partition

@dataclass
class Selection:
    rows: np.ndarray          # row numbers in the partition, ascending


class VisPartition:
    """One partition read and written by one stage execution (``io.vis(part)``).

    ``read`` returns a :class:`almapipe.msio.ms.Vis` of the rows and channels asked
    for; ``blocks`` yields the same in row blocks (bounded memory); ``write`` records a
    column's new values for some rows; ``commit`` returns the partition's new entry:
    the arrays this stage changed point at its versions, the others are unchanged."""

    def __init__(self, vstore: VisStore, entry: dict, version_tag: str, meta_path_fn, key_prefix: str):
        self.vs, self.entry = vstore, entry
        self.tag = version_tag
        self._meta_path_fn = meta_path_fn
        self._meta_path = None
        self._freq = None
        self.prefix = key_prefix           # runs/<run>/vis/<partition name>
        self._index: dict = {}
        self._writers: dict = {}
        self._calibration = None          # applycal's _GainWriter
        self.nrow, self.nchan, self.ncorr = entry["nrow"], entry["nchan"], entry["ncorr"]
        self.chunk_rows, self.chunk_chans = entry["chunks"]
        self.spw = entry["spw"]

    # --- metadata
    @property
    def meta(self) -> str:
        """A local path to the EB's MS shell (the subtables)."""
        if self._meta_path is None:
            self._meta_path = self._meta_path_fn(self.entry["meta"])
        return self._meta_path

    @property
    def freq(self) -> np.ndarray:
        # read once: every block asks, and the read-ahead thread of ``blocks`` must not
        # open the shell (casacore tables are not to be opened from two threads at once)
        if self._freq is None:
            from ..msio import ms as msio
            with msio.subtable(self.meta, "SPECTRAL_WINDOW") as t:
                self._freq = np.asarray(t.getcell("CHAN_FREQ", self.spw))
        return self._freq

    @property
    def corr_types(self) -> list:
        return list(self.entry["corr_types"])

    def has(self, column: str) -> bool:
        return ARRAY_OF_COLUMN[column] in self.entry["arrays"] or column in self._writers or \
            calibrated_on_read(self.entry) == column

    def zero_rows(self) -> np.ndarray | None:
        """The rows with a visibility exactly zero, as importdata found them, or None
        where it recorded none for the data this entry reads (a store written before it
        did, another VISIBILITY version, a continuum-subtracted view)."""
        key = self.entry["arrays"].get(ZERO_ROWS)
        if key is None or self.entry.get("zero_rows_of") != self.entry["arrays"].get("VISIBILITY") \
                or CONTINUUM_FIT in self.entry["arrays"]:     # (DATA is VISIBILITY minus a fit there)
            return None
        rows = np.asarray(self.vs.open(key)[:], dtype=np.int64)
        self.vs.counter.add("requested", rows.nbytes)
        self.vs.counter.add("decoded", rows.nbytes)
        return rows

    def index(self, column: str) -> np.ndarray:
        """A whole per-row index array (TIME, ANTENNA1, FIELD_ID, ...) by MS column name."""
        if column not in self._index:
            z = self.vs.open(self.entry["arrays"][ARRAY_OF_COLUMN[column]])
            self._index[column] = np.asarray(z[:])
            self.vs.counter.add("requested", self._index[column].nbytes)
            self.vs.counter.add("decoded", self._index[column].nbytes)
        return self._index[column]

    def row_array(self, column: str) -> np.ndarray:
        """A whole per-row array (UVW, WEIGHT, SIGMA) of the partition: small beside the cubes."""
        return _take(self._array(column), slice(0, self.nrow), None, self.vs.counter)

    def select(self, field_ids=None, cross_only: bool = False) -> np.ndarray:
        """Row numbers of the partition (of its view's fields) of the given fields."""
        keep = np.ones(self.nrow, bool)
        view = self.entry.get("field_ids")
        if view is not None:
            keep &= np.isin(self.index("FIELD_ID"), view)
        if field_ids is not None:
            keep &= np.isin(self.index("FIELD_ID"), list(map(int, field_ids)))
        if cross_only:
            keep &= self.index("ANTENNA1") != self.index("ANTENNA2")
        return np.flatnonzero(keep)

    # --- reading
    def _array(self, column: str, keep: bool = True):
        name = ARRAY_OF_COLUMN[column]
        key = self.entry["arrays"].get(name)
        if key is None:
            raise VisStoreError(f"{self.entry['name']}: no {column} ({name}) in the store; "
                                f"has {', '.join(sorted(self.entry['arrays']))}")
        return self.vs.open(key, keep=keep)

    def read_rows(self, rows: np.ndarray, column: str = "DATA", chan: slice | None = None,
                  data: bool = True, keep: bool = True):
        """A Vis of the given rows (ascending row numbers); `keep`: whether the
        visibilities read go into the worker cache (flags, weights and uvw always do)."""
        from ..msio.ms import Vis
        rows = np.asarray(rows, dtype=np.int64)
        chan = chan if chan is not None else slice(0, self.nchan)
        flag = self.rows_of("FLAG", rows, chan)
        vis = Vis(time=self.index("TIME")[rows], interval=self.index("INTERVAL")[rows],
                  ant1=self.index("ANTENNA1")[rows], ant2=self.index("ANTENNA2")[rows],
                  field_id=self.index("FIELD_ID")[rows], scan=self.index("SCAN_NUMBER")[rows],
                  uvw=self.rows_of("UVW", rows),
                  data=self.rows_of(column, rows, chan, keep) if data else np.zeros((0,) + flag.shape[1:], np.complex64),
                  flag=flag, weight=self.rows_of("WEIGHT", rows),
                  freq=self.freq[chan], corr_types=self.corr_types, rows=rows, spw=self.spw,
                  state_id=self.index("STATE_ID")[rows])
        return vis

    def rows_of(self, column: str, rows: np.ndarray, chan: slice | None = None, keep: bool = True) -> np.ndarray:
        """One column's values of the given rows (ascending row numbers): what this stage
        wrote if it wrote the column, else the version the entry points at; a cube's
        channels `chan`. A continuum-subtracted view's DATA are its VISIBILITY minus its
        committed continuum fit (uvcontsub reads the data it fits unsubtracted)."""
        rows = np.asarray(rows, dtype=np.int64)
        if column in self._writers:              # read what this stage wrote
            values = self._writers[column].read(rows, chan if column in CUBE_OF_COLUMN else None)
        else:
            values = self._stored(column, rows, chan, keep)
        if column == "DATA" and CONTINUUM_FIT in self.entry["arrays"]:
            values = subtract_continuum_fit(values, self.rows_of(CONTINUUM_FIT, rows), chan, self.nchan)
        return values

    def _stored(self, column: str, rows: np.ndarray, chan: slice | None = None, keep: bool = True) -> np.ndarray:
        """A column's values of the given rows as the entry's versions hold them: the
        calibrated column is VISIBILITY corrected by the calibration's gains."""
        if calibrated_on_read(self.entry) == column:
            return self._calibrate(_take(self._array("DATA", keep), rows, chan, self.vs.counter), rows, chan)
        return _take(self._array(column, keep), rows, chan if column in CUBE_OF_COLUMN else None, self.vs.counter)

    def _calibrate(self, data: np.ndarray, rows: np.ndarray, chan: slice | None) -> np.ndarray:
        """data (of rows, channels chan) divided by g[a1] conj(g[a2]) of their pairs; only
        the pairs the rows span are read (rows ascending: pairs follow time)."""
        from ..calibration.kernels import divide_by_gains
        pair = self.index(CALIBRATION_PAIR)[rows]     # (also for no rows: blocks' first read)
        if not len(rows):
            return data
        data = np.ascontiguousarray(data, dtype=np.complex64)
        if not data.flags.writeable:
            data = data.copy()
        # the gains of the rows' pairs only (rows scattered over the EB, a field's or a
        # plot's sample, touch a few of its pair chunks), in their channels
        pairs = np.unique(pair)
        gain = _take(self.vs.open(self.entry["arrays"][CALIBRATION_GAIN]), pairs, chan, chan_axis=2)
        self.vs.counter.add("requested", gain.nbytes)
        self.vs.counter.add("decoded", gain.nbytes)
        divide_by_gains(data, np.searchsorted(pairs, pair).astype(np.int64),
                        self.index("ANTENNA1")[rows].astype(np.int64), self.index("ANTENNA2")[rows].astype(np.int64),
                        gain)
        return data

    def read(self, column: str = "DATA", field_ids=None, chan: slice | None = None, data: bool = True,
             cross_only: bool = False):
        """A Vis of the partition's rows (of the given fields), all in memory."""
        rows = self.select(field_ids, cross_only)
        return self.read_rows(rows, column, chan, data, self._keeps(rows, chan, data))

    def _keeps(self, rows: np.ndarray, chan: slice | None, data: bool) -> bool:
        """Whether a read of these rows' visibilities goes into the cache (VisStore.keeps)."""
        nchan = len(range(*chan.indices(self.nchan))) if chan is not None else self.nchan
        return not data or self.vs.keeps(len(rows) * nchan * self.ncorr * 8)

    def blocks(self, column: str = "DATA", field_ids=None, chan: slice | None = None, data: bool = True,
               cross_only: bool = False, block_chunks: int = 1):
        """The same as ``read`` in row blocks of `block_chunks` row chunks (bounded memory);
        blocks with no selected row are skipped. As with ``read``, a pass over more
        visibilities than the worker cache holds does not go into it (VisStore.keeps)."""
        rows = self.select(field_ids, cross_only)
        keep = self._keeps(rows, chan, data)
        step = self.chunk_rows * block_chunks
        bounds = np.searchsorted(rows, np.arange(0, self.nrow + step, step))
        spans = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        if len(spans) < 2 or not self.vs.overlap:
            for lo, hi in spans:
                yield self.read_rows(rows[lo:hi], column, chan, data, keep)
            return
        # read ahead: the next block is fetched and decoded in a thread while the stage
        # works on this one, so that on a worker's cores the S3 reads and decompression
        # overlap the stage's own computing. Blocks are whole row chunks, so the block
        # read ahead never holds a chunk the stage is writing for this one; what is
        # held is two blocks. A read of no rows first, here, reads the index arrays and
        # frequencies a block needs: the thread then only reads chunks.
        self.read_rows(rows[:0], column, chan, data, keep)
        with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as ahead:
            nxt = ahead.submit(self.read_rows, rows[spans[0][0]:spans[0][1]], column, chan, data, keep)
            for k in range(len(spans)):
                blk = nxt.result()
                if k + 1 < len(spans):
                    lo, hi = spans[k + 1]
                    nxt = ahead.submit(self.read_rows, rows[lo:hi], column, chan, data, keep)
                yield blk
                del blk

    # --- writing
    def write(self, column: str, rows: np.ndarray, values: np.ndarray, before: np.ndarray | None = None) -> None:
        """New values of an MS column (DATA, CORRECTED_DATA, MODEL_DATA, FLAG, WEIGHT,
        UVW, ...) for the given rows; written as this stage's version of the array.
        before: the values of these rows the stage read (a block's flags), which a
        chunk's new values are compared with instead of reading it again."""
        if column == "DATA" and CONTINUUM_FIT in self.entry["arrays"]:
            raise VisStoreError(f"{self.entry['name']}: DATA of a continuum-subtracted view are read as "
                                "VISIBILITY minus its continuum fit and cannot be written")
        if column == "DATA" and calibrated_on_read(self.entry) == "CORRECTED_DATA":
            raise VisStoreError(f"{self.entry['name']}: its CORRECTED_DATA are its DATA divided by applycal's "
                                "gains (decision 0021); new DATA would change them: run applycal again after")
        w = self._writers.get(column)
        if w is None:
            w = self._writers[column] = _ArrayWriter(self, column)
        w.put(np.asarray(rows, dtype=np.int64), values, before)

    def write_flags(self, rows: np.ndarray, flags: np.ndarray, before: np.ndarray | None = None) -> None:
        self.write("FLAG", rows, flags, before)

    def calibration_writer(self) -> "_GainWriter":
        """applycal's calibration, corrected on reading (decision 0021): the (time, field)
        pairs of the partition's (view's) rows, in time order, so that a row block's pairs
        are a range (``_calibrate`` and the writer rely on it); each row's pair is written
        here, and the writer takes the pairs' gains in ascending ranges. ``commit``
        points the entry at both and drops a stored VISIBILITY_CORRECTED."""
        from ..msio.ms import unique_rows
        rows = self.select()
        pairs, pidx = unique_rows(self.index("TIME")[rows], self.index("FIELD_ID")[rows].astype(np.float64))
        pair_of_row = np.zeros(self.nrow, np.int32)
        pair_of_row[rows] = pidx
        nant = int(max(self.index("ANTENNA1").max(), self.index("ANTENNA2").max())) + 1 if self.nrow else 1
        key = f"{self.prefix}/{CALIBRATION_PAIR}/{self.tag}"
        self.vs.create(key, (self.nrow,), (self.chunk_rows * INDEX_FACTOR,), "int32")[:] = pair_of_row
        self._calibration = _GainWriter(self, pairs[:, 0], pairs[:, 1].astype(int), nant, key, pair_of_row)
        return self._calibration

    def flag_antennas(self, ant_ids) -> None:
        """Flag every row (of the view) with one of the antennas; only the row chunks
        holding them are read and written."""
        has = np.isin(self.index("ANTENNA1"), ant_ids) | np.isin(self.index("ANTENNA2"), ant_ids)
        rows = self.select()
        rows = rows[has[rows]]
        step = 4 * self.chunk_rows
        for lo in range(0, len(rows), step):
            chunk = rows[lo:lo + step]
            self.write_flags(chunk, np.ones((len(chunk), self.nchan, self.ncorr), bool))

    def commit(self) -> dict:
        """The partition's new entry; arrays that did not change keep their pointers."""
        arrays = dict(self.entry["arrays"])
        stored = {}
        for column, w in self._writers.items():
            key = stored[column] = w.finish()
            if key is not None:
                arrays[ARRAY_OF_COLUMN[column]] = key
        entry = dict(self.entry)
        lazy = calibrated_on_read(self.entry)
        if lazy is not None and stored.get(lazy) is not None:
            # this stage changed the calibrated column (its _ArrayWriter merged its values
            # with those corrected on reading): a stored array from now on. (A writer that
            # changed nothing stored no version: the column stays corrected on reading.)
            arrays.pop(CALIBRATION_GAIN), arrays.pop(CALIBRATION_PAIR)
            entry.pop("calibrated_column", None)
        if self._calibration is not None:
            arrays[CALIBRATION_GAIN] = self._calibration.finish()
            arrays[CALIBRATION_PAIR] = self._calibration.pair_key
            arrays.pop("VISIBILITY_CORRECTED", None)
            self._index[CALIBRATION_PAIR] = self._calibration.pair_of_row
            self._calibration = None
        self._writers = {}
        # reads after the commit see this stage's versions (read-your-writes)
        self.entry = dict(entry, arrays=arrays)
        return self.entry


def continuum_x(nchan: int) -> np.ndarray:
    """The continuum polynomial's abscissa: -1 .. 1 across a spw's channels, as
    kernels.fit_continuum_rows fits it."""
    return np.linspace(-1.0, 1.0, nchan) if nchan > 1 else np.full(nchan, -1.0)


def subtract_continuum_fit(data: np.ndarray, fit: np.ndarray, chan: slice | None, nchan: int) -> np.ndarray:
    """data (rows, channels `chan` of a spw of nchan, ncorr) minus each row's continuum
    polynomial, sum over i of fit[:, i] * x**i; terms that are zero in every row are
    skipped (order 0, the default, is one subtraction a row)."""
    from ..imaging.kernels import subtract_polynomial
    data = np.asarray(data, dtype=np.complex64)
    nonzero = np.flatnonzero(np.any(fit != 0, axis=(0, 2)))
    if not len(nonzero):
        return data.copy()
    x = continuum_x(nchan)[chan if chan is not None else slice(None)]
    xpow = np.stack([(x ** i).astype(np.float32) for i in range(int(nonzero[-1]) + 1)])
    out = np.empty_like(data)               # a new array: data may be a cached block
    subtract_polynomial(data, np.asarray(fit, np.complex64), xpow, out)
    return out


# the most bytes a read of selected rows decodes into one array before picking them (_take)
SPAN_BYTES = 64 << 20


def _take(z, sel, chan, counter: ByteCounter | None = None, chan_axis: int = 1):
    """zarr read of rows (a slice, or row numbers in ascending order: others would be
    picked wrongly) and, for a cube, a channel slice of axis `chan_axis` (2 for the
    calibration's gains: pairs, antennas, channels, correlations)."""
    if not isinstance(sel, slice) and len(sel) and sel[-1] - sel[0] + 1 == len(sel):
        sel = slice(int(sel[0]), int(sel[-1]) + 1)          # contiguous rows: a plain slice
    if counter is not None:
        _count_amplification(z, sel, chan, counter)

    def rows(s: slice):
        return _read_chunks(z, (s,) if chan is None else (s,) + (slice(None),) * (chan_axis - 1) + (chan,))
    if isinstance(sel, slice):
        return rows(sel)
    shape = list(z.shape[1:])
    if chan is not None:
        shape[chan_axis - 1] = len(range(*chan.indices(z.shape[chan_axis])))
    shape = tuple(shape)
    out = np.empty((len(sel),) + shape, z.dtype)
    # The row chunks the rows fall in are read as plain slices, runs of consecutive
    # chunks at a time (up to SPAN_BYTES), and the rows picked here. zarr's orthogonal
    # selection would index every element of every chunk through np.ix_ (numpy's fancy
    # indexing on all axes, under the GIL): 20x slower than picking rows, and 40 s of
    # the imager's time on the realistic EB (py-spy).
    rchunk = int(z.chunks[0])
    row_bytes = z.dtype.itemsize * int(np.prod(shape))
    most = max(1, SPAN_BYTES // max(1, rchunk * row_bytes))     # chunks a read may hold
    touched = np.unique(sel // rchunk)                           # the row chunks, ascending
    for run in np.split(touched, np.flatnonzero(np.diff(touched) != 1) + 1):   # consecutive ones
        for first in range(0, len(run), most):
            span = run[first:first + most]
            lo, hi = int(span[0]) * rchunk, min((int(span[-1]) + 1) * rchunk, z.shape[0])
            a, b = np.searchsorted(sel, [lo, hi])                # the selected rows in [lo, hi)
            block = rows(slice(lo, hi))
            # (mode "clip": the indices are in range, and numpy then writes into out directly)
            np.take(block, sel[a:b] - lo, axis=0, out=out[a:b], mode="clip")
    return out


# chunk objects fetched and decoded at a time by _read_chunks (those not cached: from S3
# concurrently)
FETCH_BATCH = 16
_fetch_pool_lock = threading.Lock()
_fetch_pool_executor = None


def _fetch_pool() -> ThreadPoolExecutor:
    """The threads that fetch chunk objects from S3 for _read_chunks (one pool a process)."""
    global _fetch_pool_executor
    with _fetch_pool_lock:
        if _fetch_pool_executor is None:
            _fetch_pool_executor = ThreadPoolExecutor(8, thread_name_prefix="chunk-get")
        return _fetch_pool_executor


def _chunk_decoder(z):
    """(source, dest) -> None that decodes one chunk object of z into dest, or None if
    the array's codecs are not the two this store writes (compressor_for)."""
    import numcodecs.blosc
    import numcodecs.zstd
    from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec
    codecs = z.metadata.codecs
    if (len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or z.dtype.byteorder == ">"
            or (z.dtype.itemsize > 1 and str(getattr(codecs[0].endian, "value", codecs[0].endian)) != "little")):
        return None
    if isinstance(codecs[1], BloscCodec):
        return numcodecs.blosc.decompress
    if isinstance(codecs[1], ZstdCodec):
        return numcodecs.zstd.decompress
    return None


def _chunk_key(z, coords: tuple) -> str:
    """The object key of array z's chunk at chunk coordinates `coords`."""
    return f"{z.store_path.path}/{z.metadata.encode_chunk_key(coords)}"


def _read_chunks(z, sel: tuple) -> np.ndarray:
    """z[sel] (sel: a slice per leading axis, step 1), reading the chunk objects
    itself: each is decoded straight into the result where it fills a contiguous part
    of it (a row chunk of all channels), else into one scratch chunk. zarr's own read
    decodes every chunk into a buffer of its own, copies it into the result and passes
    each object through its event loop: over twice the CPU (0.36 against 0.16 CPU-s for
    0.54 GB of chunks in local files), and on the realistic EB some 30 CPU-s of copies
    and thread wake-ups (py-spy). Arrays of other codecs, and stores other than this
    module's, are read by zarr."""
    store = z.store_path.store
    decode = _chunk_decoder(z) if hasattr(store, "get_many_sync") else None
    sel = tuple(sel) + (slice(None),) * (z.ndim - len(sel))
    spans = [s.indices(n) for s, n in zip(sel, z.shape)]
    if decode is None or any(step != 1 for _, _, step in spans):
        return np.asarray(z[sel])
    spans = [(a, max(a, b)) for a, b, _ in spans]
    chunks = z.chunks
    out = np.empty(tuple(b - a for a, b in spans), z.dtype)
    if not out.size:
        return out
    coords = list(itertools.product(*[range(a // c, (b - 1) // c + 1) for (a, b), c in zip(spans, chunks)]))
    scratch = None
    for first in range(0, len(coords), FETCH_BATCH):
        batch = coords[first:first + FETCH_BATCH]
        blobs = store.get_many_sync([_chunk_key(z, cc) for cc in batch])
        for cc, blob in zip(batch, blobs):
            src, dst, whole = [], [], True
            for ax, (ci, c, (a, b)) in enumerate(zip(cc, chunks, spans)):
                lo = ci * c
                clo, chi = max(lo, a), min(lo + c, b)
                src.append(slice(clo - lo, chi - lo))
                dst.append(slice(clo - a, chi - a))
                # decoded in place: the whole chunk inside the result, which it spans
                # on every axis after the first (so that its part is contiguous)
                whole &= clo == lo and chi == lo + c and (ax == 0 or (a == lo and b == chi))
            src, dst = tuple(src), tuple(dst)
            if blob is None:                  # never written: the fill value, as zarr reads it
                out[dst] = z.metadata.fill_value
            elif whole:
                decode(blob, out[dst])
            else:
                if scratch is None:
                    scratch = np.empty(chunks, z.dtype)
                decode(blob, scratch)
                out[dst] = scratch[src]
    return out


def _count_amplification(z, sel, chan, counter: ByteCounter) -> None:
    rows = np.arange(*sel.indices(z.shape[0])) if isinstance(sel, slice) else np.asarray(sel)
    if not len(rows):
        return
    item = z.dtype.itemsize * int(np.prod(z.shape[2:] if z.ndim > 2 else z.shape[1:] or (1,)))
    per_row_chans = z.shape[1] if z.ndim > 2 else 1
    rchunk = z.chunks[0]
    cis = np.unique(rows // rchunk)
    chunk_rows = int(np.minimum(rchunk, z.shape[0] - cis * rchunk).sum())      # the last chunk is short
    if z.ndim > 2:
        c = range(*chan.indices(z.shape[1])) if chan is not None else range(z.shape[1])
        nchan = len(c)
        cchunk = z.chunks[1]
        chan_span = (len(set(range(c.start // cchunk, (c.stop - 1) // cchunk + 1))) * cchunk) if nchan else 0
        counter.add("requested", len(rows) * nchan * item)
        counter.add("decoded", chunk_rows * min(chan_span, per_row_chans) * item)
    else:
        counter.add("requested", len(rows) * item)
        counter.add("decoded", chunk_rows * item)


class _ArrayWriter:
    """One stage's new version of one array, written chunk row-range by chunk row-range.

    A row range that the stage's values leave as they were is not written; once any
    range changed, the untouched chunks are copied server-side from the old version at
    ``finish``, so the new version is a complete zarr array. If nothing changed, no
    version exists and the pointer stays."""

    def __init__(self, part: VisPartition, column: str):
        self.part, self.column = part, column
        self.name = ARRAY_OF_COLUMN[column]
        self.old_key = part.entry["arrays"].get(self.name)
        self.key = f"{part.prefix}/{self.name}/{part.tag}"
        n = part.nrow
        if self.name in CUBE_DTYPE:
            shape, chunks, dtype = (n, part.nchan, part.ncorr), (part.chunk_rows, part.chunk_chans, part.ncorr), \
                CUBE_DTYPE[self.name]
        elif column == CONTINUUM_FIT:
            shape, chunks, dtype = (n, FIT_TERMS, part.ncorr), (part.chunk_rows, FIT_TERMS, part.ncorr), "complex64"
        elif column in ROW_ARRAYS:
            _, dtype, trail = ROW_ARRAYS[column]
            trail = part.ncorr if trail == "ncorr" else trail
            shape, chunks = (n, trail), (part.chunk_rows, trail)
        else:
            raise VisStoreError(f"{column}: an index column cannot be rewritten by a stage")
        # a version of a visibility cube larger than the cache is written past it
        self.keep = not self.name.startswith("VISIBILITY") or part.vs.keeps(n * part.nchan * part.ncorr * 8)
        self.old = part.vs.open(self.old_key, keep=self.keep) if self.old_key else None
        if self.old is not None and tuple(self.old.shape) != shape:
            raise VisStoreError(f"{part.entry['name']} {column}: shape {shape} differs from the stored "
                                f"{tuple(self.old.shape)}")
        # the column is corrected on reading (calibrated_on_read): its current values are
        # VISIBILITY corrected, which the stage's values are merged with and compared to
        self.lazy = calibrated_on_read(part.entry) == column
        if self.lazy and self.old is None:
            self.old = part.vs.open(part.entry["arrays"]["VISIBILITY"], keep=self.keep)   # its codec
        self.shape, self.chunks, self.dtype = shape, chunks, dtype
        self.new = None
        self.written: set = set()         # row-chunk indices written to the new version
        # write-behind: a chunk row-range is encoded and uploaded in a thread while the
        # stage computes the next block; at most WRITES_IN_FLIGHT at a time (memory), all
        # of them done (and their errors raised) before ``finish`` returns the version
        self._behind = None
        self._pending: dict = {}          # row-chunk index -> its write in flight
        self.rows_step = part.chunk_rows
        if self.old_key == self.key:
            # the array is at this stage's own version already (a second pass after a
            # commit in the same execution): write into it in place (nothing reads it
            # before the stage's result is written); recreating it would delete the
            # first pass's chunks, which the new values are merged with
            self.new = part.vs.open(self.key, mode="r+", keep=self.keep)
            self.written = set(range(-(-n // self.rows_step)))

    def _current(self, ci: int) -> np.ndarray:
        lo, hi = ci * self.rows_step, min((ci + 1) * self.rows_step, self.shape[0])
        if ci in self._pending:
            self._pending.pop(ci).result()
        if ci in self.written:
            return np.asarray(self.new[lo:hi])
        if self.lazy:
            return self.part._stored(self.column, np.arange(lo, hi), keep=self.keep)
        if self.old is not None:
            return np.asarray(self.old[lo:hi])
        return np.full((hi - lo,) + self.shape[1:], _fill(self.dtype), dtype=self.dtype)

    def put(self, rows: np.ndarray, values: np.ndarray, before: np.ndarray | None = None) -> None:
        if len(rows) == 0:
            return
        if values.shape[1:] != self.shape[1:]:
            raise VisStoreError(f"{self.part.entry['name']} {self.column}: values of shape "
                                f"{values.shape[1:]} for an array of rows of {self.shape[1:]}")
        # (a copy: the values are written behind the stage, which may reuse its array)
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], values[order]
        if before is not None:
            before = np.asarray(before)[order]
        cis = rows // self.rows_step
        breaks = np.flatnonzero(np.diff(cis)) + 1
        for lo_i, hi_i in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            ci = int(cis[lo_i])
            lo = ci * self.rows_step
            at = rows[lo_i:hi_i] - lo
            vals = values[lo_i:hi_i].astype(self.dtype, copy=False)
            whole = len(at) == min(self.rows_step, self.shape[0] - lo) and at[0] == 0 and bool((np.diff(at) == 1).all())
            stored = ci in self.written or self.old is not None      # values to compare with
            # a whole chunk of a new array has nothing to merge with or compare to
            if whole and before is not None and ci not in self.written:
                cur = before[lo_i:hi_i].astype(self.dtype, copy=False)    # what the stage read
            else:
                cur = self._current(ci) if stored or not whole else None
            if whole:
                new = vals
            else:
                new = cur.copy()
                new[at] = vals
            if stored and np.array_equal(new, cur):
                continue                  # unchanged: nothing to write
            if self.new is None:
                self.new = self.part.vs.create(self.key, self.shape, self.chunks, self.dtype, self.keep,
                                               self.old.compressors if self.old is not None else None)
            if self.part.vs.overlap:
                self._write_behind(ci, lo, new)
            else:
                self.new[lo:lo + len(new)] = new
            self.written.add(ci)

    def _write_behind(self, ci: int, lo: int, values: np.ndarray) -> None:
        if self._behind is None:
            self._behind = ThreadPoolExecutor(1, thread_name_prefix=f"write-{self.name}")
        while len(self._pending) >= WRITES_IN_FLIGHT:
            self._pending.pop(next(iter(self._pending))).result()
        new = self.new

        def store():
            new[lo:lo + len(values)] = values
        self._pending[ci] = self._behind.submit(store)

    def _drain(self) -> None:
        """Wait for the writes in flight; the first error is raised."""
        pending, self._pending = list(self._pending.values()), {}
        errors = [f.exception() for f in pending]
        if self._behind is not None:
            self._behind.shutdown()
            self._behind = None
        for e in errors:
            if e is not None:
                raise e

    def read(self, rows: np.ndarray, chan: slice | None) -> np.ndarray:
        """This stage's values (written or not) of rows, for a stage that reads back."""
        cis = np.unique(rows // self.rows_step)
        out = []
        for ci in cis:
            lo = int(ci) * self.rows_step
            r = rows[(rows // self.rows_step) == ci] - lo
            cur = self._current(int(ci))[r]
            out.append(cur[:, chan] if chan is not None else cur)
        if not out:
            return _take(self.old, np.zeros(0, np.int64), chan) if self.old is not None else \
                np.zeros((0,) + self.shape[1:], self.dtype)
        return np.concatenate(out)

    def finish(self) -> str | None:
        self._drain()
        if self.new is None:
            return None
        if self.old is not None:
            nci = -(-self.shape[0] // self.rows_step)
            needed = range(nci)
            if self.part.entry.get("field_ids") is not None:
                # a view's version holds the chunks of the view's rows only: the others
                # are never read through it (uvcontsub on the targets does not copy the
                # calibrators' chunks); a missing chunk reads as zeros
                needed = np.unique(self.part.select() // self.rows_step).tolist()
            missing = [ci for ci in needed if ci not in self.written]
            if missing and self.lazy:
                # the values read until now were corrected on reading: they are written
                for ci in missing:
                    lo = ci * self.rows_step
                    self.new[lo:lo + self.rows_step] = self._current(ci)
            elif missing:
                self.part.vs.copy_chunk_objects(self.old_key, self.key, _chunk_keys(self.shape, self.chunks, missing))
        return self.key


# a chunk of the calibration's gains, uncompressed: a row block's pairs read a few
GAIN_CHUNK_BYTES = 1 << 20
GAIN_CHUNKS_AT_ONCE = 16       # _GainWriter writes when it holds this many whole chunks


class _GainWriter:
    """applycal's CALIBRATION_GAIN version (npair, nant, nchan, ncorr), written in
    pair chunks as the stage puts ascending, possibly overlapping, pair ranges (a row
    block's pairs: one time's rows may straddle two blocks). Bounded memory:
    GAIN_CHUNKS_AT_ONCE chunks and the pairs put at once. `times`, `field_ids`: the
    pairs'; `pair_of_row`: each row's pair; `nant`: the antennas the gains are of."""

    def __init__(self, part: VisPartition, times: np.ndarray, field_ids: np.ndarray, nant: int, pair_key: str,
                 pair_of_row: np.ndarray):
        self.part, self.pair_key, self.pair_of_row = part, pair_key, pair_of_row
        self.times, self.field_ids, self.nant = times, field_ids, nant
        self.key = f"{part.prefix}/{CALIBRATION_GAIN}/{part.tag}"
        self.shape = (len(times), nant, part.nchan, part.ncorr)
        self.step = max(1, GAIN_CHUNK_BYTES // (nant * part.chunk_chans * part.ncorr * 8))
        self.z = part.vs.create(self.key, self.shape, (self.step, nant, part.chunk_chans, part.ncorr), "complex64")
        self.lo = 0                                       # the first pair not yet written
        self.buf = np.zeros((0,) + self.shape[1:], np.complex64)

    def put(self, first: int, gains: np.ndarray) -> None:
        """The gains of pairs first, first + 1, ...; pairs put before keep their values."""
        end = self.lo + len(self.buf)
        if first > end:
            raise VisStoreError(f"{self.part.entry['name']}: gains of pairs {end}..{first - 1} were never put")
        if gains.shape[1:] != self.shape[1:]:
            raise VisStoreError(f"{self.part.entry['name']}: gains of shape {gains.shape[1:]}, "
                                f"not {self.shape[1:]}")
        new = gains[max(0, end - first):]
        if len(new):
            self.buf = np.concatenate([self.buf, new.astype(np.complex64, copy=False)])
        whole = len(self.buf) // self.step * self.step
        if whole >= GAIN_CHUNKS_AT_ONCE * self.step:
            # many chunks in one write: zarr encodes and uploads them concurrently
            self.z[self.lo:self.lo + whole] = self.buf[:whole]
            self.buf, self.lo = self.buf[whole:], self.lo + whole

    def finish(self) -> str:
        if self.lo + len(self.buf) != self.shape[0]:
            raise VisStoreError(f"{self.part.entry['name']}: gains of {self.lo + len(self.buf)} of "
                                f"{self.shape[0]} pairs were put")
        if len(self.buf):
            self.z[self.lo:] = self.buf
        return self.key


def _chunk_keys(shape, chunks, row_chunks) -> list:
    """zarr v3's default chunk keys ("c/i/j/k") of the given row chunks, all of their
    other chunk coordinates."""
    import itertools
    others = [range(-(-s // c)) for s, c in zip(shape[1:], chunks[1:])]
    return ["c/" + "/".join(map(str, (ci,) + rest)) for ci in row_chunks for rest in itertools.product(*others)]
