"""Data in the forms people hold it: a text file of queries, records in .jsonl/.csv/.parquet, and in
Python a list of texts or images, a datasets.Dataset, a torch Dataset or DataLoader."""

import numpy as np
import pytest
import torch

from krimp.data import load_data
from krimp.data.objects import object_groups
from krimp.data.text import read_text_groups
from krimp.errors import KrimpError
from krimp.models.tasks import make_task
from krimp.recipe import DataSpec

TEXT = make_task("embedding")
IMAGES = make_task("image-classification", image_size=16, rescale=1 / 255)
QUERIES = ["how to reset my password", "refund", "opening hours?", "", "cancel order 12", "ship to Norway", "hi"]


def test_txt_is_one_item_per_line_and_a_small_file_splits_by_item(tmp_path):
    f = tmp_path / "queries.txt"
    f.write_text("\n".join(QUERIES) + "\n")
    groups = read_text_groups(f, "sentence", "text", "label")
    assert [t for t, _ in groups[0]] == [q for q in QUERIES if q]  # short lines kept, blank ones dropped
    ds = load_data(DataSpec(source=str(f), calib_samples=8, eval_samples=8), TEXT)
    assert len(ds.calib) == 3 and len(ds.eval) == 3 and not set(ds.calib) & set(ds.eval)
    assert ds.info["calib_samples"] == 3 and ds.info["eval_samples"] == 3


def test_txt_paragraphs_on_request_and_for_language_models(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("First paragraph,\nwrapped over two lines.\n\nSecond one.\n\n\nThird.\n")
    para = [t for t, _ in read_text_groups(f, "sentence", "text", "label", unit="paragraph")[0]]
    assert para == ["First paragraph, wrapped over two lines.", "Second one.", "Third."]
    assert [t for t, _ in read_text_groups(f, "passage", "text", "label")[0]] == para  # an LM reads paragraphs
    assert len(read_text_groups(f, "passage", "text", "label", unit="line")[0]) == 4


def test_non_utf8_text_file_is_named_with_the_byte(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(KrimpError, match=r"latin1\.txt: not UTF-8 text \(byte 3"):
        read_text_groups(f, "sentence", "text", "label")


def test_parquet_records_with_text_and_label(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "reviews.parquet"
    pq.write_table(pa.table({"body": [f"review {i}" for i in range(20)], "label": [i % 2 for i in range(20)]}), f)
    groups = read_text_groups(f, "sentence", "body", "label")
    items = [it for g in groups for it in g]
    assert items[:3] == [("review 0", 0), ("review 1", 1), ("review 2", 0)] and len(items) == 20
    with pytest.raises(KrimpError, match="no column 'text' .*columns: body, label"):
        read_text_groups(f, "sentence", "text", "label")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(KrimpError, match="broken.parquet: not a readable Parquet file"):
        read_text_groups(tmp_path / "broken.parquet", "sentence", "text", "label")


def test_python_lists_pairs_and_mappings_of_text():
    spec = DataSpec()
    (g,), label = object_groups(["a", "b", "c"], TEXT, spec)
    assert g == [("a", None), ("b", None), ("c", None)] and label == "list (3 items)"
    (g,), _ = object_groups([("good", 1), ("bad", 0)], TEXT, spec)
    assert g == [("good", 1), ("bad", 0)]
    (g,), _ = object_groups([{"text": "x", "label": 2}], TEXT, spec)
    assert g == [("x", 2)]
    ds = load_data(DataSpec(calib_samples=10, eval_samples=10), TEXT, items=[f"sentence {i}" for i in range(10)])
    assert len(ds.calib) == 5 and len(ds.eval) == 5 and ds.info["source"] == "list (10 items)"


def test_strings_are_texts_not_paths_and_wrong_items_say_what_is_wanted():
    with pytest.raises(KrimpError, match="a embedding model takes texts"):
        object_groups([1, 2], TEXT, DataSpec())
    with pytest.raises(KrimpError, match="data.source"):
        object_groups("corpus.txt", TEXT, DataSpec())
    with pytest.raises(KrimpError, match="got a set"):
        object_groups({"a"}, TEXT, DataSpec())
    with pytest.raises(KrimpError, match="is empty"):
        object_groups([], TEXT, DataSpec())


def test_hf_datasets_dataset_by_column():
    import datasets

    d = datasets.Dataset.from_dict({"text": ["one", "two", "three"], "label": [0, 1, 0]})
    (g,), label = object_groups(d, TEXT, DataSpec())
    assert g == [("one", 0), ("two", 1), ("three", 0)] and label == "datasets.Dataset (3 rows)"
    with pytest.raises(KrimpError, match="no column 'review'.*columns: text, label"):
        object_groups(d, TEXT, DataSpec(text_field="review"))


class _Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.full((3, 16, 16), float(i)), torch.tensor(i % 3)


def test_torch_dataset_and_dataloader_give_items_not_batches():
    (g,), label = object_groups(_Pairs(), IMAGES, DataSpec())
    assert label == "torch Dataset (6 items)" and [y for _, y in g] == [0, 1, 2, 0, 1, 2]
    loader = torch.utils.data.DataLoader(_Pairs(), batch_size=4)
    (g2,), _ = object_groups(loader, IMAGES, DataSpec())
    assert len(g2) == 6 and g2[5][0].shape == (3, 16, 16)  # items, not the two collated batches
    ds = load_data(DataSpec(calib_samples=3, eval_samples=3), IMAGES, items=loader)
    assert ds.eval[0].shape == (3, 16, 16) and ds.eval_labels is not None  # tensors pass as prepared


def test_images_of_any_size_become_the_model_size_with_per_channel_normalisation():
    from PIL import Image

    task = make_task("image-classification", image_size=16, rescale=1 / 255, mean=[0.5, 0.4, 0.3], std=[0.5, 0.25, 0.1])
    imgs = [Image.new("RGB", (40, 25), (255, 102, 0)), np.full((30, 60, 3), 255, np.uint8)]
    ds = load_data(DataSpec(calib_samples=1, eval_samples=1), task, items=imgs)
    x = np.stack([*ds.calib, *ds.eval])  # different sizes in, one shape out
    assert x.shape == (2, 3, 16, 16)
    assert np.allclose(x[0, :, 0, 0], [(1 - 0.5) / 0.5, (0.4 - 0.4) / 0.25, (0 - 0.3) / 0.1], atol=1e-5)
    assert np.allclose(x[1, :, 5, 5], [1.0, 2.4, 7.0], atol=1e-5)
    with pytest.raises(KrimpError, match="not an image"):
        object_groups([np.zeros(5)], task, DataSpec())
