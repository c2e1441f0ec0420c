"""The suite's long runs through the stack, submitted together.

A run keeps about one of the machine's two cores busy: one stage at a time, on one
worker. So the long runs are submitted together, when the first is needed. The stack's
services then work on several at once, one run's calibrator stage beside another's
imaging.

* A test module registers each run it needs with `@pooled(name)`. The name is that of
  the fixture that gives the run's result, or `fixture:param` for a parametrized one.
* The session's RunPool (conftest's `run_pool`) submits the runs that the selected tests
  use, in the order they were registered (the order of the modules).
* A module that kills workers or restarts servers sets DISTURBS_STACK = True. Every run
  of the pool has ended before its tests start.
"""
from __future__ import annotations

from typing import Callable

# name -> submit(stack, stub, folder) -> finish(): the run's result, once it has ended
RUNS: dict[str, Callable] = {}
ACTIVE = None           # the session's RunPool, once made


def pooled(name: str):
    """Registers a run: the decorated function submits it and returns a function that
    waits for it and returns what the tests read."""
    def register(submit: Callable) -> Callable:
        RUNS[name] = submit
        return submit
    return register


def used_runs(items) -> set:
    """The registered runs that the collected test items use (their fixtures, and
    parametrized fixtures as fixture:param)."""
    names = set()
    for item in items:
        names |= set(item.fixturenames)
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            names |= {f"{k}:{v}" for k, v in callspec.params.items()}
    return names & set(RUNS)


class RunPool:
    def __init__(self, stack, stub, mktemp: Callable, names: set):
        self.finish = {}
        self.results = {}
        for name in RUNS:
            if name in names:
                self.finish[name] = RUNS[name](stack, stub, mktemp(name.replace(":", "-")))

    def result(self, name: str):
        """The run's result, waiting for it to end the first time it is asked for."""
        if name not in self.results:
            self.results[name] = self.finish[name]()
        return self.results[name]

    def drain(self) -> None:
        """Waits until every submitted run has ended."""
        for name in self.finish:
            self.result(name)
