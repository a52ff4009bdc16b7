"""`authors_subset`: DiffPure's own fixed evaluation images for cifar10, imagenet and celebahq.

The authors (NVlabs/DiffPure data/datasets.py, utils.load_data) draw, per data seed s,
numpy.random.RandomState(s).choice(N, k, replace=False) over the split's N images in their loader's
order. Every expected index here is recomputed with numpy from that formula (never through the
plugin), on stand-in files in the published layouts.
"""
from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest
import torch

from benchkit import registry
from benchkit.errors import BadInput
from benchkit.suite import DatasetSpec

N_CIFAR = 300   # stand-in test_batch size: more than one seed's 64 draws, fast to write


def dataset(id, params):
    return registry.get("datasets").get(id).build(params)


def expected(count: int, per_seed: int, seeds: int) -> list[int]:
    """The authors' draws, as their code makes them: one RandomState per data seed."""
    return [int(i) for s in range(seeds) for i in np.random.RandomState(s).choice(count, per_seed, replace=False)]


# ---------------------------------------------------------------- the draw itself

def test_draw_is_numpy_legacy_choice_and_prefix_stable():
    """choice(N, k, replace=False) is permutation(N)[:k] in NumPy's legacy RandomState: so the
    first k draws of a longer choice are the k-draw (what makes CelebA-HQ's 'first batch of a
    2% subset' the same rule), and the values are pinned (NumPy's stream compatibility policy)."""
    from benchkit_data.images import authors_indices

    for s in range(3):
        assert np.array_equal(np.random.RandomState(s).choice(10_000, 64, replace=False),
                              np.random.RandomState(s).permutation(10_000)[:64])
    assert authors_indices(10_000, 512, 64).tolist() == expected(10_000, 64, 8)
    assert authors_indices(10_000, 512, 64)[:4].tolist() == [9394, 898, 2398, 5906]  # seed 0 over CIFAR-10's test set
    # DiffPure's CelebA-HQ: choice(partition_idx, int(0.02 * len), replace=False), first batch of 8,
    # equals the val rows at choice(len(val), 8): the positions authors_subset uses.
    partition_idx = np.sort(np.random.RandomState(99).choice(30_000, 2_993, replace=False))
    theirs = [np.random.RandomState(s).choice(partition_idx, int(2 / 100 * len(partition_idx)), replace=False)[:8]
              for s in range(4)]
    assert np.array_equal(np.concatenate(theirs), partition_idx[authors_indices(len(partition_idx), 32, 8)])


# ---------------------------------------------------------------- CIFAR-10

@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """cifar-10-batches-py/test_batch (the pickle format) whose image i carries i in its first two
    pixels, so the returned images say which test images they are."""
    root = tmp_path_factory.mktemp("cifar")
    (root / "cifar-10-batches-py").mkdir()
    data = np.zeros((N_CIFAR, 3 * 32 * 32), dtype=np.uint8)
    data[:, 0], data[:, 1] = np.arange(N_CIFAR) // 256, np.arange(N_CIFAR) % 256
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [i % 10 for i in range(N_CIFAR)],
             b"data": data, b"filenames": [b"x.png"] * N_CIFAR}
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return root


def which(x: torch.Tensor) -> list[int]:
    raw = (x * 255).round().long()
    return (raw[:, 0, 0, 0] * 256 + raw[:, 0, 0, 1]).tolist()


def test_cifar10_authors_subset_is_the_authors_draws_in_order(cifar_root, plugin_manager):
    ds = dataset("cifar10", {"root": str(cifar_root), "authors_subset": True, "n": 192})
    x, y = ds.get(range(len(ds)))
    want = expected(N_CIFAR, 64, 3)   # data seeds 0, 1, 2; image i = draw i % 64 of seed i // 64
    assert len(ds) == 192 and which(x) == want and y.tolist() == [i % 10 for i in want]
    assert registry.get("datasets").get("cifar10").validate({}, "d").authors_batch == 64  # run_scripts: --num_sub 64


def test_cifar10_duplicates_across_seeds_are_separate_rows(cifar_root, plugin_manager):
    """200 draws per seed (the BPDA scripts' --num_sub 200) over 300 images must repeat some."""
    ds = dataset("cifar10", {"root": str(cifar_root), "authors_subset": True, "authors_batch": 200, "n": 400})
    got = which(ds.get(range(len(ds)))[0])
    assert got == expected(N_CIFAR, 200, 2) and len(got) == 400 and len(set(got)) < 400


def test_whole_split_ignores_authors_subset(cifar_root, plugin_manager):
    """eval.clean_on: split rebuilds the dataset with n set to null: the whole split, not the draws."""
    spec = DatasetSpec(plugin="cifar10", params={"root": str(cifar_root), "authors_subset": True, "n": 64})
    ds = dataset("cifar10", spec.whole_split().params)
    assert len(ds) == N_CIFAR and which(ds.get(range(N_CIFAR))[0]) == list(range(N_CIFAR))


