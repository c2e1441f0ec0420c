"""Shared fixtures: the NGC 5921 data, simulated visibilities, and a real local stack."""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest

from almapipe.msio.ms import Vis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NGC5921 = os.path.join(ROOT, "almapipe", "data", "ngc5921.uvfits.gz")


@pytest.fixture(scope="session")
def ngc5921_ms(tmp_path_factory):
    from almapipe.msio.uvfits import uvfits_to_ms
    path = str(tmp_path_factory.mktemp("ngc") / "ngc5921.ms")
    uvfits_to_ms(NGC5921, path)
    return path


def simulate(nant=8, ntime=20, nchan=16, ncorr=2, flux=None, gains=None, bandpass=None, noise=0.01,
             offsets=(), fields=None, seed=1, freq0=1.4e9, dfreq=1e6, baseline_m=300.0):
    """Point-source visibilities with known antenna gains (ntime, nant, ncorr) and
    bandpasses (nant, nchan, ncorr): V = g_1 conj(g_2) b_1 conj(b_2) S + noise.
    offsets: extra point sources [(flux, l_rad, m_rad)] imaged in the tests."""
    rng = np.random.default_rng(seed)
    a1, a2 = np.triu_indices(nant, 1)
    nbl = len(a1)
    pos = rng.uniform(-baseline_m, baseline_m, (nant, 3))
    pos[:, 2] *= 0.05
    t = np.repeat(np.arange(ntime) * 10.0, nbl)
    ant1, ant2 = np.tile(a1, ntime), np.tile(a2, ntime)
    # rotate the array with time to fill the uv plane (earth rotation)
    ang = t / 3600.0 * np.pi / 4
    c, s = np.cos(ang), np.sin(ang)
    d = pos[ant2] - pos[ant1]
    uvw = np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1], d[:, 2]], axis=1)
    freq = freq0 + np.arange(nchan) * dfreq
    S = np.ones(nchan) if flux is None else np.asarray(flux, float) * np.ones(nchan)
    model = np.broadcast_to(S[None, :, None], (len(t), nchan, ncorr)).astype(complex)
    for f, l, m in offsets:
        # the sign CASA's MSs carry (see imaging/gridding.py)
        ph = np.exp(2j * np.pi * (uvw[:, 0:1] * l + uvw[:, 1:2] * m) * freq[None, :] / 299792458.0)
        model = model + f * ph[:, :, None]
    g = np.ones((ntime, nant, ncorr), complex) if gains is None else gains
    b = np.ones((nant, nchan, ncorr), complex) if bandpass is None else bandpass
    ti = np.repeat(np.arange(ntime), nbl)
    v = (g[ti, ant1][:, None, :] * np.conj(g[ti, ant2])[:, None, :] * b[ant1] * np.conj(b[ant2]) * model)
    v = v + noise * (rng.normal(size=v.shape) + 1j * rng.normal(size=v.shape)) / np.sqrt(2)
    return Vis(time=t + 5e9, interval=np.full(len(t), 10.0), ant1=ant1, ant2=ant2,
               field_id=np.zeros(len(t), int) if fields is None else fields, scan=np.ones(len(t), int),
               uvw=uvw, data=v.astype(np.complex64), flag=np.zeros(v.shape, bool),
               weight=np.full((len(t), ncorr), 1 / max(noise, 1e-3) ** 2, np.float32), freq=freq,
               corr_types=["XX", "YY"][:ncorr], rows=np.arange(len(t)))


def _free_base() -> int:
    from almapipe.platform.stack import port_free, stack_ports
    for _ in range(50):
        base = random.randrange(20000, 40000, 100)
        if all(port_free(p) for p in stack_ports(base).values()):
            return base
    raise RuntimeError("no free port range")


