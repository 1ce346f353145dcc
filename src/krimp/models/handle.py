"""What a loaded model is: the handle every verb and stage works on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from krimp.models.tasks import Task
from krimp.stage import Needs


@dataclass
class ModelHandle:
    """A loaded model: a torch module and/or an ONNX file, its task adapter and where it came from."""

    task: Task
    source: str
    kind: str  # hf | gguf | onnx | openvino | torch | builtin
    module: torch.nn.Module | None = None
    onnx_path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    needs: Needs = field(default_factory=Needs)  # a model that arrives compressed keeps its form on export

    @property
    def num_params(self) -> int:
        if self.module is not None:
            return sum(p.numel() for p in self.module.parameters())
        if self.kind == "openvino":
            import openvino as ov

            model = ov.Core().read_model(str(self.onnx_path))
            consts = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]
            return sum(int(np.prod(c.get_output_shape(0))) for c in consts if len(c.get_output_shape(0)) >= 2)
        from krimp.export.onnx_utils import count_onnx_params

        return count_onnx_params(self.onnx_path)

    @property
    def builtin_origin(self) -> str | None:
        """The builtin model this is, or was exported from (its builtin data follows it)."""
        return self.source if self.kind == "builtin" else self.info.get("origin")
