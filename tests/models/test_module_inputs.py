"""What a user's own model needs said once: a torch module's inputs, an HF image folder's preprocessor."""

import json

import numpy as np
import pytest
import torch

from krimp.errors import KrimpError
from krimp.models import load_model


def test_image_module_inputs_are_checked_and_defaulted():
    h = load_model(torch.nn.Conv2d(3, 4, 3), "image-classification", mean=[0.485, 0.456, 0.406], std=0.25)
    assert h.task.image_size == 224 and h.task.rescale == pytest.approx(1 / 255)
    assert h.task.mean == [0.485, 0.456, 0.406] and h.task.std == 0.25
    with pytest.raises(KrimpError, match="mean has 2 values; give one, or one per channel"):
        load_model(torch.nn.Conv2d(3, 4, 3), "image-classification", mean=[0.5, 0.5])
    with pytest.raises(KrimpError, match="std must be > 0"):
        load_model(torch.nn.Conv2d(3, 4, 3), "image-classification", std=[0.2, 0.0, 0.2])
    with pytest.raises(KrimpError, match="'tokenizer' is not something a image-classification model takes"):
        load_model(torch.nn.Conv2d(3, 4, 3), "image-classification", tokenizer="x")
    with pytest.raises(KrimpError, match="needs inputs tokenizer="):
        load_model(torch.nn.Linear(4, 4), "embedding")
    with pytest.raises(KrimpError, match="are for a torch.nn.Module"):
        load_model("builtin:digits-cnn", image_size=32)


def test_a_transform_replaces_size_and_normalisation():
    from PIL import Image

    seen = []

    def transform(img):  # as torchvision's Compose([Resize, CenterCrop, ToTensor, Normalize]) would be called
        seen.append(img.size)
        return torch.zeros(3, 8, 8) + 0.5

    h = load_model(torch.nn.Conv2d(3, 4, 3), "image-classification", transform=transform)
    x = h.task.preprocess_image(np.zeros((20, 30, 3), np.uint8))
    assert seen == [(30, 20)] and x.shape == (3, 8, 8) and np.all(x == 0.5)
    assert h.task.preprocess_image(Image.new("RGB", (5, 7))).shape == (3, 8, 8)


@pytest.mark.slow
def test_hf_image_folder_reads_its_preprocessor_config(tmp_path):
    import transformers as tf

    cfg = tf.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
    tf.ResNetForImageClassification(cfg).save_pretrained(tmp_path)
    pre = {"crop_size": {"height": 64, "width": 64}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.2, 0.3, 0.4]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**pre, "rescale_factor": 1 / 255}))
    h = load_model(tmp_path)
    assert h.task.name == "image-classification" and h.task.image_size == 64
    assert h.task.mean == [0.5, 0.5, 0.5] and h.task.std == [0.2, 0.3, 0.4] and len(h.task.labels) == 5
    x = h.task.preprocess_image(np.full((100, 80, 3), 255, np.uint8))
    assert x.shape == (3, 64, 64) and np.allclose(x[:, 0, 0], [2.5, 0.5 / 0.3, 1.25])
    out = h.module(torch.from_numpy(x)[None]).logits
    assert out.shape == (1, 5)
