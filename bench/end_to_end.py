"""The whole pipeline through the services against CASA's task chain on the same EB.

    .venv/bin/python bench/end_to_end.py --eb DIR [--casa-python PATH] [--sides ours,inplace,casa]

DIR holds an EB as `almapipe simulate` writes it (<name>.ms, flux.csv, antennapos.csv,
truth.json). One invocation measures, one after the other on the same machine:

  ours  a cold stack of its own (data directory and ports of its own), then
        `almapipe run <EB tar>` as a user types it (recipe chosen from the data, every
        stage), timed as a whole process; per stage its wall time and the bytes it moved
        through the visibility store (from the run's context); the peak RSS of every
        stack process (VmHWM); S3 and cache bytes at the end, and after `almapipe gc`.
  inplace  as ours, with the EB's folder the stack's import root and `almapipe run` given
        the MS directory: importdata reads the MS where it lies, nothing is uploaded
        (decision 0022), as CASA reads it.
  casa  CASA's tasks on a copy of the same MS, in one process: flagdata (autocorr,
        shadow, the same edge channels), setjy (flux.csv), bandpass with a phase-up,
        gaincal (phases per integration, amplitude per scan), fluxscale, applycal, then
        tclean for every image our run made (same field, spws, mode, image size, cell,
        robust, threshold and iteration count).

It prints a table and the ratios; the figures in bench/README.md come from it. CASA is
never a dependency: it runs only where --casa-python names an interpreter with casatasks.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def du(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


def load_avg() -> str:
    return open("/proc/loadavg").read().split()[0]


SETTLE = {"below": 1.0, "at_most_s": 120.0}     # --settle: 0 waits for nothing


def settle() -> float:
    """Wait until the machine's 1-minute load falls below SETTLE['below'] (the stack just
    started, or the side before just ended, raise it), at most SETTLE['at_most_s'];
    returns the seconds waited. On this 2-core VM runs of one commit started at loads of
    0.8 to 2.1 took 176 to 198 s."""
    t0 = time.monotonic()
    while float(load_avg()) >= SETTLE["below"] and time.monotonic() - t0 < SETTLE["at_most_s"]:
        time.sleep(2)
    return round(time.monotonic() - t0, 1)


def make_tar(eb_dir: str, out: str) -> str:
    """The EB as ALMA hands it over: the MS with flux.csv and antennapos.csv beside it
    (kept if already made: a large EB's MS may have been deleted to make room)."""
    if not os.path.exists(out):
        ms = glob.glob(os.path.join(eb_dir, "*.ms"))[0]
        with tarfile.open(out, "w") as tar:
            tar.add(ms, arcname=os.path.basename(ms))
            for side in ("flux.csv", "antennapos.csv"):
                if os.path.exists(os.path.join(eb_dir, side)):
                    tar.add(os.path.join(eb_dir, side), arcname=side)
    return out


def peak_rss_of_stack(data_dir: str, field: str = "VmHWM") -> dict:
    """VmHWM (peak resident memory; or another /proc status field) of each process of
    the stack, by name."""
    state = os.path.join(data_dir, "stack.json")
    out = {}
    try:
        procs = json.load(open(state)).get("procs", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return out
    for name, p in procs.items():
        try:
            for line in open(f"/proc/{p['pid']}/status"):
                if line.startswith(field):
                    out[name] = int(line.split()[1]) * 1024
        except (FileNotFoundError, KeyError):
            pass
    return out


class Sampler:
    """Every few seconds: the resident memory of each stack process and the disk in use
    (the whole file system, so S3's, the caches' and the work directories' bytes)."""

    def __init__(self, data_dir: str, period_s: float = 5.0):
        import threading
        self.data_dir, self.period = data_dir, period_s
        self.peak_disk = self.disk0 = shutil.disk_usage(data_dir).used
        self.peak_rss: dict = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stop.wait(self.period):
            self.peak_disk = max(self.peak_disk, shutil.disk_usage(self.data_dir).used)
            for name, rss in peak_rss_of_stack(self.data_dir, "VmRSS").items():
                self.peak_rss[name] = max(self.peak_rss.get(name, 0), rss)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        hwm = peak_rss_of_stack(self.data_dir)          # the kernel's own peak, if still running
        return {"peak_rss": {k: max(v, hwm.get(k, 0)) for k, v in {**hwm, **self.peak_rss}.items()},
                "peak_disk_growth": self.peak_disk - self.disk0}


def cpu_seconds_of_stack(data_dir: str) -> float:
    """utime + stime of every stack process and of the children it waited for (importdata's
    spawned ingest processes), from /proc: CPU time is what a loaded machine does not inflate."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        procs = json.load(open(os.path.join(data_dir, "stack.json"))).get("procs", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return total
    pids = {int(p["pid"]) for p in procs.values() if "pid" in p}
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / tick      # utime stime cutime cstime
        except (FileNotFoundError, KeyError, IndexError):
            pass
    # children still alive (a worker's figure-drawing helper, decision 0018): their time
    # is not in the parent's cutime until they are waited for
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            if int(fields[1]) in pids and int(entry) not in pids:
                total += sum(int(x) for x in fields[11:15]) / tick
        except (FileNotFoundError, IndexError, ValueError):
            pass
    return total


def ours(eb_dir: str, work: str, port_base: int, delete_input: bool = False, extra_env: dict | None = None,
         params: list = (), inspect=None, in_place: bool = False) -> dict:
    """`almapipe run` on the EB's tar through a cold stack. With delete_input the run is
    driven through the same calls (Upload, SubmitRun, WatchRun), the MS directory
    streamed as a tar made on the fly, and the EB deleted once uploaded: a 20 GB EB does
    not fit on this disk three times over. inspect(store, run_id): more figures from the
    run's objects, taken before the stack goes (returned under "inspected"). With
    in_place the EB's folder is the stack's import root and `almapipe run` is given the
    MS directory: importdata reads it where it lies, nothing is uploaded (decision 0022)."""
    work, eb_dir = os.path.abspath(work), os.path.abspath(eb_dir)
    data_dir = os.path.join(work, "stack")
    # the code measured: this checkout's, or extra_env's PYTHONPATH (another commit's); run
    # from the work directory, since `python -m` puts the current directory first on the path
    env = dict(os.environ, ALMAPIPE_DATA_DIR=data_dir, ALMAPIPE_PORT_BASE=str(port_base))
    env.update({"PYTHONPATH": ROOT, **(extra_env or {})})
    almapipe = [sys.executable, "-m", "almapipe.cli"]
    if in_place:
        env["ALMAPIPE_IMPORT_ROOTS"] = eb_dir
    if delete_input or in_place:
        tar = glob.glob(os.path.join(eb_dir, "*.ms"))[0]
        input_bytes = du(tar)
    else:
        tar = make_tar(eb_dir, os.path.join(work, "eb.tar"))
        input_bytes = os.path.getsize(tar)
    param_args = [a for p in params for a in ("--param", p)]
    subprocess.run(almapipe + ["up"], env=env, check=True, stdout=subprocess.DEVNULL, cwd=work)
    try:
        settled = settle()
        load0 = load_avg()
        sampler = Sampler(data_dir)
        cpu0 = cpu_seconds_of_stack(data_dir) + _children_cpu()
        t0 = time.perf_counter()
        if delete_input:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--drive", tar] + param_args, env=env, cwd=work,
                                  capture_output=True, text=True)
        else:
            proc = subprocess.run(almapipe + ["run", tar, "--out", os.path.join(work, "package")] + param_args,
                                  env=env, capture_output=True, text=True, cwd=work)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds_of_stack(data_dir) + _children_cpu() - cpu0
        sampled = sampler.finish()
        if proc.returncode:
            print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
        import re
        found = re.search(r"^run (\S+?):", proc.stdout, re.M)
        run_id = found.group(1) if found else ""
        print(f"run {run_id!r}, exit {proc.returncode}, {wall:.0f} s", file=sys.stderr, flush=True)
        ctx = _final_context(env, run_id)
        inspected = inspect(_store(env)[0], run_id) if inspect else None
        s3_before = _s3_bytes(env, run_id)
        cache = du(os.path.join(data_dir, "cache"))
        gc = subprocess.run(almapipe + ["gc"], env=env, capture_output=True, text=True, cwd=work)
        s3_after = _s3_bytes(env, run_id)
        # a stage's wall time from its start to its end (a fanned-out stage's: to its join's
        # end, its pieces and their queueing included); its bytes are its pieces' too
        # (own_s: the stage's own seconds; a fanned-out stage's and its join's, not its pieces')
        stages = [{"stage": r["name"], "s": r["ended"] - r["started"] if "started" in r else r["duration_s"],
                   "own_s": r["duration_s"], "started": r.get("started"), "ended": r.get("ended"),
                   "pieces_s": r.get("pieces_s", 0.0), **(r.get("bytes") or {})}
                  for r in sorted(ctx.get("stage_results", []), key=lambda r: r["index"])]
        return {"wall_s": wall, "cpu_s": cpu, "status": proc.returncode, "run_id": run_id, "stages": stages, **sampled,
                "s3_bytes": s3_before, "s3_bytes_after_gc": s3_after, "cache_bytes": cache,
                "gc": (gc.stdout + gc.stderr)[-2000:], "input_bytes": input_bytes, "load_at_start": load0, "settled_s": settled,
                "images": ctx.get("images", []), "tail": proc.stdout[-3000:], "inspected": inspected}
    finally:
        subprocess.run(almapipe + ["down"], env=env, stdout=subprocess.DEVNULL, cwd=work)
        shutil.rmtree(data_dir, ignore_errors=True)       # the disk is needed for what comes next


def _children_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def drive(tar: str, params: list) -> int:
    """What `almapipe run MS` does, with the EB deleted once uploaded."""
    from almapipe.cli import follow_run, upload_via_gateway
    from almapipe.config import Config
    from almapipe.platform.auth import channel
    from almapipe.v1 import pipeline_pb2 as pb, pipeline_pb2_grpc as pb_grpc
    cfg = Config.from_env()
    with channel(cfg) as ch:
        stub = pb_grpc.PipelineServiceStub(ch)
        key = upload_via_gateway(stub, pb, tar)
        print(f"uploaded {key}; deleting {tar}", flush=True)
        shutil.rmtree(tar) if os.path.isdir(tar) else os.unlink(tar)
        overrides = dict(p.split("=", 1) for p in params)
        run = stub.SubmitRun(pb.SubmitRunRequest(input_key=key, label=os.path.basename(tar), parameters=overrides),
                             timeout=60)
        return 0 if follow_run(stub, pb, run) == "SUCCEEDED" else 1


def _store(env):
    os.environ.update({k: env[k] for k in ("ALMAPIPE_DATA_DIR", "ALMAPIPE_PORT_BASE")})
    from almapipe.config import Config
    from almapipe.platform.store import ObjectStore
    cfg = Config.from_env()
    return ObjectStore(cfg), cfg


def _final_context(env, run_id: str) -> dict:
    store, _ = _store(env)
    # the stages' contexts (NN_stage.json), not init.json nor a fan-out's record
    keys = sorted(o.object_name for o in store.list(f"runs/{run_id}/context/")
                  if os.path.basename(o.object_name)[:2].isdigit() and ".fanout." not in o.object_name)
    return store.get_json(keys[-1]) if keys else {}


def _s3_bytes(env, run_id: str) -> dict:
    store, cfg = _store(env)
    run = sum(o.size for o in store.list(f"runs/{run_id}/"))
    vis = sum(o.size for o in store.list(f"runs/{run_id}/vis/"))
    raw = sum(o.size for o in store.list("", bucket=cfg.raw_bucket))
    return {"run": run, "visibilities": vis, "raw": raw}


CASA_CHAIN = r'''
import csv, json, os, sys, time
from casatasks import applycal, bandpass, flagdata, fluxscale, gaincal, gencal, setjy, tclean
from casatools import table
ms, work, images = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
truth = json.load(open(os.path.join(os.path.dirname(ms), "truth.json")))
science = truth["science_spws"]; spw = ",".join(map(str, science))
times = {}
def step(name, fn):
    t = time.perf_counter(); fn(); times[name] = time.perf_counter() - t
tb = table(); tb.open(ms + "/SPECTRAL_WINDOW"); nchan = int(tb.getcell("NUM_CHAN", science[0])); tb.close()
edge = max(1, int(round(nchan / 16)))
step("flagdata", lambda: flagdata(vis=ms, mode="list", flagbackup=False, inpfile=[
    f"mode='manual' spw='{spw}' autocorr=True", f"mode='shadow' spw='{spw}'",
    f"mode='manual' spw='{spw}:0~{edge - 1};{nchan - edge}~{nchan - 1}'"]))
rows = list(csv.DictReader(open(os.path.join(os.path.dirname(ms), "flux.csv"))))
def do_setjy():
    for r in rows:           # ALMA's flux.csv: one row per field and spw
        ghz = [w for w in r["comment"].replace(",", " ").split() if w.replace(".", "", 1).isdigit()]
        setjy(vis=ms, field=r["field"], spw=r["spw"], standard="manual", fluxdensity=[float(r["I"]), 0, 0, 0],
              spix=[float(r["spix"] or 0)], reffreq=f"{ghz[-1]}GHz" if ghz else "230GHz", usescratch=False)
step("setjy", do_setjy)
bp, cals, refant = "0", "0,1,2", "1"        # the simulator's field order: bandpass/flux, phase, check, target
def antpos():
    a = list(csv.DictReader(open(os.path.join(os.path.dirname(ms), "antennapos.csv"))))
    gencal(vis=ms, caltable=work + "/A", caltype="antpos", antenna=",".join(r["antenna"] for r in a),
           parameter=[float(r[k]) for r in a for k in ("xoffset_m", "yoffset_m", "zoffset_m")])
step("tsyscal", lambda: gencal(vis=ms, caltable=work + "/T", caltype="tsys"))
step("antpos", antpos)
step("bandpass", lambda: (gaincal(vis=ms, caltable=work + "/P0", field=bp, spw=spw, solint="int", calmode="p",
                                  refant=refant, gaintable=[work + "/A"]),
                          bandpass(vis=ms, caltable=work + "/B", field=bp, spw=spw, solint="inf", combine="scan",
                                   refant=refant, solnorm=True, gaintable=[work + "/A", work + "/P0"])))
step("gaincal", lambda: (gaincal(vis=ms, caltable=work + "/P", field=cals, spw=spw, solint="int", calmode="p",
                                 refant=refant, gaintable=[work + "/A", work + "/B"]),
                         gaincal(vis=ms, caltable=work + "/G", field=cals, spw=spw, solint="inf", calmode="ap",
                                 refant=refant, gaintable=[work + "/A", work + "/B", work + "/P"])))
step("fluxscale", lambda: fluxscale(vis=ms, caltable=work + "/G", fluxtable=work + "/F", reference=bp,
                                    transfer="1,2"))
tsys_map = list(range(max(science) + 1))
for tsys_spw, sci in truth["tsys_spw_map"].items():
    tsys_map[sci] = int(tsys_spw)
step("applycal", lambda: applycal(vis=ms, spw=spw, gaintable=[work + "/T", work + "/A", work + "/B", work + "/F"],
                                  interp=["linear", "", "nearest", "linear"], calwt=[True, False, True, True],
                                  spwmap=[tsys_map, [], [], []]))
def images_():
    for i, im in enumerate(images):
        spws = spw if im.get("aggregate") or im["spw"] in (None, "", -1) else str(im["spw"])
        mode = "cube" if im["specmode"] == "cube" else "mfs"
        tclean(vis=ms, imagename=f"{work}/img{i}", field=str(im["field"]), spw=spws, specmode=mode,
               imsize=[im["imsize"], im["imsize"]], cell=f"{im['cell_arcsec']}arcsec", weighting="briggs",
               robust=im["robust"], deconvolver="hogbom", gridder="mosaic" if im.get("pointings", 1) > 1 else "standard",
               niter=max(int(im.get("niter_done") or 0), 1), threshold=f"{im.get('threshold_jy') or 0}Jy", pbcor=True,
               datacolumn="corrected")
step("tclean", images_)
print(json.dumps(times))
'''


def casa(python: str, eb_dir: str, work: str, images: list) -> dict:
    ms = glob.glob(os.path.join(eb_dir, "*.ms"))[0]
    copy = os.path.join(work, "casa", os.path.basename(ms))
    shutil.rmtree(os.path.dirname(copy), ignore_errors=True)
    os.makedirs(os.path.dirname(copy))
    shutil.copytree(ms, copy)
    for side in ("flux.csv", "antennapos.csv", "truth.json"):
        if os.path.exists(os.path.join(eb_dir, side)):
            shutil.copy(os.path.join(eb_dir, side), os.path.dirname(copy))
    script = os.path.join(work, "casa_chain.py")
    open(script, "w").write(CASA_CHAIN)
    json.dump(images, open(os.path.join(work, "images.json"), "w"))
    settled = settle()
    load0 = load_avg()
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run([python, script, copy, os.path.dirname(copy), os.path.join(work, "images.json")],
                          cwd=os.path.dirname(copy), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
    steps = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    shutil.rmtree(os.path.dirname(copy), ignore_errors=True)
    return {"wall_s": wall, "cpu_s": cpu, "status": proc.returncode, "steps": steps, "load_at_start": load0,
            "settled_s": settled}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eb", help="directory of a simulated EB")
    ap.add_argument("--casa-python", default="")
    ap.add_argument("--sides", default="ours,casa", help="ours (the EB's tar uploaded), inplace (the MS read where "
                    "it lies, decision 0022), casa; comma-separated, run in that order")
    ap.add_argument("--port-base", type=int, default=16000)
    ap.add_argument("--work", default="")
    ap.add_argument("--json", default="", help="write the figures here too")
    ap.add_argument("--delete-input", action="store_true", help="stream the MS to Upload and delete it once "
                    "uploaded (large EBs)")
    ap.add_argument("--param", action="append", default=[], help="stage.param=value, as almapipe run takes it")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the stack (e.g. ALMAPIPE_CACHE_MB=1024)")
    ap.add_argument("--settle", type=float, default=SETTLE["at_most_s"],
                    help="before each side, wait at most this many seconds for the 1-minute load to fall below "
                         f"{SETTLE['below']} (0: do not wait)")
    ap.add_argument("--drive", help=argparse.SUPPRESS)
    args = ap.parse_args()
    SETTLE["at_most_s"] = args.settle
    if args.drive:
        sys.exit(drive(args.drive, args.param))
    if not args.eb:
        ap.error("--eb is required")
    work = args.work or tempfile.mkdtemp(prefix="e2e-")
    os.makedirs(work, exist_ok=True)
    ms = glob.glob(os.path.join(args.eb, "*.ms"))
    out = {"eb": os.path.abspath(args.eb), "ms_bytes": du(ms[0]) if ms else None}
    sides = args.sides.split(",")
    for side in ("ours", "inplace"):
        if side in sides:
            out[side] = ours(args.eb, work, args.port_base, args.delete_input,
                             dict(e.split("=", 1) for e in args.env), args.param, in_place=side == "inplace")
    if "ours" in out or "inplace" in out:       # what ours measured, kept even if the CASA side fails
        json.dump(out, open(os.path.join(work, "ours.json"), "w"), indent=1)
    if "casa" in sides and args.casa_python:
        images = (out.get("ours") or out.get("inplace") or {}).get("images") or \
            json.load(open(os.path.join(work, "images.json")))
        out["casa"] = casa(args.casa_python, args.eb, work, images)
    for side in ("ours", "inplace", "casa"):
        if side in out:
            o = out[side]
            print(f"{side}: {o['wall_s']:.1f} s wall, {o['cpu_s']:.1f} s CPU (exit {o['status']}, "
                  f"load {o['load_at_start']} at start, after {o.get('settled_s', 0)} s of waiting for it)")
    for side in ("ours", "inplace"):
        if side not in out:
            continue
        o = out[side]
        print(f"{side}:")
        print(f"{'stage':16s} {'s':>7s} {'S3 read MB':>11s} {'cache MB':>9s} {'written MB':>11s} {'asked MB':>9s} "
              f"{'decoded/asked':>13s}")
        for s in o["stages"]:
            asked = s.get("requested", 0)
            amp = s.get("decoded", 0) / asked if asked else float("nan")
            print(f"{s['stage']:16s} {s['s']:7.1f} {s.get('s3_read', 0) / 1e6:11.1f} {s.get('cache_read', 0) / 1e6:9.1f} "
                  f"{s.get('s3_written', 0) / 1e6:11.1f} {asked / 1e6:9.1f} {amp:13.2f}")
        print("peak RSS (MB):", {k: round(v / 2**20) for k, v in o["peak_rss"].items()})
        print(f"peak disk growth during the run: {o['peak_disk_growth'] / 1e9:.1f} GB")
        print(f"input {o['input_bytes'] / 1e9:.2f} GB; S3 at the end {o['s3_bytes']}, after gc {o['s3_bytes_after_gc']}; "
              f"cache {o['cache_bytes'] / 1e9:.2f} GB")
    for side in ("ours", "inplace"):
        if side in out and "casa" in out and out["casa"]["wall_s"]:
            print(f"ratio {side}/CASA end to end: wall {out[side]['wall_s'] / out['casa']['wall_s']:.2f}, "
                  f"CPU {out[side]['cpu_s'] / max(out['casa']['cpu_s'], 1e-9):.2f}")
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
