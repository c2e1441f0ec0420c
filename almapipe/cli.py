"""The `almapipe` command.

  almapipe up | down | status          the local stack
  almapipe run [INPUT] --out DIR       submit through the gateway, follow, download the products
  almapipe recipes                     list the recipes
  almapipe recipes --describe STAGE    a stage's parameters, what it reads and writes
  almapipe token add NAME --role R     a gateway token for a new identity
  almapipe simulate --preset small     an ALMA-like EB with known truth
  almapipe restore PACKAGE EB.ms --out DIR   the calibrated MS again, from the package
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.request

from .config import Config

DEFAULT_INPUT = os.path.join(os.path.dirname(__file__), "data", "ngc5921.uvfits.gz")
DEFAULT_RECIPE = "ngc5921"


def _stack():
    from .platform.stack import Stack
    return Stack()


def cmd_up(args) -> int:
    from .platform.stack import StackError
    try:
        _stack().up()
    except StackError as exc:
        print(f"almapipe up: {exc}", file=sys.stderr)
        return 1
    cfg = Config.from_env()
    print(f"stack ready: gateway {cfg.gateway_addr}, NATS {cfg.nats_url}, S3 {cfg.s3_endpoint}, data {cfg.data_dir}")
    return 0


def cmd_down(args) -> int:
    _stack().down()
    print("stack stopped")
    return 0


def cmd_status(args) -> int:
    """The stack's processes, its endpoints and whether each answers, and the active runs."""
    import urllib.request
    from .platform.stack import gateway_healthy
    cfg = Config.from_env()
    st = _stack().status()
    if not st:
        print("no stack recorded in", cfg.data_dir)
    for name, s in st.items():
        restarts = f"  restarted {s['restarts']}x" if s.get("restarts") else ""
        print(f"{name:18s} pid {s['pid']:>7d}  {'up' if s['alive'] else 'DOWN'}{restarts}  {s['log']}")
    from .config import port

    def nats_ok():
        with urllib.request.urlopen(f"http://127.0.0.1:{port('nats_monitor')}/healthz", timeout=2) as r:
            return r.status == 200

    def s3_ok():
        from .platform.store import ObjectStore
        return ObjectStore(cfg).ping()
    checks = {f"gateway  {cfg.gateway_addr}": lambda: gateway_healthy(cfg), f"NATS     {cfg.nats_url}": nats_ok,
              f"S3       {cfg.s3_endpoint}": s3_ok}
    healthy = True
    for what, check in checks.items():
        try:
            ok = check()
        except Exception:
            ok = False
        healthy &= ok
        print(f"{what:40s} {'healthy' if ok else 'NOT ANSWERING'}")
    if healthy and cfg.token:
        from .platform.auth import channel
        from .v1 import pipeline_pb2 as pb, pipeline_pb2_grpc as pb_grpc
        import grpc
        try:
            with channel(cfg) as ch:
                runs = pb_grpc.PipelineServiceStub(ch).ListRuns(pb.ListRunsRequest(limit=200), timeout=10).runs
            active = [r for r in runs if r.status in (pb.RUN_STATUS_QUEUED, pb.RUN_STATUS_RUNNING)]
            print(f"active runs: {len(active)} (of the last {len(runs)})")
            for r in active:
                st_ = r.stages[r.current_stage] if r.stages else None
                where = f"{st_.name} {pb.StageStatus.Name(st_.status)[13:].lower()}" if st_ else ""
                print(f"  {r.run_id}  {r.recipe:14s} {r.owner:10s} stage {r.current_stage} {where}")
        except grpc.RpcError as exc:
            print(f"runs: {exc.code().name}: {exc.details()}")
    return 0 if st and healthy and all(s["alive"] for s in st.values()) else 1


