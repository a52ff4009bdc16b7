"""The cifar10 dataset plugin on the real on-disk format, and pyautoattack's shipped ResNet-18."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from benchkit import registry
from benchkit.errors import BadInput
from conftest import SHARED, needs_shared

DATA = SHARED / "data" / "cifar10_test_first1017.npz"
pytestmark = needs_shared(DATA)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """The shared images written out as the standard cifar-10-batches-py/test_batch pickle."""
    d = np.load(DATA)
    root = tmp_path_factory.mktemp("cifar")
    (root / "cifar-10-batches-py").mkdir()
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": d["y"].tolist(),
             b"data": d["x"].reshape(len(d["y"]), -1), b"filenames": [b"x.png"] * len(d["y"])}
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return root


def test_loads_the_pickle_format(cifar_root, plugin_manager):
    ds = registry.get("datasets").get("cifar10").build({"root": str(cifar_root), "n": 1000})
    x, y = ds.get(range(5))
    assert len(ds) == 1000 and x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == [3, 8, 8, 0, 6]              # the official test set begins so
    raw = np.load(DATA)["x"][:5]
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(raw))
    sub = registry.get("datasets").get("cifar10").build({"root": str(cifar_root), "n": 16, "subset_seed": 0})
    sub2 = registry.get("datasets").get("cifar10").build({"root": str(cifar_root), "n": 16, "subset_seed": 0})
    assert torch.equal(sub.get(range(16))[0], sub2.get(range(16))[0]) and not torch.equal(sub.get(range(16))[0], ds.get(range(16))[0])


def test_pyautoattack_resnet18_accuracy_matches_the_known_figure(cifar_root, plugin_manager):
    """93.7% on the first 1,000 test images (../shared/data/README.md)."""
    from benchkit_baselines.cifar_resnet import pyautoattack_resnet18

    torch.set_num_threads(1)
    model = pyautoattack_resnet18().eval()
    ds = registry.get("datasets").get("cifar10").build({"root": str(cifar_root), "n": 1000})
    correct = 0
    with torch.no_grad():
        for s in range(0, 1000, 250):
            x, y = ds.get(range(s, s + 250))
            correct += int((model(x).argmax(1) == y).sum())
    assert correct == 937


def test_refuses_pickles_with_code(tmp_path, plugin_manager):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": print}, f)  # a global reference: would be looked up when unpickled
    with pytest.raises(BadInput, match="not a CIFAR-10 python batch .*refusing to load builtins.print"):
        registry.get("datasets").get("cifar10").build({"root": str(tmp_path)})


def test_missing_files_are_named(tmp_path, plugin_manager):
    with pytest.raises(BadInput, match=r"missing file .*cifar-10-batches-py/test_batch: get it from https://www.cs.toronto.edu"):
        registry.get("datasets").get("cifar10").build({"root": str(tmp_path)})
