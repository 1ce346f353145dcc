"""Text from local files: .txt, .rst/.md, .jsonl, .csv, .parquet, or a folder of such files.

A ``.txt`` file holds one item per line (a query, a sentence, a review), or with
``data.text_unit: paragraph`` one per blank-line-separated paragraph; a language model reads
paragraphs by default, as running text, where the file has blank lines to cut at. ``.rst`` / ``.md`` are prose, cleaned of markup and cut into
sentences (paragraphs for a language model). ``.jsonl``, ``.csv`` and ``.parquet`` hold records with a
text field (``data.text_field``) and optionally a label (``data.label_field``).

Items come in groups (one group per file, or per block of records of one file) so that calibration
and evaluation can be split by group and never share a document; a single file is split by item.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from krimp.errors import KrimpError, read_utf8, require

TEXT_SUFFIXES = (".txt", ".rst", ".md", ".text")
_SENT = re.compile(r"(?<=[.!?])\s+")


def clean_rst(text: str) -> str:
    """Drop reStructuredText directives, headings and markup so only prose is left."""
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(("..", ":", "=", "-", "*", "+", "#", ">>>", "|")) or set(s) <= set("=-~^*#+"):
            lines.append("")
            continue
        lines.append(re.sub(r":\w+:`([^`]*)`", r"\1", line).replace("``", ""))
    return "\n".join(lines)


def passages(text: str, mode: str, min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """Sentences (mode='sentence') or paragraph chunks (mode='passage') of prose."""
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    paras = [p for p in paras if len(p) >= min_chars]
    if mode == "passage":
        return paras
    out = []
    for p in paras:
        out += [s for s in _SENT.split(p) if min_chars <= len(s) <= max_chars]
    return out


RECORD_SUFFIXES = (".jsonl", ".csv", ".parquet")


def read_text_groups(path: Path, mode: str, text_field: str, label_field: str, unit: str | None = None):
    """Groups of (text, label-or-None) items from a file or a folder of files. ``mode``: "sentence"
    or "passage" (a language model's running text); ``unit``: how a ``.txt`` is cut ("line" or
    "paragraph"; default: lines, or for ``mode="passage"`` paragraphs where the file has more than one)."""
    if path.is_dir():
        files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file() and (f.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES or f.name.endswith(".rst.txt"))
        )
        if not files:
            raise KrimpError(f"{path}: no text files (.txt, .rst, .md, .jsonl, .csv, .parquet) in this folder")
        groups = []
        for f in files:
            groups += read_text_groups(f, mode, text_field, label_field, unit)
        return groups
    if not path.exists():
        raise KrimpError(f"data not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _chunk(_read_jsonl(path, text_field, label_field))
    if suffix == ".csv":
        return _chunk(_read_csv(path, text_field, label_field))
    if suffix == ".parquet":
        return _chunk(_read_parquet(path, text_field, label_field))
    if suffix in TEXT_SUFFIXES:
        text = read_utf8(path)
        if path.name.endswith(".rst.txt") or suffix in (".rst", ".md"):
            items = passages(clean_rst(text) if suffix != ".md" else text, mode)
        else:
            paras = [p for p in (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)) if p]
            # a language model reads paragraphs, unless the file has none to cut (a list of queries)
            by_line = unit == "line" or (unit is None and (mode != "passage" or len(paras) < 2))
            items = [s for s in (line.strip() for line in text.splitlines()) if s] if by_line else paras
        return [[(t, None) for t in items]] if items else []
    raise KrimpError(
        f"{path}: unsupported data file type '{suffix}' (use .txt, .rst, .md, .jsonl, .csv, .parquet or a folder)"
    )


def _chunk(items, size: int = 8):
    """One file of records -> groups of consecutive records, so splits stay deterministic."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def _read_jsonl(path: Path, text_field: str, label_field: str):
    items = []
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise KrimpError(f"{path}:{n}: not valid JSON") from None
        if text_field not in rec:
            raise KrimpError(f"{path}:{n}: no field '{text_field}' (set data.text_field)")
        items.append((str(rec[text_field]), rec.get(label_field)))
    return items


def _read_parquet(path: Path, text_field: str, label_field: str):
    pq = require("pyarrow.parquet", "data", f"reading {path.name}", "pyarrow")
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise KrimpError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
    if text_field not in schema.names:
        raise KrimpError(f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)}; set data.text_field)")
    cols = [text_field] + ([label_field] if label_field in schema.names else [])
    table = pq.read_table(path, columns=cols).to_pydict()
    labels = table.get(label_field, [None] * len(table[text_field]))
    return [(str(t), y) for t, y in zip(table[text_field], labels, strict=True) if t is not None]


def _read_csv(path: Path, text_field: str, label_field: str):
    rows = list(csv.DictReader(io.StringIO(read_utf8(path), newline="")))
    if rows and text_field not in rows[0]:
        raise KrimpError(f"{path}: no column '{text_field}' (columns: {', '.join(rows[0])}; set data.text_field)")
    return [(r[text_field], r.get(label_field)) for r in rows]
