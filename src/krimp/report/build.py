"""Assemble report.json's content from one run's measurements."""

from __future__ import annotations

import datetime as dt
import os
import platform
from typing import Any

from krimp.eval import energy
from krimp.eval.goal import drop_ci, goal_outcome, quality_drop, verdicts
from krimp.memory import peak_rss_mb

_NOT_TIMED = {
    "latency_ms_p50": None,
    "latency_ms_p95": None,
    "throughput_per_s": None,
    "peak_rss_mb": None,
    "noise": None,
    "cpu_s_per_inference": None,
}


def _r(v, n: int):
    return None if v is None else round(v, n)


def _side(s: dict, quality: dict, fidelity: dict) -> dict:
    b = s["bench"] or _NOT_TIMED  # a streamed run is not timed
    precision = {"inference_precision": s["inference_precision"]} if "inference_precision" in s else {}
    return {
        "runtime": s["runtime"],
        **precision,  # OpenVINO's: f32, or bf16 where the recipe asked for it
        "size_bytes": int(s["size_bytes"]),
        "bits_per_weight": round(float(s["bits_per_weight"]), 3),
        "latency_ms_p50": _r(b["latency_ms_p50"], 3),
        "latency_ms_p95": _r(b["latency_ms_p95"], 3),
        "throughput_per_s": _r(b["throughput_per_s"], 2),
        "peak_rss_mb": _r(b["peak_rss_mb"], 1),
        "latency_noise": b.get("noise"),
        "cpu_s_per_inference": b["cpu_s_per_inference"],
        "quality": quality,
        "fidelity": fidelity,
        "energy_j_per_inference": s["energy_j_per_inference"],
        "cost_usd_per_million": s["cost_usd_per_million"],
    }


def machine() -> dict:
    from krimp.quant.ort_int8 import cpu_has_vnni

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "int8_dot_product": cpu_has_vnni(),
        "python": platform.python_version(),
    }


def build_report(recipe, handle, data, run, artifacts, measured, wall_s: float) -> dict[str, Any]:
    import krimp

    q = measured["quality"]
    sides = measured["sides"]
    base = _side(sides["baseline"], q["baseline"], {})
    comp = _side(sides["compressed"], q["compressed"], q["fidelity"])
    size_ratio = comp["size_bytes"] / base["size_bytes"]
    sp = measured["speedup"]
    unstable = [
        f"{name}: {'; '.join(s['latency_noise']['reasons'])}"
        for name, s in (("baseline", base), ("compressed", comp))
        if s["latency_noise"] and not s["latency_noise"]["stable"]
    ]
    goals = verdicts(recipe.goal, q, size_ratio, sp, not unstable, " / ".join(unstable))
    within, misses, noise = goal_outcome(goals)
    drop = quality_drop(q)
    ev = recipe.eval
    memory = {**(measured.get("memory_plan") or {"path": "in-memory"}), "peak_rss_bytes": int(peak_rss_mb() * 2**20)}
    budget = memory.get("budget_bytes")
    memory["within_budget"] = memory["peak_rss_bytes"] <= budget if budget else None
    return {
        "krimp_version": krimp.__version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {
            "source": handle.source,
            "kind": handle.kind,
            "task": handle.task.name,
            "params": handle.num_params,
            **handle.info,
        },
        "data": data.info,
        "bench_settings": {
            "batch": ev.batch,
            "seq_len": ev.seq_len,
            "threads": ev.threads,
            "warmup": ev.warmup,
            "repeats": ev.repeats,
            "feed_shapes": measured["bench_feed"],
            "timing_budget_s": ev.timing_budget_s,
            "timing_s": measured.get("timing_s"),
            "note": measured.get("timing_note")
            or "alternating rounds of both models until the medians settle (krimp.eval.timing); "
            "ONNX models each in a process of their own",
        },
        "baseline": base,
        "compressed": comp,
        "ratios": {
            "size": round(size_ratio, 4),
            "speedup_p50": round(sp["value"], 3) if sp else None,
            "speedup_ci95": [round(x, 3) for x in sp["ci95"]] if sp else None,
            "timing_stable": not unstable,
            "speedup_p95": round(base["latency_ms_p95"] / comp["latency_ms_p95"], 3) if sp else None,
        },
        "quality_drop": {"metric": drop[0], "value": drop[1], "ci95": drop_ci(q)} if drop else None,
        "accuracy_delta": q.get("accuracy_delta"),
        "artifacts": artifacts,
        "goal": recipe.goal.model_dump(exclude_none=True),
        "goals": goals,  # one row per limit: value, 95% CI, met / missed / within noise
        "within_goal": within,
        "misses": misses,
        "within_noise": noise,
        "stages": run.stages,
        "fusions": run.fusions,
        "fusion_choice": run.fusion_choice,  # export.optimize: auto: both graphs timed here
        "export_check": {
            "max_relative_error": run.export_error,
            "tolerance": recipe.export.rtol,
            **(
                {"compressed_max_relative_error": run.export_error_compressed}
                if run.export_error_compressed is not None
                else {}
            ),
        },
        "exports": run.exports,
        "generation": measured.get("generation"),
        "energy_assumptions": energy.assumptions(ev.energy),
        "machine": machine(),
        "recipe": recipe.to_dict(),
        "wall_s": round(wall_s, 1),
        # krimp's own high-water mark (load, stages, exports, quality); each side's timing worker reports
        # its own in bench.peak_rss_mb
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "calibration_device": measured.get("device", "cpu"),  # resources.device, resolved
        # the memory plan (--max-memory): in memory or streamed, the budget and the estimates it was chosen by
        "memory": memory,
    }
