"""What a method is given (:class:`StageContext`) and what it declares its output needs (:class:`Needs`).

Methods import this module, never the pipeline: the pipeline builds a context per stage, calls the
method, and reads back ``ctx.needs``; the exporters (krimp.export) read the needs of the whole run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from krimp.errors import KrimpError

#: how the compressed torch model becomes ONNX: a plain float graph; QDQ pairs with the trained
#: activation grids (``krimp_act``) and int8 weights; or MatMulNBits with the weight-only codes (``krimp_wq``)
OnnxForm = Literal["float", "qdq", "nbits"]
_RANK = {"float": 0, "nbits": 1, "qdq": 2}  # QDQ also writes the int8 weights of its layers


@dataclass(frozen=True)
class Needs:
    """What a stage's output needs from the exporters; a method declares it with :meth:`StageContext.declare`
    (and a loader for a model that arrives compressed)."""

    onnx: OnnxForm = "float"
    packed: bool = False  # safetensors must store codes, bitmasks or changed shapes (krimp-packed-v1)
    onnx_only: str = ""  # why no torch format can hold this model (empty: any can)

    def merge(self, later: Needs) -> Needs:
        """The needs of two stages applied in order."""
        onnx = later.onnx if _RANK[later.onnx] >= _RANK[self.onnx] else self.onnx
        return Needs(onnx, self.packed or later.packed, self.onnx_only or later.onnx_only)


@dataclass
class StageContext:
    """What a method may use: the task, calibration feeds, and a goal check on calibration data."""

    task: Any
    calib_feeds: list[dict[str, np.ndarray]]
    threads: int
    goal_check: Callable[[Path], tuple[bool, dict]] | None = None
    max_size_ratio: float | None = None  # a fallback try that breaks this limit is not kept
    distance: Callable[[Path | bytes], float] | None = None
    step: Callable[[str], None] = lambda s: None  # progress line for long stages ("k/n" in it: krimp.progress)
    batch: int = 8
    calib_items: list = field(default_factory=list)  # raw items, for stages that batch their own data
    calib_labels: list[int] | None = None
    seq_len: int = 128
    ckpt_dir: Path | None = None  # where a training stage keeps checkpoints that a rerun resumes
    device: str = "cpu"  # where layer-wise calibration works on each block (resources.device, resolved)
    needs: Needs = field(default_factory=Needs)  # filled by the method: what its output needs from the exporters

    def declare(self, onnx: OnnxForm | None = None, packed: bool = False, onnx_only: str = "") -> None:
        """Say what this stage's output needs from the exporters (see :class:`Needs`)."""
        if onnx is not None and onnx not in _RANK:
            raise KrimpError(f"unknown ONNX form '{onnx}' (known: {', '.join(_RANK)})")
        self.needs = self.needs.merge(Needs(onnx or "float", packed, onnx_only))
