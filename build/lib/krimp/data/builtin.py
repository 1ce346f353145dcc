"""Builtin data sets for the demo and tests; ``wikipedia``, ``digits`` and ``photos`` come with the
``models`` extra (``pip install 'krimp[models]'``).

- ``python-docs``: English prose from the Python documentation sources
  (Debian's python3.11-doc at /usr/share/doc/python3.11/html/_sources); where those are absent,
  the docstrings of 42 standard-library modules, which every Python carries (parsed from their
  source files, never imported).
- ``docstrings``: English docstrings of the standard library and of NumPy, SciPy, scikit-learn,
  PyTorch and transformers where installed (parsed, never imported; see krimp.data.docstrings).
- ``wikipedia``: 106 English Wikipedia articles (3.1M characters) from gensim's test data, the
  closest to WikiText here; one group per article.
- ``digits``: scikit-learn's held-out 8x8 digits with labels (not the images the CNN trained on).
- ``photos``: random crops of real photographs from scikit-image.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

from krimp.data.cache import cached_json
from krimp.data.text import passages, read_text_groups
from krimp.errors import KrimpError, require

BUILTIN_DATA = ("python-docs", "docstrings", "wikipedia", "digits", "photos")
DOC_SOURCES = Path(f"/usr/share/doc/python3.{sys.version_info.minor}/html/_sources")
_DOCSTRING_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "importlib",
    "inspect",
    "io",
    "json",
    "logging",
    "multiprocessing",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "xml.etree.ElementTree",
    "zipfile",
)


def python_docs_groups(mode: str):
    """Groups of (text, None), one per documentation file (or per stdlib module)."""
    if DOC_SOURCES.is_dir() and any(DOC_SOURCES.glob("*.rst.txt")):
        return read_text_groups(DOC_SOURCES, mode, "text", "label"), f"python-docs:{DOC_SOURCES}"
    from krimp.data.docstrings import file_groups

    files = [f for f in map(stdlib_source, _DOCSTRING_MODULES) if f]  # parsed from the source, never imported
    return [[(t, None) for t in g] for g in file_groups(files, mode)], "python-docs:stdlib-docstrings"


def stdlib_source(name: str) -> Path | None:
    """The source file of standard-library module ``name`` (a package's ``__init__.py``), found
    without importing it."""
    base = Path(sysconfig.get_paths()["stdlib"]).joinpath(*name.split("."))
    for f in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if f.is_file():
            return f
    return None


def wikipedia_articles() -> list[str]:
    """The articles' plain text (wiki markup and bold/italic marks removed), cached once."""
    return cached_json("wikipedia-gensim-4.4.0.json", _read_wikipedia)


def _read_wikipedia() -> list[str]:
    require("gensim", "models", "builtin:wikipedia", "gensim==4.4.0")  # its test data holds the articles
    from gensim.corpora.wikicorpus import filter_wiki
    from gensim.scripts.segment_wiki import segment_all_articles
    from gensim.test.utils import datapath

    path = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    arts = []
    for _title, sections, *_ in segment_all_articles(path, include_interlinks=False):
        text = "\n\n".join(filter_wiki(body) for _, body in sections)
        arts.append(re.sub(r"'{2,}", "", text))
    return arts


def builtin_groups(name: str, mode: str):
    if name == "python-docs":
        return python_docs_groups(mode)
    if name == "docstrings":
        from krimp.data.docstrings import builtin_docstring_groups

        return builtin_docstring_groups(mode)
    if name == "wikipedia":
        groups = [[(t, None) for t in passages(a, mode)] for a in wikipedia_articles()]
        return [g for g in groups if g], "wikipedia:gensim-4.4.0 test data (106 articles)"
    raise KrimpError(f"unknown builtin data '{name}' (known: {', '.join(BUILTIN_DATA)})")


__all__ = ["BUILTIN_DATA", "builtin_groups"]
