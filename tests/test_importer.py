"""UVFITS import, observation summary, field roles, flagging: on the real NGC 5921 data."""
import numpy as np
import casacore.tables as ct
import pytest
from astropy.time import Time

from almapipe.msio import listobs, ms as msio
from almapipe.msio.uvfits import uvfits_to_ms
from almapipe.errors import ParameterError
from almapipe.heuristics.flagging import parse_template, shadow_mask, template_mask


def test_ngc5921_imports_as_casa_ms(ngc5921_ms):
    obs = listobs.summary(ngc5921_ms)
    assert obs["nrows"] == 22653 and len(obs["scans"]) == 7 and obs["telescope"] == "VLA"
    assert [f["name"] for f in obs["fields"]] == ["1331+30500002_0", "1445+09900002_0", "N5921_2"]
    assert obs["spws"][0]["nchan"] == 63 and obs["spws"][0]["frame"] == "LSRK"
    assert obs["corr_types"] == ["RR", "LL"]
    assert sum(a["has_data"] for a in obs["antennas"]) == 27


def test_uvw_and_data_as_casa_importuvfits_writes_them(ngc5921_ms):
    """CASA's importuvfits passes u, v, w (projection of x1 - x2 in this file) and the
    visibilities through unchanged; we do the same, so gains and images match CASA's."""
    with ct.table(ngc5921_ms, ack=False) as t:
        a1, a2, uvw, tm, fid = (t.getcol(c) for c in ("ANTENNA1", "ANTENNA2", "UVW", "TIME", "FIELD_ID"))
    pos = np.array([a["position"] for a in msio.antenna_table(ngc5921_ms)])
    fields = msio.field_table(ngc5921_ms)
    i = np.flatnonzero(a1 != a2)[100]
    L = pos[a1[i]] - pos[a2[i]]
    gast = Time(tm[i] / 86400, format="mjd", scale="utc").sidereal_time("apparent", "greenwich").rad
    ra, dec = fields[fid[i]]["ra_rad"], fields[fid[i]]["dec_rad"]
    H = gast - ra
    u = np.sin(H) * L[0] + np.cos(H) * L[1]
    v = -np.sin(dec) * np.cos(H) * L[0] + np.sin(dec) * np.sin(H) * L[1] + np.cos(dec) * L[2]
    assert abs(uvw[i, 0] - u) < 2.0 and abs(uvw[i, 1] - v) < 2.0


def test_roles_from_heuristic_and_from_parameter(ngc5921_ms):
    obs = listobs.summary(ngc5921_ms)
    roles = {f["name"]: f["intents"] for f in listobs.assign_roles(obs, None)}
    assert roles == {"1331+30500002_0": ["BANDPASS", "FLUX"], "1445+09900002_0": ["PHASE"], "N5921_2": ["TARGET"]}
    given = listobs.assign_roles(obs, {"1445+09900002_0": "PHASE,CHECK"})
    assert next(f for f in given if f["name"] == "1445+09900002_0")["intents"] == ["CHECK", "PHASE"]
    with pytest.raises(ValueError, match="not in the data"):
        listobs.assign_roles(obs, {"3C48": "FLUX"})


def test_not_uvfits_is_a_clear_error(tmp_path):
    bad = tmp_path / "junk.fits"
    bad.write_bytes(b"this is not a FITS file" * 100)
    with pytest.raises(msio.MSError, match="not a UVFITS"):
        uvfits_to_ms(str(bad), str(tmp_path / "x.ms"))
    with pytest.raises(msio.MSError, match="not a MeasurementSet"):
        msio.check_ms(str(tmp_path / "nothing.ms"))