def cmd_token(args) -> int:
    """Add an identity to the gateway's token table and print its token (once: the
    table keeps only its hash). The gateway picks the change up at its next call."""
    from .platform.auth import add_token
    cfg = Config.from_env()
    try:
        token = add_token(cfg.tokens_file, args.identity, args.role)
    except ValueError as exc:
        print(f"almapipe token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def cmd_recipes(args) -> int:
    from . import recipes
    if args.describe:
        try:
            print(recipes.describe(args.describe))
        except recipes.RecipeError as exc:
            print(f"almapipe recipes: {exc}", file=sys.stderr)
            return 2
        return 0
    for name in recipes.available():
        r = recipes.load(name)
        print(f"{name}: {' -> '.join(s['stage'] for s in r['stages'])}")
    return 0


def _as_file(path: str, tmp: str) -> str:
    """The input as one file: an MS directory as a tar of itself (in tmp), else itself."""
    import tarfile
    if not os.path.isdir(path):
        return path
    name = os.path.basename(os.path.normpath(path))
    local = os.path.join(tmp, name + ".tar")
    with tarfile.open(local, "w") as t:
        t.add(path, arcname=name)
    return local


def upload_input(cfg: Config, path: str) -> str:
    """Put an input into the raw bucket under a key derived from its content;
    an MS directory travels as a tar of itself. Returns the key."""
    import tempfile
    from .platform.store import ObjectStore, sha256_file
    store = ObjectStore(cfg)
    store.ensure_buckets()
    with tempfile.TemporaryDirectory() as tmp:
        local = _as_file(path, tmp)
        key = f"inputs/{sha256_file(local)[:16]}/{os.path.basename(local)}"
        if not store.exists(key, bucket=store.raw_bucket):
            store.put_file(local, key, bucket=store.raw_bucket)
    return key


class _TarSink:
    """A write-only file for tarfile's stream mode: each block goes to a callback."""

    def __init__(self, on_bytes):
        self.on_bytes = on_bytes

    def write(self, data) -> int:
        self.on_bytes(bytes(data))
        return len(data)


def tar_members(path: str) -> list:
    """[(local path, name in the tar)]: an MS directory as ALMA hands it over, with the
    sidecar files found beside it (flux.csv, antennapos.csv, ...: importdata's SIDECARS)."""
    from .stages.importdata import SIDECARS
    name = os.path.basename(os.path.normpath(path))
    out = [(path, name)]
    for side in SIDECARS:
        p = os.path.join(os.path.dirname(os.path.abspath(path)), side)
        if os.path.isfile(p):
            out.append((p, side))
    return out


def _write_tar(members: list, on_bytes) -> None:
    import tarfile
    with tarfile.open(fileobj=_TarSink(on_bytes), mode="w|") as tar:
        for local, arcname in members:
            tar.add(local, arcname=arcname)         # directories in sorted order: the same bytes each time


def input_digest(path: str) -> tuple[str, int, str]:
    """(name, size, sha256) of an input as Upload receives it: a file as it is, an MS
    directory as the tar of itself and its sidecar files (made on the fly: no copy on
    the disk, which a 20 GB EB would need). The sha256 names the input's key, so it is
    known before the first byte is sent: a pass over the data of its own (12 s for the
    5.5 GB realistic EB here), which `almapipe run` makes while the stack starts."""
    import hashlib
    from .platform.store import sha256_file
    if not os.path.isdir(path):
        return os.path.basename(path), os.path.getsize(path), sha256_file(path)
    members = tar_members(path)
    h, size = hashlib.sha256(), [0]

    def count(b):
        h.update(b)
        size[0] += len(b)
    _write_tar(members, count)
    return members[0][1] + ".tar", size[0], h.hexdigest()


def upload_via_gateway(stub, pb, path: str, digest: tuple[str, int, str] | None = None) -> str:
    """Stream an input to the gateway's Upload RPC (no S3 credentials needed). An MS
    directory travels as a tar of itself (and its sidecar files), made on the fly;
    `digest`: its input_digest, if already known. Returns the input key for SubmitRun."""
    import queue
    import threading
    name, size, sha = digest or input_digest(path)
    if os.path.isdir(path):
        members = tar_members(path)
        blocks: queue.Queue = queue.Queue(maxsize=16)
        pending = bytearray()

        def produce():
            def put(b):
                pending.extend(b)
                while len(pending) >= 1 << 20:
                    blocks.put(bytes(pending[:1 << 20]))
                    del pending[:1 << 20]
            try:
                _write_tar(members, put)
                if pending:
                    blocks.put(bytes(pending))
            finally:
                blocks.put(None)
        threading.Thread(target=produce, daemon=True).start()

        def chunks():
            yield pb.UploadChunk(name=name, size=size, sha256=sha)
            while (data := blocks.get()) is not None:
                yield pb.UploadChunk(data=data)
        return stub.Upload(chunks(), timeout=24 * 3600).key

    def chunks():
        yield pb.UploadChunk(name=name, size=size, sha256=sha)
        with open(path, "rb") as f:
            for data in iter(lambda: f.read(1 << 20), b""):
                yield pb.UploadChunk(data=data)
    return stub.Upload(chunks(), timeout=24 * 3600).key


def _in_background(fn):
    """A Future of fn() run in a daemon thread (a command that gives up early does not
    wait for it to finish)."""
    import threading
    from concurrent.futures import Future
    fut: Future = Future()

    def run():
        try:
            fut.set_result(fn())
        except BaseException as exc:      # handed to whoever asks for the result
            fut.set_exception(exc)
    threading.Thread(target=run, daemon=True, name="digest").start()
    return fut


def cmd_run(args) -> int:
    import grpc
    from .platform.inputs import covering_root
    from .platform.stack import Stack, StackError, gateway_healthy
    from .v1 import pipeline_pb2 as pb, pipeline_pb2_grpc as pb_grpc
    inputs = args.input or [DEFAULT_INPUT]
    for input_path in inputs:
        if not os.path.exists(input_path):
            print(f"almapipe run: input {input_path} does not exist", file=sys.stderr)
            return 2
    input_path = inputs[0]
    # no recipe: the built-in data's own, else the one for the telescope that observed
    # the data, chosen by the pipeline once it has read them
    recipe_name = args.recipe or (DEFAULT_RECIPE if not args.input else None)
    params = {}
    for p in args.param or []:
        k, eq, v = p.partition("=")
        if not eq:
            print(f"almapipe run: --param {p!r}: expected stage.param=value", file=sys.stderr)
            return 2
        params[k] = v
    mous = len(inputs) > 1 or bool(args.mous)
    problem = check_request(recipe_name, args.recipe_file, params, mous)
    if problem:          # refused here, before a stack is started or anything uploaded
        print(f"almapipe run: {problem}", file=sys.stderr)
        return 2
    cfg = Config.from_env()
    own_stack = not gateway_healthy(cfg)
    if own_stack and "ALMAPIPE_IMPORT_ROOTS" not in os.environ:
        # the stack this command starts for itself reads the inputs where they lie
        # (decision 0022): their folders are its import roots
        os.environ["ALMAPIPE_IMPORT_ROOTS"] = os.pathsep.join(
            sorted({os.path.dirname(os.path.realpath(p)) for p in inputs}))
        cfg = Config.from_env()
    in_place = [covering_root(p, cfg.import_roots) is not None for p in inputs]
    # the uploaded inputs' digests (a pass over their bytes, which names their keys) are
    # taken while the stack starts and the request is prepared
    digests = _in_background(lambda: [None if here else input_digest(p) for p, here in zip(inputs, in_place)])
    started = None
    if own_stack:
        print(f"no gateway at {cfg.gateway_addr}: starting the local stack in {cfg.data_dir} ...", flush=True)
        started = Stack()
        try:
            started.up()
        except StackError as exc:
            print(f"almapipe run: {exc}", file=sys.stderr)
            return 1
        cfg = Config.from_env()
    try:
        req = pb.SubmitRunRequest(mous_id=args.mous or "", recipe=recipe_name or "", parameters=params,
                                  flag_template=_read(args.flag_template), cont_dat=_read(args.cont_dat),
                                  label=args.mous or os.path.basename(input_path))
        metadata = []
        if args.recipe_file:
            metadata.append(("x-almapipe-recipe", json.dumps(json.load(open(args.recipe_file)))))
        from .platform.auth import channel
        if not cfg.token:
            print("almapipe run: no token: set ALMAPIPE_TOKEN (or use the local stack's credentials.json)",
                  file=sys.stderr)
            return 2
        with channel(cfg) as ch:
            stub = pb_grpc.PipelineServiceStub(ch)
            try:
                try:
                    run = _submit(stub, pb, req, metadata, inputs, in_place, digests.result(), mous)
                except grpc.RpcError as exc:
                    if not any(in_place) or "ALMAPIPE_IMPORT_ROOTS" not in (exc.details() or ""):
                        raise
                    # a running stack whose import roots do not hold the inputs: upload them
                    print(f"the stack does not read the inputs in place ({exc.details()}): uploading", flush=True)
                    run = _submit(stub, pb, req, metadata, inputs, [False] * len(inputs),
                                  [d or input_digest(p) for p, d in zip(inputs, digests.result())], mous)
            except grpc.RpcError as exc:
                print(f"almapipe run: submit refused: {exc.details()}", file=sys.stderr)
                return 2
            status = follow_run(stub, pb, run)
            if args.out:
                n = download_products(stub, pb, run.run_id, args.out)
                print(f"{n} files of the products package in {args.out}")
        return 0 if status == "SUCCEEDED" else 1
    finally:
        if started is not None and not args.keep_stack:
            started.down()


def _submit(stub, pb, req, metadata, inputs: list, in_place: list, digests: list, mous: bool):
    """SubmitRun with each input's key: file:// and its path where the stack reads it in
    place, else the key Upload answers once it has the bytes."""
    from .platform.inputs import key_for
    keys = []
    for path, here, digest in zip(inputs, in_place, digests):
        if here:
            keys.append(key_for(path))
            print(f"{path}: read in place by the stack (no upload)", flush=True)
        else:
            keys.append(upload_via_gateway(stub, pb, path, digest))
    del req.input_keys[:]
    if mous:
        req.input_keys.extend(keys)
    else:
        req.input_key = keys[0]
    return stub.SubmitRun(req, metadata=metadata, timeout=60)


def check_request(recipe_name: str | None, recipe_file: str | None, params: dict, mous: bool) -> str:
    """What the gateway's SubmitRun would refuse in the recipe and the --param overrides
    (an unknown stage or parameter, a wrong type, a value out of range), or ''. The
    gateway checks again; checking here spares starting a stack and uploading the data."""
    from . import recipes
    try:
        if recipe_file:
            with open(recipe_file) as f:
                recipe = recipes.validate(json.load(f))
        elif recipe_name or mous:          # an MOUS without a recipe is ALMA's
            recipe = recipes.load(recipe_name or "alma_calimage")
        else:                              # chosen from the data's telescope: valid in one candidate
            recipes.check_overrides_somewhere(params, sorted(set(recipes.BY_TELESCOPE.values()) | {recipes.DEFAULT}))
            return ""
        recipes.apply_overrides(recipe, params)
    except recipes.RecipeError as exc:
        return str(exc)
    except (OSError, ValueError) as exc:     # an unreadable file, not JSON
        return f"--recipe-file {recipe_file}: {exc}"
    return ""


def follow_run(stub, pb, run) -> str:
    """Print a submitted run's events until it ends; returns its final status (SUCCEEDED, ...)."""
    print(f"run {run.run_id}: recipe {run.recipe}, {len(run.stages)} stages", flush=True)
    for ev in stub.WatchRun(pb.WatchRunRequest(run_id=run.run_id)):
        _print_event(pb, ev)
    run = stub.GetRun(pb.GetRunRequest(run_id=run.run_id))
    status = pb.RunStatus.Name(run.status).replace("RUN_STATUS_", "")
    print(f"run {run.run_id} {status}" + (f": {run.error}" if run.error else ""), flush=True)
    return status


def _read(path):
    if not path:
        return ""
    with open(path) as f:
        return f.read()


def _print_event(pb, ev) -> None:
    status = pb.StageStatus.Name(ev.status).replace("STAGE_STATUS_", "").lower()
    if ev.stage == "_run":
        return
    line = f"  [{ev.stage_index:2d}] {ev.stage:12s} {status}"
    if ev.status == pb.STAGE_STATUS_SUCCEEDED:
        line += f"  QA {ev.qa_score:.2f}  {ev.duration_s:.1f} s"
        if ev.qa_reasons:
            line += f"  {ev.qa_reasons[-1][:90]}"
    elif ev.message and status != "dispatched":
        line += f"  {ev.message}"
    print(line, flush=True)


# products fetched at once: a package is hundreds of files (FITS, plots, logs)
DOWNLOAD_THREADS = 8


def download_products(stub, pb, run_id: str, out: str) -> int:
    """Fetch a run's products package into out, several files at a time, each checked
    against its sha256 as it is written."""
    from concurrent.futures import ThreadPoolExecutor
    resp = stub.ListProducts(pb.ListProductsRequest(run_id=run_id))

    def fetch(p):
        dest = os.path.join(out, p.path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        h = hashlib.sha256()
        with urllib.request.urlopen(p.url, timeout=120) as r, open(dest, "wb") as f:
            while block := r.read(1 << 20):
                h.update(block)
                f.write(block)
        if p.sha256 and h.hexdigest() != p.sha256:
            raise RuntimeError(f"{p.path}: checksum mismatch after download")
    with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        for _ in pool.map(fetch, resp.products):       # (the first failure is raised here)
            pass
    return len(resp.products)


def cmd_simulate(args) -> int:
    from .simulate.simulator import SimConfig, Simulator
    overrides = {k: v for k, v in (("nant", args.nant), ("nspw", args.nspw), ("nchan", args.nchan),
                                   ("target_scans", args.target_scans), ("seed", args.seed)) if v is not None}
    try:
        cfg = SimConfig.preset(args.preset, **overrides)
    except (ValueError, TypeError) as exc:
        print(f"almapipe simulate: {exc}", file=sys.stderr)
        return 2
    out = Simulator(cfg).write(args.out, args.name)
    print(f"wrote {out['ms']}\n      {out['antennapos']}\n      {out['truth']} (and truth.npz)")
    return 0


def cmd_restore(args) -> int:
    """Rebuild each EB's calibrated MS from the raw EB and the package's calibration/
    (tables, calapply record, flags): no heuristic runs (decision 11)."""
    from .calibration.restore import RestoreError, restore_ms
    if not os.path.isdir(os.path.join(args.package, "calibration")):
        print(f"almapipe restore: {args.package} has no calibration/: not a products package", file=sys.stderr)
        return 2
    for eb in args.eb:
        if not os.path.exists(eb):
            print(f"almapipe restore: EB {eb} does not exist", file=sys.stderr)
            return 2
        try:
            out = restore_ms(args.package, eb, args.out, n_ebs=len(args.eb))
        except RestoreError as exc:
            print(f"almapipe restore: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {out}")
    return 0


def cmd_gc(args) -> int:
    """Apply the retention rule to ended runs (platform/retention.py): products, caltables,
    contexts and logs stay; intermediate visibility versions and old partition tars go."""
    from .platform import retention
    from .platform.bus import BusError
    from .platform.store import ObjectStore, StoreError
    cfg = Config.from_env()
    days = args.drop_vis_after_days if args.drop_vis_after_days is not None else cfg.vis_retention_days
    try:
        reports = retention.gc(cfg, ObjectStore(cfg), args.run_id or None, args.older_than_days, days,
                               args.dry_run)
    except (ValueError, StoreError, BusError) as exc:    # a run not found; S3 or NATS away
        print(f"almapipe gc: {exc}", file=sys.stderr)
        return 2
    freed = 0
    for r in reports:
        if "skipped" in r:
            print(f"{r['run_id']}: skipped ({r['skipped']})")
            continue
        freed += r["freed_bytes"]
        what = "the whole visibility store" if r["dropped_vis"] else "intermediate visibility versions"
        print(f"{r['run_id']} ({r['status'].lower()}): {'would free' if args.dry_run else 'freed'} "
              f"{r['freed_bytes'] / 1e6:.1f} MB in {r['objects']} objects ({what}: {r['vis_objects']}, "
              f"old partition tars: {r['old_partition_tars']}); {r['kept_bytes'] / 1e6:.1f} MB kept")
    print(f"{len(reports)} runs, {freed / 1e6:.1f} MB {'to free' if args.dry_run else 'freed'}")
    return 0


def add_restore_parser(sub) -> None:
    rs = sub.add_parser("restore", help="rebuild calibrated MSs from raw EBs and a products package")
    rs.add_argument("package", help="a products package (the --out directory of `almapipe run`)")
    rs.add_argument("eb", nargs="+", help="the raw EB(s) the run calibrated (MS directory or tar)")
    rs.add_argument("--out", default="restored", help="directory for the calibrated MS(s)")
    rs.set_defaults(fn=cmd_restore)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="almapipe", description="ALMA/VLA calibration and imaging pipeline")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start the local stack").set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the local stack").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="show the local stack's processes").set_defaults(fn=cmd_status)
    rc = sub.add_parser("recipes", help="list recipes; --describe STAGE: a stage's parameters")
    rc.add_argument("--describe", metavar="STAGE", help="print a stage's parameters (types, defaults, allowed values)")
    rc.set_defaults(fn=cmd_recipes)
    tk = sub.add_parser("token", help="gateway tokens: `almapipe token add NAME --role reader`")
    tk.add_argument("action", choices=["add"])
    tk.add_argument("identity")
    tk.add_argument("--role", default="reader", help="reader, submitter, reviewer (QA2 verdicts) or operator")
    tk.set_defaults(fn=cmd_token)
    r = sub.add_parser("run", help="run a recipe on an MS (directory or tar) or UVFITS file")
    r.add_argument("input", nargs="*", help="input data (default: the built-in NGC 5921 VLA data); several "
                                             "execution blocks of an MOUS are calibrated one by one and imaged together")
    r.add_argument("--mous", help="the MOUS's identifier (uid://A001/X1/X2): names the products")
    r.add_argument("--out", default="almapipe-products", help="directory for the products package")
    r.add_argument("--recipe", help="recipe name (see `almapipe recipes`)")
    r.add_argument("--recipe-file", help="a recipe JSON file (e.g. script/recipe.json of an earlier run)")
    r.add_argument("--param", action="append", help="override: stage.param=JSON value (repeatable)")
    r.add_argument("--flag-template", help="flag commands, CASA flagdata list syntax")
    r.add_argument("--cont-dat", help="a cont.dat (ALMA format) to use instead of findcont")
    r.add_argument("--keep-stack", action="store_true", help="leave a stack started by this command running")
    r.set_defaults(fn=cmd_run)
    sm = sub.add_parser("simulate", help="write an ALMA-like execution block with known truth")
    sm.add_argument("--preset", default="small",
                    help="small (tests), realistic (43 antennas, 4 spws, ~1 h), wideband, longbaseline, "
                         "... (SimConfig.preset)")
    sm.add_argument("--out", default="sim-eb", help="output directory")
    sm.add_argument("--name", default="sim", help="MS name (NAME.ms)")
    for opt in ("nant", "nspw", "nchan", "target-scans", "seed"):
        sm.add_argument(f"--{opt}", type=int)
    sm.set_defaults(fn=cmd_simulate)
    add_restore_parser(sub)
    gc = sub.add_parser("gc", help="free the storage of ended runs: products, caltables, contexts and logs "
                                   "stay; intermediate visibility versions go")
    gc.add_argument("run_id", nargs="*", help="runs to collect (default: every ended run)")
    gc.add_argument("--older-than-days", type=float, default=0.0, help="only runs that ended this long ago")
    gc.add_argument("--drop-vis-after-days", type=float, default=None,
                    help="also drop the whole visibility store of runs that ended this long ago "
                         "(default: ALMAPIPE_VIS_RETENTION_DAYS, else never)")
    gc.add_argument("--dry-run", action="store_true", help="report what would be freed, delete nothing")
    gc.set_defaults(fn=cmd_gc)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
