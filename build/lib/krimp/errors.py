"""Errors krimp raises for bad input: one clear line, shown by the CLI without a traceback."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from pathlib import Path


class KrimpError(Exception):
    """A user-facing error. The message is one line that says what is wrong and how to fix it."""


def closest(word: str, options: Iterable[str]) -> str | None:
    """The option closest to ``word`` by edit similarity, or None if nothing is close."""
    found = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return found[0] if found else None


def require(module: str, extra: str, needed_by: str, package: str | None = None):
    """``import module``, or one KrimpError line naming the krimp extra that installs it.

    Only the module itself being absent becomes the hint; an installed package that fails on an import
    of its own raises as it is, so its traceback names the real cause.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (e.name or module).split(".")[0] != module.split(".")[0]:
            raise
        raise KrimpError(
            f"{needed_by} needs {package or module}, which is not installed: pip install 'krimp[{extra}]'"
        ) from None


def unknown_key_message(key: str, where: str, options: Iterable[str]) -> str:
    options = sorted(options)
    hint = closest(key, options)
    msg = f"unknown key '{key}' in {where}"
    if hint:
        msg += f"; did you mean '{hint}'?"
    return msg + f" (valid keys: {', '.join(options)})"


def read_utf8(p: Path) -> str:
    """A text file's content, or a one-line error naming the file and the first byte that is not UTF-8."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise KrimpError(f"{p}: not UTF-8 text (byte {e.start}: 0x{raw[e.start]:02x}); save it as UTF-8") from None
