"""scikit-learn's embedded digits (UCI optdigits test part): 1797 grey 8x8 images, 10 classes.

Images come back as float32 [N, 1, 8, 8] in [0, 1] (the raw 0..16 counts divided by 16), labels
as int64 [N].

The split is fixed and independent of scikit-learn's splitting code (which is free to change
between versions): for each class c = 0, 1, ..., 9 in turn, one shared
`numpy.random.RandomState(0)` draws `permutation(n_c)` over that class's indices (ascending);
the first 45 become test. So test = 450 images, exactly 45 per class, and train = the other 1347.
The legacy RandomState stream is frozen by NumPy's compatibility policy, and
tests/test_zoo.py pins a checksum of the test indices, so the split can never change silently.
Both index lists are returned sorted ascending, i.e. in the dataset's own order.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

TEST_PER_CLASS = 45
NUM_CLASSES = 10
SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    # Imported lazily: sklearn is slow to import and only this loader needs it.
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def digits_split_indices(split: str) -> np.ndarray:
    """Indices into load_digits() of the given split ('train' or 'test'), ascending."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
    _, y = _raw()
    rng = np.random.RandomState(0)
    test = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        test.append(idx[rng.permutation(len(idx))[:TEST_PER_CLASS]])
    test_idx = np.sort(np.concatenate(test))
    if split == "test":
        return test_idx
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask)


def load_digits_split(split: str) -> tuple[Tensor, Tensor]:
    """(images float32 [N,1,8,8] in [0,1], labels int64 [N]) of the 'train' or 'test' split."""
    x, y = _raw()
    idx = digits_split_indices(split)
    # Fresh tensors each call: callers may modify them in place without touching the cache.
    return torch.from_numpy(x[idx].copy()).unsqueeze(1), torch.from_numpy(y[idx].copy())
