"""OpenVINO IR (``model.xml`` + ``model.bin``): the run's ONNX model as OpenVINO's own format.

OpenVINO reads ONNX itself; the IR saves that conversion, and is what OpenVINO's tools and servers
(OpenVINO Model Server, ``benchmark_app``) take. The graph is the one krimp measured: static INT8
QDQ becomes OpenVINO's FakeQuantize pattern, which its CPU plugin runs in INT8; ONNX Runtime's
MatMulNBits (weight-only codes) become its compressed weights. Weights are kept in their own types
(no float16 compression of the float ones: the IR computes what krimp measured).

The check after writing compiles ``model.xml`` on the CPU (float32 inference precision) and runs
calibration inputs through it and through the ONNX file on OpenVINO (they must agree to 1e-4 of the
largest output) and on ONNX Runtime (recorded: INT8 kernels differ between runtimes; for logits,
the share of equal top-1 classes too).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from krimp.errors import KrimpError
from krimp.export.ov_model import to_openvino
from krimp.export.registry import ExportJob, exporter

log = logging.getLogger(__name__)


def check_openvino(handle) -> None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise KrimpError("openvino export needs OpenVINO: pip install 'krimp[openvino]'") from None


def write_ir(onnx_path: Path, folder: Path) -> Path:
    """``folder/model.xml`` and ``model.bin`` from an ONNX file (krimp's task metadata in the IR's
    ``rt_info``, so ``krimp eval model.xml`` reads its inputs the same way); written beside, then renamed."""
    import onnx
    import openvino as ov

    model = to_openvino(onnx_path)
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    for key, value in props.items():
        if key.startswith("krimp."):
            model.set_rt_info(value, ["krimp", key.removeprefix("krimp.")])
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder / "model.xml"


def verify_ir(xml: Path, onnx_path: Path, feeds: list[dict[str, np.ndarray]], logits: bool, threads: int = 2) -> dict:
    """The IR against the ONNX file it was written from, both on OpenVINO (they must agree: the IR is the
    model krimp measured); against OpenVINO's own conversion of the ONNX file without krimp's rewrites
    (:func:`krimp.export.ov_model.to_openvino`: they must keep the function, up to the float16 copy of a
    tied embedding that the head's codes replace); and, for information, against ONNX Runtime on the
    ONNX file (INT8 kernels round differently from runtime to runtime)."""
    import openvino as ov

    from krimp.eval.runtime import OrtEngine, OvEngine

    try:
        ir = OvEngine(xml, threads)
    except Exception as e:
        raise KrimpError(
            f"OpenVINO check failed: OpenVINO cannot compile {xml.name} ({type(e).__name__}: {e})"
        ) from None
    same_runtime, ort = OvEngine(onnx_path, threads), OrtEngine(onnx_path, threads)
    plain = OvEngine(ov.convert_model(str(onnx_path)), threads)
    err = {"ir": 0.0, "ort": 0.0, "plain": 0.0}
    agree, total = 0, 0
    for f in feeds:
        got = ir.run(f)
        for k, ref in (("ir", same_runtime.run(f)), ("plain", plain.run(f)), ("ort", ort.run(f))):
            if got.shape != ref.shape or not np.isfinite(got).all():
                raise KrimpError(f"OpenVINO check failed: {xml.name} gives shape {got.shape} or non-finite values")
            err[k] = max(err[k], float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)))
            if k == "ort" and logits:
                agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                total += int(np.prod(ref.shape[:-1]))
    if err["ir"] > 1e-4:
        raise KrimpError(
            f"OpenVINO check failed: {xml.name} differs from {onnx_path.name} on OpenVINO by {err['ir']:.1e} (relative)"
        )
    if err["plain"] > 2e-3:
        raise KrimpError(
            f"OpenVINO check failed: krimp's rewrites of the IR changed its output by {err['plain']:.1e} (relative) "
            "against OpenVINO's own conversion; export onnx instead, and please report it"
        )
    out = {
        "openvino_ir_max_rel_error": err["ir"],
        "openvino_rewrites_max_rel_error": err["plain"],
        "onnxruntime_max_rel_error": err["ort"],
        "inference_precision": "f32",
    }
    if total:
        out["onnxruntime_top1_agreement"] = agree / total
    return out


@exporter("openvino", needs_torch=False, check=check_openvino)
def write_openvino(job: ExportJob) -> dict:
    """openvino/model.xml + model.bin (OpenVINO IR) of the compressed ONNX model, checked in OpenVINO."""
    onnx_path = job.run.compressed_onnx
    if onnx_path is None:  # write_artifacts runs the onnx exporter first whenever an ONNX model exists
        raise KrimpError("openvino export needs the run's ONNX model; add onnx to export.formats")
    xml = write_ir(onnx_path, job.work / "openvino")
    job.keep.append("openvino")
    info: dict = {"path": "openvino/model.xml"}
    if job.run.verify_feeds:
        logits = job.handle.task.name != "embedding"
        info["check"] = verify_ir(xml, onnx_path, job.run.verify_feeds, logits)
    job.run.exports["openvino"] = info
    nbytes = sum(p.stat().st_size for p in xml.parent.iterdir())
    log.info("openvino: %s (%.1f MB)", xml, nbytes / 1e6)
    return {"format": "openvino", "role": "compressed", "path": "openvino/model.xml", "bytes": nbytes}
