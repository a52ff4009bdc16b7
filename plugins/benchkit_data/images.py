"""Image files to [0, 1] tensors with Pillow, matching torchvision's PIL transforms exactly.

Pillow comes with torchvision (the robustbench extra); without it, decoding says what to install.
Only `Resize(size)` (shorter side to `size`, bilinear, aspect ratio kept), `CenterCrop(size)` and
`ToTensor()` are needed, so torchvision itself is not: the arithmetic below is torchvision's
(transforms.functional.resize / center_crop on PIL images) and the tests compare them pixel for pixel.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from benchkit.errors import BadInput

INSTALL_HINT = ("needs Pillow to decode images: pip install -e '.[robustbench]' (it brings torchvision and Pillow) "
                "or pip install pillow")


def require_pillow(what: str):
    """PIL.Image; BadInput naming `what` and the install command if Pillow is missing."""
    if importlib.util.find_spec("PIL") is None:
        raise BadInput(f"{what} {INSTALL_HINT}")
    from PIL import Image

    return Image


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(size): the shorter side becomes `size`."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def load_image(path: Path, resize: int | None = None, crop: int | None = None) -> torch.Tensor:
    """float32 [3, H, W] in [0, 1]: RGB, optionally Resize(resize) then CenterCrop(crop)."""
    Image = require_pillow(f"reading {path}")
    with open(path, "rb") as f:
        img = Image.open(f)
        img = img.convert("RGB")
    if resize is not None:
        w, h = resized_size(*img.size, resize)
        if (w, h) != img.size:
            img = img.resize((w, h), Image.BILINEAR)
    if crop is not None:
        w, h = img.size
        if w < crop or h < crop:
            raise BadInput(f"{path}: {w}x{h} is smaller than the {crop}x{crop} centre crop")
        top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
        img = img.crop((left, top, left + crop, top + crop))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def authors_indices(count: int, n: int, batch: int) -> np.ndarray:
    """DiffPure's fixed evaluation images (NVlabs/DiffPure, data/datasets.py and utils.load_data):
    data seed s draws `numpy.random.RandomState(s).choice(count, batch, replace=False)`; seeds
    0 .. n/batch - 1 are concatenated, so position i is the (i % batch)-th draw of seed i // batch.
    Draws of different seeds may coincide: each is its own image row, as in the authors' runs
    (they average per-seed results)."""
    if n % batch:
        raise BadInput(f"authors_subset: n = {n} is not a multiple of authors_batch = {batch}")
    if batch > count:
        raise BadInput(f"authors_subset: authors_batch = {batch} but the split has only {count} images")
    # choice(count, batch, replace=False) is permutation(count)[:batch] in NumPy's legacy
    # RandomState (frozen by its compatibility policy), the stream the authors drew from.
    return np.concatenate([np.random.RandomState(s).choice(count, batch, replace=False)
                           for s in range(n // batch)]).astype(np.int64)


def subset(count: int, n: int | None, subset_seed: int | None, authors_batch: int | None = None) -> np.ndarray:
    """Positions 0..count-1 to use: all, the first n, n drawn with subset_seed (sorted, the same
    rule as the cifar10 dataset), or, with authors_batch, DiffPure's draws (`authors_indices`).
    n None is always the whole split (what `eval.clean_on: split` builds)."""
    if n is not None and authors_batch is not None:
        return authors_indices(count, n, authors_batch)
    idx = np.arange(count)
    if n is not None and n > count:
        raise BadInput(f"n = {n} but only {count} images are available")
    if n is not None and subset_seed is not None:
        return np.sort(np.random.RandomState(subset_seed).permutation(count)[:n])
    if n is not None:
        return idx[:n]
    return idx


def missing_lines(paths: list[Path], source: str, limit: int = 20) -> list[str]:
    """One 'missing file' line per absent path (at most `limit`, then a count)."""
    absent = [p for p in paths if not p.is_file()]
    lines = [f"missing file {p}: get it from {source}" for p in absent[:limit]]
    if len(absent) > limit:
        lines.append(f"... and {len(absent) - limit} more of the {len(paths)} selected images are missing")
    return lines