@pytest.fixture(scope="session")
def stack(tmp_path_factory, request):
    """A real local stack (NATS + S3 + gateway + workers) on loopback, as `almapipe up` starts it."""
    from almapipe.config import Config
    from almapipe.platform.stack import Stack
    data_dir = str(tmp_path_factory.mktemp("stack"))
    old = {k: os.environ.get(k) for k in ("ALMAPIPE_DATA_DIR", "ALMAPIPE_PORT_BASE", "ALMAPIPE_MAX_DELIVER",
                                          "ALMAPIPE_IMAGER_WORKERS", "ALMAPIPE_CALIBRATOR_WORKERS",
                                          "ALMAPIPE_HEARTBEAT_S", "ALMAPIPE_HEARTBEAT_TIMEOUT_S",
                                          "ALMAPIPE_IMPORT_ROOTS")}
    os.environ["ALMAPIPE_DATA_DIR"] = data_dir
    # inputs placed here are read in place (file:// keys, decision 0022)
    os.environ["ALMAPIPE_IMPORT_ROOTS"] = str(tmp_path_factory.mktemp("import-area"))
    os.environ["ALMAPIPE_PORT_BASE"] = str(_free_base())
    os.environ["ALMAPIPE_MAX_DELIVER"] = "3"
    os.environ["ALMAPIPE_IMAGER_WORKERS"] = "2"     # cube pieces really run in parallel
    # the run pool's runs (runpool.py) keep both cores busy with two runs' calibration
    os.environ["ALMAPIPE_CALIBRATOR_WORKERS"] = "2"
    if not any(item.get_closest_marker("resilience") for item in request.session.items):
        # a killed worker's stage is dispatched again after 20 s without heartbeats, not
        # 30; the fault suite measures recovery with the defaults, as operations has it
        os.environ["ALMAPIPE_HEARTBEAT_S"] = "3"
        os.environ["ALMAPIPE_HEARTBEAT_TIMEOUT_S"] = "20"
    st = Stack(data_dir)
    st.up()
    try:
        yield st, Config.from_env()
    finally:
        st.down()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(data_dir, ignore_errors=True)


def store_partition(cfg, ms_path: str, spw: int, run_id: str, workdir: str, name: str | None = None) -> tuple:
    """One spw of an MS streamed into the visibility store of a stack (as importdata does):
    (the partition's context entry, the local path of its MS shell)."""
    from almapipe.msio import storeio
    from almapipe.platform.store import ObjectStore
    from almapipe.platform.visstore import VisStore
    base = name or os.path.basename(ms_path).split(".")[0]
    shell = storeio.make_shell(ms_path, os.path.join(workdir, f"{base}.meta.ms"))
    meta_key = ObjectStore(cfg).put_dir(shell, f"runs/{run_id}/stages/00_importdata/{base}.meta.ms.tar")["key"]
    vs = VisStore(cfg, cache_dir=None, cache_limit=0)
    entry = storeio.ingest_spw(vs, ms_path, spw, f"runs/{run_id}/vis/{base}.spw{spw}.ms", "00_importdata",
                               meta_key, f"{base}.spw{spw}.ms")
    return entry, shell


def open_partition(cfg, entry: dict, workdir: str):
    """A context's partition entry opened from a stack's visibility store, read-only
    (a VisPartition; its MS shell fetched under workdir when asked for)."""
    import hashlib
    from almapipe.platform.store import ObjectStore
    from almapipe.platform.visstore import VisPartition, VisStore
    store = ObjectStore(cfg)

    def meta(key):
        return store.get_dir(key, os.path.join(workdir, "meta-" + hashlib.sha1(key.encode()).hexdigest()[:12]))
    return VisPartition(VisStore(cfg, cache_dir=None, cache_limit=0), entry, "99_test", meta,
                        "runs/test/vis/" + entry["name"])


@pytest.fixture(scope="session")
def run_pool(request, stack, tmp_path_factory):
    """The long runs the selected tests use, submitted together (runpool.py); every one
    has ended when the session does."""
    from almapipe.platform.auth import channel
    from almapipe.v1 import pipeline_pb2_grpc as pb_grpc
    import runpool
    _, cfg = stack
    with channel(cfg) as ch:
        pool = runpool.RunPool(stack, pb_grpc.PipelineServiceStub(ch), tmp_path_factory.mktemp,
                               runpool.used_runs(request.session.items))
        runpool.ACTIVE = pool
        try:
            yield pool
            pool.drain()
        finally:
            runpool.ACTIVE = None


@pytest.fixture(scope="module", autouse=True)
def _pool_ended_before_faults(request):
    """A module that kills workers or restarts servers (DISTURBS_STACK) starts when every
    run of the pool has ended."""
    import runpool
    if getattr(request.module, "DISTURBS_STACK", False) and runpool.ACTIVE is not None:
        runpool.ACTIVE.drain()