def test_flag_template_syntax_and_selection(ngc5921_ms):
    cmds = parse_template("mode='manual' antenna='VL05' spw='0:0~3' reason='bad'\n# comment\nscan='2'\n")
    assert len(cmds) == 2
    vis = msio.read_vis(ngc5921_ms, 0)
    ants = msio.antenna_table(ngc5921_ms)
    fields = [{"id": f["id"], "name": f["name"]} for f in msio.field_table(ngc5921_ms)]
    m = template_mask(vis, cmds[0], ants, fields, 0)
    ant5 = [a["id"] for a in ants if a["name"] == "VL05"][0]
    rows = (vis.ant1 == ant5) | (vis.ant2 == ant5)
    assert m[rows][:, :4].all() and not m[rows][:, 4:].any() and not m[~rows].any()
    assert template_mask(vis, cmds[1], ants, fields, 0)[vis.scan == 2].all()
    with pytest.raises(ParameterError, match="unknown key"):
        parse_template("antena='VL05'")
    with pytest.raises(ParameterError, match="no antenna"):
        template_mask(vis, {"antenna": "XX99"}, ants, fields, 0)


def test_shadowing_flags_the_antenna_behind():
    from conftest import simulate
    vis = simulate(nant=3, ntime=1)
    vis.uvw[:] = [[100.0, 0, 0]] * len(vis.uvw)
    vis.uvw[0] = [5.0, 0.0, 30.0]      # baseline 0-1 nearly along the line of sight, w > 0
    mask = shadow_mask(vis.time, vis.ant1, vis.ant2, vis.uvw, np.full(3, 12.0))
    # uvw = x0 - x1 and w > 0: antenna 0 is nearer the source, antenna 1 (behind) is shadowed
    assert mask[(vis.ant1 == 1) | (vis.ant2 == 1)].all() and not mask[(vis.ant1 == 0) & (vis.ant2 == 2)].any()


def test_intents_come_from_the_state_table(ngc5921_ms, tmp_path):
    """An MS that records intents (as ALMA's do) needs no roles parameter."""
    import shutil
    ms = str(tmp_path / "with_state.ms")
    shutil.copytree(ngc5921_ms, ms)
    modes = ["CALIBRATE_BANDPASS#ON_SOURCE,CALIBRATE_FLUX#ON_SOURCE", "CALIBRATE_PHASE#ON_SOURCE",
             "OBSERVE_TARGET#ON_SOURCE"]
    msio.fill_table(f"{ms}/STATE", {"OBS_MODE": modes, "SIG": [True] * 3, "REF": [False] * 3,
                                    "CAL": [0.0] * 3, "LOAD": [0.0] * 3, "SUB_SCAN": [0] * 3,
                                    "FLAG_ROW": [False] * 3})
    with ct.table(ms, readonly=False, ack=False) as t:
        t.putcol("STATE_ID", t.getcol("FIELD_ID"))
    obs = listobs.summary(ms)
    roles = {f["name"]: f["intents"] for f in listobs.assign_roles(obs, None)}
    assert roles == {"1331+30500002_0": ["BANDPASS", "FLUX"], "1445+09900002_0": ["PHASE"], "N5921_2": ["TARGET"]}
    assert listobs.assign_roles(obs, None)[0]["roles_from"] == "STATE table"


