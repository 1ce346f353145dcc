"""English prose from docstrings: the Python standard library's and those of installed packages.

Technical English of the same kind as the Python documentation, in far greater quantity (136,385
distinct sentences from the standard library, NumPy, SciPy, scikit-learn, PyTorch and transformers
on the machine this was written on). A transfer or calibration set that should not repeat itself
can draw on it beside the documentation: a student distilled on 7,250 sentences seen four times
matched the teacher less well on held-out sentences than one distilled on those plus 21,750 of these
once (MiniLM, top-10 agreement 0.664 against 0.685; see the README, which also records that at the
MiniLM recipe's length it made no difference).

The source files are parsed with :mod:`ast`, never imported: no package code runs. One group per
source file, so calibration and evaluation halves never share a file.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import sys
import sysconfig
from pathlib import Path

from krimp.data.text import passages

log = logging.getLogger(__name__)
PACKAGES = ("numpy", "scipy", "sklearn", "torch", "transformers")  # after the standard library
_DISTRIBUTION = {"sklearn": "scikit-learn"}
_SKIP_DIRS = {"test", "tests", "testing", "site-packages", "idlelib", "__pycache__"}
_CODE = re.compile(r"^\s*(>>>|\.\.\.|\.\. |:\w|[-=*+|#~^])")
_FORMAT = 1  # part of the cache key: raise it when the extraction changes


def clean_docstring(doc: str) -> str:
    """Prose lines only: doctest, reST directive and field lines, bullets, tables and underlines
    become paragraph breaks. (A NumPy-style ``name : type`` line stays, joined to its description.)"""
    return "\n".join("" if _CODE.match(line) else line for line in doc.splitlines())


def file_docstrings(path: Path) -> list[str]:
    """Docstrings of the module, its classes and functions (parsed, not imported)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError, RecursionError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node))]


def docstring_groups(roots: list[Path], mode: str = "sentence") -> list[list[str]]:
    """One group of distinct sentences (or passages) per ``.py`` file under ``roots``, files in
    sorted order; a sentence seen in an earlier file is not repeated."""
    seen: set[str] = set()
    groups = []
    for root in roots:
        files = sorted(f for f in root.rglob("*.py") if not _SKIP_DIRS & set(f.relative_to(root).parts))
        for f in files:
            items = []
            for doc in file_docstrings(f):
                for s in passages(clean_docstring(doc), mode):
                    if s not in seen:
                        seen.add(s)
                        items.append(s)
            if items:
                groups.append(items)
    return groups


def installed_roots() -> tuple[list[Path], str]:
    """The standard library's folder and those of :data:`PACKAGES` that are installed, with a label
    naming their versions (the text depends on them)."""
    roots, names = [Path(sysconfig.get_paths()["stdlib"])], [f"python {sys.version_info[0]}.{sys.version_info[1]}"]
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        roots.append(Path(next(iter(spec.submodule_search_locations))))
        try:
            names.append(f"{pkg} {importlib.metadata.version(_DISTRIBUTION.get(pkg, pkg))}")
        except importlib.metadata.PackageNotFoundError:
            names.append(pkg)
    return roots, ", ".join(names)


def builtin_docstring_groups(mode: str) -> tuple[list[list[tuple[str, None]]], str]:
    """``builtin:docstrings``: groups of (text, None), cached per set of versions and mode
    (parsing takes about a minute)."""
    from krimp.models.builtin import CACHE

    roots, label = installed_roots()
    key = hashlib.sha256(f"{_FORMAT}|{label}|{mode}|{[str(r) for r in roots]}".encode()).hexdigest()[:16]
    cache = CACHE / f"docstrings-{key}.json"
    if cache.exists():
        groups = json.loads(cache.read_text())
    else:
        log.info("reading docstrings of %s (once; cached in %s)", label, cache)
        groups = docstring_groups(roots, mode)
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, cache)
    return [[(t, None) for t in g] for g in groups], f"docstrings: {label}"


__all__ = ["PACKAGES", "builtin_docstring_groups", "clean_docstring", "docstring_groups", "file_docstrings"]
