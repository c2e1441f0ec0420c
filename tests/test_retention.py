"""Retention of ended runs (`almapipe gc`, platform/retention.py) against the real S3 and
NATS of a local stack: a run made the way stages make one (versions per stage through
VisPartition), recorded as the coordinator records it, then collected."""
from __future__ import annotations

import asyncio
import json
import tarfile
import time
import uuid

import numpy as np
import pytest

from almapipe.cli import main as cli
from almapipe.msio import storeio
from almapipe.platform import bus, retention
from almapipe.platform import visstore as vst
from almapipe.platform.store import CachedFetcher, ObjectStore


def bytes_under(store, prefix: str) -> int:
    return sum(o.size for o in store.list(prefix))


def put_record(cfg, run: dict) -> None:
    async def go():
        nc, js = await bus.connect(cfg, "test")
        try:
            await (await bus.runs_kv(js)).put(run["run_id"], json.dumps(run).encode())
        finally:
            await nc.close()
    asyncio.run(go())


def record(rid: str, status: str, context_key: str, **kw) -> dict:
    return dict({"run_id": rid, "status": status, "context_key": context_key, "created": time.time(),
                 "updated": time.time(), "error": "", "stages": []}, **kw)


@pytest.fixture(scope="module")
def s3(stack):
    _, cfg = stack
    store = ObjectStore(cfg)
    store.ensure_buckets()
    return cfg, store


@pytest.fixture(scope="module")
def finished_run(s3, ngc5921_ms, tmp_path_factory):
    """NGC 5921 through importdata, flagdata, setjy (MODEL), a first applycal, flagtargets
    and a second applycal (each a version of the arrays it changed), a split view of the
    target, products; recorded SUCCEEDED."""
    cfg, store = s3
    tmp = tmp_path_factory.mktemp("gc")
    rid = f"gctest-{uuid.uuid4().hex[:8]}"
    tar = str(tmp / "eb.tar")
    with tarfile.open(tar, "w") as t:
        t.add(ngc5921_ms, arcname="ngc5921.ms")
    input_key = store.put_file(tar, f"{rid}/eb.tar", bucket=store.raw_bucket)["key"]
    shell = storeio.make_shell(ngc5921_ms, str(tmp / "ngc.meta.ms"))
    meta = store.put_dir(shell, f"runs/{rid}/stages/00_importdata/ngc.meta.ms.tar")["key"]
    vs = vst.VisStore(cfg, cache_dir=None, cache_limit=0)
    prefix = f"runs/{rid}/vis/ngc.spw0.ms"
    entry = storeio.ingest_spw(vs, ngc5921_ms, 0, prefix, "00_importdata", meta, "ngc.spw0.ms")
    fetcher = CachedFetcher(store, str(tmp / "cache"), limit=0)
    work = tmp / "work"
    work.mkdir()

    def stage(tag, entry, fn):
        part = vst.VisPartition(vs, entry, tag, lambda k: fetcher.dir(k, str(work)), prefix)
        fn(part, part.read())
        new = part.commit()
        ctx = {"run_id": rid, "partitions": [new], "aux_partitions": {}}
        store.put_json(f"runs/{rid}/context/{tag}.json", ctx)
        return new

    store.put_json(f"runs/{rid}/context/00_importdata.json", {"partitions": [entry]})
    e = stage("02_flagdata", entry, lambda p, v: p.write_flags(v.rows[v.ant1 == 2], np.ones_like(v.flag[v.ant1 == 2])))
    e = stage("04_setjy", e, lambda p, v: p.write("MODEL_DATA", v.rows, np.where(
        (v.field_id == 0)[:, None, None], 15.0, 1.0).astype(np.complex64) * np.ones_like(v.data)))
    e = stage("05_applycal", e, lambda p, v: p.write("CORRECTED_DATA", v.rows, v.data * 1.1))
    e = stage("07_flagtargets", e, lambda p, v: p.write_flags(v.rows[v.ant2 == 5], np.ones_like(v.flag[v.ant2 == 5])))
    e = stage("08_applycal", e, lambda p, v: p.write("CORRECTED_DATA", v.rows, v.data * 1.2))
    e = stage("09_applycal", e, calibrate_on_reading)         # decision 0021: the stored CORRECTED goes
    # uvcontsub's view of the target: its continuum fit is an array of its own
    target = dict(e, field_ids=[2])
    contsub = vst.VisPartition(vs, dict(target, name="ngc.spw0.contsub.ms"), "09_uvcontsub",
                               lambda k: fetcher.dir(k, str(work)), f"runs/{rid}/vis/ngc.spw0.contsub.ms")
    v = contsub.read()
    fit = np.zeros((len(v.rows), vst.FIT_TERMS, contsub.ncorr), np.complex64)
    fit[:, 0] = v.data.mean(axis=1)
    contsub.write(vst.CONTINUUM_FIT, v.rows, fit)
    final = {"run_id": rid, "partitions": [e], "target_partitions": [target],
             "contsub_partitions": [contsub.commit()], "aux_partitions": {}}
    final_key = store.put_json(f"runs/{rid}/context/10_exportdata.json", final)["key"]
    # products: a caltable, an image, the weblog; the manifest names them
    products = {}
    for name, n in (("calibration/ngc.bcal.tbl.tar", 200_000), ("images/target.cont.fits", 500_000),
                    ("weblog.tar", 300_000)):
        key = f"runs/{rid}/stages/10_exportdata/{name.rsplit('/', 1)[-1]}"
        store.put_bytes(key, np.random.default_rng(n).bytes(n))
        products[name] = key
    store.put_json(f"runs/{rid}/products/manifest.json", products)
    # a cube's pieces' planes (the join assembled its products from them) and a part an
    # interrupted assembly left
    for name in ("11_imagecube_chunk/planes_0_0.npz", "11_imagecube_chunk/planes_0_0.residual",
                 "11_imagecube_chunk/planes_0_1.psf", "12_joincube/target.cube.psf.fits.part0"):
        store.put_bytes(f"runs/{rid}/stages/{name}", np.random.default_rng(7).bytes(100_000))
    store.put_bytes(f"runs/{rid}/stages/11_imagecube_chunk/imagecube_chunk.log", b"log")
    put_record(cfg, record(rid, "SUCCEEDED", final_key, input_key=input_key))
    return {"cfg": cfg, "store": store, "rid": rid, "final": e, "input_key": input_key, "products": products,
            "vs": vs, "meta": lambda k: fetcher.dir(k, str(work)), "prefix": prefix,
            "contsub": final["contsub_partitions"][0]}