def test_each_spw_streams_into_the_store_and_exports_back(ngc5921_ms, tmp_path, stack):
    """Two spectral windows become two partitions of the visibility store, each holding
    only its spw's rows, read back equal to the MS; the MS exported from the store (the
    shell plus the rows) is a CASA MS with the same data."""
    import shutil
    from almapipe.msio import storeio
    from almapipe.platform.visstore import VisPartition, VisStore
    _, cfg = stack
    ms = str(tmp_path / "two_spw.ms")
    shutil.copytree(ngc5921_ms, ms)
    with ct.table(f"{ms}/SPECTRAL_WINDOW", readonly=False, ack=False) as t:
        t.addrows(1)
        for col in ("NUM_CHAN", "CHAN_WIDTH", "EFFECTIVE_BW", "RESOLUTION", "REF_FREQUENCY",
                    "TOTAL_BANDWIDTH", "MEAS_FREQ_REF", "NET_SIDEBAND", "NAME"):
            t.putcell(col, 1, t.getcell(col, 0))
        t.putcell("CHAN_FREQ", 1, t.getcell("CHAN_FREQ", 0) + 10e6)
    msio.fill_table(f"{ms}/DATA_DESCRIPTION", {"SPECTRAL_WINDOW_ID": [1], "POLARIZATION_ID": [0], "FLAG_ROW": [False]})
    with ct.table(ms, readonly=False, ack=False) as t:
        dd = (t.getcol("SCAN_NUMBER") % 2).astype(np.int32)   # odd scans in spw 0, even in spw 1
        t.putcol("DATA_DESC_ID", 1 - dd)
        n_spw1 = int((1 - dd).sum())
    shell = storeio.make_shell(ms, str(tmp_path / "shell.ms"))
    vs = VisStore(cfg, cache_dir=None, cache_limit=0)
    entries = [storeio.ingest_spw(vs, ms, spw, f"test/importer/{spw}", "00_importdata", "meta", f"two.spw{spw}")
               for spw in (0, 1)]
    parts = [VisPartition(vs, e, "01_test", lambda key: shell, f"test/importer/{e['spw']}") for e in entries]
    assert entries[1]["nrow"] == n_spw1
    for spw, part in zip((0, 1), parts):
        mine, theirs = part.read(), msio.read_vis(ms, spw)
        assert np.array_equal(mine.data, theirs.data) and np.array_equal(mine.flag, theirs.flag)
        assert np.array_equal(mine.time, theirs.time) and np.array_equal(mine.uvw, theirs.uvw)
        assert abs(mine.freq[0] - (1.412665e9 + 10e6 * spw)) < 1e3
    out = storeio.export_ms(entries, shell, str(tmp_path / "exported.ms"),
                            lambda e: VisPartition(vs, e, "01_test", lambda key: shell, f"test/importer/{e['spw']}"))
    msio.check_ms(out)
    for spw in (0, 1):
        a, b = msio.read_vis(out, spw), msio.read_vis(ms, spw)
        assert np.array_equal(a.data, b.data) and np.array_equal(a.flag, b.flag)


def test_a_tar_in_the_raw_bucket_is_extracted_in_parallel_ranges_as_tarfile_extracts_it(tmp_path, stack,
                                                                                         monkeypatch):
    """importdata's extraction of a tar from S3 (headers first, then the files' bytes in
    equal ranges by parallel GETs, a file split between them) gives tarfile's own
    extraction: nested folders, long (PAX) names, empty files. A member outside the
    folder, a link, and a tar beyond the unpacking cap are refused before a file is
    written, each with an error naming it."""
    import io
    import os
    import tarfile
    from types import SimpleNamespace
    from almapipe.platform.store import ObjectStore
    from almapipe.stages import importdata
    from almapipe.stages.base import StageError
    _, cfg = stack
    store = ObjectStore(cfg)
    rng = np.random.default_rng(8)
    src = tmp_path / "src" / "x.ms"
    (src / ("SUB" + "_long" * 30)).mkdir(parents=True)
    files = {"table.f0": rng.bytes(300_001), "table.f1_TSM1": rng.bytes(2_000_003), "empty": b"",
             "SUB" + "_long" * 30 + "/table.f0": rng.bytes(77_777)}
    files.update({f"t{i}.f0": rng.bytes(int(n)) for i, n in enumerate(rng.integers(0, 3000, 30))})
    for name, data in files.items():
        (src / name).write_bytes(data)
    # headers read 1000 bytes at a time: reads straddle the window (a short read would end the scan)
    monkeypatch.setattr(importdata, "HEADER_READ_AHEAD", 1000)
    monkeypatch.setattr(importdata, "MIN_STREAM_BYTES", 1000)
    monkeypatch.setattr(importdata, "EXTRACT_STREAMS", 3)
    monkeypatch.setattr(importdata, "TAR_BUFFER_BYTES", 65536)
    monkeypatch.setattr(importdata.os, "cpu_count", lambda: 3)

    def extract(tar_path, name):
        key = f"test/untar/{name}"
        store.put_file(str(tar_path), key, bucket=store.raw_bucket)
        work = tmp_path / f"work-{name}"
        work.mkdir()
        return importdata._stream_tar(SimpleNamespace(store=store, workdir=str(work)), key, f"importdata: {name}")

    tar_path = tmp_path / "x.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as t:
        t.add(src, arcname="x.ms")
    dest = extract(tar_path, "x.tar")
    for name, data in files.items():
        assert (tmp_path / f"work-x.tar/untar/x.ms/{name}").read_bytes() == data, name
    assert sorted(os.listdir(os.path.join(dest, "x.ms"))) == sorted(os.listdir(src))

    def tar_with(member: tarfile.TarInfo, data: bytes = b""):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.tar"
        with tarfile.open(path, "w") as t:
            t.add(src / "table.f0", arcname="x.ms/table.f0")
            member.size = len(data)
            t.addfile(member, io.BytesIO(data))
        return path
    for n, name in enumerate(("../evil", "x.ms/../../evil")):      # ("/evil" lands as "evil", as tarfile puts it)
        with pytest.raises(StageError, match="outside the destination"):
            extract(tar_with(tarfile.TarInfo(name), b"x"), f"evil{n}")
    link = tarfile.TarInfo("x.ms/link")
    link.type, link.linkname = tarfile.SYMTYPE, "table.f0"
    with pytest.raises(StageError, match="link"):
        extract(tar_with(link), "link")
    monkeypatch.setenv("ALMAPIPE_MAX_UNPACK_RATIO", "0.5")
    with pytest.raises(StageError, match="ALMAPIPE_MAX_UNPACK_RATIO"):
        extract(tar_path, "bomb")
    assert not os.path.exists(tmp_path / "work-bomb/untar/x.ms/table.f0")


