"""``krimp sensitivity``: measure each layer, write a table, a bar plot and a mixed-precision recipe.

The recipe gives every decoder linear the width :func:`krimp.search.alloc.allocate` chose for an
average of ``target_bits`` code bits per weight (scales come on top, the same for every width at
one group size), as ``overrides`` of one weight-only stage, so it runs through ``krimp compress``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from pathlib import Path

import yaml

from krimp.errors import KrimpError
from krimp.quant.wq import WQSpec
from krimp.search.alloc import allocate, mean_bits

log = logging.getLogger(__name__)
METHOD = re.compile(r"^(rtn|gptq|awq)-w([2-8])(?:-g(\d+))?(-asym)?$")


def parse_method(text: str) -> tuple[str, WQSpec]:
    """``rtn-w4``, ``gptq-w3-g64``, ``awq-w4-g128-asym`` -> (method, grid)."""
    m = METHOD.match(text.strip().lower())
    if not m:
        raise KrimpError(
            f"--method '{text}': expected METHOD-wBITS[-gGROUP][-asym] with METHOD one of "
            "rtn, gptq, awq (for example rtn-w4 or gptq-w3-g64)"
        )
    return m[1], WQSpec(int(m[2]), int(m[3]) if m[3] else 128, not m[4])


def layer_costs(rows: list[dict], metric: str = "kl") -> dict[str, dict[int, float]]:
    """Each layer's cost per width (:func:`krimp.search.sensitivity.width_costs`)."""
    from krimp.search.sensitivity import width_costs

    return {r["layer"]: width_costs(r, metric) for r in rows}


def mixed_recipe(
    rows: list[dict], method: str, spec: WQSpec, target: float, model: str, data: dict, metric: str = "kl"
) -> tuple[dict, dict[str, int]]:
    """(recipe dict, chosen width per layer) for a mean of ``target`` bits over the layers in ``rows``."""
    cost = layer_costs(rows, metric)
    n = {r["layer"]: r["params"] for r in rows}
    try:
        choice = allocate(cost, n, target)
    except ValueError as e:
        raise KrimpError(f"--target-bits {target}: {e}") from None
    weights = Counter()
    for k, b in choice.items():
        weights[b] += n[k]
    base = weights.most_common(1)[0][0]
    overrides = {k: {"bits": b} for k, b in choice.items() if b != base}
    stage = {
        "method": method,
        "bits": base,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "head_bits": 8,
        "overrides": overrides,
    }
    gguf_ok = set(choice.values()) <= {3, 4, 8}  # GGUF has exact block formats for these widths only
    recipe = {
        "model": model,
        "data": data,
        "goal": {"max_quality_drop": 0.10},
        "export": {"formats": ["gguf" if gguf_ok else "onnx", "safetensors"]},
        "stages": [stage],
    }
    return recipe, choice


