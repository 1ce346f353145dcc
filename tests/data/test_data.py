import json

import numpy as np
import pytest

from krimp.data import load_data
from krimp.errors import KrimpError
from krimp.models.tasks import make_task
from krimp.recipe import DataSpec

SENT = "This sentence number {i} talks about topic {t} at some length for the test."


class _Tok:
    """load_data only reads and splits text, so no real tokenizer is needed."""


def _text_task():
    return make_task("embedding", tokenizer=_Tok())


def test_folder_of_text_files_splits_by_file_without_overlap(tmp_path):
    for f in range(10):
        (tmp_path / f"doc{f}.txt").write_text("\n\n".join(SENT.format(i=i, t=f) for i in range(6)))
    ds = load_data(DataSpec(source=str(tmp_path), calib_samples=20, eval_samples=20), _text_task())
    assert len(ds.calib) == 20 and len(ds.eval) == 20
    assert not set(ds.calib) & set(ds.eval)
    topics = lambda items: {s.split("topic ")[1].split()[0] for s in items}
    assert not topics(ds.calib) & topics(ds.eval)  # whole files go to one side
    assert ds.info["calib_samples"] == 20 and ds.info["eval_samples"] == 20


def test_jsonl_and_csv_with_labels(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": SENT.format(i=i, t=i % 3), "label": i % 2}) for i in range(40)))
    ds = load_data(
        DataSpec(source=str(p), calib_samples=8, eval_samples=10), make_task("classification", tokenizer=_Tok())
    )
    assert ds.eval_labels is not None and set(ds.eval_labels) <= {0, 1} and len(ds.eval_labels) == 10
    c = tmp_path / "d.csv"
    c.write_text("text,label\n" + "\n".join(f"\"{SENT.format(i=i, t=1)}\",{i % 2}" for i in range(20)))
    ds = load_data(
        DataSpec(source=str(c), calib_samples=4, eval_samples=4), make_task("classification", tokenizer=_Tok())
    )
    assert len(ds.eval) == 4 and not set(ds.calib) & set(ds.eval)


def test_jsonl_missing_field_is_a_clear_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"body": "x"}))
    with pytest.raises(KrimpError, match="no field 'text'"):
        load_data(DataSpec(source=str(p)), _text_task())


def test_empty_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(KrimpError, match="empty"):
        load_data(DataSpec(source=str(tmp_path / "empty.txt")), _text_task())
    with pytest.raises(KrimpError, match="data not found"):
        load_data(DataSpec(source=str(tmp_path / "missing.txt")), _text_task())
    with pytest.raises(KrimpError, match="unsupported data file type"):
        (tmp_path / "x.xlsx").write_text("x")
        load_data(DataSpec(source=str(tmp_path / "x.xlsx")), _text_task())


def test_builtin_python_docs_is_real_prose():
    ds = load_data(DataSpec(source="builtin:python-docs", calib_samples=16, eval_samples=32), _text_task())
    assert len(ds.eval) == 32 and all(len(s) >= 40 for s in ds.eval)
    assert not set(ds.calib) & set(ds.eval)


def test_python_docs_fallback_parses_the_standard_library_without_importing_it(monkeypatch, tmp_path):
    import sys

    import krimp.data.builtin as B

    assert all(B.stdlib_source(n) for n in B._DOCSTRING_MODULES)  # every listed module has a source file
    monkeypatch.setattr(B, "DOC_SOURCES", tmp_path / "no-docs")  # a Python without Debian's python3-doc
    monkeypatch.setattr(B, "_DOCSTRING_MODULES", ("tabnanny", "wsgiref"))  # a module and a package
    monkeypatch.delitem(sys.modules, "tabnanny", raising=False)
    monkeypatch.delitem(sys.modules, "wsgiref", raising=False)
    groups, label = B.python_docs_groups("sentence")
    assert label == "python-docs:stdlib-docstrings" and len(groups) == 2
    assert any("indentation" in s for s, _ in groups[0]) and "WSGI" in groups[1][0][0]
    assert "tabnanny" not in sys.modules and "wsgiref" not in sys.modules


