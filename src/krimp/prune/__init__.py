"""Pruning methods. Importing this package registers them (see krimp.config.REGISTRY)."""

from krimp.prune import methods  # noqa: F401  (registration)
from krimp.prune.methods import MagnitudePruneConfig, SparseGPTConfig, WandaConfig

__all__ = ["MagnitudePruneConfig", "SparseGPTConfig", "WandaConfig"]
