"""Data a user holds in memory: a list of texts or images, a Hugging Face ``datasets.Dataset``, a torch
``Dataset`` or ``DataLoader``. Each becomes one group of ``(item, label-or-None)`` items, so it is split
between calibration and evaluation by item, as one file is.

An item is a text (``str``), an image (a PIL image, an HWC or HW array of 0..255 pixels, or a CHW
tensor already prepared for the model), a ``(item, label)`` pair, or a mapping with the recipe's
``data.text_field`` (or an ``image`` key) and ``data.label_field``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from krimp.errors import KrimpError

IMAGE_KEYS = ("image", "img", "pixel_values")


def object_groups(obj: Any, task, spec) -> tuple[list[list[tuple[Any, Any]]], str]:
    """``(groups, label for the report)`` of an in-memory data object."""
    import torch

    if isinstance(obj, str | bytes) or hasattr(obj, "__fspath__"):
        raise KrimpError("data: a path goes in the recipe (data.source); data= takes items held in memory")
    if hasattr(obj, "column_names") and hasattr(obj, "features"):  # datasets.Dataset
        rows, label = _dataset_rows(obj, task, spec), f"datasets.Dataset ({len(obj)} rows)"
    else:
        if isinstance(obj, torch.utils.data.DataLoader):
            obj = obj.dataset  # its items one by one, not collated batches
        if isinstance(obj, torch.utils.data.IterableDataset):
            rows, kind = list(obj), "torch IterableDataset"
        elif isinstance(obj, torch.utils.data.Dataset):
            rows, kind = [obj[i] for i in range(len(obj))], "torch Dataset"
        elif isinstance(obj, list | tuple):
            rows, kind = list(obj), "list"
        else:
            raise KrimpError(
                f"data: got a {type(obj).__name__}; krimp takes a list of texts or images, a datasets.Dataset, "
                "a torch Dataset or DataLoader (or a path in data.source)"
            )
        label = f"{kind} ({len(rows)} items)"
    items = [_item(r, i, task, spec) for i, r in enumerate(rows)]
    if not items:
        raise KrimpError(f"data: the {label.split(' (')[0]} is empty")
    return [items], label


def _dataset_rows(ds, task, spec) -> list:
    cols = list(ds.column_names)
    if task.is_text:
        field = spec.text_field
    else:
        field = next((c for c in IMAGE_KEYS if c in cols), None)
    if field not in cols:
        want = f"'{spec.text_field}' (set data.text_field)" if task.is_text else f"one of {', '.join(IMAGE_KEYS)}"
        raise KrimpError(f"data: the datasets.Dataset has no column {want}; its columns: {', '.join(cols)}")
    xs = ds[field]
    ys = ds[spec.label_field] if spec.label_field in cols else [None] * len(xs)
    return list(zip(xs, ys, strict=True))


def _item(row: Any, i: int, task, spec) -> tuple[Any, Any]:
    import torch

    if isinstance(row, dict):
        key = spec.text_field if task.is_text else next((k for k in IMAGE_KEYS if k in row), None)
        if key not in row:
            raise KrimpError(f"data item {i}: a mapping without '{key or IMAGE_KEYS[0]}' (keys: {', '.join(row)})")
        x, y = row[key], row.get(spec.label_field)
    elif isinstance(row, tuple | list) and len(row) == 2 and not isinstance(row[0], int | float):
        x, y = row
    else:
        x, y = row, None
    if isinstance(y, torch.Tensor | np.ndarray | np.integer):
        y = int(np.asarray(y).item())
    if task.is_text:
        if not isinstance(x, str):
            raise KrimpError(f"data item {i} is a {type(x).__name__}; a {task.name} model takes texts (str)")
        return x, y
    if isinstance(x, torch.Tensor):
        if x.ndim != 3:
            raise KrimpError(f"data item {i}: an image tensor must be CHW (got shape {tuple(x.shape)})")
        return x, y
    try:
        from PIL import Image

        if isinstance(x, Image.Image):
            x = np.asarray(x.convert("RGB" if task.channels == 3 else "L"))
    except ImportError:
        pass
    x = np.asarray(x)
    if x.ndim not in (2, 3) or x.dtype == object:
        raise KrimpError(
            f"data item {i}: not an image (got {type(row).__name__} of shape {getattr(x, 'shape', '?')}); "
            "give PIL images, HWC arrays of 0..255 pixels or CHW tensors"
        )
    return x, y
