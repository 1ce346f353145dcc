"""Every compression method, loaded: the catalogue a recipe is read against.

:mod:`krimp.config` says how a method registers (a leaf: method modules import it). This module
imports the method packages, which fills :data:`krimp.config.REGISTRY`, and answers from it: which
config a recipe stage names, and which method runs a config. Nothing below it imports it back.
"""

from __future__ import annotations

from typing import Any

import pydantic

import krimp.distill  # noqa: F401  (importing a method package registers its methods)
import krimp.prune  # noqa: F401
import krimp.quant  # noqa: F401
from krimp.config import REGISTRY, BaseConfig, format_validation_error
from krimp.errors import KrimpError, closest

__all__ = ["REGISTRY", "config_from_dict", "method_for"]


def method_for(cfg: BaseConfig):
    """An instance of the method registered for this config."""
    return REGISTRY[cfg.method][1]()


def config_from_dict(d: dict[str, Any], where: str = "stage") -> BaseConfig:
    """Build a method config from a recipe stage; errors name the field path and a close key."""
    if not isinstance(d, dict):
        raise KrimpError(f"{where}: expected a mapping with a 'method' key, got {type(d).__name__}")
    if "method" not in d:
        raise KrimpError(f"{where}: missing 'method' (one of: {', '.join(sorted(REGISTRY))})")
    name = d["method"]
    if name not in REGISTRY:
        hint = closest(str(name), REGISTRY)
        extra = f"; did you mean '{hint}'?" if hint else ""
        raise KrimpError(f"{where}.method: unknown method '{name}'{extra} (known: {', '.join(sorted(REGISTRY))})")
    cls = REGISTRY[name][0]
    body = {k: v for k, v in d.items() if k != "method"}
    try:
        return cls(**body)
    except pydantic.ValidationError as e:
        raise KrimpError(format_validation_error(e, where, cls.model_fields)) from None
