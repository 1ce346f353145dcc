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
    # text: the MatMul of attention probabilities (a Softmax output) by the values. "float" keeps it out
    # of INT8: on a uint8 grid of steps of 1/255 most small probabilities become 0
    attention_probs: Literal["float", "int8"] = "float"
    # text: the embedding tables (Gather) as int8 with one scale per row. OpenVINO gathers from the int8
    # table; ONNX Runtime would dequantize the whole table on every call (keep "float" there)
    embeddings: Literal["float", "int8"] = "float"


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

                    rounding[tuple(sorted(set(exclude)))] = round_conv_weights(dst, stats, codes, cfg.rounding_damp)

            # text transformers: the weight-bearing ops only. Adds, Muls and Wheres of the plain graph
            # also carry the attention mask (0 / float-min), whose range breaks histogram calibration
            op_types = cfg.op_types or (["MatMul", "Gemm", "Attention"] if ctx.task.is_text else None)
            extra = {"CalibPercentile": cfg.percentile, "DefaultTensorType": 1}
            if ctx.task.is_text:
                # a projection's inputs only: ONNX Runtime would also round each MatMul's output (before
                # its bias) to one per-tensor range, and a transformer's FFN output carries the residual
                # stream's few huge channels (cosine 0.94 on MiniLM with it, 0.997 without: openvino_findings.md)
                extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
                # attention's query and key (a MatMul of two activations): symmetric int8, the form
                # OpenVINO's fused INT8 attention takes
                extra["TensorQuantOverrides"] = {
                    t: [{"quant_type": _qtype("int8"), "symmetric": True}] for t in attention_matmuls(pre)[1]
                }

            def _static(exclude: list[str]) -> None:
                _quantize(exclude)
                if ctx.task.is_text:
                    hoist_qdq(dst)
                    if cfg.embeddings == "int8":
                        embeddings_int8(dst)

            def _quantize(exclude: list[str]) -> None:
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
                    extra_options=extra,
                )

            probs = attention_matmuls(pre)[0] if ctx.task.is_text and cfg.attention_probs == "float" else []
            # the fallback ranks each conv with the weight it will really get
            weights = {n: r.dequantized() for n, r in codes.items()} or None
            info = _with_fallback(run, pre, dst, cfg, ctx, weights, always=probs)
            if probs:
                info["attention_probs_float"] = len(probs)
            kept = tuple(
                sorted({*info["excluded_by_recipe"], *probs, *(info.get("fallback") or {}).get("excluded", [])})
            )
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


def hoist_qdq(path: Path) -> int:
    """Move each per-tensor QuantizeLinear/DequantizeLinear pair that feeds a MatMul above the Reshape and
    Transpose nodes before it, in place; returns how many moved. Rounding to one grid commutes with
    reshaping and transposing, so the model computes the same; OpenVINO then sees attention's query and
    key quantized where its fused INT8 attention looks for them (behind Transpose it keeps the pair as a
    separate FakeQuantize and runs attention in float32: MiniLM 10% slower, bench/results/openvino_findings.md)."""
    import onnx

    m = onnx.load(str(path))
    g = m.graph
    made_by = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}
    moved = 0
    for d in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        q = made_by.get(d.input[0])
        users = readers.get(d.output[0], [])
        if q is None or q.op_type != "QuantizeLinear" or len(users) != 1 or users[0].op_type != "MatMul":
            continue
        if q.input[1] not in inits or len(inits[q.input[1]].dims) != 0 or len(readers.get(q.output[0], [])) != 1:
            continue  # per-tensor pairs only: a per-channel grid does not commute with a transpose
        bottom = made_by.get(q.input[0])
        chain = []
        node = bottom
        while node is not None and node.op_type in ("Reshape", "Transpose") and len(readers[node.output[0]]) == 1:
            chain.append(node)
            node = made_by.get(node.input[0])
        if not chain:
            continue
        top = chain[-1]
        q.input[0], top.input[0] = top.input[0], d.output[0]
        users[0].input[list(users[0].input).index(d.output[0])] = bottom.output[0]
        moved += 1
    if moved:
        from onnxruntime.quantization.onnx_model import ONNXModel

        ONNXModel(m).topological_sort()  # each moved pair now comes before the Reshape it feeds
        onnx.save(m, str(path))
    return moved


def embeddings_int8(path: Path) -> int:
    """Store each float embedding table that a Gather reads (2-D, by row) as int8 codes with one symmetric
    scale per row behind a DequantizeLinear, in place; returns how many tables."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    done, new_nodes = 0, []
    for n in g.node:
        t = inits.get(n.input[0]) if n.op_type == "Gather" else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if t is None or len(t.dims) != 2 or axis != 0 or t.data_type != onnx.TensorProto.FLOAT:
            continue
        if any(r.op_type != "Gather" for r in readers[t.name]):
            continue  # a table shared with a MatMul (a tied head) keeps its float values
        w = numpy_helper.to_array(t).astype(np.float32)
        scale = np.maximum(np.abs(w).max(1), 1e-12) / 127
        codes = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
        name = t.name
        t.CopyFrom(numpy_helper.from_array(codes, name + "_int8"))
        g.initializer.append(numpy_helper.from_array(scale.astype(np.float32), name + "_scale"))
        new_nodes.append(
            helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale"], [name], name + "_dq", axis=0)
        )
        done += 1
    if done:
        nodes = new_nodes + list(g.node)
        del g.node[:]
        g.node.extend(nodes)
        onnx.save(m, str(path))
    return done


def attention_matmuls(path: Path) -> tuple[list[str], list[str]]:
    """Attention's MatMuls of two activations: the names of those that read a Softmax output (probabilities
    times values), and the inputs of the others (query times key)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    softmax_out = {o for n in g.node if n.op_type == "Softmax" for o in n.output}
    both = [n for n in g.node if n.op_type == "MatMul" and not consts & set(n.input)]
    probs = [n.name for n in both if softmax_out & set(n.input)]
    return probs, [i for n in both if n.name not in probs for i in n.input]


def _with_fallback(
    run, src: Path, dst: Path, cfg: _Int8Base, ctx, weights: dict | None = None, always: list[str] = ()
) -> dict:
    excluded = select_excluded(src, cfg)
    info = {"excluded_by_recipe": excluded, "reduce_range": _reduce_range(cfg)}
    kept = [n for n in always if n not in excluded]  # float by the method's own rule (not fallback candidates)

    def run_with(extra: list[str]) -> None:
        run(excluded + kept + extra)
        if extra and cfg.fallback_weights == "int8":
            weight_only_int8(dst, extra)

    run_with([])
    if cfg.fallback and cfg.max_fallback_nodes > 0 and ctx.goal_check is not None:
        mode = "dynamic" if isinstance(cfg, DynamicInt8Config) else "static"
        bits = 7 if _reduce_range(cfg) else 8
        info["fallback"] = auto_fallback(
            run_with, src, dst, excluded + kept, cfg.max_fallback_nodes, ctx, mode, bits, weights
        )
        info["fallback"]["weights"] = cfg.fallback_weights
    return info