def plot_sensitivity(rows: list[dict], choice: dict[str, int] | None, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "kl" if "kl" in rows[0] else None
    order = sorted(rows, key=lambda r: r["layer"].split(".")[2].zfill(4) + r["layer"])
    vals = [r[key] if key else max(r["proxy"].values()) for r in order]
    colors = {2: "#c92a2a", 3: "#e8590c", 4: "#1971c2", 5: "#2f9e44", 6: "#2f9e44", 8: "#5f3dc4"}
    fig, ax = plt.subplots(figsize=(max(8, len(order) * 0.06), 3.6))
    c = [colors.get(choice.get(r["layer"]), "#868e96") if choice else "#1971c2" for r in order]
    ax.bar(range(len(order)), vals, color=c, width=0.9)
    ax.set_yscale("log")
    ax.set_xlabel("decoder linear (block order)")
    ax.set_ylabel("KL to float when alone quantized" if key else "proxy: relative output error")
    if choice:
        for b in sorted(set(choice.values())):
            ax.bar([], [], color=colors.get(b, "#868e96"), label=f"{b}-bit in mixed recipe")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out: Path, result: dict, recipe: dict | None) -> dict[str, Path]:
    """sensitivity.json, sensitivity.md, sensitivity.png and (with a target) mixed.yaml, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sensitivity.json", "md": out / "sensitivity.md", "png": out / "sensitivity.png"}
    _atomic(paths["json"], json.dumps(result, indent=1))
    _atomic(paths["md"], markdown(result))
    plot_sensitivity(
        result["layers"],
        result.get("choice"),
        paths["png"],
        f"{result['model']}: {result['method']} one layer at a time",
    )
    if recipe is not None:
        paths["recipe"] = out / "mixed.yaml"
        head = (
            f"# Mixed precision from `krimp sensitivity` ({result['method']}): mean "
            f"{result['mean_bits']:.3f} code bits per weight over {len(result['layers'])} decoder linears\n"
            f"#   krimp compress {paths['recipe']} --out runs/mixed\n"
        )
        _atomic(paths["recipe"], head + yaml.safe_dump(recipe, sort_keys=False, width=120))
    return paths


def markdown(result: dict) -> str:
    measured = "kl" in result["layers"][0]
    lines = [
        f"# Sensitivity of {result['model']} to {result['method']}",
        "",
        f"{result['note']}",
        "",
        f"Took {result['seconds']:.0f} s.",
        "",
    ]
    if result.get("choice"):
        lines += [
            f"Mixed precision for a mean of {result['target_bits']} bits: mean {result['mean_bits']:.3f}; "
            f"widths used: {result['widths_used']}.",
            "",
        ]
    head = "| layer | params | " + ("KL | ppl change | " if measured else "") + "proxy | mixed bits |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    bits = result["method_bits"]
    for r in result["layers"]:
        cells = [r["layer"], f"{r['params']:,}"]
        if measured:
            cells += [f"{r['kl']:.5f}", f"{100 * r['ppl_change']:+.2f}%"]
        cells += [f"{r['proxy'][str(bits)]:.2e}", str(result.get("choice", {}).get(r["layer"], ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_sensitivity(
    model: str,
    method: str,
    data_source: str | None,
    out: Path,
    widths: list[int],
    target_bits: float | None,
    measure: bool = True,
    calib_samples: int = 16,
    eval_samples: int = 8,
    seq_len: int = 256,
    advance=None,
    layers: list[str] | None = None,
    metric: str = "kl",
    measure_widths: list[int] | None = None,
) -> dict:
    """Load, measure, allocate and write; returns the result dict (also in sensitivity.json)."""
    from krimp.data import load_data
    from krimp.models import load_model
    from krimp.recipe import DataSpec
    from krimp.search.sensitivity import lm_sensitivity

    name, spec = parse_method(method)
    if target_bits is not None and not min(widths) <= target_bits <= max(widths + [spec.bits]):
        raise KrimpError(f"--target-bits {target_bits} is outside the widths {sorted(widths)}")
    t0 = time.perf_counter()
    handle = load_model(model, "causal-lm" if str(model) == "builtin:smollm2" else None)
    if handle.task.name != "causal-lm" or handle.module is None:
        raise KrimpError(
            f"sensitivity to {method} needs a causal language model in torch (got a "
            f"{handle.task.name} {handle.kind} model)"
        )
    data_spec = DataSpec(source=data_source, calib_samples=calib_samples, eval_samples=eval_samples, seq_len=seq_len)
    data = load_data(data_spec, handle.task, handle.builtin_origin)
    rows = lm_sensitivity(
        handle.module,
        handle.task,
        data.calib,
        data.eval,
        spec,
        widths,
        measure,
        seq_len,
        advance=advance,
        layers=layers,
        measure_widths=measure_widths,
    )
    result = {
        "model": str(model),
        "method": method,
        "method_bits": spec.bits,
        "group_size": spec.group_size,
        "widths": sorted(set(widths)),
        "data": {**data.info, "calib_windows": len(data.calib), "eval_windows": len(data.eval), "seq_len": seq_len},
        "note": (
            "Each decoder linear rounded alone (RTN on the method's grid), the rest in float; "
            "KL(float || quantized) per token and perplexity change on held-out windows."
            if measure
            else "Proxy only: relative output error under the input second moment (no model evaluation per layer)."
        ),
        "layers": [
            {
                **r,
                "proxy": {str(b): v for b, v in r["proxy"].items()},
                "cost": {str(b): v for b, v in r["cost"].items()},
            }
            for r in rows
        ],
        "allocation_metric": metric if measure else "proxy",
    }
    recipe = None
    if target_bits is not None:
        data_block = {
            "source": data_source or "builtin:python-docs",
            "calib_samples": 128,
            "eval_samples": 32,
            "seq_len": 512,
        }
        recipe, choice = mixed_recipe(
            rows, name, spec, target_bits, str(model), data_block, metric if measure else "proxy"
        )
        n = {r["layer"]: r["params"] for r in rows}
        result.update(
            target_bits=target_bits,
            choice=choice,
            mean_bits=mean_bits(choice, n),
            widths_used=dict(sorted(Counter(choice.values()).items())),
        )
    result["seconds"] = time.perf_counter() - t0
    result["measured_widths"] = sorted({spec.bits, *(measure_widths or [])}) if measure else []
    result["outputs"] = {k: str(v) for k, v in write_outputs(Path(out), result, recipe).items()}
    return result
