"""Peak resident memory of the imager's stages on one EB, each in a process of its own.

    .venv/bin/python bench/imager_memory.py --ms EB/realistic.ms --work /tmp/imager-mem \
        [--parts aggregate,cube] [--spw N] [--reuse]

The EB's science spws are ingested into the visibility store of an S3 server started
for the purpose (no NATS, no workers), their DATA taken as calibrated (CORRECTED_DATA),
split into target views, and the views taken as continuum-subtracted with the inner
80 % of each spw as continuum (the images are of the simulated data as they are:
memory, not image quality, is what this measures). Then, each as a cold process whose
peak RSS (ru_maxrss) is read by a small launcher, as an imager worker runs them:

  aggregate  makeimages with the target's per-spw continuum images and the aggregate
             continuum of all spws (target_cont, target_aggregate)
  cube       makeimages with the target's cubes (target_cube), then, when it hands
             them out in pieces, every imagecube_chunk and the joincube

The stages run with the code on PYTHONPATH, so the same script measures another
checkout (PYTHONPATH=/path/to/checkout). The clean is cut short (niter) so that a run
is minutes: the data held, not the minor cycle, sets the peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_LAUNCHER = """
import resource, subprocess, sys
child = subprocess.run(sys.argv[1:])
print("PEAK_KIB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
sys.exit(child.returncode)
"""

PARAMS = {
    "aggregate": {"calibrators": False, "target_cont": True, "target_aggregate": True, "target_cube": False,
                  "cont": {"niter": 200}},
    "cube": {"calibrators": False, "target_cont": False, "target_aggregate": False, "target_cube": True,
             "cube": {"niter": 100}},
}


def _stage_io(cfg, work: str, run_id: str, index: int, name: str):
    from almapipe.platform.store import CachedFetcher, ObjectStore
    from almapipe.stages.base import StageIO
    store = ObjectStore(cfg)
    wd = os.path.join(work, f"{index:02d}_{name}")
    os.makedirs(wd, exist_ok=True)
    return StageIO(store, CachedFetcher(store, os.path.join(work, f"cache-{index:02d}")), run_id, index, name, wd)


def prepare(cfg, ms: str, work: str, run_id: str) -> dict:
    """The EB's science spws in the store and the context makeimages reads."""
    from almapipe.msio import listobs, storeio
    from almapipe.platform.store import ObjectStore
    from almapipe.platform.visstore import VisStore
    from almapipe.stages.imaging import format_channels, split
    obs = listobs.summary(ms)
    base = os.path.basename(ms).split(".")[0]
    shell = storeio.make_shell(ms, os.path.join(work, f"{base}.meta.ms"))
    meta_key = ObjectStore(cfg).put_dir(shell, f"runs/{run_id}/stages/00_importdata/{base}.meta.ms.tar")["key"]
    vs = VisStore(cfg, cache_dir=None, cache_limit=0)
    parts = []
    for spw in obs["science_spws"]:
        t0 = time.time()
        entry = storeio.ingest_spw(vs, ms, spw, f"runs/{run_id}/vis/{base}.spw{spw}.ms", "00_importdata",
                                   meta_key, f"{base}.spw{spw}.ms")
        print(f"ingested spw {spw}: {entry['nrow']} rows x {entry['nchan']} channels in {time.time() - t0:.0f} s",
              flush=True)
        parts.append(dict(entry, calibrated=True,
                          arrays=dict(entry["arrays"], VISIBILITY_CORRECTED=entry["arrays"]["VISIBILITY"])))
    ctx = {"run_id": run_id, "recipe": {"name": "bench"}, "observation": obs,
           "fields": listobs.assign_roles(obs, None), "partitions": parts, "user": {}, "images": [],
           "stage_results": [], "ms_name": base}
    split(ctx, {}, _stage_io(cfg, work, run_id, 10, "split"))
    targets = sorted({f["name"] for f in ctx["fields"] if "TARGET" in f["intents"]})
    import numpy as np
    contsub, continuum = [], []
    for view in ctx["target_partitions"]:
        n = int(view["nchan"])
        mask = np.zeros(n, bool)
        mask[n // 10:n - n // 10] = True
        chans = format_channels(mask)
        contsub.append(dict(view, cont_chans={t: chans for t in targets}))
        continuum += [{"field": t, "spw": view["spw"], "channels": chans, "frame": "TOPO", "ranges_ghz": []}
                      for t in targets]
    ctx["contsub_partitions"], ctx["continuum"] = contsub, continuum
    return ctx


def child(stage_name: str, ctx_path: str, params_path: str, out_path: str, index: int) -> None:
    """One stage in this process (the launcher reads its peak RSS)."""
    from almapipe.config import Config
    from almapipe.stages.base import REGISTRY
    with open(ctx_path) as f:
        ctx = json.load(f)
    with open(params_path) as f:
        params = json.load(f)
    work = os.path.dirname(ctx_path)
    io = _stage_io(Config.from_env(), work, ctx["run_id"], index, stage_name)
    t0 = time.time()
    qa = REGISTRY[stage_name].fn(ctx, params, io)
    print(f"{stage_name}: {time.time() - t0:.1f} s; {' '.join(qa.reasons)[:400]}", flush=True)
    with open(out_path, "w") as f:
        json.dump(ctx, f)


def run_child(stage_name: str, ctx: dict, params: dict, work: str, tag: str, index: int) -> tuple:
    """(peak RSS MiB, wall s, the context after) of one stage in a cold process."""
    ctx_path, params_path = os.path.join(work, f"{tag}.ctx.json"), os.path.join(work, f"{tag}.params.json")
    out_path = os.path.join(work, f"{tag}.out.json")
    with open(ctx_path, "w") as f:
        json.dump(ctx, f)
    with open(params_path, "w") as f:
        json.dump(params, f)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, os.path.abspath(__file__), "--child",
                           stage_name, ctx_path, params_path, out_path, str(index)],
                          capture_output=True, text=True)
    wall = time.time() - t0
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{stage_name} failed")
    peak = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_KIB"))
    with open(out_path) as f:
        return peak / 1024.0, wall, json.load(f)


