"""INT8 for ONNX Runtime: dynamic (weights INT8 ahead of time, activations at run time) and static
(activations calibrated ahead of time: min-max, percentile or entropy), per-channel weights, QDQ.

Method references: Jacob et al. 2018 (integer-arithmetic-only inference, affine quantization);
Migacz 2017 (entropy / KL calibration, "8-bit Inference with TensorRT"); Wu et al. 2020
("Integer Quantization for Deep Learning Inference", percentile calibration). The graph rewriting
is ONNX Runtime's own quantization tool; krimp chooses the settings, the nodes, and the fallback.

Recipe::

    stages:
      - method: int8-static
        calibration: percentile
        ignore: ["/_fc/*"]
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import pydantic

from krimp.config import BaseConfig, register
from krimp.quant.fallback import auto_fallback
from krimp.quant.nodes import select_excluded

log = logging.getLogger(__name__)


class _Int8Base(BaseConfig):
    domain = "onnx"
    per_channel: bool = True  # one scale per output channel of each weight
    reduce_range: Literal["auto", True, False] = "auto"  # 7-bit weights on x86 without VNNI
    op_types: list[str] | None = None  # None: ONNX Runtime's default set (int8-static on text: MatMul, Gemm, Attention)
    fallback: bool = True  # take the most harmful nodes out of INT8 until the goal holds
    max_fallback_nodes: int = pydantic.Field(8, ge=0)
    # what a fallback MatMul keeps: "int8" weights with float activations (weight-only, blocks of
    # 32, ONNX Runtime's MatMulNBits) or plain "float"; other node types fall back to float
    fallback_weights: Literal["int8", "float"] = "int8"


class DynamicInt8Config(_Int8Base):
    """INT8 weights, activations quantized at run time per tensor (uint8)."""

    method = "int8-dynamic"
    weight_type: Literal["int8", "uint8"] = "int8"


class StaticInt8Config(_Int8Base):
    """INT8 weights and activations with ranges calibrated on the calibration data, as QDQ."""

    method = "int8-static"
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = pydantic.Field(99.999, gt=90, le=100)
    activation_type: Literal["uint8", "int8"] = "uint8"  # uint8 x int8 is the fast x86 path
    weight_type: Literal["int8", "uint8"] = "int8"
    format: Literal["qdq", "qoperator"] = "qdq"
    calib_batches: int = pydantic.Field(16, ge=1)
    # convolution weights: GPTQ's error-compensating rounding on ONNX Runtime's grid
    # (krimp.quant.conv_gptq; QDQ only) or ONNX Runtime's nearest rounding
    weight_rounding: Literal["gptq", "nearest"] = "gptq"
    rounding_damp: float = pydantic.Field(0.01, gt=0, lt=1)


@contextlib.contextmanager
def _working_dir(path: str | Path):
    """Run a block with ``path`` as the working directory (for tools that write beside it)."""
    import os

    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def cpu_has_vnni() -> bool:
    """True where 8-bit dot products cannot saturate (VNNI, AMX) or the CPU is not x86."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _reduce_range(cfg: _Int8Base) -> bool:
    return (not cpu_has_vnni()) if cfg.reduce_range == "auto" else bool(cfg.reduce_range)


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


@register(DynamicInt8Config)
class DynamicInt8:
    def apply_onnx(self, src: Path, dst: Path, cfg: DynamicInt8Config, ctx) -> dict:
        from onnxruntime.quantization import quantize_dynamic

        def run(exclude: list[str]) -> None:
            quantize_dynamic(
                str(src),
                str(dst),
                weight_type=_qtype(cfg.weight_type),
                per_channel=cfg.per_channel,
                reduce_range=_reduce_range(cfg),
                op_types_to_quantize=cfg.op_types,
                nodes_to_exclude=exclude,
                extra_options={"DefaultTensorType": 1},
            )

        return _with_fallback(run, src, dst, cfg, ctx)