def calibrate_on_reading(p, v):
    """applycal as it is since decision 0021: gains per (time, field) pair, here one
    real gain 1 / sqrt(1.3) for every antenna (CORRECTED_DATA = 1.3 DATA)."""
    w = p.calibration_writer()
    w.put(0, np.full((len(w.times), w.nant, p.nchan, p.ncorr), 1 / np.sqrt(1.3), np.complex64))


def test_gc_keeps_the_final_versions_and_meets_the_footprint_bound(finished_run, capsys):
    r = finished_run
    store, rid = r["store"], r["rid"]
    read = vst.VisPartition(r["vs"], r["final"], "99_x", r["meta"], r["prefix"])
    want = read.read(column="CORRECTED_DATA")
    model = read.read(column="MODEL_DATA")
    contsub = lambda vs: vst.VisPartition(vs, r["contsub"], "99_x", r["meta"], "").read().data   # noqa: E731
    subtracted = contsub(r["vs"])
    before = bytes_under(store, f"runs/{rid}/")
    input_bytes = store.client.stat_object(store.raw_bucket, r["input_key"]).size
    product_bytes = sum(store.client.stat_object(store.bucket, k).size for k in r["products"].values())
    # a dry run names what would go and deletes nothing
    assert cli(["gc", rid, "--dry-run"]) == 0
    assert "would free" in capsys.readouterr().out
    assert bytes_under(store, f"runs/{rid}/") == before
    groups = {o.object_name for o in store.list(f"runs/{rid}/vis/")
              if o.object_name.endswith("/zarr.json") and o.object_name.count("/") <= 5}   # zarr groups
    [rep] = retention.gc(r["cfg"], store, [rid])
    after = bytes_under(store, f"runs/{rid}/")
    record_bytes = store.client.stat_object(store.bucket, f"runs/{rid}/gc.json").size
    print(f"run {rid}: input {input_bytes / 1e6:.1f} MB, products {product_bytes / 1e6:.1f} MB; "
          f"S3 under runs/{rid}/ {before / 1e6:.1f} MB before gc, {after / 1e6:.1f} MB after "
          f"(freed {rep['freed_bytes'] / 1e6:.1f} MB in {rep['objects']} objects)")
    assert rep["freed_bytes"] == before - (after - record_bytes) > 0
    assert after <= 2 * input_bytes + product_bytes
    assert before > 2 * input_bytes + product_bytes      # the rule is what brings the run within it
    # what the final context points at reads back as before; the intermediate versions are gone
    again = vst.VisPartition(vst.VisStore(r["cfg"], cache_dir=None, cache_limit=0), r["final"], "99_x",
                             r["meta"], r["prefix"])
    np.testing.assert_array_equal(again.read(column="CORRECTED_DATA").data, want.data)
    np.testing.assert_array_equal(again.read(column="CORRECTED_DATA").flag, want.flag)
    np.testing.assert_array_equal(again.read(column="MODEL_DATA").data, model.data)
    # the continuum-subtracted view too: a rerun of makeimages from the final context reads it
    np.testing.assert_array_equal(contsub(again.vs), subtracted)
    names = {o.object_name for o in store.list(f"runs/{rid}/vis/")}
    assert not any("/FLAG/02_flagdata/" in k or "/VISIBILITY_CORRECTED/" in k for k in names)
    assert {vst.CALIBRATION_GAIN, vst.CALIBRATION_PAIR} <= set(r["final"]["arrays"])
    assert all(any(f"/{a}/09_applycal/c/" in k for k in names) for a in (vst.CALIBRATION_GAIN, vst.CALIBRATION_PAIR))
    np.testing.assert_allclose(want.data, read.read().data * 1.3, rtol=1e-5)
    assert any("/FLAG/07_flagtargets/" in k for k in names)
    # the zarr groups of the arrays the context points at stay (VISIBILITY_CORRECTED's,
    # no version of which is live since the last applycal, goes with them)
    assert {g for g in groups if "/VISIBILITY_CORRECTED/" not in g} <= names
    # products, contexts and the shell stay; gc.json says what was done; a second gc frees nothing
    for key in list(r["products"].values()) + [r["final"]["meta"], f"runs/{rid}/context/02_flagdata.json"]:
        assert store.exists(key)
    assert store.get_json(f"runs/{rid}/gc.json")["freed_bytes"] == rep["freed_bytes"]
    assert retention.gc(r["cfg"], store, [rid])[0]["freed_bytes"] == 0
    # the pieces' planes and the assembly's leftover part are gone, the pieces' log stays
    stages = {o.object_name.split("/stages/")[1] for o in store.list(f"runs/{rid}/stages/")}
    assert not any("planes_" in k or ".part" in k for k in stages), stages
    assert "11_imagecube_chunk/imagecube_chunk.log" in stages


