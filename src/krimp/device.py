"""Where layer-wise calibration runs: ``resources.device`` / ``--device`` (``auto``, ``cpu``, ``cuda``,
``cuda:N``). The layer-wise calibrator (:mod:`krimp.calib.layerwise`) moves each block, its inputs and
its statistics there, and the codes back to the CPU, where the model, the exporters and the
measurements stay. ``auto`` is the first CUDA GPU when PyTorch sees one, else the CPU."""

from __future__ import annotations

from krimp.errors import KrimpError


def resolve_device(spec: str) -> str:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a torch device string; a GPU that is not there is
    refused in one line, before any work."""
    import torch

    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if spec == "auto":
        return "cuda:0"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise KrimpError(
            f"resources.device {spec}: PyTorch sees no CUDA GPU here (torch {torch.__version__}, {build}); "
            "use --device cpu or auto"
        )
    index = int(spec.split(":", 1)[1]) if ":" in spec else 0
    if index >= torch.cuda.device_count():
        raise KrimpError(
            f"resources.device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
            f"numbered 0 to {torch.cuda.device_count() - 1}"
        )
    return f"cuda:{index}"