def measure(part: str, ctx: dict, work: str) -> list:
    """[(step, peak RSS MiB, wall s)] of one part (aggregate or cube)."""
    params = PARAMS[part]
    rss, wall, after = run_child("makeimages", ctx, params, work, f"{part}-makeimages", 20)
    out = [(f"{part}: makeimages ({len(after['images'])} images)", rss, wall)]
    fan = after.get("fanout")
    if fan:
        keys = []
        for k, item in enumerate(fan["items"]):
            rss, wall, done = run_child("imagecube_chunk", after, dict(params, piece=item), work, f"{part}-piece{k}",
                                        21)
            key = f"runs/{ctx['run_id']}/bench/{part}-piece{k}.json"
            from almapipe.config import Config
            from almapipe.platform.store import ObjectStore
            ObjectStore(Config.from_env()).put_json(key, {"piece": done["piece"]})
            keys.append(key)
            out.append((f"{part}: imagecube_chunk {k} of {len(fan['items'])}", rss, wall))
        rss, wall, joined = run_child("joincube", after, dict(params, pieces=keys), work, f"{part}-join", 22)
        out.append((f"{part}: joincube ({len(joined['images'])} images)", rss, wall))
    return out


def s3_up(work: str):
    """An S3 server of its own (a Stack with only its S3) keeping its data under work/stack;
    the environment set for Config.from_env. Returns the Stack (down() stops it)."""
    from almapipe.platform.stack import Stack, stack_ports, port_free
    os.makedirs(work, exist_ok=True)
    os.environ["ALMAPIPE_DATA_DIR"] = os.path.join(work, "stack")
    if not os.environ.get("ALMAPIPE_PORT_BASE"):
        base = next(b for b in range(31000, 40000, 100) if all(port_free(p) for p in stack_ports(b).values()))
        os.environ["ALMAPIPE_PORT_BASE"] = str(base)
    st = Stack(os.environ["ALMAPIPE_DATA_DIR"])
    os.makedirs(os.path.join(st.data_dir, "logs"), exist_ok=True)
    st._ensure_credentials()
    st._start_s3(st.env(), 90.0)
    st.save()
    return st


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--parts", default="aggregate,cube")
    ap.add_argument("--spw", type=int, default=None, help="the cubes of this spw only")
    ap.add_argument("--reuse", action="store_true", help="use the store and context a previous run left in --work "
                    "(its S3 server is started again)")
    args = ap.parse_args()
    work = os.path.abspath(args.work)
    st = s3_up(work)
    try:
        from almapipe.config import Config
        cfg = Config.from_env()
        ctx_path = os.path.join(work, "prepared.ctx.json")
        if args.reuse and os.path.exists(ctx_path):
            with open(ctx_path) as f:
                ctx = json.load(f)
        else:
            ctx = prepare(cfg, args.ms, work, "bench-imager-memory")
            with open(ctx_path, "w") as f:
                json.dump(ctx, f)
        if args.spw is not None:
            ctx["contsub_partitions"] = [p for p in ctx["contsub_partitions"] if p["spw"] == args.spw]
        rows = []
        for part in args.parts.split(","):
            rows += measure(part, ctx, work)
        print(f"\nload average {os.getloadavg()}")
        print("| step | peak RSS (MiB) | wall (s) |\n|---|---|---|")
        for step, rss, wall in rows:
            print(f"| {step} | {rss:.0f} | {wall:.0f} |")
    finally:
        st.down()


if __name__ == "__main__":
    main()
