"""``evaluate``, ``bench`` and ``inspect`` on any supported model, outside a recipe run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from krimp.data import load_data
from krimp.errors import KrimpError
from krimp.eval.bench import bench_engine, bench_onnx
from krimp.eval.compare import compare
from krimp.eval.energy import estimate
from krimp.eval.measure import bench_feed
from krimp.eval.runtime import TorchEngine, onnx_engine
from krimp.models import ModelHandle, load_model
from krimp.recipe import DataSpec, EnergySpec, EvalSpec


def _engine(h: ModelHandle, threads: int, seq_len: int = 512):
    """The artifact's own runtime: ONNX Runtime for .onnx, OpenVINO for .xml, llama.cpp for .gguf when
    installed (else PyTorch on the dequantized weights), PyTorch for the rest."""
    if h.onnx_path is not None:
        return onnx_engine(h.onnx_path, threads)
    if h.kind == "gguf" and _has_llama_cpp():
        from krimp.eval.llamacpp import LlamaCppEngine

        return LlamaCppEngine(h.source, n_ctx=seq_len, threads=threads)
    return TorchEngine(h.module, h.task, threads)


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def default_reference(model: str) -> str | None:
    """For a run folder's model.onnx / model.gguf / packed folder, the baseline.onnx written beside it."""
    p = Path(model)
    folder = p if p.is_dir() else p.parent
    if p.suffix == ".xml" and folder.name == "openvino":  # a run folder's openvino/model.xml
        folder = folder.parent
    ref = folder / "baseline.onnx"
    return str(ref) if p.name != "baseline.onnx" and ref.exists() else None


def _at_least(**flags: tuple[int, int]) -> None:
    """Refuse an out-of-range number before any work, naming the option (``seq_len=(0, 2)``: --seq-len >= 2)."""
    for name, (value, low) in flags.items():
        if not isinstance(value, int) or value < low:
            raise KrimpError(f"--{name.replace('_', '-')} must be an integer >= {low} (got {value!r})")


def evaluate(
    model: str,
    data: str | None = None,
    reference: str | None = None,
    samples: int = 256,
    seq_len: int = 128,
    batch: int = 8,
    threads: int = 2,
    task: str | None = None,
) -> dict[str, Any]:
    """Quality of ``model`` on held-out data, and fidelity to ``reference`` (the model itself if none)."""
    _at_least(samples=(samples, 1), seq_len=(seq_len, 2), batch=(batch, 1), threads=(threads, 1))
    h = load_model(model, task)
    ref = load_model(reference, h.task.name) if reference else h
    if ref is not h and ref.task.name != h.task.name:
        raise KrimpError(f"reference task {ref.task.name} differs from model task {h.task.name}")
    spec = DataSpec(source=data, eval_samples=samples, calib_samples=1, seq_len=seq_len)
    ds = load_data(spec, h.task, h.builtin_origin)
    eng = _engine(h, threads, seq_len)
    q = compare(_engine(ref, threads, seq_len), eng, h.task, ds.eval, ds.eval_labels, batch, seq_len)
    return {
        "model": h.source,
        "reference": ref.source,
        "task": h.task.name,
        "runtime": eng.runtime,
        "data": ds.info,
        **q,
    }


