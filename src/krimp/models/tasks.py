"""Task adapters: how to feed a model and what its output means.

A task turns data items into the numpy feed a runtime takes, wraps a torch module so it exports
to ONNX with named keyword inputs, and turns raw outputs into per-sample features that the
evaluator compares (pooled embeddings, class logits, next-token logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from krimp.errors import KrimpError

TASKS = ("embedding", "classification", "causal-lm", "image-classification")
LOGITS_BUDGET = 2**25  # logits (float32) one forward pass may return: 128 MB, whatever the vocabulary


@dataclass
class Task:
    name: str
    input_names: list[str]
    output_name: str
    tokenizer: Any = None
    # image preprocessing: pixels (0..255) times `rescale`, then (x - mean) / std per channel (a
    # number, or one per channel), the shorter side resized to `image_size` and the centre cropped
    # square; or `transform`, a callable (a torchvision / timm transform) from a PIL image to CHW
    mean: float | list[float] = 0.0
    std: float | list[float] = 1.0
    channels: int = 3
    image_size: int | None = None
    rescale: float = 1.0
    transform: Any = None
    labels: list[str] = field(default_factory=list)

    @property
    def is_text(self) -> bool:
        return self.name != "image-classification"

    # ---- feeding ---------------------------------------------------------------------------
    def rows(self, batch: int, seq_len: int) -> int:
        """Rows a feed of ``batch`` may hold: fewer for a language model whose logits (rows x seq_len x
        vocabulary floats) would pass :data:`LOGITS_BUDGET` (Gemma 3's 262k vocabulary: one row of 512)."""
        if self.name != "causal-lm" or self.tokenizer is None:
            return batch
        return max(1, min(batch, LOGITS_BUDGET // max(1, seq_len * len(self.tokenizer))))

    def encode(self, items: list[Any], seq_len: int, pad_to_max: bool = False) -> dict[str, np.ndarray]:
        """A feed for a batch of items: token ids for text, a float NCHW tensor for images."""
        if not self.is_text:
            return {self.input_names[0]: np.stack(items).astype(np.float32)}
        if items and hasattr(items[0], "score_from"):  # language-model token windows
            ids = np.stack([w.ids for w in items]).astype(np.int64)
            score = np.ones_like(ids, dtype=bool)
            for b, w in enumerate(items):
                score[b, : max(w.score_from, 1)] = False  # targets from position score_from on
            return {"input_ids": ids, "attention_mask": np.ones_like(ids), "score_mask": score}
        if self.tokenizer is None:
            raise KrimpError("this text model has no tokenizer: put its tokenizer files beside the model file")
        enc = self.tokenizer(
            list(items),
            padding="max_length" if pad_to_max else True,
            truncation=True,
            max_length=seq_len,
            return_tensors="np",
        )
        out = {}
        for name in self.input_names:
            if name == "token_type_ids" and name not in enc:
                out[name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
            else:
                out[name] = np.asarray(enc[name], dtype=np.int64)
        return out

    def dummy_feed(self, batch: int, seq_len: int, example: dict[str, np.ndarray] | None = None):
        """A fixed-shape feed for latency runs: full-length random tokens, or random images."""
        rng = np.random.default_rng(0)
        if not self.is_text:
            shape = example[self.input_names[0]].shape[1:]
            return {self.input_names[0]: rng.standard_normal((batch, *shape)).astype(np.float32)}
        vocab = getattr(self.tokenizer, "vocab_size", 1000) or 1000
        ids = rng.integers(min(1000, vocab // 2), vocab - 1, size=(batch, seq_len), dtype=np.int64)
        feed = {"input_ids": ids}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = np.ones_like(ids)
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        return feed

    def preprocess_image(self, img: Any) -> np.ndarray:
        """An image (HWC or HW pixels on 0..255, a PIL image, or a CHW tensor already prepared) ->
        CHW float32 of the model's size and normalisation."""
        if self.transform is not None:
            from PIL import Image

            pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))
            return np.asarray(self.transform(pil), dtype=np.float32)
        if isinstance(img, torch.Tensor):  # a tensor from a torch Dataset: already the model's input
            return img.detach().float().numpy()
        x = torch.from_numpy(np.array(img, dtype=np.float32))  # a copy: PIL's pixels are read-only
        if x.ndim == 2:
            x = x[..., None]
        x = x.permute(2, 0, 1)
        if x.shape[0] != self.channels:
            x = x.mean(0, keepdim=True).expand(self.channels, -1, -1) if self.channels in (1, 3) else x
        if self.image_size and tuple(x.shape[1:]) != (self.image_size, self.image_size):
            h, w = x.shape[1:]
            s = self.image_size / min(h, w)  # the shorter side to image_size, then the centre square
            size = (max(self.image_size, round(h * s)), max(self.image_size, round(w * s)))
            x = torch.nn.functional.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
            top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
            x = x[:, top : top + self.image_size, left : left + self.image_size]
        mean = torch.as_tensor(self.mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32).reshape(-1, 1, 1)
        return ((x * self.rescale - mean) / std).numpy().astype(np.float32)

    # ---- outputs ---------------------------------------------------------------------------
    def features(self, raw: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Per-sample features: normalised mean-pooled embeddings, or logits as they are."""
        raw = np.asarray(raw, dtype=np.float32)
        if self.name == "embedding":
            mask = feed["attention_mask"][..., None].astype(np.float32)
            v = (raw * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return raw

    def export_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return _KeywordWrapper(module, self.input_names, self.name)


class _KeywordWrapper(torch.nn.Module):
    """Passes positional export inputs to the model by keyword and returns one tensor."""

    def __init__(self, module: torch.nn.Module, names: list[str], task: str):
        super().__init__()
        self.module, self.names, self.task = module, names, task

    def forward(self, *args):
        if self.task == "image-classification":
            out = self.module(args[0])
        else:
            kwargs = dict(zip(self.names, args, strict=False))
            if self.task == "causal-lm":
                kwargs["use_cache"] = False
            out = self.module(**kwargs)
        if isinstance(out, torch.Tensor):
            return out
        if self.task == "embedding":
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return out.logits if hasattr(out, "logits") else out[0]


def make_task(name: str, tokenizer: Any = None, input_names: list[str] | None = None, **kw) -> Task:
    if name not in TASKS:
        from krimp.errors import KrimpError, closest

        hint = closest(name, TASKS)
        raise KrimpError(
            f"unknown task '{name}'" + (f"; did you mean '{hint}'?" if hint else "") + f" (known: {', '.join(TASKS)})"
        )
    if name == "image-classification":
        return Task(name, input_names or ["pixel_values"], "logits", **kw)
    names = input_names or ["input_ids", "attention_mask"]
    out = "last_hidden_state" if name == "embedding" else "logits"
    return Task(name, names, out, tokenizer=tokenizer, **kw)
