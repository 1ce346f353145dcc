"""Quantization methods. Importing this package registers them (see krimp.config.REGISTRY)."""

from krimp.quant import floats, llm, ort_int8, qat  # noqa: F401  (registration)
from krimp.quant.floats import Bf16Config, Fp16Config
from krimp.quant.ort_int8 import DynamicInt8Config, StaticInt8Config

__all__ = ["Bf16Config", "DynamicInt8Config", "Fp16Config", "StaticInt8Config"]
