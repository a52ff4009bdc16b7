"""ImageNet validation images: RobustBench's fixed 5,000-image subset, Resize(256) + CenterCrop(224).

Layout (torchvision ImageFolder / RobustBench's ``load_imagenet(data_dir)``)::

    root/val/<wnid>/<file>.JPEG          e.g. root/val/n01440764/ILSVRC2012_val_00000293.JPEG

The image list and the class indices are RobustBench's own files, shipped inside the robustbench
package (helper_files/imagenet_test_image_ids.txt: 5,000 ``<wnid>/<file>`` lines;
helper_files/imagenet_class_to_id_map.json: wnid -> index, the sorted-wnid order torchvision uses).
They are read without importing robustbench (which pulls torchvision and timm). Images are decoded
only when asked for, so a 512-image subset costs 512 decodes, not 5,000.

`authors_subset` draws DiffPure's images instead, which are *not* from RobustBench's list: the
authors (utils.load_data -> data.imagenet_lmdb_dataset_sub) index all 50,000 validation images in
torchvision ImageFolder's order (class folders sorted by wnid, then file names sorted within each;
labels the sorted-wnid index, which RobustBench's class map equals) and draw
RandomState(data_seed).choice(50000, 16, replace=False) per data seed (run_scripts/imagenet:
--num_sub 16; README: data seeds 0..31, so 512 images). So that mode lists the whole val/ folder
and needs all 50,000 images there (allow_partial accepts fewer, the draws then differ).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from benchkit.dataset import Dataset
from benchkit.errors import BadInput, MissingAsset

SOURCE = ("the ILSVRC2012 validation set (https://image-net.org/download-images.php, ILSVRC2012_img_val.tar), "
          "sorted into one folder per class, root/val/<wnid>/<file>.JPEG, as torchvision's ImageFolder and "
          "RobustBench expect")
INSTALL_HINT = "pip install -e '.[robustbench]'"
LIST_FILE = "helper_files/imagenet_test_image_ids.txt"
CLASS_FILE = "helper_files/imagenet_class_to_id_map.json"
RESIZE, CROP = 256, 224
N_VAL = 50_000
# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder lists (compared lower-cased).
IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _robustbench_dir() -> Path:
    """robustbench's package folder, located without importing it."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput("dataset 'imagenet' needs the robustbench extra for RobustBench's 5000-image ImageNet "
                       f"list: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _read_robustbench(name: str) -> str:
    try:
        return (_robustbench_dir() / name).read_text()
    except OSError as exc:
        raise BadInput(f"robustbench's ImageNet list cannot be read ({type(exc).__name__}: {exc}); "
                       f"reinstall the extra: {INSTALL_HINT}") from None


def class_map() -> dict[str, int]:
    """wnid -> class index (RobustBench's map: the sorted-wnid order of torchvision's ImageFolder)."""
    try:
        return {k: int(v) for k, v in json.loads(_read_robustbench(CLASS_FILE)).items()}
    except ValueError as exc:
        raise BadInput(f"robustbench's ImageNet class map cannot be read ({exc}); reinstall the extra: "
                       f"{INSTALL_HINT}") from None


def robustbench_list() -> list[tuple[str, int]]:
    """RobustBench's 5,000 (relative path under val/, class index), in its order."""
    lines = _read_robustbench(LIST_FILE).split()
    class_to_idx = class_map()
    return [(rel, class_to_idx[rel.split("/")[0]]) for rel in lines]


def imagefolder_list(val: Path) -> list[str]:
    """Every image under val/ (paths relative to it) in torchvision ImageFolder's order, the order
    DiffPure indexes: class folders sorted by name, each walked (os.walk, sorted, links followed)
    with its file names sorted, keeping IMAGEFOLDER_EXTENSIONS."""
    out = []
    for wnid in sorted(e.name for e in os.scandir(val) if e.is_dir()):
        for folder, _, names in sorted(os.walk(val / wnid, followlinks=True)):
            out += [os.path.relpath(os.path.join(folder, f), val) for f in sorted(names)
                    if f.lower().endswith(IMAGEFOLDER_EXTENSIONS)]
    return out


def authors_selected(val: Path, n: int, batch: int, allow_partial: bool = False) -> list[tuple[str, int]]:
    """DiffPure's images: (path under val/, class index) at `authors_indices` over the ImageFolder
    listing of the whole val/ folder."""
    from benchkit_data.images import authors_indices

    listing = imagefolder_list(val)
    if len(listing) != N_VAL and not allow_partial:
        raise BadInput(f"{val}: {len(listing)} images, not ImageNet's {N_VAL:,} validation images; authors_subset "
                       "draws from the ImageFolder listing of all of them (set allow_partial: true to use these "
                       "anyway: the images then differ from the paper's)")
    classes = class_map()
    unknown = sorted({rel.split(os.sep)[0] for rel in listing} - set(classes))
    if unknown:
        raise BadInput(f"{val}: folder(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} are not "
                       "ImageNet class wnids; expected val/<wnid>/<file>.JPEG")
    return [(listing[i].replace(os.sep, "/"), classes[listing[i].split(os.sep)[0]])
            for i in authors_indices(len(listing), n, batch)]


def selected(n: int | None, subset_seed: int | None) -> list[tuple[str, int]]:
    from benchkit_data.images import subset

    items = robustbench_list()
    return [items[i] for i in subset(len(items), n, subset_seed)]


class ImageNetVal(Dataset):
    """The selected validation images, decoded and preprocessed on access."""

    name = "imagenet-val"
    num_classes = 1000

    def __init__(self, paths: list[Path], labels: list[int]):
        self.paths, self.labels = paths, torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        from benchkit_data.images import load_image

        idx = [int(i) for i in indices]
        x = torch.stack([load_image(self.paths[i], resize=RESIZE, crop=CROP) for i in idx]) if idx else \
            torch.zeros(0, 3, CROP, CROP)
        return x, self.labels[idx]


def load(root: Path, n: int | None, subset_seed: int | None, authors_batch: int | None = None,
         allow_partial: bool = False) -> ImageNetVal:
    """RobustBench's list (all, the first n, or n drawn with subset_seed), or with authors_batch
    and n, DiffPure's draws over the whole val/ folder (n None: RobustBench's list, the split)."""
    from benchkit_data.images import missing_lines, require_pillow

    val = root / "val"
    if not val.is_dir():
        raise MissingAsset(f"missing folder {val}: get it from {SOURCE}")
    if authors_batch is not None and n is not None:
        items = authors_selected(val, n, authors_batch, allow_partial)
    else:
        items = selected(n, subset_seed)
    paths = [val / rel for rel, _ in items]
    missing = missing_lines(paths, SOURCE)
    if missing:
        raise MissingAsset(missing)
    require_pillow("dataset 'imagenet'")
    return ImageNetVal(paths, [label for _, label in items])
