"""krimp: make trained neural networks smaller, faster and cheaper to run, and prove it.

    import krimp
    report = krimp.compress("builtin:minilm", "minilm-int8", out="runs/minilm-int8")

Names are imported lazily so that light entry points (the benchmark worker) do not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "compress": "krimp.api",
    "evaluate": "krimp.verbs",
    "bench": "krimp.verbs",
    "inspect": "krimp.verbs",
    "load_model": "krimp.models",
    "Recipe": "krimp.recipe",
    "BaseConfig": "krimp.config",
    "register": "krimp.config",
    "REGISTRY": "krimp.methods",
    "KrimpError": "krimp.errors",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'krimp' has no attribute {name!r}")
