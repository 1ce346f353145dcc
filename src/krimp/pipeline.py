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

import numpy as np
from torch import nn

from krimp.data import Dataset
from krimp.errors import KrimpError
from krimp.eval.bench import faster_of
from krimp.eval.compare import collect, compare, compare_features, lm_feeds, lm_stats
from krimp.eval.goal import calib_ok
from krimp.eval.measure import bench_feed
from krimp.eval.runtime import StreamedEngine, TorchEngine, batches, engine_for
from krimp.export.onnx import export_onnx, lower, optimize_transformer, task_props, verify_onnx
from krimp.export.onnx_streamed import export_onnx_streamed
from krimp.memory import release
from krimp.methods import method_for
from krimp.models import ModelHandle
from krimp.models.arch import linear_view
from krimp.models.lazy import lazy_of
from krimp.recipe import Recipe
from krimp.stage import Needs, StageContext
from krimp.train.trainer import is_main

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What one run hands on to the exporters (krimp.export.registry), the measurements and the report."""

    stages: list[dict]  # one note per stage: method, config, seconds, what it did
    baseline_module: nn.Module | None  # the loaded model (None for an ONNX input)
    module: nn.Module | None  # after the torch stages (the loaded model when there are none)
    needs: Needs = field(default_factory=Needs)  # what the stages declared their output needs from the exporters
    helper: bool = False  # a data-parallel helper process (torchrun): it stops after training
    verify_ids: np.ndarray | None = None  # token windows for checking exports of a language model
    verify_feeds: list[dict[str, np.ndarray]] = field(default_factory=list)  # calibration feeds for export checks
    baseline_onnx: Path | None = None
    compressed_onnx: Path | None = None  # None: no ONNX; the torch modules are measured
    export_error: float | None = None  # max relative error of the baseline ONNX against torch
    export_error_compressed: float | None = None
    fusions: dict | None = None  # transformer fusions applied before ONNX stages
    fusion_choice: dict | None = None  # export.optimize: auto: both graphs timed here
    exports: dict[str, dict] = field(default_factory=dict)  # what each rewrite / exporter did (nbits, qdq, gguf)

    @property
    def torch_only(self) -> bool:
        return self.compressed_onnx is None


def _calib_goal_check(recipe: Recipe, handle: ModelHandle, data: Dataset, ref_path: Path):
    task, ev = handle.task, recipe.eval
    if task.name == "causal-lm":
        ref_engine = engine_for(ref_path, ev)

        def check_lm(path: Path):  # a few windows: a full pass of a language model is minutes
            q = compare(
                ref_engine,
                engine_for(path, ev),
                task,
                data.calib[:16],
                None,
                ev.batch,
                recipe.data.seq_len,
                n_boot=100,
            )
            size_ratio = path.stat().st_size / ref_path.stat().st_size
            return calib_ok(recipe.goal, q, size_ratio, confident=True), {
                **_brief(q),
                "size_ratio": round(size_ratio, 4),
            }

        return check_lm
    items = data.calib[:512]  # enough to check a goal; a large transfer set would make each try slow
    ref = collect(engine_for(ref_path, ev), task, items, ev.batch, recipe.data.seq_len)
    if not np.isfinite(ref).all():
        raise KrimpError("the original model produces NaN/Inf on the calibration data")

    def check(path: Path):
        got = collect(engine_for(path, ev), task, items, ev.batch, recipe.data.seq_len)
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
    items = data.calib[: n_items // 4 if task.name == "causal-lm" else n_items]
    seq = recipe.data.seq_len
    if task.name == "causal-lm":
        ref_engine = engine_for(ref_path, ev)

        def dist_lm(model) -> float:  # the reference runs again each time: its logits are not kept
            e = engine_for(model, ev)
            rows = [r for f in lm_feeds(task, items, ev.batch, seq) for r in lm_stats(ref_engine.run(f), e.run(f), f)]
            return float(np.mean([r[2] for r in rows]))

        return dist_lm
    ref = collect(engine_for(ref_path, ev), task, items, ev.batch, seq)

    def dist(model) -> float:
        got = collect(engine_for(model, ev), task, items, ev.batch, seq)
        if not np.isfinite(got).all():
            return float("inf")
        if task.name == "embedding":
            return float(1.0 - F.cosine(ref, got).mean())
        return float(F.kl_divergence(ref, got).mean())

    return dist


def _brief(q: dict) -> dict:
    return {k: round(v["value"], 5) for k, v in q.get("fidelity", {}).items() if isinstance(v, dict)}


def _apply_torch_stages(
    handle: ModelHandle,
    stages,
    feeds,
    recipe: Recipe,
    data: Dataset,
    notes: list,
    step,
    ckpt_root: Path | None = None,
    device: str = "cpu",
    calib_batch: int = 8,
) -> tuple[nn.Module, Needs]:
    """Check the original model on calibration data, then apply torch stages to a deep copy; after
    each stage, measure its fidelity to the original on a few evaluation items (the report shows
    quality and size as the recipe goes). Returns the model and what its stages need from the exporters.

    A lazily opened decoder (:mod:`krimp.models.lazy`, chosen by :func:`krimp.budget.plan`) is not
    copied: its original stays in its file, each block is read for its turn, and what the stages
    leave is codes. ``calib_batch``: the windows a block's forward pass takes at a time."""
    module, threads, needs = handle.module, recipe.eval.threads, handle.needs
    lazy = lazy_of(module)
    engine = (
        StreamedEngine(module, handle.task, threads, "float") if lazy else TorchEngine(module, handle.task, threads)
    )
    # a few batches show a model that cannot take the data or overflows; for a language model one or two
    # full-length windows (a batch's logits of a large vocabulary are gigabytes, and minutes to compute);
    # for a streamed model one short window (each check reads the whole model from its file)
    rows = handle.task.rows(2, recipe.data.seq_len)
    checks = [{k: v[:rows] for k, v in feeds[0].items()}] if handle.task.name == "causal-lm" and feeds else feeds[:4]
    if lazy is not None:
        checks = [{k: v[:1, :32] for k, v in f.items()} for f in checks[:1]]
    for f in checks:
        try:
            out = engine.run(f)
        except Exception as e:  # a model that cannot take the data: say so in one line
            shapes = {k: list(v.shape) for k, v in f.items()}
            raise KrimpError(
                f"the model failed on calibration inputs {shapes} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
        if not np.isfinite(out).all():
            raise KrimpError("the original model produces NaN/Inf on the calibration data")
    if stages and lazy is None:
        module = linear_view(copy.deepcopy(module))  # a GPT-2 object's Conv1D as linears, in the copy only
    for i, cfg in enumerate(stages):
        step(f"stage {i + 1}: {cfg.method}")
        t0 = time.perf_counter()
        ctx = StageContext(
            handle.task,
            feeds,
            threads,
            step=step,
            calib_items=data.calib,
            calib_labels=data.calib_labels,
            seq_len=recipe.data.seq_len,
            ckpt_dir=ckpt_root / f"stage{i}-{cfg.method}" if ckpt_root else None,
            device=device,
            batch=calib_batch,
        )
        module, info = method_for(cfg).apply_torch(module, cfg, ctx)
        if lazy is not None:
            lazy.release_outside()
        release()
        needs = needs.merge(ctx.needs)
        note = {"method": cfg.method, "config": cfg.to_dict(), "seconds": time.perf_counter() - t0, **info}
        if len(stages) > 1 or cfg.method in ("distill", "qat"):
            note["after"] = _stage_quality(handle, module, recipe, data)
        notes.append(note)
    return module, needs


def _stage_quality(handle: ModelHandle, module, recipe: Recipe, data: Dataset, n_items: int = 64) -> dict:
    """Fidelity (and quality) of a stage's torch model against the original on the first evaluation
    items, its parameter count, and whether the goal's quality and fidelity limits hold on them
    (a preview as the recipe goes: the final report measures every item on the deployed runtime)."""
    task, ev = handle.task, recipe.eval
    items = data.eval[: 4 if task.name == "causal-lm" else n_items]
    seq = recipe.data.seq_len
    labels = data.eval_labels[: len(items)] if data.eval_labels else None
    q = compare(
        TorchEngine(handle.module, task, ev.threads),
        TorchEngine(module, task, ev.threads),
        task,
        items,
        labels,
        min(ev.batch, 4) if task.name == "causal-lm" else ev.batch,
        seq,
        ev.top_k,
        n_boot=100,
    )
    out = {"items": len(items), "params": sum(p.numel() for p in module.parameters()), **_brief(q)}
    out.update({k: round(v["value"], 5) for k, v in q.get("compressed", {}).items() if isinstance(v, dict)})
    out["within_goal"] = calib_ok(recipe.goal, q)
    return out


def _apply_onnx_stages(
    cur: Path,
    stages,
    first: int,
    recipe: Recipe,
    handle: ModelHandle,
    data: Dataset,
    feeds,
    base: Path,
    work: Path,
    notes: list,
    step,
) -> Path:
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
            raise KrimpError(
                f"stage {cfg.method} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
        ok, metrics = check(dst)
        notes.append(
            {
                "method": cfg.method,
                "config": cfg.to_dict(),
                "seconds": round(time.perf_counter() - t0, 2),
                "calib_within_goal": ok,
                "calib_metrics": metrics,
                **info,
            }
        )
        cur = dst
    return cur


def _verify_feeds(feeds, task):
    """Feeds for export checks: two batches, or for language models two short windows (a full batch
    of long windows costs a minute per check)."""
    if task.name != "causal-lm":
        return feeds[:2]
    return [{k: v[:2, :128] for k, v in feeds[0].items()}]


def run_stages(
    handle: ModelHandle,
    recipe: Recipe,
    data: Dataset,
    work: Path,
    step: Callable[[str], None],
    ckpt_root: Path | None = None,
    device: str = "cpu",
    calib_batch: int = 8,
) -> RunResult:
    """Apply the recipe: torch stages, the ONNX export in the form they need, then ONNX stages.
    ``device``: where layer-wise calibration works (:mod:`krimp.device`); ``calib_batch``: windows per
    block forward pass (:func:`krimp.budget.plan` lowers it to stay under a memory budget)."""
    ev, rtol, opset = recipe.eval, recipe.export.rtol, recipe.export.opset
    feeds = list(batches(handle.task, data.calib, ev.batch, recipe.data.seq_len))
    torch_stages = [s for s in recipe.stages if s.domain == "torch"]
    onnx_stages = [s for s in recipe.stages if s.domain == "onnx"]
    if torch_stages and onnx_stages and torch_stages[-1] is not recipe.stages[len(torch_stages) - 1]:
        raise KrimpError("torch stages (e.g. bf16) must come before ONNX stages (int8-*, fp16)")
    if torch_stages and handle.module is None:
        raise KrimpError(f"stage '{torch_stages[0].method}' needs a torch model; an ONNX file was given")
    notes: list[dict] = []
    run = RunResult(notes, handle.module, None, handle.needs)
    if handle.module is not None:
        run.module, run.needs = _apply_torch_stages(
            handle, torch_stages, feeds, recipe, data, notes, step, ckpt_root, device, calib_batch
        )
        if lazy_of(handle.module) is not None:  # streamed: the loaded model now holds the stages' codes
            run.baseline_module = None
    if not is_main():  # data-parallel helpers (torchrun) stop after training; rank 0 writes
        run.helper = True
        return run
    run.verify_feeds = _verify_feeds(feeds, handle.task) if feeds else []
    if handle.task.name == "causal-lm" and feeds:
        run.verify_ids = run.verify_feeds[0]["input_ids"]
    if lazy_of(handle.module) is not None:  # streamed: ONNX written one tensor at a time, and no float ONNX
        if "onnx" in recipe.export.formats:
            step("export: compressed ONNX, one tensor at a time")
            run.compressed_onnx = work / "model.onnx"
            example = {k: v[:2, :16] for k, v in feeds[0].items()}  # the trace's logits: 2 x 16 x vocab
            props = task_props(handle.task, handle.source)
            run.exports[run.needs.onnx] = export_onnx_streamed(
                run.module, handle.task, example, run.compressed_onnx, opset, props
            )
            release()
            engine = StreamedEngine(run.module, handle.task, ev.threads, "current")
            run.export_error_compressed = verify_onnx(run.compressed_onnx, engine, run.verify_feeds, rtol * 10)
        return run
    if not {"onnx", "openvino"} & set(recipe.export.formats) and not onnx_stages:
        return run  # measured as torch modules
    base = work / "baseline.onnx"
    cur = base
    if handle.kind == "openvino":
        raise KrimpError(
            "an OpenVINO IR can be evaluated and benchmarked (krimp eval, krimp bench), not compressed: give "
            "the ONNX file or the original model, with eval.runtime: openvino"
        )
    if handle.module is None:  # an ONNX file was given
        shutil.copyfile(handle.onnx_path, base)
    else:
        # the exporter traces one forward pass: two rows of a batch show the dynamic axes at a fraction
        # of the time and memory (a batch of a 262k-vocabulary model's logits is gigabytes)
        example = {k: v[:2] for k, v in feeds[0].items()}
        step("export: baseline ONNX")
        export_onnx(handle.module, handle.task, example, base, opset, handle.source, share_tied=not onnx_stages)
        release()
        run.export_error = verify_onnx(
            base, TorchEngine(handle.module, handle.task, ev.threads), _verify_feeds(feeds, handle.task), rtol
        )
        if torch_stages:
            step("export: compressed ONNX")
            plain = export_onnx(run.module, handle.task, example, work / "torch_stages.onnx", opset, handle.source)
            release()
            cur, details = lower(plain, work, run.module, run.needs.onnx, step)
            if details is not None:
                run.exports[run.needs.onnx] = details
            run.export_error_compressed = verify_onnx(
                cur, TorchEngine(run.module, handle.task, ev.threads), _verify_feeds(feeds, handle.task), rtol * 10
            )
    run.baseline_onnx = base
    # ONNX Runtime's fusions make its own contrib ops (Attention, SkipLayerNormalization): for ONNX Runtime only
    if onnx_stages and recipe.export.optimize and handle.module is not None and ev.runtime == "onnxruntime":
        stats = optimize_transformer(cur, work / "fused.onnx", handle.module)
        if stats and recipe.export.optimize == "auto":
            step("timing the fused graph against the plain one")
            ms = faster_of(cur, work / "fused.onnx", bench_feed(handle.task, recipe.eval, data), recipe.eval.threads)
            run.fusion_choice = {
                "plain_ms": round(ms["a"], 2),
                "fused_ms": round(ms["b"], 2),
                "kept": ms["b"] < ms["a"],
            }
            log.info("transformer fusion: plain %.1f ms, fused %.1f ms", ms["a"], ms["b"])
            if ms["b"] >= ms["a"]:
                stats = None
        if stats:
            run.fusions, cur = stats, work / "fused.onnx"
    run.compressed_onnx = _apply_onnx_stages(
        cur, onnx_stages, len(torch_stages), recipe, handle, data, feeds, base, work, notes, step
    )
    return run
