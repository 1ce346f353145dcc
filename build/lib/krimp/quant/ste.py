"""The two gradient tricks quantization-aware training is built on (used by weights and activations)."""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward (the straight-through estimator)."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward; its gradient multiplied by ``g`` backward (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g
