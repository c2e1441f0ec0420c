"""The visibility store against the real S3 server of a local stack (decision 0015):
what a stage's reads fetch and its writes create, object by object, and the worker
cache's bound."""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
import uuid

import numpy as np
import pytest

from almapipe.msio import storeio
from almapipe.platform import visstore as vst
from almapipe.platform.cache import BoundedCache
from almapipe.platform.store import CachedFetcher, ObjectStore

ROWS, CHANS = 2048, 16       # small chunks: the NGC 5921 spw (63 channels) spans several of each


@pytest.fixture(scope="module")
def s3(stack):
    _, cfg = stack
    store = ObjectStore(cfg)
    store.ensure_buckets()
    return cfg, store


@pytest.fixture(scope="module")
def ngc(s3, ngc5921_ms, tmp_path_factory):
    """NGC 5921 ingested as a partition in chunks of ROWS x CHANS, and a fetcher for its shell."""
    cfg, store = s3
    tmp = tmp_path_factory.mktemp("vs")
    run = f"vstest-{uuid.uuid4().hex[:8]}"
    shell = storeio.make_shell(ngc5921_ms, str(tmp / "ngc.meta.ms"))
    meta_key = store.put_dir(shell, f"runs/{run}/stages/00_importdata/ngc.meta.ms.tar")["key"]
    vs = vst.VisStore(cfg, cache_dir=None, cache_limit=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vst, "chunking", lambda nchan, ncorr: (ROWS, CHANS))
        entry = storeio.ingest_spw(vs, ngc5921_ms, 0, f"runs/{run}/vis/ngc.spw0.ms", "00_importdata", meta_key,
                                   "ngc.spw0.ms")
    fetcher = CachedFetcher(store, str(tmp / "dircache"), limit=0)
    work = tmp / "work"
    work.mkdir()
    return {"cfg": cfg, "store": store, "run": run, "entry": entry,
            # each partition its own folder, as each stage execution has its own workdir
            "meta": lambda key: fetcher.dir(key, tempfile.mkdtemp(dir=work)), "prefix": f"runs/{run}/vis/ngc.spw0.ms"}


def partition(ngc, tag: str, entry: dict | None = None, vs: vst.VisStore | None = None) -> vst.VisPartition:
    vs = vs or vst.VisStore(ngc["cfg"], cache_dir=None, cache_limit=0)
    return vst.VisPartition(vs, entry or ngc["entry"], tag, ngc["meta"], ngc["prefix"])


def objects(ngc, under: str = "") -> dict:
    """key -> sha256 of every object under the partition's prefix (or a part of it)."""
    store = ngc["store"]
    return {o.object_name: hashlib.sha256(store.get_bytes(o.object_name)).hexdigest()
            for o in store.list(f"{ngc['prefix']}/{under}")}


def sizes(ngc) -> dict:
    return {o.object_name: o.size for o in ngc["store"].list(ngc["prefix"] + "/")}


def test_chunk_bodies_are_hashed_into_signatures_only_off_this_machine_without_tls():
    """UNSIGNED-PAYLOAD (the signature covers the headers) to a server on this machine or
    over TLS; a body sent in the clear to another host is hashed into its signature."""
    from almapipe.platform.store import loopback
    assert loopback("127.0.0.1:16033") and loopback("localhost:9000") and loopback("[::1]:9000")
    assert not loopback("minio:9000") and not loopback("10.1.2.3:9000") and not loopback("s3.example.org:443")


def test_rows_picked_from_plain_chunk_slices_equal_zarrs_orthogonal_selection(monkeypatch):
    """_take reads the row chunks that ascending row numbers fall in as plain slices, runs
    of consecutive chunks up to SPAN_BYTES, and picks the rows: the values of zarr's
    orthogonal selection (which indexes every element through np.ix_), for sparse,
    dense and clustered rows, with and without a channel range, spans of one chunk too."""
    import zarr
    from almapipe.platform import visstore as vst
    rng = np.random.default_rng(7)
    z = zarr.create_array(store={}, shape=(20000, 64, 2), chunks=(1024, 16, 2), dtype="complex64")
    z[:] = (rng.standard_normal((20000, 64, 2)) + 1j * rng.standard_normal((20000, 64, 2))).astype(np.complex64)
    selections = [np.sort(rng.choice(20000, n, replace=False)) for n in (1, 7, 900, 12000)]
    selections += [np.concatenate([np.arange(5, 3000), np.arange(9000, 9010), [19999]])]
    for span in (vst.SPAN_BYTES, 1):
        monkeypatch.setattr(vst, "SPAN_BYTES", span)
        for sel in selections:
            for chan in (None, slice(3, 40)):
                want = np.asarray(z.get_orthogonal_selection((sel, chan or slice(None), slice(None))))
                got = vst._take(z, sel, chan)
                assert got.shape == want.shape and np.array_equal(got, want)


def test_chunks_read_and_decoded_by_the_store_equal_zarrs_reads(s3, tmp_path):
    """_read_chunks (which decodes chunk objects into the result itself) gives zarr's
    values and fetches the same objects and bytes, from S3 and then from the cache:
    LZ4 and zstd arrays of every dtype the store writes, edge chunks on every axis,
    channel ranges across chunks, a chunk never written (the fill value), no rows."""
    import zarr
    cfg, _ = s3
    rng = np.random.default_rng(3)
    prefix = f"runs/readtest-{uuid.uuid4().hex[:8]}"
    cases = [("complex64", (1000, 40, 2), (256, 16, 2)), ("complex64", (700, 24, 4), (128, 24, 4)),
             ("bool", (1000, 40, 2), (256, 16, 2)), ("float64", (999, 3), (256, 3)),
             ("float32", (500, 2), (64, 2)), ("int32", (333,), (100,))]
    for n, (dtype, shape, chunks) in enumerate(cases):
        writer = vst.VisStore(cfg, cache_dir=None, cache_limit=0)
        z = writer.create(f"{prefix}/a{n}", shape, chunks, dtype)
        values = rng.standard_normal(shape + (2,)).view(np.complex128)[..., 0] if dtype == "complex64" \
            else rng.random(shape) < 0.3 if dtype == "bool" else (rng.standard_normal(shape) * 1000)
        values = values.astype(dtype)
        z[chunks[0]:] = values[chunks[0]:]            # the first row chunk is never written
        values[:chunks[0]] = 0
        sels = [(slice(0, shape[0]),), (slice(5, 6),), (slice(chunks[0] - 3, 2 * chunks[0] + 1),),
                (slice(shape[0] - 1, shape[0]),), (slice(7, 7),)]
        if len(shape) == 3:
            sels += [(slice(0, shape[0]), slice(3, shape[1] - 1)), (slice(100, 900), slice(16, 32)),
                     (slice(0, chunks[0] * 2), slice(0, shape[1]))]
        for cached in (False, True):
            ours = vst.VisStore(cfg, cache_dir=str(tmp_path / f"c{n}") if cached else None, cache_limit=64 << 20)
            theirs = vst.VisStore(cfg, cache_dir=str(tmp_path / f"d{n}") if cached else None, cache_limit=64 << 20)
            zo, zt = ours.open(f"{prefix}/a{n}"), theirs.open(f"{prefix}/a{n}")
            for _ in range(2 if cached else 1):           # the second time from the cache
                for sel in sels:
                    got, want = vst._read_chunks(zo, sel), np.asarray(zt[sel])
                    assert got.dtype == want.dtype and got.shape == want.shape, (dtype, sel)
                    assert np.array_equal(got, want) and np.array_equal(got, values[sel]), (dtype, sel)
                assert ours.counter.as_dict() == theirs.counter.as_dict(), (dtype, cached)
    # an array of codecs the store does not write is read by zarr
    z = zarr.create_array(store={}, shape=(10, 4), chunks=(4, 4), dtype="float32",
                          compressors=zarr.codecs.GzipCodec())
    z[:] = np.arange(40, dtype=np.float32).reshape(10, 4)
    assert np.array_equal(vst._read_chunks(z, (slice(2, 9),)), np.arange(40).reshape(10, 4)[2:9])


