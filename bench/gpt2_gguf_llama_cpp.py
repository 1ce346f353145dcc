"""GPT-2 to GGUF, read by llama.cpp itself: does llama.cpp compute what krimp's model computes?

    python bench/gpt2_gguf_llama_cpp.py --llama-perplexity /path/to/llama-perplexity

A GPT-2 of random weights (two blocks of 64, a byte-level BPE of 512 tokens trained on this README),
its 2-D weights scaled by 4 so that its predictions are peaked and distinctive (a wrong tensor layout
would show), rounded to 4 bits in groups of 32 by krimp's RTN and exported to GGUF. llama.cpp's
``llama-perplexity`` scores 4 chunks of 128 tokens of the README (the second half of each chunk, as it
does); krimp scores the same tokens with the same codes through transformers' GPT-2. Writes
bench/results/gpt2_gguf_llama_cpp.md.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, machine_line

from krimp.export.gguf import export_gguf
from krimp.models.arch import linear_view
from krimp.quant.llm import RTN, RTNConfig
from krimp.stage import StageContext

CTX, CHUNKS = 128, 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-perplexity", required=True, help="llama.cpp's llama-perplexity binary")
    a = ap.parse_args()
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")[:20000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    )
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=256, bos_token_id=0, eos_token_id=0
    )
    m = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(4)
    m, _ = RTN().apply_torch(linear_view(m), RTNConfig(bits=4, group_size=32), StageContext("causal-lm", [], 2))
    work = Path(tempfile.mkdtemp(prefix="krimp-gpt2-gguf-"))
    info = export_gguf(m, None, work / "gpt2.gguf", tokenizer=tok)
    (work / "text.txt").write_text(text, encoding="utf-8")
    cmd = [a.llama_perplexity, "-m", str(work / "gpt2.gguf"), "-f", str(work / "text.txt"), "-c", str(CTX)]
    cmd += ["-b", str(CTX), "-ub", str(CTX), "-np", "1", "--chunks", str(CHUNKS), "-t", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out.stdout + out.stderr)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nll, n = 0.0, 0
    for c in range(CHUNKS):  # llama-perplexity's scoring: each chunk's second half, given the first
        chunk = torch.tensor([ids[c * CTX : (c + 1) * CTX]])
        with torch.no_grad():
            lp = torch.log_softmax(m(chunk).logits[0].double(), -1)
        for j in range(CTX // 2, CTX - 1):
            nll -= float(lp[j, chunk[0, j + 1]])
            n += 1
    ours = math.exp(nll / n)
    lines = [
        "# GPT-2 from krimp's GGUF in llama.cpp (bench/gpt2_gguf_llama_cpp.py)",
        "",
        f"{machine_line()}. Tensor types written: {info['tensor_types']}.",
        "",
        "| scorer | perplexity, 4 x 64 tokens |",
        "|---|---|",
        f"| llama.cpp `llama-perplexity` on the GGUF | {found.group(1)} +/- {found.group(2)} |",
        f"| krimp's model (transformers' GPT-2 with the same codes) | {ours:.4f} |",
        "",
        f"Relative difference: {abs(float(found.group(1)) / ours - 1):.2%} (a uniform guess would score {len(tok)}).",
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpt2_gguf_llama_cpp.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
