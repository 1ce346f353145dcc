"""Which method runs on which architecture: every family of tiny random configs (seconds each), from its
Hugging Face folder through `krimp.compress` with one method, exported to ONNX (and safetensors where
the method writes one). Not a speed or quality figure: random weights say only that the path works,
or how it is refused.

    python bench/architectures.py [NAME ...]

Writes bench/results/architectures.{md,json}.
"""

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

import krimp
from krimp.models import load_model

RESULTS = Path(__file__).parent / "results"
H = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
GQA = {**H, "num_key_value_heads": 2}
FAMILIES = {
    "llama": ("text", tf.LlamaConfig, tf.LlamaForCausalLM, GQA),
    "mistral": ("text", tf.MistralConfig, tf.MistralForCausalLM, GQA),
    "qwen2": ("text", tf.Qwen2Config, tf.Qwen2ForCausalLM, GQA),
    "qwen3": ("text", tf.Qwen3Config, tf.Qwen3ForCausalLM, {**GQA, "head_dim": 16}),
    "gemma2": ("text", tf.Gemma2Config, tf.Gemma2ForCausalLM, {**GQA, "head_dim": 16}),
    "gemma3": ("text", tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {**GQA, "head_dim": 16}),
    "phi3": ("text", tf.Phi3Config, tf.Phi3ForCausalLM, {**H, "num_key_value_heads": 4, "pad_token_id": 0}),
    "gpt2": ("text", tf.GPT2Config, tf.GPT2LMHeadModel, {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "bert": ("text", tf.BertConfig, tf.BertModel, H),
    "roberta": ("text", tf.RobertaConfig, tf.RobertaModel, {**H, "pad_token_id": 1}),
    "xlm-roberta": ("text", tf.XLMRobertaConfig, tf.XLMRobertaModel, {**H, "pad_token_id": 1}),
    "distilbert": (
        "text",
        tf.DistilBertConfig,
        tf.DistilBertModel,
        {"dim": 64, "hidden_dim": 128, "n_layers": 2, "n_heads": 4},
    ),
    "deberta-v2": ("text", tf.DebertaV2Config, tf.DebertaV2Model, H),
    "vit": (
        "image",
        tf.ViTConfig,
        tf.ViTForImageClassification,
        {**H, "image_size": 32, "patch_size": 8, "num_labels": 10},
    ),
    "resnet": (
        "image",
        tf.ResNetConfig,
        tf.ResNetForImageClassification,
        {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "num_labels": 10},
    ),
    "mobilenet_v2": (
        "image",
        tf.MobileNetV2Config,
        tf.MobileNetV2ForImageClassification,
        {"depth_multiplier": 0.25, "image_size": 32, "num_labels": 10},
    ),
    "convnext": (
        "image",
        tf.ConvNextConfig,
        tf.ConvNextForImageClassification,
        {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_labels": 10, "image_size": 32},
    ),
}
METHODS = {
    "rtn": {"bits": 4, "group_size": 32},
    "gptq": {"bits": 4, "group_size": 32},
    "awq": {"bits": 4, "group_size": 32},
    "smoothquant": {"alpha": 0.5},
    "sparsegpt": {"sparsity": 0.5},
    "wanda": {"sparsity": 0.5},
    "magnitude": {"sparsity": 0.5},
    "structured": {"ffn": 0.5, "heads": 0.25, "importance": "magnitude"},
    "channels": {"ratio": 0.25},
    "qat": {"steps": 2, "batch": 4},
    "int8-dynamic": {"fallback": False},
    "int8-static": {"fallback": False},
}
SMALL = {
    "data": {"calib_samples": 8, "eval_samples": 8, "seq_len": 32},
    "eval": {"seq_len": 32, "batch": 4, "repeats": 3, "warmup": 1, "bootstrap": 100, "timing_budget_s": 1},
}


def main(only: list[str]) -> None:
    tok = load_model("builtin:minilm").task.tokenizer
    root = Path(tempfile.mkdtemp(prefix="krimp-arch-"))
    rows = {}
    for name, (kind, cfg_cls, model_cls, kw) in FAMILIES.items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        folder = root / name
        model_cls(cfg_cls(**kw, **({"vocab_size": tok.vocab_size} if kind == "text" else {}))).save_pretrained(folder)
        if kind == "text":
            tok.save_pretrained(folder)
        fits = set(krimp.inspect(str(folder))["methods"])
        rows[name] = {}
        for m, settings in METHODS.items():
            t0 = time.time()
            recipe = {**SMALL, "export": {"formats": ["onnx"]}, "stages": [{"method": m, **settings}]}
            try:
                r = krimp.compress(str(folder), recipe, root / f"{name}-{m}")
                cell = f"ok ({r['compressed']['size_bytes'] / r['baseline']['size_bytes']:.2f}x size)"
            except krimp.KrimpError as e:
                cell = "refused: " + str(e).split(";")[0][:90]
            except Exception as e:  # noqa: BLE001  (a crash is what this table is for)
                cell = f"CRASH {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            rows[name][m] = {"result": cell, "offered": m in fits, "seconds": round(time.time() - t0, 1)}
            print(name, m, cell, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "architectures.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "# Methods x architectures on tiny random configs (bench/architectures.py)",
        "",
        f"transformers {tf.__version__}, torch {torch.__version__}, {platform.machine()}, {time.strftime('%Y-%m-%d')}. "
        "Each cell: one `krimp.compress` with that method alone (ONNX export); `ok` with the artifact's size "
        "against the float export, or the one-line refusal. An offered method is one `krimp inspect` lists.",
        "",
        "| family | " + " | ".join(METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    for name, cells in rows.items():

        def show(c):
            mark = "" if c["offered"] == c["result"].startswith("ok") else " (!)"
            return ("ok" if c["result"].startswith("ok") else c["result"].split(":")[0]) + mark

        lines.append(f"| {name} | " + " | ".join(show(cells[m]) for m in METHODS) + " |")
    lines += ["", "(!) = offered by `krimp inspect` but not ok, or ok but not offered.", "", "Refusals:", ""]
    lines += [
        f"- {n} / {m}: {c['result']}"
        for n, cells in rows.items()
        for m, c in cells.items()
        if not c["result"].startswith("ok")
    ]
    (RESULTS / "architectures.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
