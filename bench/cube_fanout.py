"""A cube's channels over imager workers: what the fan-out costs and what it gains.

    .venv/bin/python bench/cube_fanout.py --eb DIR [--configs 1:1,1:4,2:2,2:4,2:8]
        [--cube '{"imsize": 256, "chans": "0~959"}'] [--base-src DIR] [--json OUT]

DIR holds an EB as `almapipe simulate` writes it (the long-baseline preset: FDM spws of
3840 channels). Each configuration WORKERS:CHUNKS is one `almapipe run` through a cold
stack of its own (end_to_end.ours), ALMAPIPE_IMAGER_WORKERS=WORKERS, with makeimages
making only the target's cubes (no calibrator or continuum images) in CHUNKS channel
ranges (`cube_chunks`; 1: makeimages cleans the cube itself, no fan-out). From the run's
objects (the stage's result and each piece's) it takes:

  cube wall  makeimages' start to the last join's end: what a user waits for the cubes;
  heuristics makeimages' start to the first piece's start (its heuristics from the
             whole spw, the pieces' dispatch);
  pieces     the first piece's start to the last piece's end;
  join       the last piece's end to the stage's end (the join's dispatch, restoring,
             the FITS products written and uploaded);
  work       makeimages' and the join's own seconds plus every piece's, summed over
             workers.

With --base-src DIR (a checkout of another commit) each configuration is run with that
commit's code first (PYTHONPATH, for the stack's processes too), then with this one's:
the two sides alternate, so that the machine's drift falls on both.

It prints the table of bench/README.md's "A cube's channels over imager workers" with
the ratios to the first configuration of the same side (with 1:1 first: the cube made in
one piece).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from end_to_end import load_avg, make_tar, ours  # noqa: E402

# makeimages makes the target's cubes only; everything before it runs as in a user's run
CUBE_ONLY = ["makeimages.calibrators=false", "makeimages.target_cont=false", "makeimages.target_aggregate=false"]


def pieces_of(store, run_id: str) -> list:
    """Each cube piece's result (its span and seconds), from runs/<id>/pieces/."""
    out = []
    for o in store.list(f"runs/{run_id}/pieces/"):
        if "imagecube_chunk" in o.object_name:
            p = store.get_json(o.object_name)
            out.append({"started": p["started"], "ended": p["ended"], "s": p["duration_s"],
                        "bytes_read": sum((p.get("bytes") or {}).get(k, 0) for k in ("s3_read", "cache_read"))})
    return sorted(out, key=lambda p: p["started"])


def phases(result: dict) -> dict:
    """The cube's wall time and its parts, from the makeimages stage and its pieces."""
    mk = next(s for s in result["stages"] if s["stage"] == "makeimages")
    pieces = (result.get("inspected") or {}).get("pieces") or []
    out = {"cube_wall_s": mk["s"], "work_s": mk["own_s"] + mk["pieces_s"], "pieces": len(pieces)}
    if pieces:
        first, last = min(p["started"] for p in pieces), max(p["ended"] for p in pieces)
        out.update(heuristics_s=first - mk["started"], pieces_s=last - first, join_s=mk["ended"] - last,
                   piece_s=[round(p["s"], 1) for p in pieces],
                   piece_read_mb=[round(p["bytes_read"] / 1e6, 1) for p in pieces])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eb", required=True, help="directory of a simulated EB")
    ap.add_argument("--configs", default="1:1,1:4,2:2,2:4,2:8", help="WORKERS:CHUNKS, comma separated")
    ap.add_argument("--cube", default='{"robust": 0.5, "niter": 300, "nsigma": 3.0, "automask": true, '
                    '"imsize": 256, "chans": "0~959"}', help="makeimages.cube, as --param takes it")
    ap.add_argument("--base-src", default="", help="a checkout of the commit to compare with")
    ap.add_argument("--port-base", type=int, default=16200)
    ap.add_argument("--work", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="fanout-")
    os.makedirs(work, exist_ok=True)
    tar = make_tar(args.eb, os.path.join(work, "eb.tar"))      # one tar for every configuration
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sides = ([("base", os.path.abspath(args.base_src))] if args.base_src else []) + [("ours", root)]
    rows = []
    for config in args.configs.split(","):
        workers, chunks = (int(x) for x in config.split(":"))
        for side, src in sides:
            run_dir = os.path.join(work, f"{side}-{config.replace(':', 'x')}")
            os.makedirs(run_dir, exist_ok=True)
            if not os.path.exists(os.path.join(run_dir, "eb.tar")):
                os.link(tar, os.path.join(run_dir, "eb.tar"))
            load0 = load_avg()
            res = ours(args.eb, run_dir, args.port_base, False,
                       {"ALMAPIPE_IMAGER_WORKERS": str(workers), "PYTHONPATH": src},
                       CUBE_ONLY + [f"makeimages.cube={args.cube}", f"makeimages.cube_chunks={chunks}"],
                       inspect=lambda store, run_id: {"pieces": pieces_of(store, run_id)})
            row = {"side": side, "workers": workers, "chunks": chunks, "status": res["status"],
                   "run_wall_s": res["wall_s"], "load_at_start": load0,
                   "imager_peak_rss": {k: v for k, v in res["peak_rss"].items() if "imager" in k}, **phases(res)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                json.dump(rows, open(args.json, "w"), indent=1)
    print(f"\n{'side':>5} {'workers':>7} {'chunks':>6} {'cube wall s':>11} {'x first':>7} {'heuristics':>10} "
          f"{'pieces':>7} {'join':>6} {'work s':>7} {'work / first wall':>17} {'imager peak GB':>14}")
    for r in rows:
        first = next(f for f in rows if f["side"] == r["side"])
        rss = max(r["imager_peak_rss"].values(), default=0) / 2**30
        print(f"{r['side']:>5} {r['workers']:7d} {r['chunks']:6d} {r['cube_wall_s']:11.1f} "
              f"{r['cube_wall_s'] / first['cube_wall_s']:7.2f} {r.get('heuristics_s', 0):10.1f} "
              f"{r.get('pieces_s', 0):7.1f} {r.get('join_s', 0):6.1f} {r['work_s']:7.1f} "
              f"{r['work_s'] / first['cube_wall_s']:17.2f} {rss:14.2f}")


if __name__ == "__main__":
    main()