def test_a_file_input_names_only_what_lies_under_an_import_root(tmp_path):
    """file:// keys (decision 0022): a path outside the roots, a link out of them, a
    relative or unnormalised path, a missing one, or any path when no root is set, is
    refused with the reason; one under a root is its real path."""
    import os
    from almapipe.platform import inputs
    root, outside = tmp_path / "area", tmp_path / "elsewhere"
    for ms in (root / "eb.ms", outside / "secret.ms"):
        ms.mkdir(parents=True)
        (ms / "table.dat").write_bytes(b"")
    os.symlink(outside / "secret.ms", root / "link.ms")
    roots = (str(root),)
    assert inputs.local_path(inputs.key_for(str(root / "eb.ms")), roots) == str(root / "eb.ms")
    cases = [(f"file://{outside}/secret.ms", roots, "not under an import root"),
             (f"file://{root}/link.ms", roots, "not under an import root"),
             (f"file://{root}/../elsewhere/secret.ms", roots, "absolute, normalised"),
             ("file://eb.ms", roots, "absolute, normalised"),
             (f"file://{root}/eb.ms", (), "ALMAPIPE_IMPORT_ROOTS is empty")]
    for key, rts, why in cases:
        with pytest.raises(inputs.InputError, match=why):
            inputs.local_path(key, rts)
    with pytest.raises(inputs.InputError, match="no such file") as e:
        inputs.local_path(f"file://{root}/gone.ms", roots)
    assert e.value.not_found
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("x")
    with pytest.raises(inputs.InputError, match="not under an import root"):   # the link leads out
        inputs.list_local(f"file://{root}/", roots)
    os.unlink(root / "link.ms")
    assert inputs.list_local(f"file://{root}/", roots) == [f"file://{root}/eb.ms"]
    with pytest.raises(ValueError, match="not an absolute path"):
        from almapipe.config import import_roots
        import_roots("relative/dir")


def _tree_state(path: str) -> dict:
    import os
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), path)] = (st.st_size, st.st_mtime_ns)
    return out


