"""Runtimes that execute a model on a numpy feed: ONNX Runtime sessions and PyTorch modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


class OrtEngine:
    runtime = "onnxruntime"

    def __init__(self, path: Path | str | bytes, threads: int = 2, spin: bool = True):
        self.sess = ort_session(path, threads, spin)
        self.inputs = [i.name for i in self.sess.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.sess.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]


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


def batches(task, items: list, batch: int, seq_len: int):
    """Feeds of ``batch`` items each (the last may be smaller)."""
    for i in range(0, len(items), batch):
        yield task.encode(items[i:i + batch], seq_len)
