"""importdata (importer service): ingest, partition by spw, summarise, assign roles."""
from __future__ import annotations

import io as io_module
import multiprocessing
import os
import shutil
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from .base import QA, Param, Score, StageError, StageIO, metric, stage
from .. import limits
from ..platform import inputs as local_inputs
from ..msio import listobs, ms as msio, storeio, uvfits


# an input tar is read and copied this many bytes at a time (tarfile's own: 10-16 KiB)
TAR_BUFFER_BYTES = 4 << 20
# a tar in the raw bucket: its headers are read this much at a time, and its files'
# bytes streamed in up to this many ranged GETs at once, none of less than MIN_STREAM_BYTES
HEADER_READ_AHEAD = 64 << 10
EXTRACT_STREAMS = 4
MIN_STREAM_BYTES = 64 << 20
# Files an input tar may carry beside the MS, as ALMA's pipeline finds them in
# its working directory; each lands in the context's user inputs.
SIDECARS = {"antennapos.csv": "antennapos", "flagtemplate.txt": "flag_template", "cont.dat": "cont_dat",
            "flux.csv": "flux_csv", "flagtargetstemplate.txt": "flagtargets_template"}


def _ms_in(dest: str, name: str) -> str:
    """The one MS directory an unpacked tar holds (beside its sidecar files), checked."""
    tops = [d for d in os.listdir(dest) if os.path.isdir(os.path.join(dest, d))]
    if len(tops) != 1:
        raise StageError(f"importdata: {name}: a tar must hold exactly one MS directory (and optionally "
                         f"{', '.join(SIDECARS)}), found {tops}")
    ms_path = os.path.join(dest, tops[0])
    try:
        msio.check_ms(ms_path)
    except msio.MSError as exc:
        raise StageError(f"importdata: {name}: {exc}") from exc
    return ms_path


def _unpack_input(path: str, workdir: str, packed_size: int = 0) -> tuple[str, str]:
    """Return (ms_path, input_format) for an MS tar or a UVFITS file. Unpacking stops at
    the limits of almapipe/limits.py (decompression bombs), with an error naming them."""
    name = os.path.basename(path)
    if uvfits.is_uvfits(path):
        ms_path = os.path.join(workdir, "input.ms")
        try:
            uvfits.uvfits_to_ms(path, ms_path)
        except limits.UnpackLimit as exc:
            raise StageError(f"importdata: {name}: {exc}") from None
        except msio.MSError as exc:
            raise StageError(f"importdata: {name}: {exc}") from exc
        return ms_path, "UVFITS"
    if tarfile.is_tarfile(path):
        dest = os.path.join(workdir, "untar")
        os.makedirs(dest, exist_ok=True)    # an empty tar extracts nothing: say so below
        with tarfile.open(path, copybufsize=TAR_BUFFER_BYTES) as tar:
            try:   # the members' sizes, before anything lands on disk
                limits.check_tar(tar, packed_size or os.path.getsize(path), f"importdata: {name}")
            except limits.UnpackLimit as exc:
                raise StageError(str(exc)) from None
            tar.extractall(dest, filter="data")
        os.unlink(path)      # the worker's copy of the upload: the disk holds the input once, not twice
        return _ms_in(dest, name), "MeasurementSet"
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:2] == b"\x1f\x8b":   # a gzip of something that is not UVFITS: maybe a .tar.gz
        raw = path + ".raw"
        try:
            limits.gunzip_bounded(path, raw, f"importdata: {name}")
        except limits.UnpackLimit as exc:
            os.unlink(raw)
            raise StageError(str(exc)) from None
        if tarfile.is_tarfile(raw):
            # the tar's ratio counts from the gzip that arrived, not from the gunzipped tar
            return _unpack_input(raw, workdir, packed_size=os.path.getsize(path))
    raise StageError(f"importdata: {name} is neither a MeasurementSet (as a tar of its directory) "
                     f"nor a UVFITS file (first bytes {head[:16]!r})")


def _is_plain_tar(head: bytes) -> bool:
    """A POSIX/GNU tar's first header: "ustar" at byte 257."""
    return len(head) >= 262 and head[257:262] == b"ustar"


