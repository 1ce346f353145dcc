"""INT4 on OpenVINO: krimp's GPTQ recipe against NNCF's ``compress_weights`` on SmolLM2-135M-Instruct,
both IRs scored in OpenVINO on the same held-out text.

    python bench/openvino_llm.py [--eval 16] [--reuse]

Needs the ``openvino`` extra (OpenVINO and NNCF).

- float IR: SmolLM2 (the float model krimp loads from its GGUF) exported to ONNX by krimp and converted
  with ``openvino.convert_model``: what NNCF compresses.
- NNCF, data-aware (the peer): ``nncf.compress_weights(model, mode=INT4_ASYM, group_size=128, ratio=1.0,
  awq=True, scale_estimation=True, dataset=...)`` with ``group_size_fallback_mode=ADJUST`` (SmolLM2's
  576-wide rows hold no whole group of 128: NNCF uses 64 there), calibrated on the same 128 windows of
  512 tokens krimp's recipe calibrates on; saved with ``openvino.save_model``'s defaults.
- NNCF, data-free: the same without a dataset (its 8-second default).
- krimp RTN: the recipe with round-to-nearest in place of GPTQ: the grid alone.
- krimp GPTQ: ``krimp compress smollm2-gptq-w4-openvino`` in its own process (the same grid as NNCF's:
  asymmetric 4-bit, groups of 128 and 64, the tied embedding at 8 bits per channel).

Quality: each IR compiled by OpenVINO on the CPU in float32 activations (``INFERENCE_PRECISION_HINT f32``,
dynamic quantization off: the weights are what differs), on windows of 512 tokens of the held-out halves
of the Wikipedia excerpt and of the documentation; perplexity, KL and top-1 agreement to the float model
(transformers, float32) with 95% bootstrap intervals over windows, and each IR's perplexity relative to
NNCF's, paired over windows. Bytes: ``model.xml`` + ``model.bin``. Speed: these IRs have no KV cache
(ONNX export of the full forward), so it is prompt throughput, tokens/s of one 128-token forward,
models alternated (a shared 2-core VM: read as ratios). Writes bench/results/openvino_llm.{md,json}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import lm_peer_table, time_interleaved
from _lm_peer import krimp_compress, score_all, scorers, write_results

WORK = Path("/tmp/krimp-bench-openvino-llm")
RECIPE = "smollm2-gptq-w4-openvino"
PEER = "NNCF INT4_ASYM g128, AWQ + scale estimation"


def _bytes(xml: Path) -> int:
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def float_ir(h, out: Path) -> Path:
    """SmolLM2 in float as an OpenVINO model file (``convert_model`` of krimp's ONNX export)."""
    import openvino as ov

    from krimp.export.onnx import export_onnx

    xml = out / "model.xml"
    if not xml.exists():
        out.mkdir(parents=True, exist_ok=True)
        feed = h.task.encode(["a float model for NNCF to compress"], 16)
        export_onnx(h.module, h.task, feed, out / "model.onnx")
        ov.save_model(ov.convert_model(str(out / "model.onnx")), str(xml), compress_to_fp16=False)
    return xml


def nncf_int4(fp32: Path, feeds: list[dict] | None, out: Path, reuse: bool) -> float:
    """Seconds for NNCF to compress ``fp32`` (data-aware with AWQ and scale estimation when ``feeds``);
    ``reuse``: an earlier run's IR in ``out``, and its time."""
    import nncf
    import openvino as ov

    if reuse and (out / "seconds.json").exists():
        return json.loads((out / "seconds.json").read_text())
    t = time.perf_counter()
    model = ov.Core().read_model(str(fp32))
    kw = (
        {"awq": True, "scale_estimation": True, "dataset": nncf.Dataset(feeds), "subset_size": len(feeds)}
        if feeds
        else {}
    )
    adjust = nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST)
    model = nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode.INT4_ASYM,
        group_size=128,
        ratio=1.0,
        advanced_parameters=adjust,
        **kw,
    )
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out / "model.xml"))
    seconds = round(time.perf_counter() - t, 1)
    (out / "seconds.json").write_text(json.dumps(seconds))
    return seconds


