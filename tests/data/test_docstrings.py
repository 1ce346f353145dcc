"""builtin:docstrings: prose from docstrings, read by parsing source files, never by importing them."""

import pytest

from krimp.data.docstrings import docstring_groups
from krimp.data.text import clean_rst

MOD = '''"""A module whose import would fail: parsing must be enough to read its prose.

>>> this_is_a_doctest_line_that_must_not_appear()
"""
raise RuntimeError("imported")


class Widget:
    """Widgets collect the readings of every sensor on the board at once.

    Parameters
    ----------
    rate : float
        How often the sensors are read, in hertz, while the board is awake.
    """

    def reset(self):
        """Reset clears the stored readings and starts a new measurement window."""
'''


def _package(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_docstrings_are_parsed_not_imported_one_group_per_file(tmp_path):
    pkg = _package(
        tmp_path / "pkg",
        {
            "a.py": MOD,
            "b.py": '"""Widgets collect the readings of every sensor on the board at once."""\n'
            'def f():\n    """The second file says something of its own about the sensors here."""\n',
            "tests/test_a.py": '"""Text from a tests folder is left out of the prose collection."""\n',
            "broken.py": 'def (:\n    """A file that does not parse is skipped without an error."""\n',
        },
    )
    groups = docstring_groups([pkg])
    text = [s for g in groups for s in g]
    assert len(groups) == 2  # a.py and b.py; the tests folder and the unparsable file give nothing
    assert "Reset clears the stored readings and starts a new measurement window." in text
    assert "rate : float How often the sensors are read, in hertz, while the board is awake." in text
    assert not any("doctest" in s or "-----" in s or "tests folder" in s or "does not parse" in s for s in text)
    assert text.count("Widgets collect the readings of every sensor on the board at once.") == 1  # not repeated
    assert groups[1] == ["The second file says something of its own about the sensors here."]


def test_docstring_markup_is_cleaned_as_the_documentation_is():
    doc = "Prose stays.\n>>> x = 1\n... more\n.. note:: a directive\n:param x: a field\n- a bullet\nMore prose."
    assert clean_rst(doc).split("\n") == ["Prose stays.", "", "", "", "", "", "More prose."]
    assert clean_rst("Composed with :func:`jacrev` and ``vmap``.") == "Composed with jacrev and vmap."


@pytest.mark.slow
def test_builtin_docstrings_read_the_standard_library_once_then_the_cache(tmp_path, monkeypatch):
    import krimp.data.docstrings as D
    import krimp.models.builtin
    from krimp.data import load_data
    from krimp.models.tasks import make_task
    from krimp.recipe import DataSpec

    monkeypatch.setattr(D, "PACKAGES", ())  # the standard library alone: seconds, not a minute
    monkeypatch.setattr(krimp.models.builtin, "CACHE", tmp_path)
    spec, task = (
        DataSpec(source="builtin:docstrings", calib_samples=64, eval_samples=64),
        make_task("embedding", tokenizer=object()),
    )
    ds = load_data(spec, task)
    assert len(ds.calib) == 64 and len(ds.eval) == 64 and not set(ds.calib) & set(ds.eval)
    assert all(40 <= len(s) <= 400 for s in ds.calib + ds.eval)
    assert ds.info["source"].startswith("docstrings: python 3.")
    cached = list(tmp_path.glob("docstrings-*.json"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp"))
    groups, _ = D.builtin_docstring_groups("sentence")
    assert sum(map(len, groups)) > 5000  # the standard library alone holds about 15,000 sentences
    monkeypatch.setattr(D, "docstring_groups", lambda *a: pytest.fail("parsed again despite the cache"))
    assert load_data(spec, task).eval == ds.eval