def test_an_array_is_opened_once_per_store_until_it_is_created_again(s3):
    """VisStore.open keeps the arrays it opened to read (a key is immutable: its
    zarr.json is read once); a key created again (a retried stage) is opened anew."""
    cfg, _ = s3
    vs = vst.VisStore(cfg, cache_dir=None, cache_limit=0)
    key = f"runs/opentest-{uuid.uuid4().hex[:8]}/a"
    vs.create(key, (10, 2), (4, 2), "float32")
    z = vs.open(key)
    before = vs.counter.objects_read
    assert vs.open(key) is z and vs.counter.objects_read == before
    assert vs.open(key, keep=False) is not z            # (the store that does not cache)
    vs.create(key, (12, 2), (4, 2), "float32")
    assert vs.open(key) is not z and vs.open(key).shape == (12, 2)


def test_ingest_reads_back_as_the_ms(ngc, ngc5921_ms):
    from almapipe.msio import ms as msio
    ref = msio.read_vis(ngc5921_ms, 0)
    v = partition(ngc, "00_x").read()
    order = np.lexsort((ref.ant2, ref.ant1, ref.time))
    assert v.data.shape == ref.data.shape
    np.testing.assert_array_equal(v.data, ref.data[order])
    np.testing.assert_array_equal(v.flag, ref.flag[order])
    assert ngc["entry"]["chunks"] == [ROWS, CHANS] and ngc["entry"]["nrow"] > 5 * ROWS


def test_a_cache_write_that_fails_or_is_swept_leaves_the_count_right(tmp_path):
    """A write that raises takes its count back; a writer stalled past TMP_STALE_S whose
    temporary file a recount swept ends without error, keeps nothing, and the count is
    the folder's."""
    from almapipe.platform import cache as cache_mod
    folder = str(tmp_path / "c")
    cache = BoundedCache(folder, 5_000_000)
    cache.fill("kept", b"k" * 1000)

    def failing(f):
        f.write(b"x" * 500)
        raise OSError("disk full")
    with pytest.raises(OSError):
        cache._put("a", 500, failing, replace=False)
    assert "a" not in cache and int(open(tmp_path / "c" / ".size").read()) == cache.held() == 1000

    def stalled(f):
        f.write(b"y" * 700)
        f.flush()
        old = time.time() - cache_mod.TMP_STALE_S - 1
        os.utime(f.name, (old, old))
        BoundedCache(folder, 5_000_000)          # another process's recount sweeps it
    cache._put("b", 700, stalled, replace=False)
    assert "b" not in cache and int(open(tmp_path / "c" / ".size").read()) == cache.held() == 1000


def test_importdata_records_the_rows_with_zeros_and_clipping_them_reads_only_theirs(s3, ngc5921_ms, tmp_path):
    """ingest_spw lists the rows holding an exactly zero visibility (one sample or all of
    them); flagdata's zero clipping then finds the same samples as a pass over all the
    data, reading the data of those rows' chunks only. An entry whose VISIBILITY is not
    the version the list was made for has no list (the stage reads the data)."""
    import shutil
    import casacore.tables as ct
    from almapipe.stages.flagging import _zeros
    cfg, _ = s3
    ms = str(tmp_path / "zeros.ms")
    shutil.copytree(ngc5921_ms, ms)
    with ct.table(ms, readonly=False, ack=False) as t:
        for row, chans in ((10, slice(5, 6)), (11, slice(0, 63)), (9000, slice(20, 22))):
            d = t.getcell("DATA", row)
            d[chans, :1] = 0
            t.putcell("DATA", row, d)
    prefix = f"runs/zeros-{uuid.uuid4().hex[:8]}/vis/z.spw0.ms"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vst, "chunking", lambda nchan, ncorr: (ROWS, CHANS))
        entry = storeio.ingest_spw(vst.VisStore(cfg, cache_dir=None, cache_limit=0), ms, 0, prefix,
                                   "00_importdata", "unused", "z.spw0.ms")
    everything = vst.VisPartition(vst.VisStore(cfg, cache_dir=None, cache_limit=0), entry, "01_x", lambda key: ms, prefix)
    v = everything.read()
    want = np.flatnonzero((v.data == 0).any(axis=(1, 2)))
    assert len(want) == 3 and np.array_equal(everything.zero_rows(), want)

    vs = vst.VisStore(cfg, cache_dir=None, cache_limit=0)
    p = vst.VisPartition(vs, entry, "01_x", lambda key: ms, prefix)
    rows = p.zero_rows()
    found = np.concatenate([_zeros(p, b, rows) for b in p.blocks(data=False, block_chunks=4)])
    assert np.array_equal(found, v.data == 0)
    full = vst.VisStore(cfg, cache_dir=None, cache_limit=0)
    for _ in vst.VisPartition(full, entry, "01_x", lambda key: ms, prefix).blocks(block_chunks=4):
        pass
    assert vs.counter.s3_read < 0.4 * full.counter.s3_read      # flags, index arrays, two data chunks

    moved = dict(entry, arrays=dict(entry["arrays"], VISIBILITY=f"{prefix}/VISIBILITY/05_other"))
    assert vst.VisPartition(vs, moved, "01_x", lambda key: ms, prefix).zero_rows() is None
    contsub = dict(entry, arrays=dict(entry["arrays"], CONTINUUM_FIT=f"{prefix}/CONTINUUM_FIT/06_uvcontsub"))
    assert vst.VisPartition(vs, contsub, "01_x", lambda key: ms, prefix).zero_rows() is None


