"""The teacher's outputs kept in memory after their first pass over the transfer data.

A run of several epochs feeds the teacher the same batches again and again; its outputs do not
change (the teacher is frozen and in eval mode), so after the first epoch only the student needs to
run. This is the saving of distillation from stored teacher outputs (Shen & Xing 2022, "A Fast
Knowledge Distillation Framework for Visual Recognition", arXiv:2112.01528, store soft labels once
for all epochs), here kept in memory rather than written to disk. The outputs are
held in float16 (11 significant bits; the targets move by at most 0.05%), and only when all of
them fit in the memory limit; otherwise every step runs the teacher as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

Outputs = tuple[torch.Tensor, list[torch.Tensor] | None]


class TeacherCache:
    """``cache(feed, run)`` returns the teacher's (main output, hidden states) for ``feed``, from
    memory after the first time. Hidden states not in ``needed`` come back as ``None``."""

    def __init__(
        self, batches: Sequence[dict[str, np.ndarray]], first: Outputs, needed: set[int], limit_gb: float, repeats: bool
    ):
        self.needed = needed
        self.store: dict[int, Outputs] = {}
        main, states = first
        per_batch = main.numel() + sum(states[i].numel() for i in self._own(first))
        size0 = max(next(iter(batches[0].values())).size, 1)
        scale = sum(next(iter(b.values())).size for b in batches) / size0
        self.gib = per_batch * scale * 2 / 2**30  # float16
        self.on = repeats and 0 < self.gib <= limit_gb
        if repeats:
            log.info(
                "teacher outputs %s in memory (%.2f GiB, limit %.2f GiB)",
                "kept" if self.on else "not kept",
                self.gib,
                limit_gb,
            )

    def _own(self, out: Outputs) -> list[int]:
        """The needed hidden states that are not the main output itself (BERT's last state is)."""
        main, states = out
        if states is None:
            return []
        return [i for i in sorted(self.needed) if states[i].data_ptr() != main.data_ptr()]

    def __call__(self, feed: dict[str, np.ndarray], run: Callable[[], Outputs]) -> Outputs:
        hit = self.store.get(id(feed))
        if hit is not None:
            main, kept = hit
            main = main.float()
            if kept is None:
                return main, None
            return main, [main if v is True else (None if v is None else v.float()) for v in kept]
        out = run()
        if self.on:
            main, states = out
            kept = None
            if states is not None:
                own = set(self._own(out))
                kept = [
                    states[i].half() if i in own else (True if i in self.needed else None) for i in range(len(states))
                ]
            entry = (main.half(), kept)
            if all(
                torch.isfinite(t).all() for t in [entry[0], *(k for k in kept or [] if isinstance(k, torch.Tensor))]
            ):
                self.store[id(feed)] = entry
            else:  # beyond float16's range (an LLM's outlier states): run the teacher every time
                log.info("teacher outputs exceed float16's range; not kept in memory")
                self.on = False
                self.store.clear()
        return out