class _RangeReader(io_module.RawIOBase):
    """A seekable view of an S3 object for tarfile's scan of the headers: a read fetches
    HEADER_READ_AHEAD bytes (or what it asks for) from where it is, so that a tar's
    headers cost one small GET each and its members' data are skipped, not read."""

    def __init__(self, store, bucket: str, key: str, size: int):
        self.store, self.bucket, self.key, self.size = store, bucket, key, size
        self.pos, self.buf, self.buf_at = 0, b"", 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset + (self.pos if whence == 1 else self.size if whence == 2 else 0))
        return self.pos

    def readinto(self, b) -> int:
        if self.pos >= self.size:
            return 0
        want = min(len(b), self.size - self.pos)
        if not self.buf_at <= self.pos <= self.pos + want <= self.buf_at + len(self.buf):
            # (a read is never short: tarfile takes a short header for the archive's end)
            length = min(max(want, HEADER_READ_AHEAD), self.size - self.pos)
            self.buf, self.buf_at = self.store.get_range(self.key, self.pos, length, bucket=self.bucket), self.pos
        chunk = memoryview(self.buf)[self.pos - self.buf_at:self.pos - self.buf_at + len(b)]
        if not len(chunk):             # (the object shorter than it said)
            return 0
        b[:len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def _stream_tar(io: StageIO, key: str, what: str) -> str:
    """Extract a plain tar straight from the raw bucket, without a local copy of the
    archive (the importer's disk holds the input once; a 20 GB EB would need 40 GB
    otherwise), in EXTRACT_STREAMS ranged GETs at once. Its headers are read first (a
    small GET each): the members' sizes count against the unpacking cap and each must
    pass tarfile's "data" filter before a byte is written. Then the members' data,
    cut into equal byte ranges of the archive (an MS's DATA column is one file of most
    of its bytes), are streamed into their files by parallel threads: one stream wrote
    5.5 GB in 19 s with a core idle, its time in writes to new pages of the page cache."""
    store = io.store
    size = store.client.stat_object(store.raw_bucket, key).size
    dest = os.path.join(io.workdir, "untar")
    os.makedirs(dest, exist_ok=True)
    try:
        with tarfile.open(fileobj=_RangeReader(store, store.raw_bucket, key, size), mode="r:") as tar:
            limits.check_tar(tar, size, what)        # (stops reading headers at the cap)
            members = tar.getmembers()
    except limits.UnpackLimit as exc:
        raise StageError(str(exc)) from None
    except tarfile.TarError as exc:
        raise StageError(f"{what}: not a readable tar: {exc}") from None
    checked = []
    for m in members:
        try:
            safe = tarfile.data_filter(m, dest)
        except tarfile.FilterError as exc:
            raise StageError(f"{what}: {exc}") from None
        if not (safe.isdir() or (safe.isreg() and not m.issparse())):
            raise StageError(f"{what}: member {m.name!r} is a link or a special file; an MS tar holds "
                             "directories and files")
        checked.append((m, safe, os.path.normpath(os.path.join(dest, safe.name))))
    last = {path: i for i, (_, _, path) in enumerate(checked)}    # a name given twice: the last wins
    files = []                     # (member, path) of the regular files, in the archive's order
    for i, (m, safe, path) in enumerate(checked):
        if last[path] != i:
            continue
        if safe.isdir():
            os.makedirs(path, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, safe.mode & 0o777 or 0o644)
        os.ftruncate(fd, m.size)
        os.close(fd)
        files.append((m, path))
    # the files' bytes cut into equal shares, each a run of (path, file offset, archive
    # offset, length) in the archive's order: one ranged GET a share
    total = sum(m.size for m, _ in files)
    streams = max(1, min(EXTRACT_STREAMS, os.cpu_count() or 1, -(-total // MIN_STREAM_BYTES)))
    shares, share, room = [], [], -(-total // streams) if total else 0
    for m, path in files:
        done = 0
        while done < m.size:
            n = min(m.size - done, room)
            share.append((path, done, m.offset_data + done, n))
            done += n
            room -= n
            if room == 0:
                shares.append(share)
                share, room = [], -(-total // streams)
    if share:
        shares.append(share)

    def stream(pieces):
        first, end = pieces[0][2], pieces[-1][2] + pieces[-1][3]
        resp = store.client.get_object(store.raw_bucket, key, offset=first, length=end - first)
        buf = memoryview(bytearray(TAR_BUFFER_BYTES))
        try:
            at = first
            for path, file_at, tar_at, length in pieces:
                while at < tar_at:                        # headers and padding between files
                    at += _read_into(resp, buf[:min(len(buf), tar_at - at)], what)
                fd = os.open(path, os.O_WRONLY)
                try:
                    done = 0
                    while done < length:
                        n = _read_into(resp, buf[:min(len(buf), length - done)], what)
                        os.pwrite(fd, buf[:n], file_at + done)
                        done += n
                finally:
                    os.close(fd)
                at = tar_at + length
        finally:
            resp.close()
            resp.release_conn()
    with ThreadPoolExecutor(len(shares) or 1, thread_name_prefix="untar") as pool:
        for _ in pool.map(stream, shares):
            pass
    return dest


def _read_into(resp, buf, what: str) -> int:
    """Read what an HTTP response has next into buf, up to its length (at least a byte)."""
    n = resp.readinto(buf)
    if not n:
        raise StageError(f"{what}: the archive ended early")
    return n


def _local_input(io: StageIO, key: str) -> tuple[str, str, bool]:
    """(MS path, format, read in place) of a file:// input (decision 0022). An MS
    directory is read where it lies and never written (casacore opens it read-only); a
    tar or UVFITS file is unpacked into the work directory, as one from the raw bucket."""
    try:
        path = local_inputs.local_path(key, io.store.cfg.import_roots)
    except local_inputs.InputError as exc:
        raise StageError(f"importdata: {exc}") from None
    if not os.path.isdir(path):
        return (*_unpack_input(path, io.workdir), False)
    try:
        msio.check_ms(path)
    except msio.MSError as exc:
        raise StageError(f"importdata: {os.path.basename(path)}: {exc}") from exc
    return path, "MeasurementSet", True


def _ingest(io: StageIO, ms_path: str, basename: str, spws: list) -> list:
    """Stream each spectral window of `spws` into the visibility store, spws in parallel
    processes (casacore tables are not thread-safe), each in row blocks; the subtables
    go to S3 once, as the EB's MS shell. Returns the partitions' entries."""
    shell = storeio.make_shell(ms_path, os.path.join(io.workdir, f"{basename}.meta.ms"))
    meta_key = io.put_dir(shell, os.path.basename(shell))["key"]
    tag = f"{io.stage_index:02d}_{io.stage}"
    jobs = [(io.store.cfg, ms_path, s, f"runs/{io.run_id}/vis/{basename}.spw{s}.ms", tag, meta_key,
             f"{basename}.spw{s}.ms") for s in spws]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    if workers == 1:
        results = [storeio.ingest_spw_job(*j) for j in jobs]
    else:
        # spawned, not forked: the parent's S3 client and zarr's event loop do not survive a fork
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(storeio.ingest_spw_job, *zip(*jobs)))
    entries = []
    for entry, written in results:
        io.vstore.counter.add("s3_written", written)
        entries.append(entry)
    return entries


@metric("importdata.field_roles", "whether the field roles came from the data's scan intents: 0.8 when they "
        "were inferred (calibrator names, scan pattern)")
def inferred_roles(roles_from: str) -> Score | None:
    if roles_from.startswith("heuristic"):
        return Score(0.8, "No scan intents in the data: field roles were inferred from calibrator names "
                          "and the scan pattern; check them, or give field_roles.")
    return None


@metric("importdata.intents", "whether some field has each of the intents BANDPASS, PHASE and TARGET: 0.5 when "
        "one is missing")
def missing_intents(missing: set) -> Score | None:
    if missing:
        return Score(0.5, f"No field with intent(s) {', '.join(sorted(missing))}.")
    return None


@stage("importdata", service="importer", topic="Data set", reads=("input_key", "user"),
       qa=(inferred_roles, missing_intents),
       writes=("user", "observation", "fields", "partitions", "aux_partitions", "ms_name", "input_format"), params=(
           Param("field_roles", dict, None, "intents by field name ({\"3C286\": \"FLUX,BANDPASS\"}); "
                 "none: the scan intents, else heuristics"),
           Param("name", str, "", "the MS's base name; empty: the input's")))
def importdata(ctx: dict, params: dict, io: StageIO) -> QA:
    qa = QA()
    key = ctx["input_key"]
    t0 = time.perf_counter()
    in_place = False
    if local_inputs.is_local(key):
        ms_path, fmt, in_place = _local_input(io, key)
        local = os.path.basename(key.rstrip("/"))
    elif _is_plain_tar(io.store.get_range(key, 0, 512, bucket=io.store.raw_bucket)):
        local = os.path.basename(key)
        ms_path, fmt = _ms_in(_stream_tar(io, key, f"importdata: {local}"), local), "MeasurementSet"
        if io.store.cfg.raw_retention == "imported":
            # the importer holds the EB now: the S3 copy goes before the store fills, so
            # that the disk never holds the input three times (upload, MS, store)
            io.store.remove(key, bucket=io.store.raw_bucket)
            io.log("input %s removed from the raw bucket (ALMAPIPE_RAW_RETENTION=imported)", key)
    else:                                       # UVFITS, gzip: a local file first
        local = io.fetch_raw(key)
        ms_path, fmt = _unpack_input(local, io.workdir)
    io.log("input %s %s as %s in %.1f s", os.path.basename(local), "opened in place" if in_place else "read", fmt,
           time.perf_counter() - t0)
    for fname, key in SIDECARS.items():
        side = os.path.join(os.path.dirname(ms_path), fname)
        if os.path.exists(side) and not ctx["user"].get(key):
            with open(side) as f:
                ctx["user"][key] = f.read()
            qa.note(f"Found {fname} beside the MS.")
    obs = listobs.summary(ms_path)
    try:
        fields = listobs.assign_roles(obs, params["field_roles"])
    except ValueError as exc:
        raise StageError(f"importdata: {exc}") from exc
    basename = params["name"] or os.path.basename(ctx["input_key"].rstrip("/")).split(".")[0]
    science = obs["science_spws"]
    if not science:
        kinds = ", ".join(f"{s['id']} ({s['kind']})" for s in obs["spws"])
        raise StageError(f"importdata: no science spectral window in the data (spws: {kinds})")
    wvr = [s["id"] for s in obs["spws"] if s["kind"] == "wvr" and s["id"] in
           {sid for sc in obs["scans"] for sid in sc["spws"]}]
    parts, aux = [], {}
    t0 = time.perf_counter()
    try:
        entries = _ingest(io, ms_path, basename, science + wvr[:1])
    except msio.MSError as exc:
        raise StageError(f"importdata: {exc}") from exc
    io.log("%d spws streamed into the store in %.1f s", len(entries), time.perf_counter() - t0)
    for part in entries:
        if part["spw"] in science:
            parts.append(part)
        else:
            aux["wvr"] = part
        io.count_visibilities(part["nrow"] * part["nchan"] * part["ncorr"])
    if not in_place:      # the input's local copy: the store has it now (an input in place is never touched)
        shutil.rmtree(ms_path, ignore_errors=True)
    ctx.update(partitions=parts, observation=obs, fields=fields, ms_name=basename, input_format=fmt)
    if aux:
        ctx["aux_partitions"] = aux
    others = [s for s in obs["spws"] if s["kind"] != "science"]
    if others:
        qa.note("Science spws " + ", ".join(map(str, science)) + "; not science data: " +
                ", ".join(f"{s['id']} ({s['kind']})" for s in others) + ".")
    roles_from = fields[0]["roles_from"] if fields else ""
    for f in fields:
        io.log("field %s: %s", f["name"], ",".join(f["intents"]) or "no intent")
    qa.add(inferred_roles(roles_from))
    if not roles_from.startswith("heuristic"):
        qa.note(f"Field roles from the {roles_from}.")
    missing = {"BANDPASS", "PHASE", "TARGET"} - {i for f in fields for i in f["intents"]}
    qa.add(missing_intents(missing))
    nant_data = sum(a["has_data"] for a in obs["antennas"])
    qa.note(f"{fmt}: {obs['nrows']} rows, {len(obs['scans'])} scans, {len(obs['fields'])} fields, "
            f"{len(obs['spws'])} spw(s), {nant_data} antennas with data.")
    return qa
