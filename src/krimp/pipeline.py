"""One compression run: load -> torch stages -> export -> ONNX stages -> evaluate -> report.

Data moves one way; the input model is never modified (torch stages work on a deep copy, ONNX
stages on new files), and everything is written into a temporary folder that is renamed to the
output folder only when the run is complete.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from krimp.config import method_for
from krimp.data import Dataset
from krimp.errors import KrimpError
from krimp.eval.bench import faster_of
from krimp.eval.compare import collect, compare, compare_features
from krimp.eval.goal import calib_ok
from krimp.eval.measure import bench_feed
from krimp.eval.runtime import OrtEngine, TorchEngine, batches
from krimp.export.onnx import export_onnx, optimize_transformer, verify_onnx
from krimp.models import ModelHandle
from krimp.recipe import Recipe
from krimp.train.trainer import is_main

log = logging.getLogger(__name__)


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


def _calib_goal_check(recipe: Recipe, handle: ModelHandle, data: Dataset, ref_path: Path):
    task, ev = handle.task, recipe.eval
    if task.name == "causal-lm":
        ref_engine = OrtEngine(ref_path, ev.threads)

        def check_lm(path: Path):  # a few windows: a full pass of a language model is minutes
            q = compare(ref_engine, OrtEngine(path, ev.threads), task, data.calib[:16], None, ev.batch,
                        recipe.data.seq_len, n_boot=100)
            size_ratio = path.stat().st_size / ref_path.stat().st_size
            return calib_ok(recipe.goal, q, size_ratio, confident=True), {**_brief(q), "size_ratio": round(size_ratio, 4)}

        return check_lm
    items = data.calib[:512]  # enough to check a goal; a large transfer set would make each try slow
    ref = collect(OrtEngine(ref_path, ev.threads), task, items, ev.batch, recipe.data.seq_len)
    if not np.isfinite(ref).all():
        raise KrimpError("the original model produces NaN/Inf on the calibration data")

    def check(path: Path):
        got = collect(OrtEngine(path, ev.threads), task, items, ev.batch, recipe.data.seq_len)
        if not np.isfinite(got).all():
            return False, {"finite": False}
        q = compare_features(task, ref, got, None, ev.top_k, n_boot=100)
        size_ratio = path.stat().st_size / ref_path.stat().st_size
        return calib_ok(recipe.goal, q, size_ratio, confident=True), {**_brief(q), "size_ratio": round(size_ratio, 4)}

    return check


def _calib_distance(recipe: Recipe, handle: ModelHandle, data: Dataset, ref_path: Path, n_items: int = 32):
    """A continuous distance to the float model on a few calibration items: mean KL for logits,
    1 - mean cosine for embeddings (used to rank nodes by sensitivity)."""
    from krimp.eval import fidelity as F

    task, ev = handle.task, recipe.eval
    items = data.calib[:n_items // 4 if task.name == "causal-lm" else n_items]
    seq = recipe.data.seq_len
    if task.name == "causal-lm":
        feeds = list(batches(task, items, ev.batch, seq))
        ref_out = [OrtEngine(ref_path, ev.threads).run(f) for f in feeds]

        def dist_lm(model) -> float:
            e = OrtEngine(model, ev.threads)
            return float(np.mean([F.kl_divergence(r, e.run(f)).mean() for r, f in zip(ref_out, feeds)]))

        return dist_lm
    ref = collect(OrtEngine(ref_path, ev.threads), task, items, ev.batch, seq)

    def dist(model) -> float:
        got = collect(OrtEngine(model, ev.threads), task, items, ev.batch, seq)
        if not np.isfinite(got).all():
            return float("inf")
        if task.name == "embedding":
            return float(1.0 - F.cosine(ref, got).mean())
        return float(F.kl_divergence(ref, got).mean())

    return dist


def _brief(q: dict) -> dict:
    return {k: round(v["value"], 5) for k, v in q.get("fidelity", {}).items() if isinstance(v, dict)}


def _apply_torch_stages(handle: ModelHandle, stages, feeds, recipe: Recipe, data: Dataset, notes: list, step,
                        ckpt_root: Path | None = None):
    """Check the original model on calibration data, then apply torch stages to a deep copy; after
    each stage, measure its fidelity to the original on a few evaluation items (the report shows
    quality and size as the recipe goes)."""
    module, threads = handle.module, recipe.eval.threads
    engine = TorchEngine(module, handle.task, threads)
    for f in feeds[:4]:  # a few batches show a model that cannot take the data or overflows
        try:
            out = engine.run(f)
        except Exception as e:  # a model that cannot take the data: say so in one line
            shapes = {k: list(v.shape) for k, v in f.items()}
            raise KrimpError(f"the model failed on calibration inputs {shapes} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if not np.isfinite(out).all():
            raise KrimpError("the original model produces NaN/Inf on the calibration data")
    if stages:
        module = copy.deepcopy(module)
    for i, cfg in enumerate(stages):
        step(f"stage {i + 1}: {cfg.method}")
        t0 = time.perf_counter()
        ctx = StageContext(handle.task, feeds, threads, step=step, calib_items=data.calib,
                           calib_labels=data.calib_labels, seq_len=recipe.data.seq_len,
                           ckpt_dir=ckpt_root / f"stage{i}-{cfg.method}" if ckpt_root else None)
        module, info = method_for(cfg).apply_torch(module, cfg, ctx)
        note = {"method": cfg.method, "config": cfg.to_dict(), "seconds": time.perf_counter() - t0, **info}
        if len(stages) > 1 or cfg.method in ("distill", "qat"):
            note["after"] = _stage_quality(handle, module, recipe, data)
        notes.append(note)
    return module


def _stage_quality(handle: ModelHandle, module, recipe: Recipe, data: Dataset, n_items: int = 64) -> dict:
    """Fidelity (and quality) of a stage's torch model against the original on the first evaluation
    items, its parameter count, and whether the goal's quality and fidelity limits hold on them
    (a preview as the recipe goes: the final report measures every item on the deployed runtime)."""
    task, ev = handle.task, recipe.eval
    items = data.eval[:4 if task.name == "causal-lm" else n_items]
    seq = recipe.data.seq_len
    labels = data.eval_labels[:len(items)] if data.eval_labels else None
    q = compare(TorchEngine(handle.module, task, ev.threads), TorchEngine(module, task, ev.threads), task, items,
                labels, min(ev.batch, 4) if task.name == "causal-lm" else ev.batch, seq, ev.top_k, n_boot=100)
    out = {"items": len(items), "params": sum(p.numel() for p in module.parameters()), **_brief(q)}
    out.update({k: round(v["value"], 5) for k, v in q.get("compressed", {}).items() if isinstance(v, dict)})
    out["within_goal"] = calib_ok(recipe.goal, q)
    return out


def _apply_onnx_stages(cur: Path, stages, first: int, recipe: Recipe, handle: ModelHandle, data: Dataset,
                       feeds, base: Path, work: Path, notes: list, step) -> Path:
    """Apply ONNX stages in order, each to a new file; after each, check the goal on calibration data."""
    ev = recipe.eval
    check = _calib_goal_check(recipe, handle, data, base)
    distance = _calib_distance(recipe, handle, data, base)
    for i, cfg in enumerate(stages):
        step(f"stage {first + i + 1}: {cfg.method}")
        dst = work / f"stage{i}.onnx"
        t0 = time.perf_counter()
        ctx = StageContext(handle.task, feeds, ev.threads, check, recipe.goal.max_size_ratio, distance, step=step)
        try:
            info = method_for(cfg).apply_onnx(cur, dst, cfg, ctx)
        except KrimpError:
            raise
        except Exception as e:
            raise KrimpError(f"stage {cfg.method} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        ok, metrics = check(dst)
        notes.append({"method": cfg.method, "config": cfg.to_dict(), "seconds": round(time.perf_counter() - t0, 2),
                      "calib_within_goal": ok, "calib_metrics": metrics, **info})
        cur = dst
    return cur


def _verify_feeds(feeds, task):
    """Feeds for export checks: two batches, or for language models two short windows (a full batch
    of long windows costs a minute per check)."""
    if task.name != "causal-lm":
        return feeds[:2]
    return [{k: v[:2, :128] for k, v in feeds[0].items()}]


def run_stages(handle: ModelHandle, recipe: Recipe, data: Dataset, work: Path,
               step: Callable[[str], None], ckpt_root: Path | None = None) -> dict[str, Any]:
    """Apply the recipe; returns paths of baseline and compressed models (or modules) and stage notes."""
    ev, rtol, opset = recipe.eval, recipe.export.rtol, recipe.export.opset
    feeds = list(batches(handle.task, data.calib, ev.batch, recipe.data.seq_len))
    torch_stages = [s for s in recipe.stages if s.domain == "torch"]
    onnx_stages = [s for s in recipe.stages if s.domain == "onnx"]
    if torch_stages and onnx_stages and torch_stages[-1] is not recipe.stages[len(torch_stages) - 1]:
        raise KrimpError("torch stages (e.g. bf16) must come before ONNX stages (int8-*, fp16)")
    if torch_stages and handle.module is None:
        raise KrimpError(f"stage '{torch_stages[0].method}' needs a torch model; an ONNX file was given")
    notes: list[dict] = []
    out: dict[str, Any] = {"stages": notes}
    module = None
    if handle.module is not None:
        module = _apply_torch_stages(handle, torch_stages, feeds, recipe, data, notes, step, ckpt_root)
    out["module"], out["baseline_module"] = module, handle.module
    if not is_main():  # data-parallel helpers (torchrun) stop after training; rank 0 writes
        out["helper"] = True
        return out
    if handle.task.name == "causal-lm" and feeds:
        out["verify_ids"] = _verify_feeds(feeds, handle.task)[0]["input_ids"]
    if "onnx" not in recipe.export.formats and not onnx_stages:
        out["torch_only"] = True
        return out
    base = work / "baseline.onnx"
    if handle.module is None:  # an ONNX file was given
        shutil.copyfile(handle.onnx_path, base)
        cur = base
    else:
        step("export: baseline ONNX")
        export_onnx(handle.module, handle.task, feeds[0], base, opset, handle.source)
        out["export_error"] = verify_onnx(base, TorchEngine(handle.module, handle.task, ev.threads),
                                          _verify_feeds(feeds, handle.task), rtol)
        cur = base
        if torch_stages:
            step("export: compressed ONNX")
            cur = export_onnx(module, handle.task, feeds[0], work / "torch_stages.onnx", opset, handle.source)
            vfeeds = _verify_feeds(feeds, handle.task)
            has_act = any(hasattr(m, "krimp_act") for m in module.modules())
            if not has_act:  # (trained activation grids enter the graph below; checked there)
                out["export_error_compressed"] = verify_onnx(cur, TorchEngine(module, handle.task, ev.threads),
                                                             vfeeds, rtol * 10)
            if has_act:
                from krimp.export.onnx_qdq import to_qdq

                step("export: ONNX QDQ INT8 (trained scales)")
                out["qdq"] = to_qdq(cur, work / "qdq.onnx", module)
                cur = work / "qdq.onnx"
                out["export_error_compressed"] = verify_onnx(
                    cur, TorchEngine(module, handle.task, ev.threads), vfeeds, rtol * 10)
            elif any(hasattr(m, "krimp_wq") for m in module.modules()):
                from krimp.export.onnx_nbits import to_matmul_nbits

                step("export: ONNX Runtime MatMulNBits")
                out["nbits"] = to_matmul_nbits(cur, work / "nbits.onnx", module)
                cur = work / "nbits.onnx"
                out["export_error_compressed"] = verify_onnx(
                    cur, TorchEngine(module, handle.task, ev.threads), vfeeds, rtol * 10)
    out["baseline_onnx"] = base
    if onnx_stages and recipe.export.optimize and handle.module is not None:
        stats = optimize_transformer(cur, work / "fused.onnx", handle.module)
        if stats and recipe.export.optimize == "auto":
            step("timing the fused graph against the plain one")
            ms = faster_of(cur, work / "fused.onnx", bench_feed(handle.task, recipe.eval, data), recipe.eval.threads)
            out["fusion_choice"] = {"plain_ms": round(ms["a"], 2), "fused_ms": round(ms["b"], 2),
                                    "kept": ms["b"] < ms["a"]}
            log.info("transformer fusion: plain %.1f ms, fused %.1f ms", ms["a"], ms["b"])
            if ms["b"] >= ms["a"]:
                stats = None
        if stats:
            out["fusions"], cur = stats, work / "fused.onnx"
    out["compressed_onnx"] = _apply_onnx_stages(cur, onnx_stages, len(torch_stages), recipe, handle, data,
                                                feeds, base, work, notes, step)
    return out
