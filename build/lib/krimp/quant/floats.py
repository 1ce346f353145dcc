"""Half-precision weights: FP16 for ONNX Runtime and BF16 for PyTorch.

FP16 (IEEE 754 binary16) halves the artifact; on CPUs without native FP16 arithmetic ONNX Runtime
may run it no faster (or slower) than FP32 — the report measures, it does not assume.
BF16 (Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep Learning Training") keeps FP32's range
with 8 bits of mantissa; ONNX Runtime's CPU kernels lack it, so a BF16 model is a safetensors
artifact evaluated in PyTorch.

Recipe::

    stages:
      - method: fp16
    export: {formats: [onnx]}
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from krimp.config import BaseConfig, register

log = logging.getLogger(__name__)


class Fp16Config(BaseConfig):
    """Convert the exported ONNX graph's float tensors to FP16; inputs and outputs stay FP32."""

    method = "fp16"
    domain = "onnx"
    keep_io_types: bool = True
    op_block_list: list[str] | None = None  # op types to keep in FP32 (ORT's default list if None)


class Bf16Config(BaseConfig):
    """Cast the torch model's floating-point weights to BF16 (artifact: safetensors, runtime: PyTorch)."""

    method = "bf16"
    domain = "torch"


@register(Fp16Config)
class Fp16:
    def apply_onnx(self, src: Path, dst: Path, cfg: Fp16Config, ctx) -> dict:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        from krimp.export.onnx_utils import module_path

        m = onnx.load(str(src))
        kw = {"op_block_list": cfg.op_block_list} if cfg.op_block_list else {}
        kept = cfg.select({n.name: n for n in m.graph.node if n.name}, "ONNX node", alias=module_path)
        excluded = [n.name for n in m.graph.node if n.name and n.name not in kept]
        m16 = convert_float_to_float16(m, keep_io_types=cfg.keep_io_types, node_block_list=excluded, **kw)
        onnx.save(m16, str(dst))
        return {"excluded_by_recipe": excluded}


@register(Bf16Config)
class Bf16:
    def apply_torch(self, module: torch.nn.Module, cfg: Bf16Config, ctx) -> tuple[torch.nn.Module, dict]:
        n = 0
        owners = {name: mod for name, mod in module.named_modules() if name and list(mod.parameters(recurse=False))}
        for mod in cfg.select(owners, "module with parameters").values():
            for p in mod.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
                    n += p.numel()
        return module, {"params_bf16": n}
