"""Progress of a long run, from the one-line messages stages send through ``step``.

A message may carry a count, ``"GPTQ: block 3/30"``: the text before the count names the phase, and
the count drives a progress bar (with rate and ETA) in the CLI. When a message names another phase,
the last one is finished: :class:`PhaseLog` turns it into one line with its duration, which the CLI
keeps on the screen and the run writes to ``run.log`` in its output folder, with the process's peak
resident memory so far (the phase that raised it is the one to look at).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from krimp.memory import peak_rss_mb

_COUNT = re.compile(r"(\d+)/(\d+)")


def count(msg: str) -> tuple[int, int] | None:
    """``(done, total)`` from a message's first ``k/n``, or None."""
    m = _COUNT.search(msg)
    return (int(m.group(1)), int(m.group(2))) if m else None


def phase(msg: str) -> str:
    m = _COUNT.search(msg)
    return (msg[: m.start()] if m else msg).rstrip(" :(")


class PhaseLog:
    """Calls ``sink(line)`` once per finished phase: its last message and how long it took."""

    def __init__(self, sink: Callable[[str], None]):
        self.sink, self.current, self.last, self.t0 = sink, None, "", time.perf_counter()

    def __call__(self, msg: str) -> None:
        p = phase(msg)
        if p != self.current:
            self.close()
            self.current, self.t0 = p, time.perf_counter()
        self.last = msg

    def close(self) -> None:
        if self.current is not None:
            self.sink(f"{self.last} ({time.perf_counter() - self.t0:.1f} s, peak RSS {peak_rss_mb() / 1024:.2f} GiB)")
            self.current = None