def test_gc_drops_the_whole_visibility_store_after_n_days(finished_run, capsys):
    r = finished_run
    store, rid = r["store"], r["rid"]
    assert cli(["gc", rid, "--drop-vis-after-days", "1"]) == 0          # ended just now: not yet
    assert store.list(f"runs/{rid}/vis/")
    assert cli(["gc", rid, "--drop-vis-after-days", "0"]) == 0
    assert "whole visibility store" in capsys.readouterr().out
    assert not store.list(f"runs/{rid}/vis/")
    assert all(store.exists(k) for k in r["products"].values())


def test_gc_leaves_running_runs_and_the_ebs_of_a_running_mous(s3):
    cfg, store = s3
    parent, kid, old = (f"gctest-{uuid.uuid4().hex[:8]}" for _ in range(3))
    for rid in (parent, kid):
        store.put_bytes(f"runs/{rid}/vis/p.ms/FLAG/03_x/c/0/0/0", b"x" * 1000)
        store.put_json(f"runs/{rid}/context/00.json", {"partitions": []})
    put_record(cfg, record(parent, "RUNNING", f"runs/{parent}/context/00.json"))
    put_record(cfg, record(kid, "SUCCEEDED", f"runs/{kid}/context/00.json", parent_run_id=parent))
    assert cli(["gc", f"{parent}-nosuch"]) == 2                       # named, not a traceback
    reports = {x["run_id"]: x for x in retention.gc(cfg, store, [parent, kid])}
    assert "not ended" in reports[parent]["skipped"] and "MOUS" in reports[kid]["skipped"]
    assert store.exists(f"runs/{kid}/vis/p.ms/FLAG/03_x/c/0/0/0")
    # the stand-in MOUS run must not stay "running" in the shared stack's records (the
    # gateway's active-run count, read by later tests, counts it)
    put_record(cfg, record(parent, "CANCELLED", f"runs/{parent}/context/00.json"))
    # a run of the layout before the store: its partition tars go, unless they are products
    for name in ("a.ms.tar", "b.ms.tar", "target.ms.tar"):
        store.put_bytes(f"runs/{old}/stages/05_applycal/{name}", b"y" * 5000)
    ctx = {"partitions": [{"name": "a.ms", "key": f"runs/{old}/stages/05_applycal/a.ms.tar"},
                          {"name": "b.ms", "key": f"runs/{old}/stages/05_applycal/b.ms.tar"}],
           "target_partitions": [{"name": "t.ms", "key": f"runs/{old}/stages/05_applycal/target.ms.tar"}]}
    key = store.put_json(f"runs/{old}/context/05_applycal.json", ctx)["key"]
    store.put_json(f"runs/{old}/products/manifest.json", {"target.ms.tar": f"runs/{old}/stages/05_applycal/target.ms.tar"})
    put_record(cfg, record(old, "FAILED", key))
    [rep] = retention.gc(cfg, store, [old])
    assert rep["old_partition_tars"] == 2 and rep["freed_bytes"] == 10000
    assert store.exists(f"runs/{old}/stages/05_applycal/target.ms.tar") and store.exists(key)