def test_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    task = make_task("image-classification", mean=127.0, std=128.0, image_size=16)
    ds = load_data(DataSpec(source=str(tmp_path), calib_samples=4, eval_samples=6), task)
    assert ds.eval[0].shape == (3, 16, 16) and ds.eval[0].dtype == np.float32
    assert sorted(set(ds.eval_labels)) <= [0, 1]
    assert abs(float(ds.eval[0].mean())) < 1.1


def test_builtin_photos_calibration_and_evaluation_are_disjoint_halves():
    task = make_task("image-classification", mean=127.0, std=128.0, image_size=32)
    ds = load_data(DataSpec(source="builtin:photos", calib_samples=8, eval_samples=8), task)
    assert len(ds.calib) == 8 and len(ds.eval) == 8
    assert "left" in ds.info["split"]


def test_builtin_digits_are_held_out_from_training():
    from krimp.models.builtin import digits_split

    _, train, held = digits_split()
    assert not set(train) & set(held)
    task = make_task("image-classification", mean=0.0, std=16.0, channels=1, image_size=8)
    ds = load_data(DataSpec(source="builtin:digits", calib_samples=50, eval_samples=100), task)
    assert ds.eval[0].shape == (1, 8, 8) and len(ds.eval_labels) == 100


def test_text_and_label_fields_are_configurable(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"body": SENT.format(i=i, t=0), "y": i % 2}) for i in range(20)))
    ds = load_data(
        DataSpec(source=str(p), calib_samples=4, eval_samples=6, text_field="body", label_field="y"),
        make_task("classification", tokenizer=_Tok()),
    )
    assert len(ds.eval) == 6 and ds.eval_labels is not None and "topic" in ds.eval[0]


def _topic_folder(root, name, n_files=10):
    root.mkdir()
    for f in range(n_files):
        (root / f"doc{f}.txt").write_text("\n\n".join(SENT.format(i=i, t=f"{name}{f}") for i in range(6)))
    return str(root)


def test_a_mix_of_sources_calibrates_on_each_and_never_on_held_out_items(tmp_path):
    a, b = _topic_folder(tmp_path / "a", "a"), _topic_folder(tmp_path / "b", "b")
    topics = lambda items: {s.split("topic ")[1].split()[0] for s in items}
    mix = load_data(DataSpec(calib_source=[a, b], eval_source=b, calib_samples=60, eval_samples=30), _text_task())
    cal = topics(mix.calib)
    assert any(t.startswith("a") for t in cal) and any(t.startswith("b") for t in cal)
    assert not cal & topics(mix.eval)
    alone = load_data(DataSpec(source=a, calib_samples=30, eval_samples=30), _text_task())
    assert not cal & topics(alone.eval)  # source a's held-out half, as a run on a alone scores it
    assert {t for t in cal if t.startswith("a")} <= topics(alone.calib)
    assert mix.info["split"] == "calibration and evaluation halves of each source"
    with pytest.raises(KrimpError, match="cannot be mixed"):
        load_data(DataSpec(calib_source=[a, "builtin:photos"], calib_samples=4, eval_samples=4), _text_task())


def test_language_model_windows_come_evenly_from_each_source(minilm, tmp_path):
    a, b = _topic_folder(tmp_path / "a", "apple", 20), _topic_folder(tmp_path / "b", "banana", 20)
    task = make_task("causal-lm", tokenizer=minilm.task.tokenizer)
    d = load_data(DataSpec(source=[a, b], calib_samples=6, eval_samples=4, seq_len=32), task)
    words = [minilm.task.tokenizer.decode(w.ids) for w in d.calib]
    assert len(d.calib) == 6 and len(d.eval) == 4
    assert sum("apple" in w for w in words) == 3 and sum("banana" in w for w in words) == 3


def test_a_sentence_in_both_halves_is_never_calibrated_on(tmp_path):
    shared = "Availability: this sentence is boilerplate repeated in every documentation file."
    for f in range(10):
        (tmp_path / f"doc{f}.txt").write_text("\n\n".join([shared] + [SENT.format(i=i, t=f) for i in range(6)]))
    ds = load_data(DataSpec(source=str(tmp_path), calib_samples=100, eval_samples=100), _text_task())
    assert shared in ds.eval and shared not in ds.calib
    assert ds.info["calib_dropped_as_in_eval"] == 5  # one per calibration-half file
    assert len(ds.calib) == 30 and not set(ds.calib) & set(ds.eval)
