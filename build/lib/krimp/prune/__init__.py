"""Pruning methods. Importing this package registers them (see krimp.config.REGISTRY)."""

from krimp.prune import channels, gradual, methods, transformer  # noqa: F401  (registration)
from krimp.prune.channels import ChannelPruneConfig
from krimp.prune.gradual import GradualPruneConfig
from krimp.prune.methods import MagnitudePruneConfig, SparseGPTConfig, WandaConfig
from krimp.prune.transformer import StructuredPruneConfig

__all__ = [
    "ChannelPruneConfig",
    "GradualPruneConfig",
    "MagnitudePruneConfig",
    "SparseGPTConfig",
    "StructuredPruneConfig",
    "WandaConfig",
]