@register(StaticInt8Config)
class StaticInt8:
    def apply_onnx(self, src: Path, dst: Path, cfg: StaticInt8Config, ctx) -> dict:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        method = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }[cfg.calibration]
        with tempfile.TemporaryDirectory(prefix="krimp-") as tmp:
            pre = Path(tmp) / "pre.onnx"
            try:
                # from inside tmp: when its symbolic shape inference is incomplete, ONNX Runtime saves
                # the model (with its weights as a uuid-named .data file) into the working directory
                with _working_dir(tmp):
                    quant_pre_process(str(Path(src).resolve()), str(pre), skip_symbolic_shape=not ctx.task.is_text)
            except Exception as e:  # pre-processing is an optimisation; quantize the plain graph
                log.warning("ONNX Runtime pre-processing failed (%s); quantizing the plain graph", e)
                pre = src
            import onnx

            graph_inputs = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}
            # only what the graph takes: an export drops inputs the model never reads (DeBERTa's token types)
            feeds = [{k: v for k, v in f.items() if k in graph_inputs} for f in ctx.calib_feeds[: cfg.calib_batches]]
            if cfg.calibration != "minmax":  # ORT's histograms stack every batch: one shape for all
                feeds = same_shape(feeds)

            # GPTQ rounding: conv Hessians and codes computed once, written into every fallback try
            stats, codes, rounding = {}, {}, {}  # rounding: info per set of excluded nodes
            if cfg.weight_rounding == "gptq" and cfg.format == "qdq":
                from krimp.quant.conv_gptq import conv_hessians, gptq_round_convs

                stats = conv_hessians(pre, feeds)
                codes = gptq_round_convs(stats, 64 if _reduce_range(cfg) else 127, cfg.rounding_damp)

            def run(exclude: list[str]) -> None:
                with contextlib.redirect_stdout(io.StringIO()):  # its histogram calibrators print
                    _static(exclude)
                if stats:
                    from krimp.quant.conv_gptq import round_conv_weights

                    rounding[tuple(sorted(exclude))] = round_conv_weights(dst, stats, codes, cfg.rounding_damp)

            # text transformers: the weight-bearing ops only. Adds, Muls and Wheres of the plain graph
            # also carry the attention mask (0 / float-min), whose range breaks histogram calibration
            op_types = cfg.op_types or (["MatMul", "Gemm", "Attention"] if ctx.task.is_text else None)

            def _static(exclude: list[str]) -> None:
                quantize_static(
                    str(pre),
                    str(dst),
                    _Reader(feeds),
                    calibrate_method=method,
                    quant_format=QuantFormat.QDQ if cfg.format == "qdq" else QuantFormat.QOperator,
                    per_channel=cfg.per_channel,
                    reduce_range=_reduce_range(cfg),
                    activation_type=_qtype(cfg.activation_type),
                    weight_type=_qtype(cfg.weight_type),
                    op_types_to_quantize=op_types,
                    nodes_to_exclude=exclude,
                    extra_options={"CalibPercentile": cfg.percentile, "DefaultTensorType": 1},
                )

            # the fallback ranks each conv with the weight it will really get
            info = _with_fallback(run, pre, dst, cfg, ctx, {n: r.dequantized() for n, r in codes.items()} or None)
            kept = tuple(sorted(info["excluded_by_recipe"] + (info.get("fallback") or {}).get("excluded", [])))
            return {**info, "weight_rounding": rounding.get(kept, {"method": "nearest"})}


def same_shape(feeds: list[dict]) -> list[dict]:
    """Zero-pad every input to the largest shape seen across batches (text batches are padded to
    their own longest sequence; a zero attention mask keeps the added positions out of the result)."""
    if not feeds:
        return feeds
    top = {k: np.max([f[k].shape for f in feeds], axis=0) for k in feeds[0]}
    out = []
    for f in feeds:
        g = {}
        for k, v in f.items():
            pad = [(0, int(t) - n) for n, t in zip(v.shape, top[k], strict=True)]
            g[k] = np.pad(v, pad) if any(p for _, p in pad) else v
        out.append(g)
    return out


class _Reader:
    """ONNX Runtime's calibration data reader over krimp's calibration feeds."""

    def __init__(self, feeds):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def weight_only_int8(path: Path, nodes: list[str], block_size: int = 32) -> list[str]:
    """Turn float MatMul nodes with constant weights into 8-bit weight-only MatMulNBits, in place."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer}
    todo = [n.name for n in m.graph.node if n.name in nodes and n.op_type == "MatMul" and n.input[1] in inits]
    if not todo:
        return []
    q = MatMulNBitsQuantizer(m, bits=8, block_size=block_size, is_symmetric=True, nodes_to_include=todo)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    q.process()
    q.model.save_model_to_file(str(path), use_external_data_format=False)
    return todo


def _with_fallback(run, src: Path, dst: Path, cfg: _Int8Base, ctx, weights: dict | None = None) -> dict:
    excluded = select_excluded(src, cfg)
    info = {"excluded_by_recipe": excluded, "reduce_range": _reduce_range(cfg)}

    def run_with(extra: list[str]) -> None:
        run(excluded + extra)
        if extra and cfg.fallback_weights == "int8":
            weight_only_int8(dst, extra)

    run_with([])
    if cfg.fallback and cfg.max_fallback_nodes > 0 and ctx.goal_check is not None:
        mode = "dynamic" if isinstance(cfg, DynamicInt8Config) else "static"
        bits = 7 if _reduce_range(cfg) else 8
        info["fallback"] = auto_fallback(run_with, src, dst, excluded, cfg.max_fallback_nodes, ctx, mode, bits, weights)
        info["fallback"]["weights"] = cfg.fallback_weights
    return info