def test_the_chunk_cache_is_warmed_with_a_runs_visibilities_once(ngc, tmp_path):
    """CacheWarmer fetches every VISIBILITY chunk of the context's partitions into the
    chunk cache, in a process of its own, counted in no stage's bytes; once per run and
    version; not where the visibilities would fill over WARM_SHARE of the cache."""
    import itertools
    from almapipe.platform.warmup import CacheWarmer
    vs = vst.VisStore(ngc["cfg"], cache_dir=str(tmp_path / "chunks"), cache_limit=256 << 20)
    ctx = {"partitions": [ngc["entry"]]}
    warmer = CacheWarmer()
    assert warmer.start(vs, ngc["cfg"], ctx, "run-a")
    warmer.process.join(120)
    z = vs.open(ngc["entry"]["arrays"]["VISIBILITY"])
    keys = [f"{z.store_path.path}/{z.metadata.encode_chunk_key(cc)}"
            for cc in itertools.product(*[range(-(-n // c)) for n, c in zip(z.shape, z.chunks)])]
    assert len(keys) > 4 and all(k in vs.cache for k in keys)
    assert vs.counter.s3_read < 10_000                    # (the test's own open of the array)
    assert not warmer.start(vs, ngc["cfg"], ctx, "run-a")     # done once
    assert not [n for n in os.listdir(tmp_path / "chunks") if n.startswith(".warm-")]   # its lock file went
    small = vst.VisStore(ngc["cfg"], cache_dir=str(tmp_path / "small"), cache_limit=1 << 20)
    assert not CacheWarmer().start(small, ngc["cfg"], ctx, "run-a")   # would not fit


def test_a_flag_write_creates_flag_objects_only(ngc):
    part = partition(ngc, "10_flagtest")
    before = set(objects(ngc))
    v = part.read(data=False)
    rows = v.rows[(v.ant1 == 3) | (v.ant2 == 3)]           # one antenna: rows in every row chunk
    part.write_flags(rows, np.ones((len(rows), part.nchan, part.ncorr), bool))
    new = part.commit()
    created = set(objects(ngc)) - before
    assert created and all(k.startswith(f"{ngc['prefix']}/FLAG/10_flagtest/") for k in created)
    changed = {a for a in new["arrays"] if new["arrays"][a] != ngc["entry"]["arrays"][a]}
    assert changed == {"FLAG"}
    assert partition(ngc, "11_x", new).read_rows(rows, data=False).flag.all()


def test_writing_the_stored_values_writes_nothing(ngc):
    vs = vst.VisStore(ngc["cfg"], cache_dir=None, cache_limit=0)
    part = partition(ngc, "12_same", vs=vs)
    before = set(objects(ngc))
    v = part.read()
    part.write("DATA", v.rows, v.data)
    part.write_flags(v.rows[:100], v.flag[:100])
    part.write("WEIGHT", v.rows, v.weight)
    assert part.commit() == ngc["entry"]
    assert vs.counter.objects_written == 0 and set(objects(ngc)) == before


def test_values_the_stage_read_are_compared_without_reading_them_again(ngc):
    """write(..., before=what the stage read): an unchanged chunk is still not written,
    a changed one is, and the stored values are not read back to tell."""
    vs = vst.VisStore(ngc["cfg"], cache_dir=None, cache_limit=0)
    part = partition(ngc, "12_before", vs=vs)
    blocks = list(part.blocks(data=False))
    read = vs.counter.objects_read
    for k, b in enumerate(blocks):
        flag = b.flag.copy()
        if k == 1:
            flag[:, 3] = True
        part.write_flags(b.rows, flag, before=b.flag)
    # no chunk read back to compare (without `before`, each of the blocks' chunks would
    # be): what is read is the arrays' metadata
    assert vs.counter.objects_read - read < len(blocks)
    entry = part.commit()
    # one row chunk's channel chunks (and the array's metadata): the others are copied
    assert 0 < vs.counter.objects_written <= -(-part.nchan // CHANS) + 1 < len(blocks)
    again = partition(ngc, "12_x", entry).read(data=False)
    np.testing.assert_array_equal(again.flag[:, 3][blocks[0].rows.size:][:blocks[1].rows.size], True)
    np.testing.assert_array_equal(again.flag[:blocks[0].rows.size], blocks[0].flag)


def test_a_retried_write_rewrites_the_same_keys_with_the_same_bytes(ngc):
    def attempt():
        part = partition(ngc, "13_retry")
        v = part.read()
        rows = v.rows[v.scan == v.scan.max()]
        corrected = (v.data[np.isin(v.rows, rows)] * 2).astype(np.complex64)
        part.write("CORRECTED_DATA", rows, corrected)         # a new array: first version
        part.write("WEIGHT", rows, np.full((len(rows), part.ncorr), 0.5, np.float32))
        return part.commit()

    first = attempt()
    got = objects(ngc, "VISIBILITY_CORRECTED/13_retry") | objects(ngc, "WEIGHT/13_retry")
    second = attempt()
    assert second == first
    assert objects(ngc, "VISIBILITY_CORRECTED/13_retry") | objects(ngc, "WEIGHT/13_retry") == got
    assert any("/c/" in k for k in got)


def test_partial_row_writes_copy_the_untouched_chunks_and_read_back(ngc):
    vs = vst.VisStore(ngc["cfg"], cache_dir=None, cache_limit=0)
    part = partition(ngc, "14_partial", vs=vs)
    old = part.read()
    nrow = part.nrow
    nchunks = -(-nrow // ROWS)
    # rows of row chunks 1 and 3 only, a few rows each, some straddling no boundary
    rows = np.r_[np.arange(ROWS + 5, ROWS + 50), np.arange(3 * ROWS, 3 * ROWS + 7)]
    flags = np.zeros((len(rows), part.nchan, part.ncorr), bool)
    flags[:, 10:30] = True
    part.write_flags(rows, flags)
    new = part.commit()
    key = new["arrays"]["FLAG"]
    assert key == f"{ngc['prefix']}/FLAG/14_partial"
    # written: 2 row chunks x 4 channel chunks; copied server-side: the others
    nchan_chunks = -(-part.nchan // CHANS)
    assert vs.counter.objects_written == 2 * nchan_chunks + 1          # + zarr.json
    stored = {k.rsplit("/c/", 1)[1] for k in objects(ngc, "FLAG/14_partial/") if "/c/" in k}
    assert len(stored) == nchunks * nchan_chunks
    back = partition(ngc, "15_x", new).read()
    expect = old.flag.copy()
    expect[rows] = flags
    np.testing.assert_array_equal(back.flag, expect)
    np.testing.assert_array_equal(back.data, old.data)
    # the untouched chunks are the old version's bytes
    old_objs, new_objs = objects(ngc, "FLAG/00_importdata/"), objects(ngc, "FLAG/14_partial/")
    for ci in set(range(nchunks)) - {1, 3}:
        for cj in range(nchan_chunks):
            tail = f"c/{ci}/{cj}/0"
            assert new_objs[f"{key}/{tail}"] == old_objs[f"{ngc['entry']['arrays']['FLAG']}/{tail}"]


def test_floats_are_stored_as_shuffled_lz4_and_a_new_version_keeps_its_predecessors_codec(ngc):
    """Visibilities and weights: Blosc LZ4 with a byte shuffle; flags: zstd. A version
    written after an older one takes that one's codec (an array stored by an earlier
    release as zstd), since its unchanged chunk objects are copied into it as they are."""
    from zarr.codecs import BloscCodec, ZstdCodec
    vs = vst.VisStore(ngc["cfg"], cache_dir=None, cache_limit=0)
    arrays = ngc["entry"]["arrays"]
    codec = {name: type(vs.open(arrays[name]).compressors[0]) for name in ("VISIBILITY", "WEIGHT", "FLAG")}
    assert codec == {"VISIBILITY": BloscCodec, "WEIGHT": BloscCodec, "FLAG": ZstdCodec}
    weight = vs.open(arrays["WEIGHT"])
    old_key = f"{ngc['prefix']}/WEIGHT/00_zstd"
    z = vs.create(old_key, weight.shape, weight.chunks, str(weight.dtype), compressors=ZstdCodec(level=1))
    z[:] = weight[:]
    entry = dict(ngc["entry"], arrays=dict(arrays, WEIGHT=old_key))
    vs = vst.VisStore(ngc["cfg"], cache_dir=None, cache_limit=0)           # its counter from here
    part = partition(ngc, "16_codec", entry, vs)
    rows = np.arange(ROWS + 3, ROWS + 40)
    part.write("WEIGHT", rows, np.full((len(rows), part.ncorr), 7.0, np.float32))
    new = part.commit()
    assert vs.counter.objects_written < -(-part.nrow // ROWS)           # the other chunks copied
    stored = vs.open(new["arrays"]["WEIGHT"])
    assert type(stored.compressors[0]) is ZstdCodec
    expect = np.asarray(weight[:]).copy()
    expect[rows] = 7.0
    np.testing.assert_array_equal(np.asarray(stored[:]), expect)


def test_a_channel_range_fetches_only_its_chunks(ngc):
    vs = vst.VisStore(ngc["cfg"], cache_dir=None, cache_limit=0)
    part = partition(ngc, "16_x", vs=vs)
    part.read(data=False, chan=slice(0, 1))      # the index arrays (read whole once) and the shell
    size = sizes(ngc)
    arrays = ngc["entry"]["arrays"]
    start = vs.counter.as_dict()
    part.read(chan=slice(CHANS, 2 * CHANS))      # channel chunk 1 exactly
    got = {k: vs.counter.as_dict()[k] - start[k] for k in start}
    nchunks = -(-part.nrow // ROWS)
    wanted = [f"{arrays[a]}/c/{ci}/1/0" for a in ("VISIBILITY", "FLAG") for ci in range(nchunks)]
    wanted += [f"{arrays[a]}/c/{ci}/0" for a in ("UVW", "WEIGHT") for ci in range(nchunks)]
    wanted += [f"{arrays['VISIBILITY']}/zarr.json"]     # the others were opened by the first read
    assert got["objects_read"] == len(wanted)
    assert got["s3_read"] == sum(size[k] for k in wanted)
    # a channel range across a chunk boundary reads both chunks, no more
    start = vs.counter.as_dict()
    part.read(chan=slice(CHANS - 2, CHANS + 2))
    assert vs.counter.objects_read - start["objects_read"] == 2 * 2 * nchunks + 2 * nchunks


def test_read_your_writes_within_a_stage(ngc):
    part = partition(ngc, "17_ryw")
    v = part.read(field_ids=[1])
    rows = v.rows[::3]
    part.write_flags(rows, np.ones((len(rows), part.nchan, part.ncorr), bool))
    part.write("CORRECTED_DATA", v.rows, v.data * 3)
    again = part.read(column="CORRECTED_DATA", field_ids=[1])
    np.testing.assert_array_equal(again.data, v.data * 3)
    assert again.flag[::3].all()
    np.testing.assert_array_equal(again.flag[1::3], v.flag[1::3])
    blocks = list(part.blocks(column="CORRECTED_DATA", field_ids=[1]))
    np.testing.assert_array_equal(np.concatenate([b.flag for b in blocks]), again.flag)
    part.commit()
    after = part.read(column="CORRECTED_DATA", field_ids=[1], chan=slice(5, 9))
    np.testing.assert_array_equal(after.data, v.data[:, 5:9] * 3)
    assert after.flag[::3].all()


def test_a_continuum_fit_is_what_uvcontsub_writes_and_the_view_reads_subtracted(ngc):
    """A continuum-subtracted view writes only CONTINUUM_FIT (a few coefficients a row,
    not a second copy of the data); its DATA read back, whole and in a channel range,
    as VISIBILITY minus the fit, and cannot be written."""
    vs = vst.VisStore(ngc["cfg"], cache_dir=None, cache_limit=0)
    view = dict(ngc["entry"], field_ids=[2], name="ngc.spw0.contsub.ms")
    part = partition(ngc, "18_contsub", view, vs)
    v = part.read()
    fit = np.zeros((len(v.rows), vst.FIT_TERMS, part.ncorr), np.complex64)
    fit[:, 0] = v.data[:, 5:15].mean(axis=1)                 # order 1: a level and a slope
    fit[:, 1] = 0.01 * fit[:, 0]
    part.write(vst.CONTINUUM_FIT, v.rows, fit)
    new = part.commit()
    assert {a for a in new["arrays"] if new["arrays"][a] != view["arrays"].get(a)} == {vst.CONTINUUM_FIT}
    written = sum(n for k, n in sizes(ngc).items() if f"/{vst.CONTINUUM_FIT}/18_contsub/" in k)
    data_bytes = sum(n for k, n in sizes(ngc).items() if k.startswith(ngc["entry"]["arrays"]["VISIBILITY"] + "/"))
    assert 0 < written < 0.1 * data_bytes
    x = np.linspace(-1, 1, part.nchan)[None, :, None]
    want = v.data - fit[:, None, 0] - fit[:, None, 1] * x
    sub = partition(ngc, "19_x", new).read()
    np.testing.assert_allclose(sub.data, want, atol=1e-4 * np.abs(v.data).max())
    np.testing.assert_array_equal(sub.flag, v.flag)
    piece = partition(ngc, "19_x", new).read(chan=slice(CHANS, 2 * CHANS))
    np.testing.assert_allclose(piece.data, want[:, CHANS:2 * CHANS], atol=1e-4 * np.abs(v.data).max())
    with pytest.raises(vst.VisStoreError, match="continuum-subtracted"):
        partition(ngc, "20_x", new).write("DATA", v.rows[:3], v.data[:3])


def test_chunks_written_twice_and_a_second_pass_after_commit(ngc, tmp_path):
    """Through a worker cache: two writes into one chunk both count (the cache holds the
    second), and a second pass after commit adds to the stage's version instead of
    recreating it."""
    vs = vst.VisStore(ngc["cfg"], cache_dir=str(tmp_path / "c"), cache_limit=64 << 20)
    part = partition(ngc, "19_twopass", vs=vs)
    old = part.read(data=False)
    ones = lambda rows: np.ones((len(rows), part.nchan, part.ncorr), bool)       # noqa: E731
    a, b, c = np.arange(0, 10), np.arange(10, 20), np.arange(ROWS + 3, 3 * ROWS + 3, 7)
    part.write_flags(a, ones(a))
    part.write_flags(b, ones(b))                       # the same row chunk again
    assert part.read_rows(np.r_[a, b], data=False).flag.all()
    first = part.commit()
    part.write_flags(c, ones(c))                       # a second pass, chunks 1 to 3
    second = part.commit()
    assert first["arrays"]["FLAG"] == second["arrays"]["FLAG"] == f"{ngc['prefix']}/FLAG/19_twopass"
    expect = old.flag.copy()
    for rows in (a, b, c):
        expect[rows] = True
    for reader in (part, partition(ngc, "20_x", second)):          # cached and from S3
        np.testing.assert_array_equal(reader.read(data=False).flag, expect)


def test_reading_ahead_and_writing_behind_give_what_one_block_at_a_time_gives(ngc, tmp_path):
    """A stage's pass with the next block read in a thread and its writes made in one
    (VisStore.overlap, the default) reads the same blocks and writes the same arrays as
    one block at a time in the stage's thread (ALMAPIPE_IO_OVERLAP=0); a write that fails
    behind the stage fails its commit."""
    from dataclasses import replace
    passes = {}
    for overlap in (False, True):
        vs = vst.VisStore(replace(ngc["cfg"], io_overlap=overlap), cache_dir=str(tmp_path / f"c{overlap}"),
                          cache_limit=64 << 20)
        assert vs.overlap is overlap
        part = partition(ngc, f"21_overlap{int(overlap)}", vs=vs)
        seen = []
        for blk in part.blocks(field_ids=[1, 2], block_chunks=1):
            seen.append(blk)
            flags = blk.flag | (np.abs(blk.data) > np.median(np.abs(blk.data)))
            part.write("CORRECTED_DATA", blk.rows, blk.data * 2)
            part.write_flags(blk.rows, flags)
        assert len(seen) > 3                              # several blocks: something was read ahead
        entry = part.commit()
        back = partition(ngc, "22_x", entry).read(column="CORRECTED_DATA", field_ids=[1, 2])
        passes[overlap] = (seen, back)
    (one, back_one), (ahead, back_ahead) = passes[False], passes[True]
    for a, b in zip(one, ahead):
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.flag, b.flag)
    np.testing.assert_array_equal(back_one.data, back_ahead.data)
    np.testing.assert_array_equal(back_one.flag, back_ahead.flag)

    class Unwritable:
        shape = ()

        def __setitem__(self, key, value):
            raise OSError("S3 answered 500")
    part = partition(ngc, "23_failing")
    v = part.read(field_ids=[1])
    part.write("CORRECTED_DATA", v.rows[:10], v.data[:10])
    part._writers["CORRECTED_DATA"].new = Unwritable()
    part.write("CORRECTED_DATA", v.rows[-10:], v.data[-10:])   # another chunk, written behind
    with pytest.raises(OSError, match="S3 answered 500"):
        part.commit()


# ------------------------------------------------------------------ the worker cache

def test_the_chunk_cache_never_exceeds_its_limit(ngc, tmp_path):
    """A stage reads the partition (about 24 MB of chunks) through a 4 MB cache, twice,
    with two workers (two caches on one folder) at once; the folder is watched all along."""
    limit = 4 << 20
    folder = str(tmp_path / "chunks")
    stores = [vst.VisStore(ngc["cfg"], cache_dir=folder, cache_limit=limit) for _ in range(2)]
    peak, done = [0], threading.Event()

    def held():       # objects and writes under way (temporary files), as a disk sees them
        total = 0
        # under the cache's lock, as every renaming and deleting in the folder is: a scan
        # beside a rename may list an object under both its names
        with stores[0].cache._locked():
            names = list(os.scandir(folder))
        for e in names:
            if not e.name.startswith("."):
                try:
                    total += e.stat().st_size
                except FileNotFoundError:         # evicted, or renamed into place
                    pass
        return total

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], held())

    def stage(vs, out):
        part = partition(ngc, "18_x", vs=vs)
        for _ in range(2):             # in row chunks, each kept (a pass of blocks would not be)
            out.append(sum(int(b.flag.sum()) + b.data.size
                           for b in (part.read_rows(np.arange(lo, min(lo + ROWS, part.nrow)))
                                     for lo in range(0, part.nrow, ROWS))))

    watcher = threading.Thread(target=watch)
    watcher.start()
    results = [[], []]
    try:
        workers = [threading.Thread(target=stage, args=(vs, out)) for vs, out in zip(stores, results)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        done.set()
        watcher.join()
    read = sum(vs.counter.s3_read + vs.counter.cache_read for vs in stores)
    assert read > 8 * limit                     # the stages read far more than the cache holds
    assert 0 < peak[0] <= limit
    assert stores[0].cache.held() <= limit
    assert results[0] == results[1] and len(set(results[0])) == 1      # and read right


def test_a_stage_that_cycles_through_more_than_the_cache_keeps_the_first_part(tmp_path):
    """makeimages reads a target's spws once per image, more than the cache holds: under
    plain LRU every read evicts what the next pass needs first, and nothing is ever hit.
    The cache evicts what earlier stages used, never what this stage used; an object
    that finds no other room is not kept, and each later pass hits what stayed."""
    size, n = 100_000, 15                       # a pass of 15 objects through room for 10

    def used_before(cache, prefix, count):      # last used 10 s ago, whatever the clock's tick
        t = time.time() - 10
        for k in range(count):
            if f"{prefix}{k}" in cache:
                os.utime(cache._path(f"{prefix}{k}"), (t, t))

    def passes(cache, stage_begins: bool):
        for k in range(5):                      # an earlier stage's objects
            cache.fill(f"old/{k}", bytes(size))
        used_before(cache, "old/", 5)
        if stage_begins:
            cache.begin_stage()
        hits = []
        for _ in range(3):
            hit = 0
            for k in range(n):
                if cache.get(f"spw/{k}") is not None:
                    hit += 1
                else:
                    cache.fill(f"spw/{k}", bytes(size))
                assert cache.held() <= cache.limit
            hits.append(hit)
        return hits

    lru = passes(BoundedCache(str(tmp_path / "lru"), 10 * size), stage_begins=False)
    assert lru[0] == 0 and max(lru[1:]) < 10   # (objects of one clock tick go in any order)
    cache = BoundedCache(str(tmp_path / "stage"), 10 * size)
    assert passes(cache, stage_begins=True) == [0, 10, 10]
    assert not any(f"old/{k}" in cache for k in range(5))       # the earlier stage's went first
    # a new stage: what the last one kept (used before it began) may now go
    used_before(cache, "spw/", n)
    cache.begin_stage()
    cache.fill("next/0", bytes(size))
    assert "next/0" in cache and sum(f"spw/{k}" in cache for k in range(n)) < 10


def test_a_pass_larger_than_the_cache_reads_and_writes_past_it(ngc, tmp_path):
    """A pass of blocks over more visibilities than the cache holds keeps none of them
    (least recently used, it would only evict what a later read could use), nor does a
    version of a visibility cube larger than the cache; flags, weights and uvw are kept,
    and a pass that fits is kept whole. What was cached before is still read from it."""
    part_bytes = ngc["entry"]["nrow"] * ngc["entry"]["nchan"] * ngc["entry"]["ncorr"] * 8
    vis_key = ngc["entry"]["arrays"]["VISIBILITY"]

    def cached_under(vs, prefix):
        return {k for k in objects(ngc) if k.startswith(prefix + "/") and k in vs.cache}

    small = vst.VisStore(ngc["cfg"], cache_dir=str(tmp_path / "small"), cache_limit=part_bytes // 2)
    part = partition(ngc, "21_pass", vs=small)
    data = np.concatenate([b.data for b in part.blocks()])
    assert not cached_under(small, vis_key)
    assert cached_under(small, ngc["entry"]["arrays"]["FLAG"]) and cached_under(small, ngc["entry"]["arrays"]["UVW"])
    part.write("CORRECTED_DATA", np.arange(part.nrow), data * 2)
    new = part.commit()
    assert not cached_under(small, new["arrays"]["VISIBILITY_CORRECTED"])
    back = partition(ngc, "22_x", new, small).read(column="CORRECTED_DATA")
    np.testing.assert_array_equal(back.data, data * 2)
    assert not cached_under(small, new["arrays"]["VISIBILITY_CORRECTED"])
    # one field's rows fit: kept, and read from the cache the second time
    rows = part.select([0])
    assert small.keeps(len(rows) * part.nchan * part.ncorr * 8)
    first = np.concatenate([b.data for b in part.blocks(field_ids=[0])])
    assert cached_under(small, vis_key)
    before = small.counter.as_dict()
    np.testing.assert_array_equal(np.concatenate([b.data for b in part.blocks(field_ids=[0])]), first)
    assert small.counter.s3_read == before["s3_read"] and small.counter.cache_read > before["cache_read"]
    # a cache that holds the partition keeps the whole pass
    large = vst.VisStore(ngc["cfg"], cache_dir=str(tmp_path / "large"), cache_limit=4 * part_bytes)
    list(partition(ngc, "23_x", vs=large).blocks())
    nchunks = -(-ngc["entry"]["nrow"] // ROWS) * -(-ngc["entry"]["nchan"] // CHANS)
    assert len({k for k in cached_under(large, vis_key) if "/c/" in k}) == nchunks


def test_the_directory_cache_is_bounded_and_unpacks_private_copies(s3, tmp_path):
    cfg, store = s3
    keys = []
    for i in range(6):                          # six 200 kB directories through a 1 MB cache
        d = tmp_path / "src" / f"t{i}.tbl"
        d.mkdir(parents=True)
        (d / "table.f0").write_bytes(np.random.default_rng(i).bytes(200_000))
        keys.append(store.put_dir(str(d), f"runs/dircache-{uuid.uuid4().hex[:6]}/t{i}.tbl.tar")["key"])
    fetcher = CachedFetcher(store, str(tmp_path / "cache"), limit=1 << 20)
    work = tmp_path / "work"
    work.mkdir()
    for rnd in range(2):
        for i, key in enumerate(keys):
            path = fetcher.dir(key, str(work))
            assert open(os.path.join(path, "table.f0"), "rb").read() == \
                np.random.default_rng(i).bytes(200_000)
            assert fetcher.cache.held() <= 1 << 20
    assert keys[-1] in fetcher.cache and keys[0] not in fetcher.cache     # least recently used went
    # a killed writer's temporary file is swept; .size is recounted
    open(os.path.join(fetcher.cache_dir, "x.12345.tmp"), "wb").write(b"x" * 1000)
    again = BoundedCache(fetcher.cache_dir, 1 << 20)
    assert not os.path.exists(os.path.join(fetcher.cache_dir, "x.12345.tmp"))
    assert int(open(os.path.join(fetcher.cache_dir, ".size")).read()) == again.held()


def test_cache_writes_run_side_by_side_and_are_counted_while_under_way(tmp_path):
    """Two threads' cache fills are written at the same time (each waits inside its write
    for the other: written under the lock, they would wait for ever); while they are under
    way their bytes count against the limit, and a third fill that would go over it makes
    room or is not kept. A killed writer's temporary file counts until it has not been
    written to for TMP_STALE_S, then a recount sweeps it."""
    from almapipe.platform import cache as cache_mod
    cache = BoundedCache(str(tmp_path / "c"), 5_000_000)
    both_writing = threading.Barrier(2, timeout=20)
    seen = []

    def fill(key):
        def write(f):
            f.write(b"x" * 1_000_000)
            both_writing.wait()                 # the other thread's write is under way too
            seen.append(cache.held())
        cache._put(key, 1_000_000, write, replace=False)

    threads = [threading.Thread(target=fill, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [2_000_000, 2_000_000]       # both counted, both written at once
    assert "a" in cache and "b" in cache and cache.held() == 2_000_000
    assert int(open(tmp_path / "c" / ".size").read()) == 2_000_000
    cache.fill("a", b"y" * 1_000_000)           # already there: kept as it was
    assert cache.get("a") == b"x" * 1_000_000

    # a write under way of a process that was killed: counted while fresh, swept when stale
    left = tmp_path / "c" / f"{'0' * 40}.999-1.1500000.tmp"
    left.write_bytes(b"z" * 10)
    assert BoundedCache(str(tmp_path / "c"), 10_000_000).held() == 3_500_000
    old = time.time() - cache_mod.TMP_STALE_S - 1
    os.utime(left, (old, old))
    again = BoundedCache(str(tmp_path / "c"), 10_000_000)
    assert not left.exists() and again.held() == 2_000_000


def test_a_range_longer_than_s3s_largest_part_is_copied_in_equal_parts():
    """compose_object would cut a range over 5 GiB into 5 GiB parts and a remainder that
    may be shorter than S3 allows: assemble's sources are equal parts within the limits."""
    from almapipe.platform.store import MAX_PART_BYTES, MIN_PART_BYTES, _sources
    for length in (MIN_PART_BYTES, MAX_PART_BYTES, MAX_PART_BYTES + 1, 11 * 2**30 + 3):
        src = _sources("b", "k", 100, length)
        assert src[0].offset == 100 and sum(s.length for s in src) == length
        assert all(a.offset + a.length == b.offset for a, b in zip(src[:-1], src[1:]))
        assert all(MIN_PART_BYTES <= s.length <= MAX_PART_BYTES for s in src)
    assert len(_sources("b", "k", 0, MAX_PART_BYTES + 1)) == 2


def test_an_object_assembled_from_stored_ranges_is_their_bytes_with_their_sha256(s3):
    """ObjectStore.assemble (a joined cube's FITS products): a header, stored ranges long
    enough to be copied by the server, a short one between them, a plane repeated 600
    times and a short tail make one object of exactly those bytes, its sha256 in the
    entry and the object's metadata; the server copied the long ranges and the repeated
    units, and no temporary part is left."""
    from almapipe.platform.store import MIN_PART_BYTES, REPEAT_UNIT_BYTES, Range, Repeat, StoreError, Stream
    cfg, store = s3
    rng = np.random.default_rng(3)
    run = f"runs/assemble-{uuid.uuid4().hex[:6]}"
    slabs = [rng.bytes(n) for n in (MIN_PART_BYTES + 7, 100, MIN_PART_BYTES + 1, 3 << 20, 2 * MIN_PART_BYTES)]
    for k, b in enumerate(slabs):
        store.put_bytes(f"{run}/slab{k}", b)
    head, plane = b"H" * 2880, rng.bytes(65536)
    segments = [head, *(Range(f"{run}/slab{k}", 0, len(b)) for k, b in enumerate(slabs)),
                Range(f"{run}/slab0", 11, 17), Repeat(plane, 600), Stream([b"ab", memoryview(b"cd")], 4), b"\0" * 123]
    want = head + b"".join(slabs) + slabs[0][11:28] + plane * 600 + b"abcd" + b"\0" * 123
    entry = store.assemble(f"{run}/whole.fits", segments)
    assert store.get_bytes(f"{run}/whole.fits") == want
    assert entry["size"] == len(want) and entry["sha256"] == hashlib.sha256(want).hexdigest()
    assert store.client.stat_object(store.bucket, f"{run}/whole.fits").metadata["x-amz-meta-sha256"] == entry["sha256"]
    # copied: slab2; slab4 but what the short slab3 lacks of 5 MiB; of the 300 planes, the
    # 600 planes, two 16 MiB units of 256 (the first less what the 17 bytes' part lacks of
    # 5 MiB). Uploaded: the header with slab0 (the rest of slab0 too short to copy) and
    # slab1, and the last 88 planes with the tail
    assert entry["copied"] == len(slabs[2]) + len(slabs[4]) - (MIN_PART_BYTES - len(slabs[3])) + \
        2 * 256 * len(plane) - (MIN_PART_BYTES - 17), entry
    assert sorted(o.object_name for o in store.list(run + "/")) == [f"{run}/slab{k}" for k in range(5)] + \
        [f"{run}/whole.fits"]
    # more parts than S3 takes: refused before anything is read or composed
    with pytest.raises(StoreError, match="10001 parts, more than S3's 10000"):
        store.assemble(f"{run}/huge", [Repeat(bytes(REPEAT_UNIT_BYTES), 10001)])
    assert not store.exists(f"{run}/huge")
    # all of it short: one part, uploaded
    entry = store.assemble(f"{run}/small", [b"x" * 10, Range(f"{run}/slab1", 10, 50)])
    assert store.get_bytes(f"{run}/small") == b"x" * 10 + slabs[1][10:60] and entry["copied"] == 0


@pytest.mark.parametrize("slice_bytes", [1, None])
def test_flagtargets_in_channel_slices_flags_as_the_whole_partition_would(ngc, tmp_path, monkeypatch, slice_bytes):
    """flagtargets spills the target amplitudes channel-major to disk and finds the outliers
    one channel slice at a time (bounded memory): with slices of one channel, the flags it
    writes equal uv_outliers on the whole partition in memory, burst rows flagged whole.
    With its own budget (None), one slice holds all channels and nothing goes to disk."""
    import types
    from almapipe.heuristics.outliers import uv_outliers
    from almapipe.stages import outlierflag
    target = 2                                             # N5921
    p = partition(ngc, "20_applycal")
    v = p.read(field_ids=[target])
    data = v.data.copy()
    burst = (v.ant1 == 1) & (v.ant2 == 5) & (v.time >= v.time[0] + 600) & (v.time <= v.time[0] + 900)
    data[burst] += 50 * np.median(np.abs(data))
    p.write("CORRECTED_DATA", v.rows, data)
    entry = p.commit()

    expected = v.flag.copy()
    cross = v.ant1 != v.ant2
    expected[cross] |= uv_outliers(np.abs(data[cross]).astype(np.float32), v.flag[cross],
                                               np.hypot(v.uvw[cross, 0], v.uvw[cross, 1]))
    assert expected[burst].all()

    if slice_bytes is not None:
        monkeypatch.setattr(outlierflag, "SLICE_BYTES", slice_bytes)    # one channel per slice
    p = partition(ngc, "21_flagtargets", entry)
    ctx = {"observation": {"antennas": []}, "fields": [{"id": target, "name": "N5921_2"}]}
    params = {"nbins": 10, "nsigma_high": 12.0, "nsigma_low": 13.0}
    io = types.SimpleNamespace(count_visibilities=lambda n: None, log=lambda *a: None)
    counts = {"template": 0, "outliers": 0, "samples": 0, "before": 0}
    per_field: dict = {}
    assert outlierflag._flag_targets_in(p, [target], [], ctx, params, io, str(tmp_path), counts, per_field)
    after = partition(ngc, "22_x", p.commit()).read(field_ids=[target], data=False)
    np.testing.assert_array_equal(after.flag, expected)
    assert per_field == {"N5921_2": int((expected & ~v.flag).sum())} == {"N5921_2": counts["outliers"]}
    spilled = os.listdir(tmp_path)
    if slice_bytes is None:
        assert not spilled
    else:
        assert len(spilled) > 3 and all(f.startswith(("amp.", "flag.", "out.")) for f in spilled)


def _calibrate(ngc, tag: str, seed: int = 5):
    """NGC 5921's partition calibrated as applycal does it (decision 0021): random
    gains per (time, field) pair, antenna, channel and correlation, a few of them zero
    (flagged), put in overlapping pair ranges. Returns (entry, pair of each row, gains)."""
    part = partition(ngc, tag)
    rng = np.random.default_rng(seed)
    w = part.calibration_writer()
    pidx = w.pair_of_row
    # the pairs are the distinct (time, field) of the rows, in time order
    times, fields = part.index("TIME"), part.index("FIELD_ID")
    np.testing.assert_array_equal(w.times[pidx], times)
    np.testing.assert_array_equal(w.field_ids[pidx], fields)
    assert (np.diff(pidx) >= 0).all() and len(w.times) == len(set(zip(times.tolist(), fields.tolist())))
    assert w.nant == int(part.index("ANTENNA2").max()) + 1
    shape = (len(w.times), w.nant, part.nchan, part.ncorr)
    gains = (rng.normal(1, 0.2, shape) * np.exp(1j * rng.uniform(-3, 3, shape))).astype(np.complex64)
    gains[rng.random(shape) < 0.01] = 0
    lo, npair = 0, len(w.times)
    while lo < npair:                               # blocks overlapping by a pair, as row blocks do
        hi = min(npair, lo + int(rng.integers(1, 40)))
        w.put(lo, gains[lo:hi])
        lo = hi - 1 if hi < npair and rng.random() < 0.5 else hi
    return part.commit(), pidx, gains


def test_calibration_is_stored_as_gains_and_corrected_on_reading(ngc):
    """applycal's CORRECTED_DATA are not written (decision 0021): the partition holds
    the gains of each (time, field) pair (about nant/2 times fewer bytes than the data),
    and CORRECTED_DATA read, whole and in a channel range, as VISIBILITY / (g1 conj g2),
    with the arithmetic applycal's kernel uses on stored data."""
    from almapipe.calibration.kernels import apply_gains
    before = set(objects(ngc))
    entry, pidx, gains = _calibrate(ngc, "19_applycal")
    made = set(objects(ngc)) - before
    assert made and all("/CALIBRATION_GAIN/" in k or "/CALIBRATION_PAIR/" in k for k in made)
    assert "VISIBILITY_CORRECTED" not in entry["arrays"] and vst.has_corrected(entry)
    size = sizes(ngc)
    gain_bytes = sum(size[k] for k in made)
    data_bytes = sum(s for k, s in size.items() if "/VISIBILITY/" in k)
    assert gain_bytes < data_bytes / 4

    raw = partition(ngc, "20_x", entry).read()
    want = raw.data.copy()
    nant = gains.shape[1]
    none = np.zeros(gains.shape, bool)
    apply_gains(want, raw.flag.copy(), raw.weight.astype(np.float32), pidx.astype(np.int64),
                raw.ant1.astype(np.int64), raw.ant2.astype(np.int64), gains, np.ones(gains.shape, np.float32), none)
    got = partition(ngc, "20_x", entry).read(column="CORRECTED_DATA")
    np.testing.assert_array_equal(got.data, want)
    g = gains[pidx, raw.ant1] * np.conj(gains[pidx, raw.ant2])
    np.testing.assert_allclose(got.data, np.where(g != 0, raw.data / np.where(g != 0, g, 1), raw.data), rtol=1e-5)
    assert nant > 1 and (g == 0).any()
    part = partition(ngc, "20_x", entry)
    np.testing.assert_array_equal(part.read(column="CORRECTED_DATA", chan=slice(CHANS - 3, CHANS + 5)).data,
                                  want[:, CHANS - 3:CHANS + 5])
    blocks = list(part.blocks(column="CORRECTED_DATA", field_ids=[1, 2]))
    rows = part.select([1, 2])
    np.testing.assert_array_equal(np.concatenate([b.data for b in blocks]), want[rows])
    # a split view (decision 0021): its DATA are the calibrated data
    view = dict(entry, field_ids=[2], calibrated_column="DATA", name="ngc.spw0.target.ms")
    tgt = partition(ngc, "21_split", view).read()
    np.testing.assert_array_equal(tgt.data, want[part.select([2])])


def test_a_stage_writing_a_column_corrected_on_reading_stores_it_whole(ngc):
    """A stage that writes some rows of a view's calibrated DATA (fluxconsistency's
    equalize) makes it a stored array: its other rows keep their corrected values."""
    entry, _, _ = _calibrate(ngc, "22_applycal", seed=7)
    view = dict(entry, field_ids=[1, 2], calibrated_column="DATA", name="ngc.spw0.target.ms")
    part = partition(ngc, "23_scale", view)
    before = part.read()
    some = before.rows[::5]
    part.write("DATA", some, before.data[::5] * 2)
    after = part.commit()
    assert vst.CALIBRATION_GAIN not in after["arrays"] and "calibrated_column" not in after
    again = partition(ngc, "24_x", after).read()
    want = before.data.copy()
    want[::5] *= 2
    np.testing.assert_array_equal(again.data, want)


def test_the_calibrated_ms_exported_from_gains_holds_the_corrected_data(ngc, tmp_path):
    """exportdata's calibrated MS of a partition corrected on reading: CORRECTED_DATA
    as the store reads them, DATA the raw visibilities."""
    import casacore.tables as ct
    entry, _, _ = _calibrate(ngc, "25_applycal", seed=9)
    part = partition(ngc, "26_x", entry)
    dest = storeio.export_ms([entry], part.meta, str(tmp_path / "cal.ms"), lambda e: partition(ngc, "26_x", e))
    full = part.read(column="CORRECTED_DATA")
    with ct.table(dest, ack=False) as t:
        np.testing.assert_array_equal(t.getcol("CORRECTED_DATA"), full.data)
        np.testing.assert_array_equal(t.getcol("DATA"), part.read().data)


def test_a_column_corrected_on_reading_stays_so_when_a_stage_writes_it_unchanged(ngc):
    """A stage whose writes of the calibrated column change nothing (fluxconsistency with
    a factor that rounds to 1 in float32) stores no version: the view keeps reading its
    DATA corrected, not the raw VISIBILITY. And DATA under a CORRECTED_DATA corrected on
    reading cannot be written (it would change them)."""
    entry, _, _ = _calibrate(ngc, "27_applycal", seed=11)
    view = dict(entry, field_ids=[2], calibrated_column="DATA", name="ngc.spw0.target.ms")
    part = partition(ngc, "28_same", view)
    want = part.read()
    for blk in part.blocks():
        part.write("DATA", blk.rows, blk.data * np.float32(1 + 1e-9), before=blk.data)
    after = part.commit()
    assert after["arrays"] == view["arrays"] and after["calibrated_column"] == "DATA"
    np.testing.assert_array_equal(partition(ngc, "29_x", after).read().data, want.data)
    with pytest.raises(vst.VisStoreError, match="CORRECTED_DATA are its DATA divided"):
        partition(ngc, "30_x", entry).write("DATA", want.rows, want.data)


def test_the_gains_of_scattered_rows_are_read_from_their_pair_chunks_only(ngc, monkeypatch):
    """Rows far apart (a plot's sample, one field's rows) read the gains of their own
    pairs' chunks, not every pair between the first and the last."""
    monkeypatch.setattr(vst, "GAIN_CHUNK_BYTES", 1)             # a pair a chunk
    entry, pidx, _ = _calibrate(ngc, "31_applycal", seed=13)
    part = partition(ngc, "32_x", entry)
    full = part.read(column="CORRECTED_DATA")
    rows = np.array([0, 1, part.nrow // 2, part.nrow - 1])
    seen = []
    real = vst._take

    def spy(z, sel, chan, counter=None, chan_axis=1):
        if chan_axis == 2:
            seen.append(np.atleast_1d(sel))
        return real(z, sel, chan, counter, chan_axis)
    monkeypatch.setattr(vst, "_take", spy)
    got = part.read_rows(rows, "CORRECTED_DATA")
    np.testing.assert_array_equal(got.data, full.data[rows])
    assert len(seen) == 1 and set(seen[0].tolist()) == set(pidx[rows].tolist())