def test_every_run_record_is_read_while_others_are_written(s3):
    """gc and the gateway's start-up read the records through kv_values. It once ended at
    the watcher's "all delivered" marker, which can come before the replay is over while
    other keys are written, and gc then said "no run" of a run just recorded. Before the
    fix about 2 reads in 100 of this bucket came back short."""
    cfg, _ = s3

    async def go():
        nc, js = await bus.connect(cfg, "test")
        bucket = f"kvtest-{uuid.uuid4().hex[:8]}"
        kv = await js.create_key_value(bucket=bucket, history=5)
        try:
            assert await bus.kv_values(kv) == []
            for i in range(50):
                await kv.put(f"k{i}", json.dumps({"i": i}).encode())
                if i % 3 == 0:                                   # keys with history
                    await kv.put(f"k{i}", json.dumps({"i": i, "again": True}).encode())
            await kv.delete("k5")
            await kv.put("k7", json.dumps({"i": 7, "last": True}).encode())
            stop = asyncio.Event()

            async def writer():                                   # other runs' updates
                n = 0
                while not stop.is_set():
                    await kv.put(f"other{n % 5}", json.dumps({"i": -1}).encode())
                    n += 1
                    await asyncio.sleep(0)
            task = asyncio.create_task(writer())
            try:
                short = 0
                for _ in range(200):
                    values = await bus.kv_values(kv)
                    short += {v["i"] for v in values} - {-1} != set(range(50)) - {5}
            finally:
                stop.set()
                await task
            assert short == 0, f"{short} of 200 reads missed a record"
            assert [v for v in values if v["i"] == 7][0].get("last")
        finally:
            await js.delete_key_value(bucket)
            await nc.close()
    asyncio.run(go())
