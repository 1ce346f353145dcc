"""Derived data kept in krimp's cache folder (``KRIMP_CACHE``), computed once."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


def cached_json(name: str, compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON-able result, kept in krimp's cache folder after the first call (written
    to a temporary file, then renamed)."""
    from krimp.models.builtin import CACHE

    path = CACHE / name
    if path.exists():
        return json.loads(path.read_text())
    out = compute()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)
    return out
