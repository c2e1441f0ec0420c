"""What a GB of visibility chunks costs to write to and read from the stack's S3 server,
and to keep in the worker cache, on this machine.

    .venv/bin/python bench/s3_costs.py [--gb 1] [--port-base 27400]

Starts a stack of its own (as `almapipe up`), writes --gb of complex64 chunk objects
(8 MiB, the store's chunk size, LZ4 after a byte shuffle as the store encodes them)
through the visibility store, then reads them back four ways: from S3 filling an empty
cache, from that cache, and from S3 with no cache. For each it prints the wall time,
this process's CPU and the S3 server's CPU (its processes' utime + stime from /proc),
per GB. The figures in bench/README.md ("What the S3 server costs") come from it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROWS, CHANS, CORRS = 4096, 128, 2          # one 8 MiB chunk, as the store chunks a TDM spw


def server_cpu(pids: list) -> float:
    """CPU seconds (user + system) the processes have used."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def server_pids(pid: int) -> list:
    """The S3 server's process and its children (SeaweedFS runs one process; MinIO too)."""
    out = [pid]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p))
            except OSError:
                pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--port-base", type=int, default=27400)
    args = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="s3-costs-")
    os.environ["ALMAPIPE_DATA_DIR"] = data_dir
    os.environ["ALMAPIPE_PORT_BASE"] = str(args.port_base)
    from almapipe.config import Config
    from almapipe.platform.stack import Stack
    from almapipe.platform.visstore import VisStore
    stack = Stack(data_dir)
    stack.up()
    try:
        cfg = Config.from_env()
        pids = server_pids(stack.status()["s3"]["pid"])
        nchunk = max(1, int(args.gb * 1e9 / (ROWS * CHANS * CORRS * 8)))
        gb = nchunk * ROWS * CHANS * CORRS * 8 / 1e9
        rng = np.random.default_rng(1)
        block = (rng.normal(size=(ROWS, CHANS, CORRS)) + 1j * rng.normal(size=(ROWS, CHANS, CORRS))).astype(np.complex64)
        rows = []

        def measure(label, fn):
            s0, c0, t0 = server_cpu(pids), time.process_time(), time.perf_counter()
            fn()
            rows.append((label, (time.perf_counter() - t0) / gb, (time.process_time() - c0) / gb,
                         (server_cpu(pids) - s0) / gb))

        writer = VisStore(cfg, cache_dir=None, cache_limit=0)
        arr = writer.create("bench/VISIBILITY", (nchunk * ROWS, CHANS, CORRS), (ROWS, CHANS, CORRS), "complex64",
                            keep=False)

        def write():
            for k in range(nchunk):
                arr[k * ROWS:(k + 1) * ROWS] = block

        def read(store):
            def run():
                a = store.open("bench/VISIBILITY")
                for k in range(nchunk):
                    a[k * ROWS:(k + 1) * ROWS]
            return run

        measure("write to S3", write)
        cached = VisStore(cfg, cache_dir=os.path.join(data_dir, "bench-cache"), cache_limit=int(4 * gb * 1e9))
        measure("read from S3, filling the cache", read(cached))
        measure("read from the cache", read(cached))
        measure("read from S3, no cache", read(VisStore(cfg, cache_dir=None, cache_limit=0)))
        print(f"{gb:.2f} GB in {nchunk} chunk objects of 8 MiB; per GB:")
        print(f"{'':34s} {'wall (s)':>9s} {'client CPU (s)':>15s} {'S3 server CPU (s)':>18s}")
        for label, wall, client, server in rows:
            print(f"{label:34s} {wall:9.2f} {client:15.2f} {server:18.2f}")
    finally:
        stack.down()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
