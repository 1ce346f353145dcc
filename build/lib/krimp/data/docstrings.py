"""English prose from docstrings: the Python standard library's and those of installed packages.

Technical English of the same kind as the Python documentation, in far greater quantity (how much
depends on what is installed; see bench/results/data_findings.md). A transfer or calibration set
that should not repeat itself can draw on it beside the documentation (what that did for MiniLM
distillation: bench/results/distill_findings.md).

The source files are parsed with :mod:`ast`, never imported: no package code runs. One group per
source file, so calibration and evaluation halves never share a file.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import logging
import sys
import sysconfig
from pathlib import Path

from krimp.data.text import clean_rst, passages

log = logging.getLogger(__name__)
PACKAGES = ("numpy", "scipy", "sklearn", "torch", "transformers")  # after the standard library
_DISTRIBUTION = {"sklearn": "scikit-learn"}
_SKIP_DIRS = {"test", "tests", "testing", "site-packages", "idlelib", "__pycache__"}
_FORMAT = 2  # part of the cache key: raise it when the extraction changes (2: clean_rst)


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
    sorted order; a sentence seen in an earlier file is not repeated. Docstrings are reStructuredText:
    :func:`krimp.data.text.clean_rst` keeps their prose, as for the documentation (a NumPy-style
    ``name : type`` line stays, joined to its description)."""
    files = [
        f
        for root in roots
        for f in sorted(f for f in root.rglob("*.py") if not _SKIP_DIRS & set(f.relative_to(root).parts))
    ]
    return file_groups(files, mode)


def file_groups(files: list[Path], mode: str = "sentence") -> list[list[str]]:
    """One group of distinct sentences (or passages) per file of ``files`` that has any, in order;
    a sentence seen in an earlier file is not repeated."""
    seen: set[str] = set()
    groups = []
    for f in files:
        items = []
        for doc in file_docstrings(f):
            for s in passages(clean_rst(doc), mode):
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
    from krimp.data.cache import cached_json

    roots, label = installed_roots()

    def parse():
        log.info("reading docstrings of %s (once, then from krimp's cache)", label)
        return docstring_groups(roots, mode)

    key = hashlib.sha256(f"{_FORMAT}|{label}|{mode}|{[str(r) for r in roots]}".encode()).hexdigest()[:16]
    groups = cached_json(f"docstrings-{key}.json", parse)
    return [[(t, None) for t in g] for g in groups], f"docstrings: {label}"


__all__ = ["PACKAGES", "builtin_docstring_groups", "docstring_groups", "file_docstrings", "file_groups"]
