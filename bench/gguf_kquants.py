"""llama.cpp's K-quants: krimp's GPTQ on llama-quantize's Q4_K_M mix against llama-quantize's own Q4_K_M,
without and with an importance matrix, on an off-grid SmolLM2 (``bench/offgrid_smollm2.py``).

    python bench/gguf_kquants.py --llama-bin DIR [--calib 128] [--eval 16] [--reuse]

``DIR`` holds llama.cpp's ``llama-quantize``, ``llama-imatrix`` and ``llama-perplexity`` (built from the
``llama-cpp-python`` sdist's vendored llama.cpp; TESTBED.md). One float GGUF (F32) of the fixture is the
input of both sides: llama-imatrix collects its statistics on the same calibration text krimp calibrates
on (128 windows of 512 tokens, half the documentation, half Wikipedia), llama-quantize writes Q4_K_M
with and without them, and ``krimp compress`` runs GPTQ with ``gguf_type: Q4_K_M``. Every file is then

- read back through transformers' GGUF reader (weights dequantized, float32 compute) and scored on
  held-out windows of Wikipedia and the documentation against the float fixture: perplexity, KL, top-1,
  with 95% bootstrap intervals and the perplexity ratio to llama.cpp's imatrix file paired over windows;
- scored by llama.cpp itself (``llama-perplexity`` on the held-out text: its kernels, activations
  rounded to 8 bits), whose prompt throughput is the speed column (one run each; a shared 2-core VM).

The per-tensor types of krimp's file and llama.cpp's are compared: the same mix is the same bytes.
Writes bench/results/gguf_kquants.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

WORK = Path("/tmp/krimp-bench-kquants")
PEER = "llama.cpp Q4_K_M + imatrix"


def run(cmd: list, log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{log.read_text()[-3000:]}")
    return round(time.perf_counter() - t, 1)


def text_of(h, windows) -> str:
    """The windows' tokens as text, for llama.cpp's tools (which tokenize it again, alike for every file)."""
    return "".join(h.task.tokenizer.decode(w.ids) for w in windows)


def llama_perplexity(bin_dir: Path, gguf: Path, text: Path, log: Path) -> dict:
    run([bin_dir / "llama-perplexity", "-m", gguf, "-f", text, "-c", 512, "-t", 2, "-b", 512], log)
    out = log.read_text()
    ppl = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    # throughput: the chunks' tokens over the time between the log's stamps (minutes.seconds.ms.us) that
    # open and close the pass (this build prints no timings of its own)
    start = re.search(
        r"^(\d+)\.(\d+)\.(\d+)\.\d+ I perplexity: calculating perplexity over (\d+) chunks, n_ctx=(\d+)", out, re.M
    )
    end = re.search(r"^(\d+)\.(\d+)\.(\d+)\.\d+ I Final estimate", out, re.M)

    def at(m):
        return int(m[1]) * 60 + int(m[2]) + int(m[3]) / 1000

    tps = int(start[4]) * int(start[5]) / (at(end) - at(start)) if start and end else float("nan")
    return {"ppl": float(ppl[1]), "ppl_pm": float(ppl[2]), "prompt_tps": round(tps, 1)}


def tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def to_markdown(res: dict) -> str:
    from _common import lm_peer_table

    rows = res["rows"]
    lines = [
        "# llama.cpp K-quants: krimp GPTQ on the Q4_K_M mix vs llama-quantize Q4_K_M (imatrix)",
        "",
        f"{res['machine']}. Fixture: {res['fixture']}. Calibration: {res['calib']}; held-out: {res['eval']}.",
        "Perplexity, KL and top-1: each GGUF read back by transformers (dequantized, float32 compute);",
        f"ratios to `{PEER}` paired over windows, 95% bootstrap. `llama-perplexity`: llama.cpp on the held-out",
        "text (its own kernels, 8-bit activations, 512-token chunks); its prompt throughput is the speed",
        "column (one run each, shared VM: read as ratios). Time: making the file (GPTQ includes calibration).",
        "",
        *lm_peer_table(rows, ("llama-perplexity", "llama_ppl"), ("llama.cpp prompt tok/s", "prompt_tps")),
        "",
        f"Per-tensor types: {res['types_note']}",
        "",
        f"Wall time {res['wall_s']:.0f} s"
        + (" (the files of an earlier run reused, `--reuse`: the time column is theirs)" if res.get("reused") else "")
        + ". `python bench/gguf_kquants.py --llama-bin DIR`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    import offgrid_smollm2
    import torch
    from _lm_peer import krimp_compress, score_all, scorers, write_results

    from krimp.data import load_data
    from krimp.eval.runtime import TorchEngine
    from krimp.export.gguf import export_gguf
    from krimp.models import load_model
    from krimp.quant.llm import RTN, RTNConfig
    from krimp.recipe import DataSpec
    from krimp.stage import StageContext

    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bin", type=Path, required=True)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=16, help="held-out windows of 512 tokens per source")
    ap.add_argument("--reuse", action="store_true", help="keep files already in the work folder")
    a = ap.parse_args()
    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fixture = offgrid_smollm2.make()
    meta_fix = json.loads((fixture / "offgrid.json").read_text())
    h = load_model(str(fixture))
    sources = ["builtin:python-docs", "builtin:wikipedia"]
    calib = load_data(DataSpec(source=sources, calib_samples=a.calib, eval_samples=1, seq_len=512), h.task).calib
    (WORK / "calib.txt").write_text(text_of(h, calib), encoding="utf-8")
    scorer = scorers(h, a.eval)
    held = [w for s in ("builtin:wikipedia", "builtin:python-docs") for w in _eval_windows(h, s, a.eval)]
    (WORK / "heldout.txt").write_text(text_of(h, held), encoding="utf-8")

    f32 = WORK / "float.gguf"
    if not (a.reuse and f32.exists()):
        export_gguf(h.module, None, f32, float_type="f32", tokenizer=h.task.tokenizer)
    b = a.llama_bin
    files, seconds = {}, {}
    imat, imat_s = WORK / "imatrix.gguf", WORK / "imatrix.seconds"
    if not (a.reuse and imat.exists() and imat_s.exists()):
        cmd = [b / "llama-imatrix", "-m", f32, "-f", WORK / "calib.txt", "-o", imat, "-c", 512, "--chunks", a.calib]
        imat_s.write_text(str(run([*cmd, "-t", 2], WORK / "imatrix.log")))
    seconds["imatrix"] = float(imat_s.read_text())  # kept for --reuse: the imatrix row's time includes it
    for name, extra in (("llama.cpp Q4_K_M", []), (PEER, ["--imatrix", imat])):
        out = WORK / (name.replace(" ", "_").replace("+", "").replace(".", "") + ".gguf")
        t = run([b / "llama-quantize", *extra, f32, out, "Q4_K_M", 2], out.with_suffix(".log"))
        files[name], seconds[name] = out, t + (seconds.get("imatrix", 0) if extra else 0)

    # krimp: round-to-nearest on the same mix (in process), then GPTQ through the CLI
    t = time.perf_counter()
    m, _ = RTN().apply_torch(copy.deepcopy(h.module), RTNConfig(gguf_type="Q4_K_M"), StageContext(h.task, [], 2))
    files["krimp RTN Q4_K_M"] = WORK / "krimp-rtn.gguf"
    export_gguf(m, None, files["krimp RTN Q4_K_M"], tokenizer=h.task.tokenizer)
    seconds["krimp RTN Q4_K_M"] = round(time.perf_counter() - t, 1)
    del m
    recipe = WORK / "krimp-gptq-q4_k_m.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": str(fixture),
                "data": {"source": sources, "calib_samples": a.calib, "eval_samples": 8, "seq_len": 512},
                "eval": {"batch": 4, "seq_len": 128, "repeats": 3},
                "export": {"formats": ["gguf"]},
                "stages": [{"method": "gptq", "gguf_type": "Q4_K_M"}],
            }
        )
    )
    name = "krimp GPTQ Q4_K_M"
    seconds[name] = krimp_compress(recipe, WORK / "krimp-gptq", WORK / "krimp.log", reuse=a.reuse)
    files[name] = WORK / "krimp-gptq" / "model.gguf"

    ref_types = tensor_types(files[PEER])
    diffs = {}
    for k in ("krimp RTN Q4_K_M", name):
        got = tensor_types(files[k])
        diffs[k] = {t: (got.get(t), v) for t, v in ref_types.items() if got.get(t) != v}
    counts = {}
    for v in ref_types.values():
        counts[v] = counts.get(v, 0) + 1
    types_note = (
        f"llama.cpp's Q4_K_M file: {dict(sorted(counts.items()))}; krimp's files differ from it in "
        + "; ".join(f"{k}: {len(v)} tensors{' ' + str(v) if v else ''}" for k, v in diffs.items())
    )
    print(types_note)

    def engine_of(path: Path):
        return TorchEngine(load_model(str(path)).module, h.task, 2)

    rows, engines, nll = score_all(files, engine_of, scorer, seconds, lambda p: p.stat().st_size)
    del engines
    for k, p in {"float (F32)": f32, **files}.items():
        lp = llama_perplexity(b, p, WORK / "heldout.txt", WORK / f"ppl-{p.stem}.log")
        if k in rows:
            rows[k].update(llama_ppl=lp["ppl"], llama_ppl_pm=lp["ppl_pm"], prompt_tps=lp["prompt_tps"])
        else:
            float_llama = lp
        print(k, lp)
    meta = {
        "t0": t0,
        "fixture": f"{fixture.name} ({meta_fix['base']}, {meta_fix['transform']}: logits within "
        f"{meta_fix['max_relative_logit_difference']:.0e}, Q4_1-grid distance {meta_fix['q4_1_grid_distance_steps']['after']} "
        f"steps, 0.25 = off grid); float: llama-perplexity {float_llama['ppl']:.4f} at {float_llama['prompt_tps']:.0f} tok/s, perplexity "
        + ", ".join(f"{k} {v['ppl_ref']:.3f}" for k, v in rows[PEER]["scores"].items()),
        "calib": f"{a.calib} windows of 512 tokens of {' + '.join(sources)} (calibration halves)",
        "eval": f"{a.eval} + {a.eval} windows of 512 tokens (held-out halves of Wikipedia and the documentation)",
        "types_note": types_note,
        "reused": a.reuse,
        "type_differences": {k: len(v) for k, v in diffs.items()},
    }
    write_results("gguf_kquants", rows, nll, PEER, meta, to_markdown)


def _eval_windows(h, source: str, n: int):
    from krimp.data import load_data
    from krimp.recipe import DataSpec

    return load_data(DataSpec(source=source, calib_samples=1, eval_samples=n, seq_len=512), h.task).eval


if __name__ == "__main__":
    main()
