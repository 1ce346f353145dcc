"""ONNX Runtime GenAI: krimp's GPTQ 4-bit GenAI folder against the GenAI model builder's own int4,
SmolLM2-135M-Instruct, both scored in ONNX Runtime GenAI itself on the same held-out text.

    python bench/genai.py [--eval 16] [--skip-krimp]

Needs the ``genai`` extra.

- float folder: SmolLM2 (the float model krimp loads from its GGUF) saved as a Hugging Face folder.
- peer: ``python -m onnxruntime_genai.models.builder -i FLOAT -o OUT -p int4 -e cpu`` (its defaults:
  round-to-nearest, symmetric 4-bit blocks of 32, the tied embedding shared with the head at 4 bits,
  accuracy_level 4).
- krimp GPTQ: ``krimp compress smollm2-gptq-w4-genai --out OUT`` (the shipped recipe: GPTQ on the same
  grid, 128 x 512 tokens of the calibration halves of the documentation and the Wikipedia excerpt),
  in its own process.
- krimp RTN: krimp's round-to-nearest on the same grid, through the same exporter: the grid alone.

Quality: each folder in ``onnxruntime_genai`` (a fresh generator per window: the prompt's logits at
every position) on windows of 512 tokens of the held-out halves of the Wikipedia excerpt and of the
documentation: perplexity, KL and top-1 agreement to the float model (transformers, float32), 95%
bootstrap intervals over windows, and each folder's perplexity relative to the peer's, paired over
windows. Bytes: ``model.onnx`` and its external data. Decode tokens/s: greedy, a 128-token prompt
then 64 tokens, models alternated over 3 rounds (median). Writes bench/results/genai.{md,json};
timings are from a shared 2-core VM: read them as ratios.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import lm_peer_table
from _lm_peer import finish, make_folders, score_all, scorers, start

WORK = Path("/tmp/krimp-bench-genai")
PEER = "GenAI builder -p int4 (RTN w4 g32)"


class GenAIEngine:
    """A GenAI folder as an engine: ``run(feed)`` -> logits (b, t, vocab), one generator per row."""

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(folder))

    def _generator(self, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def run(self, feed: dict) -> np.ndarray:
        out = []
        for row in np.asarray(feed["input_ids"]):
            gen = self._generator(len(row) + 1)
            gen.append_tokens(row[None].astype(np.int32))
            out.append(np.array(gen.get_output("logits"), np.float32).reshape(len(row), -1))
        return np.stack(out)

    def decode_tps(self, prompt: np.ndarray, new: int = 64) -> float:
        gen = self._generator(len(prompt) + new)
        gen.append_tokens(prompt[None].astype(np.int32))
        t = time.perf_counter()
        for _ in range(new):
            gen.generate_next_token()
        return new / (time.perf_counter() - t)


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))


def main() -> None:
    import onnxruntime_genai as og

    from krimp.export.genai import export_genai

    a, h, flt, t_all = start(WORK)
    builder = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(flt), "-o"]
    builder += [str(WORK / "builder-int4"), "-p", "int4", "-e", "cpu", "-c", str(WORK / "cache")]
    folders, seconds = make_folders(
        h,
        WORK,
        (PEER, builder, WORK / "builder-int4"),
        ("krimp RTN w4 g32", 32, export_genai),
        ("krimp GPTQ w4 g32", "smollm2-gptq-w4-genai", "genai"),
        a.skip_krimp,
    )
    scorer = scorers(h, a.eval)
    rows, engines, nll = score_all(folders, GenAIEngine, scorer, seconds, _bytes)
    meta = {"onnxruntime_genai": og.__version__, "eval_windows": a.eval, "t0": t_all}
    finish("genai", rows, engines, nll, scorer, PEER, meta, to_markdown)


def to_markdown(res: dict) -> str:
    first = next(iter(res["rows"].values()))["scores"]
    lines = [
        "# SmolLM2-135M in ONNX Runtime GenAI: krimp's folders against the GenAI model builder's int4",
        "",
        f"{res['machine']}; onnxruntime-genai {res['onnxruntime_genai']}. Made by `python bench/genai.py` "
        f"({res['wall_s']:.0f} s). Every folder computed in GenAI (accuracy_level 4: int8 activations in "
        f"MatMulNBits). {res['eval_windows']} held-out windows of 512 tokens from each source; 95% bootstrap "
        "intervals over windows; KL and top-1 agreement are to the float model (transformers, float32). Float "
        "perplexity: "
        + ", ".join(f"{k} {v['ppl_ref']:.2f}" for k, v in first.items())
        + ". Decode: greedy after a 128-token prompt, 64 tokens, models alternated over 3 rounds (median; a "
        "shared 2-core VM: read as ratios).",
        "",
    ]
    lines += lm_peer_table(res["rows"])
    lines += [
        "",
        "Time: krimp GPTQ's is its GPTQ stage (calibration forward passes included) from the run's report.json; "
        "krimp RTN's is rounding and building the folder; the builder's is its whole command (load, round, write).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
