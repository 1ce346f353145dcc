"""llama.cpp (through llama-cpp-python, an optional extra) as a runtime: logits, perplexity windows
and decode speed of a GGUF file in the client people deploy it with."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from krimp.errors import KrimpError
from krimp.memory import peak_rss_mb


def _llama(path: Path | str, n_ctx: int, threads: int, logits_all: bool = True):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise KrimpError("llama.cpp is not installed: pip install 'krimp[llama]' (builds from source)") from None
    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=logits_all,
        verbose=False,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=min(n_ctx, 512),
    )


class LlamaCppEngine:
    """Next-token logits of a GGUF model for a feed of token windows, row by row."""

    runtime = "llama.cpp"

    def __init__(self, path: Path | str, n_ctx: int = 512, threads: int = 2):
        self.llm = _llama(path, n_ctx, threads)

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        out = []
        for row in feed["input_ids"]:
            self.llm.reset()
            toks = [int(t) for t in row]
            self.llm.eval(toks)
            out.append(np.array(self.llm.scores[: len(toks)], dtype=np.float32))
        return np.stack(out)


def bench_gguf(path: Path | str, threads: int = 2, prompt: int = 128, decode: int = 64, repeats: int = 3) -> dict:
    """Prompt and decode tokens/s of a GGUF file in llama.cpp (best of ``repeats``), in a fresh
    process so that its peak RSS is the model's alone."""
    import subprocess

    args = [
        sys.executable,
        "-m",
        "krimp.eval.llamacpp",
        str(path),
        str(threads),
        str(prompt),
        str(decode),
        str(repeats),
    ]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise KrimpError(f"llama.cpp bench failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _worker(path: str, threads: int, prompt: int, decode: int, repeats: int) -> dict:
    llm = _llama(path, prompt + decode + 8, threads, logits_all=False)
    rng = np.random.default_rng(0)
    toks = [int(t) for t in rng.integers(1000, 20000, size=prompt)]
    best_p, best_d = 0.0, 0.0
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(toks)
        t1 = time.perf_counter()
        for _ in range(decode):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
        t2 = time.perf_counter()
        best_p, best_d = max(best_p, prompt / (t1 - t0)), max(best_d, decode / (t2 - t1))
    rss = peak_rss_mb()
    return {
        "runtime": "llama.cpp",
        "prompt_tokens_per_s": best_p,
        "decode_tokens_per_s": best_d,
        "peak_rss_mb": rss,
        "threads": threads,
        "prompt_tokens": prompt,
        "decode_tokens": decode,
        "size_bytes": Path(path).stat().st_size,
    }


if __name__ == "__main__":
    p, th, pr, de, rep = sys.argv[1:6]
    sys.stdout.write(json.dumps(_worker(p, int(th), int(pr), int(de), int(rep))) + "\n")  # the parent reads this line
