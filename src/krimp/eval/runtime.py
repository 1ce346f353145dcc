"""Runtimes that execute a model on a numpy feed: ONNX Runtime sessions, OpenVINO compiled models
and PyTorch modules.

An ONNX file runs on either ONNX Runtime or OpenVINO (``eval.runtime``): :func:`onnx_engine` opens it
on the one asked for, so the goal check, the float fallback and the report measure the model where
it will be deployed.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from krimp.errors import KrimpError


def ort_session(path: Path | str | bytes, threads: int = 2, spin: bool = True):
    """An ONNX Runtime CPU session with fixed intra-op threads and one inter-op thread. ``spin=False``
    stops its idle threads from spinning, so that sessions taking turns in one process do not slow
    each other down."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    src = path if isinstance(path, bytes) else str(path)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        unknown = re.search(r"([\w.]*):(\w+)\((-?\d+)\) is not a registered function/op", str(e))
        standard = re.search(r"No Op registered for (\w+) with domain_version of (\d+)", str(e))
        if unknown or standard:
            domain, op, version = unknown.groups() if unknown else ("", *standard.groups())
            name = "the model" if isinstance(path, bytes) else str(path)
            raise KrimpError(
                f"{name}: ONNX Runtime has no op '{op}' in domain '{domain or 'ai.onnx'}' "
                f"(opset {version}); export the model without it, or with ops ONNX Runtime "
                "implements"
            ) from None
        raise


def check_feed(sess, feed: dict[str, np.ndarray]) -> None:
    """Name the input whose fixed shape or element type the data does not fit (one line)."""
    types = {
        "tensor(float)": np.float32,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(float16)": np.float16,
        "tensor(double)": np.float64,
    }
    for i in sess.get_inputs():
        if i.name not in feed:
            continue
        got = tuple(feed[i.name].shape)
        want = tuple(i.shape)
        fixed = len(want) == len(got) and all(not isinstance(w, int) or w == g for w, g in zip(want, got, strict=True))
        if not fixed:
            shown = tuple(w if isinstance(w, int) else "?" for w in want)
            raise KrimpError(
                f"the model's input '{i.name}' takes shape {shown} but the data gives {got}; "
                "give data of that size (e.g. data.image_size, data.seq_len) or export the model "
                "with dynamic axes"
            )
        if i.type in types and feed[i.name].dtype != types[i.type]:
            raise KrimpError(f"the model's input '{i.name}' takes {i.type} but the data gives {feed[i.name].dtype}")


class OrtEngine:
    runtime = "onnxruntime"

    def __init__(self, path: Path | str | bytes, threads: int = 2, spin: bool = True):
        self.sess = ort_session(path, threads, spin)
        self.inputs = [i.name for i in self.sess.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: v for k, v in feed.items() if k in self.inputs}
        try:
            return self.sess.run(None, feed)[0]
        except Exception:
            check_feed(self.sess, feed)  # a user's model that does not fit the data: say which input
            raise


class OvEngine:
    """An ONNX file (or OpenVINO IR ``.xml``) compiled by OpenVINO for the CPU: fixed threads, the
    latency hint, and float32 inference unless ``precision`` is "bf16" (OpenVINO would otherwise pick
    bf16 on CPUs that have it, and round the activations of weight-compressed MatMuls to int8 groups:
    its results would not be float32's)."""

    runtime = "openvino"

    def __init__(self, path: Path | str | bytes, threads: int = 2, precision: str = "f32"):
        try:
            import openvino as ov
        except ImportError:
            raise KrimpError("eval.runtime openvino needs OpenVINO: pip install 'krimp[openvino]'") from None
        core = ov.Core()
        if isinstance(path, ov.Model):  # a model already read or converted
            model = path
        elif isinstance(path, bytes):  # an ONNX model in memory (the fallback's tries)
            model = _convert_onnx_bytes(path)
        elif str(path).endswith(".xml"):
            model = core.read_model(str(path))
        else:
            # the model the openvino export saves (convert_model, not read_model: the two can round a QDQ
            # model's weights differently), so what is measured here is what the IR computes
            from krimp.export.ov_model import to_openvino

            model = to_openvino(path)
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
        }
        if precision == "f32":  # float32 activations also into weight-compressed MatMuls, which OpenVINO's CPU
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0  # plugin would round to int8 groups (logits off 2.7%)
        self.compiled = core.compile_model(model, "CPU", config)
        self.inputs = [i.get_any_name() for i in self.compiled.inputs]
        self.request = self.compiled.create_infer_request()

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: v for k, v in feed.items() if k in self.inputs}
        missing = [k for k in self.inputs if k not in feed]
        if missing:
            raise KrimpError(f"the model's input '{missing[0]}' is not in the data's feed ({', '.join(feed)})")
        return self.request.infer(feed)[0].copy()


def _convert_onnx_bytes(data: bytes):
    import tempfile

    from krimp.export.ov_model import to_openvino

    with tempfile.TemporaryDirectory(prefix="krimp-ov-") as tmp:
        p = Path(tmp) / "model.onnx"
        p.write_bytes(data)
        return to_openvino(p)


#: the runtimes an ONNX model can be measured on (``eval.runtime``)
RUNTIMES = ("onnxruntime", "openvino")


def onnx_engine(path: Path | str | bytes, threads: int = 2, runtime: str = "onnxruntime", precision: str = "f32"):
    """``path`` (an ONNX file or bytes; for OpenVINO also an ``.xml``) opened on ``runtime``."""
    if runtime == "openvino" or str(path).endswith(".xml"):
        return OvEngine(path, threads, precision)
    return OrtEngine(path, threads)


def engine_for(path: Path | str | bytes, ev):
    """``path`` on the runtime a recipe's ``eval`` section names (its threads and precision)."""
    return onnx_engine(path, ev.threads, ev.runtime, ev.precision)


class TorchEngine:
    runtime = "pytorch"

    def __init__(self, module, task, threads: int = 2):
        import torch

        self.module = task.export_module(module).eval()
        self.task, self.threads = task, threads
        p = next(module.parameters(), None)
        self.dtype = p.dtype if p is not None else torch.float32

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._run(feed, torch)

    def _run(self, feed, torch) -> np.ndarray:
        torch.set_num_threads(self.threads)
        args = []
        for name in self.task.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feed[name]))
            args.append(t.to(self.dtype) if t.is_floating_point() else t)
        return self.module(*args).float().numpy()


class StreamedEngine(TorchEngine):
    """A lazily opened decoder (:mod:`krimp.models.lazy`) run block by block: each block is read just
    before it runs and released after. ``variant``: ``float`` (the file's model: the baseline) or
    ``current`` (as the stages left it)."""

    runtime = "pytorch (streamed)"

    def __init__(self, module, task, threads: int = 2, variant: str = "current"):
        import torch

        from krimp.models.lazy import lazy_of

        super().__init__(module, task, threads)
        self.lazy, self.variant = lazy_of(module), variant
        self.dtype = torch.float32  # the blocks' type (an embedding may be kept in its stored half type)

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        with self.lazy.streaming(self.variant):
            return super().run(feed)


def batches(task, items: list, batch: int, seq_len: int):
    """Feeds of ``batch`` items each (the last may be smaller)."""
    for i in range(0, len(items), batch):
        yield task.encode(items[i : i + batch], seq_len)
