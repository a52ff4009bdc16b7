"""CIFAR-10 from the standard python-pickle batches (cifar-10-batches-py/), read without running
pickled code: only the builtins and numpy constructors the format uses are allowed."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from benchkit.assets import Asset
from benchkit.dataset import TensorDataset
from benchkit.errors import MissingAsset

SOURCE = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract so the folder cifar-10-batches-py/ is inside root)"
# What `benchkit assets --download` fetches: the publisher's archive, then only the batches a split needs.
ARCHIVE = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"   # the CIFAR-10 page's md5sum; torchvision's CIFAR10.tgz_md5
# md5 of each extracted batch, as torchvision (datasets/cifar.py, CIFAR10.train_list / test_list) checks them.
MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
       "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
       "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


class _SafeUnpickler(pickle.Unpickler):
    ALLOWED = {("builtins", "dict"), ("builtins", "list"), ("builtins", "bytes"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 3, 32, 32], int64 [N]) from one cifar-10-batches-py file."""
    try:
        d = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data, labels = d[b"data"], d[b"labels"]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as exc:
        raise MissingAsset(f"{path}: not a CIFAR-10 python batch ({exc})") from None
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def batch_asset(relpath: str, name: str) -> Asset:
    """A batch file `name` (e.g. test_batch) as published: inside the archive, with torchvision's md5."""
    return Asset(relpath, SOURCE, md5=MD5[name], archive=ARCHIVE, member=f"cifar-10-batches-py/{name}",
                 archive_md5=ARCHIVE_MD5)


def files(root: Path, split: str) -> list[Path]:
    names = ["test_batch"] if split == "test" else TRAIN_FILES
    return [root / "cifar-10-batches-py" / n for n in names]


def load(root: Path, split: str, n: int | None, subset_seed: int | None,
         authors_batch: int | None = None) -> TensorDataset:
    """The split, optionally a fixed subset: the first n images, n drawn with subset_seed, or
    (authors_batch) DiffPure's own draws, n / authors_batch data seeds of authors_batch images each
    over the split in the file's order (torchvision's CIFAR10(train=False) order, which the authors
    index)."""
    for f in files(root, split):
        if not f.is_file():
            raise MissingAsset(f"missing file {f}: get it from {SOURCE}")
    parts = [read_batch(f) for f in files(root, split)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    idx = np.arange(len(y))
    if n is not None and authors_batch is not None:
        from benchkit_data.images import authors_indices

        idx = authors_indices(len(y), n, authors_batch)
    elif n is not None and subset_seed is not None:
        idx = np.sort(np.random.RandomState(subset_seed).permutation(len(y))[:n])
    elif n is not None:
        idx = idx[:n]
    return TensorDataset(torch.from_numpy(x[idx]).float() / 255.0, torch.from_numpy(y[idx]),
                         name=f"cifar10-{split}", num_classes=10)
