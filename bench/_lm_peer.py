"""The harness the language-model peer benches share (``genai.py``, ``mlx_peer.py``): the peer's own
command, krimp's round-to-nearest on the same grid and krimp's shipped GPTQ recipe, then held-out
scorers and decode speed alternated between the folders."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, machine_line, ppl_ratios, timed
from llm_wbits import Scorer


def start(work: Path):
    """The command line (``--eval``, ``--skip-krimp``), SmolLM2 loaded and its float folder written:
    (args, handle, float folder, start time)."""
    import argparse

    import torch
    from _common import float_folder

    from krimp.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", type=int, default=16, help="held-out windows of 512 tokens per source")
    ap.add_argument("--skip-krimp", action="store_true", help=f"reuse the GPTQ run in {work}/krimp-gptq")
    a = ap.parse_args()
    torch.set_num_threads(2)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    h = load_model("builtin:smollm2")
    return a, h, float_folder(h, work / "float"), t0


def krimp_rtn(h, out: Path, group: int, export) -> float:
    """Seconds to round SmolLM2 to symmetric 4 bits in groups of ``group`` (the tied head too) and
    ``export(module, out, tokenizer)`` it: the grid alone, without GPTQ."""
    import copy

    from krimp.quant.llm import RTN, RTNConfig
    from krimp.stage import StageContext

    t = time.perf_counter()
    cfg = RTNConfig(bits=4, group_size=group, symmetric=True, head_bits=4, head_group_size=group)
    m, _ = RTN().apply_torch(copy.deepcopy(h.module), cfg, StageContext(h.task, [], 2))
    export(m, out, h.task.tokenizer)
    return round(time.perf_counter() - t, 1)


def make_folders(
    h,
    work: Path,
    peer: tuple[str, list[str], Path],
    rtn: tuple[str, object],
    gptq: tuple[str, str, str],
    skip_krimp: bool,
) -> tuple[dict[str, Path], dict[str, float]]:
    """The three folders and the seconds each took. ``peer``: (name, command, its output folder), run
    in a subprocess; ``rtn``: (name, function(out folder) -> seconds); ``gptq``: (name, recipe, the
    artifact's folder inside the run), ``krimp compress RECIPE`` in its own process unless
    ``skip_krimp`` (its time: the GPTQ stage, calibration included, from report.json)."""
    (pname, cmd, pout), (rname, group, export), (gname, recipe, sub) = peer, rtn, gptq
    shutil.rmtree(pout, ignore_errors=True)
    seconds = {pname: timed(cmd, work / f"{pout.name}.log")}
    seconds[rname] = krimp_rtn(h, work / "krimp-rtn", group, export)
    seconds[gname] = krimp_compress(recipe, work / "krimp-gptq", work / "krimp.log", reuse=skip_krimp)
    return {pname: pout, rname: work / "krimp-rtn", gname: work / "krimp-gptq" / sub}, seconds


def krimp_compress(recipe: str | Path, out: Path, log: Path, reuse: bool = False) -> float:
    """``krimp compress RECIPE --out OUT`` in its own process (not when ``reuse`` finds its report);
    the seconds of its first stage (calibration included), from report.json."""
    if not (reuse and (out / "report.json").exists()):
        cmd = [sys.executable, "-m", "krimp.cli.main", "compress", str(recipe), "--out", str(out), "--overwrite"]
        timed(cmd, log)
    return json.loads((out / "report.json").read_text())["stages"][0]["seconds"]


def score_all(folders: dict[str, Path], engine_of, scorer: dict, seconds: dict, bytes_of) -> tuple[dict, dict, dict]:
    """Each folder opened by ``engine_of`` and scored on every source: (rows with bytes, seconds and
    scores; the engines; per-window NLL for the paired ratios)."""
    rows, engines, nll = {}, {}, {}
    for name, folder in folders.items():
        engines[name] = engine_of(folder)
        per_window = {k: s.rows(engines[name]) for k, s in scorer.items()}
        rows[name] = {
            "bytes": bytes_of(folder),
            "seconds": seconds[name],
            "scores": {k: Scorer.summary(v) for k, v in per_window.items()},
        }
        nll[name] = {k: v[:, 1] for k, v in per_window.items()}
        print(name, rows[name]["bytes"], {k: round(v["ppl"]["value"], 3) for k, v in rows[name]["scores"].items()})
    return rows, engines, nll


def scorers(h, windows: int) -> dict[str, Scorer]:
    """Held-out windows of 512 tokens of the Wikipedia excerpt and of the documentation, scored against float."""
    from krimp.data import load_data
    from krimp.recipe import DataSpec

    out = {}
    for src in ("builtin:wikipedia", "builtin:python-docs"):
        d = load_data(DataSpec(source=src, calib_samples=1, eval_samples=windows, seq_len=512), h.task)
        out[src.split(":")[1]] = Scorer(h, d.eval)
    return out


def decode_speeds(engines: dict, prompt: np.ndarray, rounds: int = 3) -> dict[str, float]:
    """Median decode tokens/s of each engine's ``decode_tps(prompt)``, alternated so noise hits all alike."""
    tps = {k: [] for k in engines}
    for _ in range(rounds):
        for k, e in engines.items():
            tps[k].append(e.decode_tps(prompt))
    return {k: float(np.median(v)) for k, v in tps.items()}


def finish(name: str, rows: dict, engines: dict, nll: dict, scorer: dict, peer: str, meta: dict, to_markdown) -> None:
    """Decode speeds and the paired perplexity ratios into ``rows``; ``results/NAME.{json,md}`` written
    (``meta``: the runtime's version, the windows and ``t0``, the bench's start)."""
    prompt = np.asarray(scorer["wikipedia"].feeds[0]["input_ids"][0][:128])
    for k, v in decode_speeds(engines, prompt).items():
        rows[k]["decode_tps"] = v
    write_results(name, rows, nll, peer, meta, to_markdown)


def write_results(name: str, rows: dict, nll: dict, peer: str, meta: dict, to_markdown) -> None:
    """The paired perplexity ratios into ``rows``; ``results/NAME.{json,md}`` written (``meta``: the
    runtime's version, the windows and ``t0``, the bench's start)."""
    ppl_ratios(rows, nll, peer)
    t0 = meta.pop("t0")
    res = {"machine": machine_line(), **meta, "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(to_markdown(res))
    print(to_markdown(res))
