"""Images from a local folder (``class_name/image.png`` for labels, or a flat folder) and the
builtin real photographs (random crops of scikit-image's sample photos)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from krimp.errors import KrimpError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Photographs of objects, as an ImageNet classifier sees in use. Left out on purpose: drawings,
# logos, micrographs, star fields, and textures (brick, grass, gravel, coins), on which
# EfficientNet-Lite0 itself is unsure (see bench/results/data_findings.md), so top-1
# "agreement" there measures near-ties, not fidelity.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "camera")


def read_image_groups(path: Path):
    """Groups of (HWC uint8 array, label-or-None): one group per image file."""
    from PIL import Image

    if not path.is_dir():
        raise KrimpError(f"{path}: image data must be a folder of images")
    files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise KrimpError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    labelled = all(f.parent != path for f in files)
    classes = sorted({f.parent.name for f in files}) if labelled else []
    groups = []
    for f in files:
        try:
            img = np.asarray(Image.open(f).convert("RGB"))
        except Exception:
            raise KrimpError(f"{f}: not a readable image") from None
        groups.append([(img, classes.index(f.parent.name) if labelled else None)])
    return groups


def photo_crops(n: int, half: str, seed: int) -> list[np.ndarray]:
    """``n`` random square crops (flipped at random) of real photos. Calibration crops come from
    the left half of each photo and evaluation crops from the right half, so they never overlap."""
    import skimage.data as sd

    photos = []
    for name in PHOTOS:
        a = getattr(sd, name)()
        a = a[0] if isinstance(a, tuple) else a  # stereo pairs: the left view
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        w = a.shape[1] // 2
        photos.append(a[:, :w] if half == "left" else a[:, w:])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = photos[rng.integers(len(photos))]
        h, w = a.shape[:2]
        s = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        c = a[y : y + s, x : x + s]
        out.append(np.ascontiguousarray(c[:, ::-1] if rng.random() < 0.5 else c))
    return out