def main() -> None:
    import argparse

    import nncf
    import openvino as ov
    import torch

    from krimp.data import load_data
    from krimp.eval.runtime import OvEngine
    from krimp.models import load_model
    from krimp.recipe import Recipe, read_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", type=int, default=16, help="held-out windows of 512 tokens per source")
    ap.add_argument("--reuse", dest="skip_krimp", action="store_true", help=f"reuse the IRs made before in {WORK}")
    a = ap.parse_args()
    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    h = load_model("builtin:smollm2")
    raw = read_recipe(RECIPE)
    recipe = Recipe.from_dict(raw)
    calib = load_data(recipe.data, h.task).calib  # the windows krimp's recipe calibrates on
    names = h.task.input_names  # the model's inputs (the encoding also carries a score mask)
    feeds = [
        {k: v.astype(np.int64) for k, v in h.task.encode([w], recipe.data.seq_len).items() if k in names} for w in calib
    ]
    fp32 = float_ir(h, WORK / "float")
    xmls, seconds = {}, {}
    seconds[PEER] = nncf_int4(fp32, feeds, WORK / "nncf-awq-se", a.skip_krimp)
    xmls[PEER] = WORK / "nncf-awq-se" / "model.xml"
    seconds["NNCF INT4_ASYM g128, data-free"] = nncf_int4(fp32, None, WORK / "nncf-free", a.skip_krimp)
    xmls["NNCF INT4_ASYM g128, data-free"] = WORK / "nncf-free" / "model.xml"
    rtn = {**raw, "stages": [{**raw["stages"][0], "method": "rtn"}]}  # the recipe, round-to-nearest
    (WORK / "krimp-rtn.yaml").write_text(json.dumps(rtn))  # YAML reads JSON
    for name, recipe_file in (
        ("krimp RTN, the recipe's grid", WORK / "krimp-rtn.yaml"),
        (f"krimp GPTQ (`{RECIPE}`)", RECIPE),
    ):
        run = WORK / ("krimp-rtn" if "RTN" in name else "krimp-gptq")
        seconds[name] = krimp_compress(recipe_file, run, WORK / f"{run.name}.log", reuse=a.skip_krimp)
        xmls[name] = run / "openvino" / "model.xml"
    scorer = scorers(h, a.eval)
    rows, engines, nll = score_all(xmls, lambda xml: OvEngine(xml, threads=2, precision="f32"), scorer, seconds, _bytes)
    prompt = {k: v[:, :128] for k, v in scorer["wikipedia"].feeds[0].items()}
    prompt = {k: v[:1] for k, v in prompt.items()}
    speed = time_interleaved({k: (lambda e=e: e.run(prompt)) for k, e in engines.items()}, rounds=9, warmup=2)
    for k, v in speed.items():
        rows[k]["prompt_tps"] = 128 / (v["p50_ms"] / 1e3)
    meta = {"openvino": ov.__version__, "nncf": nncf.__version__, "eval_windows": a.eval}
    meta |= {"calib_windows": len(feeds), "t0": t_all}
    write_results("openvino_llm", rows, nll, PEER, meta, to_markdown)


def to_markdown(res: dict) -> str:
    first = next(iter(res["rows"].values()))["scores"]
    lines = [
        "# SmolLM2-135M INT4 on OpenVINO: krimp's GPTQ against NNCF's compress_weights",
        "",
        f"{res['machine']}; OpenVINO {res['openvino']}, NNCF {res['nncf']}. Made by `python bench/openvino_llm.py` "
        f"({res['wall_s']:.0f} s). Every IR compiled by OpenVINO on the CPU in float32 activations. "
        f"{res['eval_windows']} held-out windows of 512 tokens from each source; NNCF's data-aware row and "
        f"krimp's GPTQ calibrated on the same {res['calib_windows']} windows; 95% bootstrap intervals over "
        "windows; KL and top-1 agreement are to the float model (transformers, float32). Float perplexity: "
        + ", ".join(f"{k} {v['ppl_ref']:.2f}" for k, v in first.items())
        + ". Speed: prompt tokens/s of one 128-token forward (these IRs have no KV cache), models alternated "
        "over 9 rounds (median; a shared 2-core VM: read as ratios).",
        "",
    ]
    lines += lm_peer_table(res["rows"], speed=("prompt tok/s", "prompt_tps"))
    lines += [
        "",
        "Time: krimp's is its quantization stage (calibration forward passes included) from the run's "
        "report.json; NNCF's is `compress_weights` and saving the IR.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
