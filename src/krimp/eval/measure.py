"""Measure the baseline and the compressed model side by side on the artifact's own runtime."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from krimp.eval import energy
from krimp.eval.compare import compare
from krimp.eval.runtime import TorchEngine, engine_for
from krimp.eval.timing import EngineTimer, time_onnx_pair, time_pair
from krimp.export.onnx_utils import bits_per_weight, count_onnx_params


def bench_feed(task, ev, data):
    example = task.encode(data.eval[:1], ev.seq_len)
    return task.dummy_feed(task.rows(ev.batch, ev.seq_len), ev.seq_len, example)


def measure_pair(run, handle, recipe, data, work: Path) -> dict[str, Any]:
    """Size, timing (krimp.eval.timing), quality and fidelity of ``run``'s baseline and compressed models
    (a :class:`krimp.pipeline.RunResult`): ONNX files on ``eval.runtime`` (ONNX Runtime or OpenVINO), else torch
    modules."""
    ev, task = recipe.eval, handle.task
    feed = bench_feed(task, ev, data)
    side: dict[str, dict] = {"baseline": {}, "compressed": {}}
    if not run.torch_only:
        base, comp = run.baseline_onnx, run.compressed_onnx
        n_w = count_onnx_params(base)
        for name, path in (("baseline", base), ("compressed", comp)):
            side[name].update(
                size_bytes=path.stat().st_size, bits_per_weight=bits_per_weight(path, n_w), runtime=ev.runtime
            )
            if ev.runtime == "openvino":
                side[name]["inference_precision"] = ev.precision
        timed = time_onnx_pair(
            base, comp, feed, ev.threads, ev.warmup, ev.repeats, ev.timing_budget_s, ev.runtime, ev.precision
        )
        # opened after the timing workers are gone: a large model is not held by four sessions at once
        ref_engine, engine = engine_for(base, ev), engine_for(comp, ev)
    else:
        from krimp.export.safetensors_io import save_packed, save_safetensors
        from krimp.quant.wq import quantized_layers

        ref_engine = TorchEngine(run.baseline_module, task, ev.threads)
        engine = TorchEngine(run.module, task, ev.threads)
        n_w = sum(p.numel() for p in run.baseline_module.parameters() if p.ndim >= 2)
        with tempfile.TemporaryDirectory() as tmp:
            b = save_safetensors(run.baseline_module, Path(tmp) / "base.safetensors").stat().st_size
            # the packed artifact, packed here when not exported; codes on llama.cpp's K grids (gguf_type)
            # have no packed form: their GGUF
            k_grids = any(qw.spec.superblock for qw in quantized_layers(run.module, k_grids=True).values())
            written = work / ("model.gguf" if k_grids else "model.safetensors")
            c = (written if written.exists() else save_packed(run.module, Path(tmp) / "c")).stat().st_size
        side["baseline"].update(size_bytes=b, bits_per_weight=8 * b / n_w, runtime="pytorch")
        side["compressed"].update(size_bytes=c, bits_per_weight=8 * c / n_w, runtime="pytorch")
        timed = time_pair(
            EngineTimer(ref_engine, feed, ev.warmup),
            EngineTimer(engine, feed, ev.warmup),
            ev.repeats,
            ev.timing_budget_s,
        )
        timed["baseline"]["peak_rss_note"] = "in-process: includes krimp and the baseline model"
    side["baseline"]["bench"], side["compressed"]["bench"] = timed["baseline"], timed["compressed"]
    for s in side.values():
        s.update(energy.estimate(s["bench"], ev.energy))
    q = compare(
        ref_engine, engine, task, data.eval, data.eval_labels, ev.batch, recipe.data.seq_len, ev.top_k, ev.bootstrap
    )
    out = {
        "sides": side,
        "quality": q,
        "bench_feed": {k: list(v.shape) for k, v in feed.items()},
        "speedup": timed["speedup"],
        "timing_s": timed["seconds"],
    }
    if task.name == "causal-lm" and run.module is not None:
        out["generation"] = {
            name: greedy(m, task.tokenizer, PROMPT)
            for name, m in (("baseline", run.baseline_module), ("compressed", run.module))
        }
        out["generation"]["prompt"] = PROMPT
    return out


def measure_streamed(run, handle, recipe, data, work: Path) -> dict[str, Any]:
    """Size and quality of a streamed run (:func:`krimp.pipeline.run_stages` on a lazily opened model): both sides run block by
    block from the file, the baseline as stored and the compressed one from its codes. Not timed: a
    streamed forward pass measures the disk, not the model."""
    from krimp.eval.runtime import StreamedEngine

    ev, task = recipe.eval, handle.task
    n_w = sum(p.numel() for p in run.module.parameters() if p.ndim >= 2)
    params = sum(p.numel() for p in run.module.parameters())
    # the compressed model's bytes: its safetensors, else its ONNX graph and weights, else its GGUF
    files = {"safetensors": ["model.safetensors"], "onnx": ["model.onnx", "model.onnx.data"], "gguf": ["model.gguf"]}
    have = next(fs for fs in files.values() if (work / fs[0]).exists())
    comp = sum((work / f).stat().st_size for f in have if (work / f).exists())
    side = {
        # the float32 model's size, as the in-memory path's float32 safetensors (counted, not written)
        "baseline": {"size_bytes": 4 * params, "bits_per_weight": 32.0, "runtime": StreamedEngine.runtime},
        "compressed": {"size_bytes": comp, "bits_per_weight": 8 * comp / n_w, "runtime": StreamedEngine.runtime},
    }
    for s in side.values():
        s["bench"] = None
        s.update(energy.estimate(None, ev.energy))
    q = compare(
        StreamedEngine(run.module, task, ev.threads, "float"),
        StreamedEngine(run.module, task, ev.threads, "current"),
        task,
        data.eval,
        data.eval_labels,
        ev.batch,
        recipe.data.seq_len,
        ev.top_k,
        ev.bootstrap,
    )
    return {
        "sides": side,
        "quality": q,
        "bench_feed": None,
        "speedup": None,
        "timing_s": None,
        "timing_note": "not timed: the model was streamed from disk block by block",
    }


PROMPT = "What is the capital of France?"


def greedy(module, tokenizer, prompt: str, new_tokens: int = 16) -> str:
    """A short greedy continuation (chat template when the tokenizer has one): a sanity check."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = module.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