def bench(
    model: str,
    batch: int = 8,
    seq: int = 128,
    threads: int = 2,
    repeats: int = 20,
    warmup: int = 5,
    task: str | None = None,
) -> dict[str, Any]:
    """Latency p50/p95, throughput, peak RSS, size and energy/cost estimates on the model's runtime."""
    _at_least(batch=(batch, 1), seq_len=(seq, 2), threads=(threads, 1), repeats=(repeats, 3), warmup=(warmup, 0))
    if str(model).endswith(".gguf"):  # llama.cpp: prompt and decode tokens/s
        from krimp.eval.llamacpp import bench_gguf

        res = bench_gguf(model, threads, prompt=seq, decode=64, repeats=max(3, repeats // 5))
        res.update(model=str(model))
        return res
    h = load_model(model, task)
    ev = EvalSpec(batch=batch, seq_len=seq, threads=threads, repeats=repeats, warmup=warmup)
    if h.task.is_text:
        feed = h.task.dummy_feed(batch, seq)
    else:
        ds = load_data(DataSpec(calib_samples=1, eval_samples=1), h.task, h.builtin_origin)
        feed = bench_feed(h.task, ev, ds)
    if h.onnx_path is not None:
        runtime = "openvino" if h.kind == "openvino" else "onnxruntime"
        res = bench_onnx(h.onnx_path, feed, threads, warmup, repeats, runtime)
        res.update(runtime=runtime, size_bytes=file_bytes(h.onnx_path))
    else:
        res = bench_engine(_engine(h, threads), feed, warmup, repeats)
        res.update(runtime="pytorch", size_bytes=_size(h))
    res.update(estimate(res, EnergySpec()))
    res.update(model=h.source, feed_shapes={k: list(v.shape) for k, v in feed.items()}, threads=threads)
    return res


def file_bytes(path: Path) -> int:
    """Bytes of a model file with its weights file (an OpenVINO .xml's .bin; an ONNX file's external
    data, ``model.onnx.data``, as a streamed run writes it)."""
    path = Path(path)
    weights = path.with_suffix(".bin") if path.suffix == ".xml" else path.with_name(path.name + ".data")
    return path.stat().st_size + (weights.stat().st_size if weights.exists() else 0)


def _size(h: ModelHandle) -> int:
    p = Path(h.source)
    if p.is_file():
        return file_bytes(p)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.glob("*.safetensors")) or sum(f.stat().st_size for f in p.glob("*.bin"))
    return sum(t.numel() * t.element_size() for t in h.module.state_dict().values())


#: what each model part is, for messages (BaseConfig.needs)
PARTS = {
    "decoder_blocks": "decoder language models",
    "encoder_layers": "BERT-like encoders",
    "transformer_layers": "transformers whose heads and FFN krimp.models.arch knows",
    "convolutions": "convolutional networks",
}


def model_parts(h: ModelHandle) -> set[str]:
    """Which of :data:`PARTS` this model has (none for an ONNX file)."""
    from krimp.models.arch import ffn_of, find_blocks, find_layers, heads_of
    from krimp.quant.smooth_encoder import encoder_layers

    m, has = h.module, set()
    if m is None:
        return has
    try:
        find_blocks(m)
        has.add("decoder_blocks")
    except KrimpError:
        pass
    try:
        layer = find_layers(m)[1][0]
        if heads_of(layer) or ffn_of(layer):
            has.add("transformer_layers")
    except KrimpError:
        pass
    if "decoder_blocks" not in has and h.task.name != "causal-lm" and encoder_layers(m):
        has.add("encoder_layers")
    if any(isinstance(x, torch.nn.Conv2d) for x in m.modules()):
        has.add("convolutions")
    return has


def fitting_methods(h: ModelHandle) -> list[str]:
    """The registered methods that apply to this model: ONNX-graph methods to any model, torch methods
    to a torch model that has one of the parts the method needs (``BaseConfig.needs``)."""
    from krimp.methods import REGISTRY

    domains = {"onnx"} if h.module is None else {"onnx", "torch"}
    has = model_parts(h)
    return sorted(k for k, (c, _) in REGISTRY.items() if c.domain in domains and (not c.needs or has & set(c.needs)))


def inspect(model: str, task: str | None = None) -> dict[str, Any]:
    """Layers, parameter count, dtypes, size, and the methods krimp can apply to this model."""
    h = load_model(model, task)
    if h.onnx_path is not None:
        import onnx

        g = onnx.load(str(h.onnx_path)).graph
        layers = Counter(n.op_type for n in g.node)
        dtypes = Counter(onnx.TensorProto.DataType.Name(t.data_type).lower() for t in g.initializer)
    else:
        layers = Counter(type(m).__name__ for m in h.module.modules() if not list(m.children()))
        dtypes = Counter(str(p.dtype).replace("torch.", "") for p in h.module.parameters())
    methods = fitting_methods(h)
    return {
        "model": h.source,
        "kind": h.kind,
        "task": h.task.name,
        "params": h.num_params,
        "size_bytes": _size(h),
        "layers": dict(layers.most_common()),
        "dtypes": dict(dtypes),
        "inputs": h.task.input_names,
        "methods": methods,
        **h.info,
    }