def test_an_ms_under_an_import_root_is_read_in_place_and_left_as_it_was(ngc5921_ms, stack):
    """A run whose input is file:// and an MS directory under the stack's import root
    (decision 0022): nothing is uploaded, importdata reads the MS where it lies, the MS is
    not changed (every file's size and mtime), and the store holds its rows. Paths the
    stack may not read are refused at SubmitRun, naming the reason."""
    import json
    import shutil
    import grpc
    from almapipe.platform.auth import channel
    from almapipe.platform.store import ObjectStore
    from almapipe.v1 import pipeline_pb2 as pb, pipeline_pb2_grpc as pb_grpc
    from test_operations import wait_run
    _, cfg = stack
    ms = shutil.copytree(ngc5921_ms, f"{cfg.import_roots[0]}/inplace.ms")
    before = _tree_state(ms)
    store = ObjectStore(cfg)
    raw_before = {o.object_name for o in store.list("", bucket=cfg.raw_bucket)}
    one_stage = [("x-almapipe-recipe", json.dumps({"name": "import-only", "stages": [{"stage": "importdata"}]}))]
    with channel(cfg) as ch:
        stub = pb_grpc.PipelineServiceStub(ch)
        run = stub.SubmitRun(pb.SubmitRunRequest(input_key=f"file://{ms}"), metadata=one_stage, timeout=30)
        run = wait_run(stub, run.run_id, 180)
        assert run.status == pb.RUN_STATUS_SUCCEEDED, run.error
        assert run.input_key == f"file://{ms}"
        for key, code, why in [(f"file://{ngc5921_ms}", grpc.StatusCode.INVALID_ARGUMENT, "ALMAPIPE_IMPORT_ROOTS"),
                               (f"file://{cfg.import_roots[0]}/none.ms", grpc.StatusCode.NOT_FOUND, "no such file")]:
            with pytest.raises(grpc.RpcError) as e:
                stub.SubmitRun(pb.SubmitRunRequest(input_key=key), metadata=one_stage, timeout=30)
            assert e.value.code() == code and why in e.value.details(), e.value.details()
    assert _tree_state(ms) == before
    assert {o.object_name for o in store.list("", bucket=cfg.raw_bucket)} == raw_before
    vis = list(store.list(f"runs/{run.run_id}/vis/"))
    assert any("VISIBILITY" in o.object_name for o in vis), "no visibilities in the store"
    with ct.table(ngc5921_ms, ack=False) as t:
        nrow = t.nrows()
    ctx_keys = sorted(o.object_name for o in store.list(f"runs/{run.run_id}/context/") if "importdata" in o.object_name)
    parts = store.get_json(ctx_keys[-1])["partitions"]
    assert sum(p["nrow"] for p in parts) == nrow


def test_almapipe_run_hands_over_a_path_under_the_import_root_and_uploads_otherwise(ngc5921_ms, stack, tmp_path):
    """`almapipe run MS`: with the MS under the stack's import root it sends the path (no
    upload); a client that believes in a root the stack does not have is refused by the
    gateway and uploads the MS instead. Both runs succeed."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    _, cfg = stack
    ms = shutil.copytree(ngc5921_ms, f"{cfg.import_roots[0]}/viacli.ms")
    recipe = tmp_path / "import-only.json"
    recipe.write_text(json.dumps({"name": "import-only", "stages": [{"stage": "importdata"}]}))
    cmd = [sys.executable, "-m", "almapipe.cli", "run", "--recipe-file", str(recipe)]
    here = subprocess.run(cmd + [ms], capture_output=True, text=True, timeout=300)
    assert here.returncode == 0, here.stdout[-2000:] + here.stderr[-2000:]
    assert "read in place by the stack (no upload)" in here.stdout and "SUCCEEDED" in here.stdout
    other = shutil.copytree(ngc5921_ms, tmp_path / "mine" / "viacli.ms")
    env = dict(os.environ, ALMAPIPE_IMPORT_ROOTS=str(tmp_path / "mine"))
    up = subprocess.run(cmd + [str(other)], capture_output=True, text=True, timeout=300, env=env)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    assert "does not read the inputs in place" in up.stdout and "SUCCEEDED" in up.stdout
