"""Export a torch model to ONNX (opset >= 17) and check the file against the in-memory model.

After writing, ONNX Runtime runs the file on a few calibration batches and its outputs must match
the torch model within ``rtol`` (max abs difference / max abs reference output); otherwise the
export fails loudly. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from krimp.errors import KrimpError
from krimp.export.registry import ExportJob, exporter

log = logging.getLogger(__name__)


def export_onnx(
    module: torch.nn.Module,
    task,
    feed: dict[str, np.ndarray],
    path: Path,
    opset: int = 17,
    origin: str | None = None,
    share_tied: bool = False,
) -> Path:
    """``module`` as ONNX at ``path``, with krimp's task metadata (appended to the file: the graph is
    not read back, which for a large model would hold it in memory twice).

    ``share_tied``: fold no constants, so a tied embedding and output head stay one initializer (the
    folded transpose of the head is a second copy: 671 MB for Gemma 3); ONNX Runtime folds them when
    it loads the graph. Not for a graph a weight rewrite reads: it finds the head's MatMul by its
    initializer."""
    import onnx

    tmp = path.with_name(path.name + ".tmp")
    trace(module, task, feed, tmp, opset, do_constant_folding=not share_tied)
    props = task_props(task, origin)
    # a serialized protobuf message appended to another merges into it: repeated fields add up
    extra = onnx.ModelProto()
    onnx.helper.set_model_props(extra, props)
    with open(tmp, "ab") as f:
        f.write(extra.SerializeToString())
    os.replace(tmp, path)
    return path


def trace(module: torch.nn.Module, task, feed: dict[str, np.ndarray], path: Path, opset: int, **options) -> None:
    """torch's (TorchScript) exporter on one forward pass of ``module`` over ``feed``, with the task's
    input names and dynamic axes, into ``path``; ``options`` go to ``torch.onnx.export``. A failure is
    one KrimpError line, and no file is left."""
    wrapped = task.export_module(module).eval()
    args = tuple(torch.from_numpy(feed[n]) for n in task.input_names)
    dyn = {n: ({0: "batch", 1: "seq"} if task.is_text else {0: "batch"}) for n in task.input_names}
    dyn["output"] = {0: "batch", 1: "seq"} if task.name in ("embedding", "causal-lm") else {0: "batch"}
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped,
                args,
                str(path),
                input_names=task.input_names,
                output_names=["output"],
                dynamic_axes=dyn,
                opset_version=opset,
                dynamo=False,
                **options,
            )
    except Exception as e:
        path.unlink(missing_ok=True)
        raise KrimpError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def task_props(task, origin: str | None) -> dict[str, str]:
    """The metadata krimp writes into every ONNX file: the task (how its inputs are made) and where the
    model came from."""
    meta = {
        "name": task.name,
        "mean": task.mean,
        "std": task.std,
        "channels": task.channels,
        "image_size": task.image_size,
        "rescale": task.rescale,
        "labels": task.labels,
    }
    props = {"krimp.task": json.dumps(meta)}
    if origin:
        props["krimp.origin"] = origin  # e.g. builtin:digits-cnn, so its builtin data can follow it
    return props


def verify_onnx(path: Path, engine_ref, feeds: list[dict[str, np.ndarray]], rtol: float, threads: int = 2) -> float:
    """Max relative error of the ONNX file against ``engine_ref``; raises past ``rtol``."""
    from krimp.eval.runtime import OrtEngine

    refs = [engine_ref.run(f) for f in feeds]  # before ONNX Runtime holds the model: not both at once
    ort_engine = OrtEngine(path, threads)
    worst = 0.0
    for f, a in zip(feeds, refs, strict=True):
        b = ort_engine.run(f)
        if a.shape != b.shape:
            raise KrimpError(f"exported {path.name} gives shape {b.shape}, model gives {a.shape}")
        err = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))
        worst = max(worst, err)
    if not np.isfinite(worst) or worst > rtol:
        raise KrimpError(
            f"exported {path.name} does not match the model: max relative error {worst:.2e} > tolerance {rtol:.0e}"
        )
    log.info("export check %s: max relative error %.2e (tolerance %.0e)", path.name, worst, rtol)
    return worst


def optimize_transformer(src: Path, dst: Path, module: torch.nn.Module) -> dict | None:
    """ONNX Runtime's transformer fusions (attention, layer norm, GELU) for BERT-like encoders."""
    cfg = getattr(module, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in ("bert", "roberta", "distilbert", "xlm-roberta", "electra"):
        return None
    from onnxruntime.transformers import optimizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = optimizer.optimize_model(
                str(src), model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size, opt_level=1
            )
        opt.save_model_to_file(str(dst))
    except Exception as e:
        log.warning("transformer fusion failed (%s); keeping the plain graph", e)
        return None
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def lower(src: Path, work: Path, module: torch.nn.Module, form: str, step=lambda s: None) -> tuple[Path, dict | None]:
    """The compressed model's ONNX in the form its stages declared (krimp.stage.Needs.onnx): ``src``
    itself for "float"; else ``src`` rewritten into ``work/<form>.onnx``, and what the rewrite did."""
    if form == "float":
        return src, None
    if form == "qdq":  # trained activation grids and int8 weights as QuantizeLinear / DequantizeLinear
        from krimp.export.onnx_qdq import to_qdq as rewrite

        step("export: ONNX QDQ INT8 (trained scales)")
    else:  # weight-only codes as ONNX Runtime's MatMulNBits
        from krimp.export.onnx_nbits import to_matmul_nbits as rewrite

        step("export: ONNX Runtime MatMulNBits")
    dst = work / f"{form}.onnx"
    return dst, rewrite(src, dst, module)


@exporter("onnx", needs_torch=False)
def write_onnx(job: ExportJob) -> list[dict]:
    """model.onnx (the compressed graph) beside baseline.onnx, and a text model's tokenizer files; a recipe
    without stages copies the baseline."""
    import shutil

    run, final = job.run, job.work / "model.onnx"
    if run.compressed_onnx == run.baseline_onnx:  # a recipe with no stages: export only
        shutil.copyfile(run.compressed_onnx, final)
    elif run.compressed_onnx != final:
        os.replace(run.compressed_onnx, final)
    run.compressed_onnx = final
    tok = job.handle.task.tokenizer
    if tok is not None and hasattr(tok, "save_pretrained"):  # `krimp eval model.onnx` reads text with it
        job.keep += [Path(f).name for f in tok.save_pretrained(job.work)]
    compressed = {"format": "onnx", "role": "compressed", "path": "model.onnx"}
    data = job.work / "model.onnx.data"
    if data.exists():  # a streamed run's weights, beside the graph (krimp.export.onnx_streamed)
        job.keep.append(data.name)
        compressed["bytes"] = final.stat().st_size + data.stat().st_size
    if run.baseline_onnx is None:  # streamed: the input file is the baseline; no float ONNX is made
        return [compressed]
    return [compressed, {"format": "onnx", "role": "baseline", "path": "baseline.onnx"}]