@pytest.mark.parametrize("plugin", ["cifar10", "imagenet", "celebahq"])
@pytest.mark.parametrize("params, message", [
    ({"authors_subset": True}, "authors_subset needs n, a multiple of authors_batch = {b} (that many images per data seed)"),
    ({"authors_subset": True, "n": 12, "authors_batch": 5},
     "authors_subset: n = 12 is not a multiple of authors_batch = 5 (images per data seed)"),
    ({"authors_subset": True, "n": 16, "authors_batch": 8, "subset_seed": 0},
     "authors_subset and subset_seed are exclusive: authors_subset fixes the images by DiffPure's data seeds"),
])
def test_authors_subset_params_are_refused_in_one_line(plugin, params, message, plugin_manager):
    entry = registry.get("datasets").get(plugin)
    with pytest.raises(BadInput) as exc:
        entry.validate(params, "s.yaml: dataset")
    default = {"cifar10": 64, "imagenet": 16, "celebahq": 8}[plugin]
    assert exc.value.problems == [f"s.yaml: dataset.params: {message.format(b=default)}"]
    assert entry.validate({"authors_subset": True, "n": None}, "d").n is None   # whole split: valid


def test_authors_batch_larger_than_the_split_is_bad_input(cifar_root, plugin_manager):
    with pytest.raises(BadInput, match=r"^authors_subset: authors_batch = 400 but the split has only 300 images$"):
        dataset("cifar10", {"root": str(cifar_root), "authors_subset": True, "authors_batch": 400, "n": 400})


# ---------------------------------------------------------------- CelebA-HQ

@pytest.mark.parametrize("layout", ["diffpure", "celebamask-hq"])
def test_celebahq_authors_subset_draws_over_the_val_partition(tmp_path, layout, plugin_manager):
    from test_imagenet_celebahq_data import EYE, NAMES, PART, celebamask_layout, diffpure_layout

    root = (diffpure_layout if layout == "diffpure" else celebamask_layout)(tmp_path / layout)
    ds = dataset("celebahq", {"root": str(root), "layout": layout, "allow_partial": True, "authors_subset": True,
                              "authors_batch": 3, "n": 6})
    val = [n for n in sorted(NAMES) if PART[n] == 1]   # DiffPure's order: sorted names, then the val rows
    picked = [val[i] for i in expected(len(val), 3, 2)]
    names = [p.name.replace(".png", ".jpg") if layout == "diffpure" else NAMES[int(p.stem)] for p in ds.paths]
    assert names == picked and ds.labels.tolist() == [EYE[n] for n in picked]
    assert registry.get("datasets").get("celebahq").validate({}, "d").authors_batch == 8  # 2 per GPU x 4 GPUs


# ---------------------------------------------------------------- ImageNet

WNIDS = ("n01440764", "n01443537", "n15075141")   # the first two and the last of ImageNet's sorted classes


def imagenet_val(root):
    """val/<wnid>/<file>.JPEG, 5 files per class created in unsorted order, plus files ImageFolder skips."""
    for w, wnid in enumerate(WNIDS):
        folder = root / "val" / wnid
        folder.mkdir(parents=True)
        for k in (3, 0, 4, 1, 2):
            (folder / f"ILSVRC2012_val_{w * 100 + k:08d}.JPEG").write_bytes(b"")
        (folder / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def with_robustbench():
    if importlib.util.find_spec("robustbench") is None:
        pytest.skip("the robustbench extra is not installed (its class map labels the images)")


def test_imagenet_authors_subset_draws_over_the_imagefolder_listing(tmp_path, with_robustbench, plugin_manager):
    from benchkit_data.imagenet import class_map

    root = imagenet_val(tmp_path)
    listing = [f"{wnid}/ILSVRC2012_val_{w * 100 + k:08d}.JPEG" for w, wnid in enumerate(WNIDS) for k in range(5)]
    params = {"root": str(root), "authors_subset": True, "authors_batch": 4, "n": 8, "allow_partial": True}
    ds = dataset("imagenet", params)
    picked = [listing[i] for i in expected(len(listing), 4, 2)]
    classes = class_map()
    assert [p.relative_to(root / "val").as_posix() for p in ds.paths] == picked
    assert ds.labels.tolist() == [classes[rel.split("/")[0]] for rel in picked] and classes["n15075141"] == 999
    tv = importlib.util.find_spec("torchvision")
    if tv is not None:  # the order DiffPure's lmdb dataset inherits from torchvision's ImageFolder
        from torchvision.datasets import ImageFolder

        assert [p for p, _ in ImageFolder(str(root / "val")).samples] == [str(root / "val" / r) for r in listing]
    entry = registry.get("datasets").get("imagenet")
    assert [p for _, p in entry.assets(entry.validate(params, "d"))] == [root / "val"]


def test_imagenet_authors_subset_needs_the_whole_val_folder(tmp_path, with_robustbench, plugin_manager):
    root = imagenet_val(tmp_path)
    with pytest.raises(BadInput, match=r"val: 15 images, not ImageNet's 50,000 validation images; authors_subset "
                                       r"draws .*allow_partial: true"):
        dataset("imagenet", {"root": str(root), "authors_subset": True, "n": 16})
    (root / "val" / "not-a-wnid").mkdir()
    (root / "val" / "not-a-wnid" / "x.JPEG").write_bytes(b"")
    with pytest.raises(BadInput, match=r"folder\(s\) not-a-wnid are not ImageNet class wnids"):
        dataset("imagenet", {"root": str(root), "authors_subset": True, "n": 4, "authors_batch": 4,
                             "allow_partial": True})
