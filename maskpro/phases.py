"""Phase lines for long jobs: ``[2/4] block re-fit`` when a phase starts, its time when it ends.

A job's bars say how far one phase is; these lines say which phase of how many is running, so a quiet
stretch between two bars never looks like a hang.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("maskpro")


class Phases:
    def __init__(self, names: list[str]):
        self.names = list(names)
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        i, n = self.names.index(name) + 1, len(self.names)
        log.info("[%d/%d] %s", i, n, name)
        t = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t
        log.info("[%d/%d] %s: done in %s (%s since the start)", i, n, name, _clock(self.times[name]),
                 _clock(time.perf_counter() - self.t0))


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"
