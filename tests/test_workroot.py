"""Work folders are swept after a killed worker, never under a live sibling."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from almapipe.platform.worker import LOCK_GRACE_S, claim_workroot

# kills workers or restarts servers: the suite's pooled runs end first (tests/runpool.py)
DISTURBS_STACK = True

# a worker as far as its work folder goes: claim it, fill it, say where, live on
CHILD = """
import os, sys, time
from almapipe.platform.worker import claim_workroot
folder, lock = claim_workroot(sys.argv[1])
os.makedirs(os.path.join(folder, "importdata-x1", "eb.ms"))
open(os.path.join(folder, "importdata-x1", "eb.ms", "table.f0"), "wb").write(b"v" * 100000)
print(folder, flush=True)
time.sleep(600)
"""


def start_worker(root: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-c", CHILD, root], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    return p, p.stdout.readline().strip()


def age(path: str, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_killed_workers_folder_is_swept_and_a_live_ones_kept(tmp_path):
    root = str(tmp_path / "work" / "calibrator")
    live, live_dir = start_worker(root)
    killed, killed_dir = start_worker(root)
    try:
        os.makedirs(os.path.join(root, "applycal-old"))      # a stage folder of the layout before
        killed.send_signal(signal.SIGKILL)                   # no cleanup runs
        killed.wait()
        assert os.path.isdir(killed_dir)
        for d in (live_dir, killed_dir):                     # both claimed long ago
            age(d + ".lock", 2 * LOCK_GRACE_S)
        mine, lock = claim_workroot(root)                    # the next worker to start
        try:
            assert not os.path.exists(killed_dir) and not os.path.exists(killed_dir + ".lock")
            assert not os.path.exists(os.path.join(root, "applycal-old"))
            assert os.path.isfile(os.path.join(live_dir, "importdata-x1", "eb.ms", "table.f0"))
            assert os.path.isdir(mine) and mine != live_dir
            # the live sibling, starting again later, leaves this worker's folder alone
            age(mine + ".lock", 2 * LOCK_GRACE_S)
            other, other_lock = claim_workroot(root)
            assert os.path.isdir(mine) and os.path.isdir(live_dir)
            other_lock.close()
        finally:
            lock.close()
    finally:
        live.kill()
        live.wait()
    # all gone: the next start leaves only its own folder
    for f in os.listdir(root):
        age(os.path.join(root, f), 2 * LOCK_GRACE_S)
    final, final_lock = claim_workroot(root)
    assert sorted(os.listdir(root)) == sorted([os.path.basename(final), os.path.basename(final) + ".lock"])
    final_lock.close()


def test_a_lock_file_just_created_is_not_taken(tmp_path):
    """Between creating its lock file and locking it, a starting worker's folder is not swept."""
    root = str(tmp_path / "w")
    os.makedirs(root)
    open(os.path.join(root, "w-1-abc.lock"), "w").close()    # created, not yet locked
    os.makedirs(os.path.join(root, "w-1-abc"))
    mine, lock = claim_workroot(root)
    assert os.path.isdir(os.path.join(root, "w-1-abc"))
    lock.close()


def test_a_killed_imager_workers_folder_goes_when_it_starts_again(stack):
    """The stack's imager workers (two share the root): one killed as a crash would be
    (SIGKILL) leaves its folder; started again, it removes it and keeps its sibling's."""
    import glob
    st, cfg = stack
    root = os.path.join(cfg.data_dir, "work", "imager")

    def folder(name):
        t_end = time.time() + 60
        while time.time() < t_end:
            found = glob.glob(os.path.join(root, f"w-{st.procs[name]['pid']}-*.lock"))
            if found:
                return found[0][:-5]
            time.sleep(0.2)
        raise TimeoutError(f"{name} claimed no work folder under {root}")

    victim, sibling = folder("worker-imager-2"), folder("worker-imager")
    os.makedirs(os.path.join(victim, "makeimages-x", "target.ms"))
    open(os.path.join(victim, "makeimages-x", "target.ms", "table.f0"), "wb").write(b"v" * 100000)
    st.stop("worker-imager-2")
    assert os.path.isdir(victim)
    age(victim + ".lock", 2 * LOCK_GRACE_S)
    age(sibling + ".lock", 2 * LOCK_GRACE_S)
    st.start("worker-imager-2")
    new = folder("worker-imager-2")
    assert new != victim and os.path.isdir(new)
    assert not os.path.exists(victim) and not os.path.exists(victim + ".lock")
    assert os.path.isdir(sibling)


BLOCKS_SCRIPT = r"""
import resource, sys, threading
import numpy as np
from almapipe.platform import memory
tuned = memory.tune_malloc() if sys.argv[1] == "tuned" else False

def blocks():          # as a stage reads: a 64 MiB block allocated, filled, freed, in a thread
    for _ in range(20):
        b = np.empty(64 << 20, np.uint8)
        b[:] = 1
        del b

def faults(fn):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = threading.Thread(target=fn)
    t.start()
    t.join()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults(blocks)                     # the heap grows to one block
print(tuned, faults(blocks))
"""


def test_a_workers_row_blocks_reuse_its_heap(tmp_path):
    """With the workers' malloc settings (platform/memory.py) a block freed is the next
    block's memory: 20 blocks of 64 MiB allocated and freed in a thread fault in almost
    no page (5 here). glibc's defaults map every block afresh: 661 faults here, where
    numpy asks for huge pages; 20 x 16,384 where there are none."""
    import subprocess
    import sys
    script = tmp_path / "blocks.py"
    script.write_text(BLOCKS_SCRIPT)
    out = {}
    for mode in ("tuned", "default"):
        proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=120,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert proc.returncode == 0, proc.stderr
        tuned, n = proc.stdout.split()
        out[mode] = (tuned == "True", int(n))
    assert out["tuned"][0], "tune_malloc refused on this glibc"
    assert out["tuned"][1] < 200 and out["tuned"][1] < out["default"][1] / 2, out
