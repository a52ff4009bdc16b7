"""ImageNet validation images: RobustBench's fixed 5,000-image subset, Resize(256) + CenterCrop(224).

Layout (torchvision ImageFolder / RobustBench's ``load_imagenet(data_dir)``)::

    root/val/<wnid>/<file>.JPEG          e.g. root/val/n01440764/ILSVRC2012_val_00000293.JPEG

The image list and the class indices are RobustBench's own files, shipped inside the robustbench
package (helper_files/imagenet_test_image_ids.txt: 5,000 ``<wnid>/<file>`` lines;
helper_files/imagenet_class_to_id_map.json: wnid -> index, the sorted-wnid order torchvision uses).
They are read without importing robustbench (which pulls torchvision and timm). Images are decoded
only when asked for, so a 512-image subset costs 512 decodes, not 5,000.
"""
from __future__ import annotations

import importlib.util
import json
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


def _robustbench_dir() -> Path:
    """robustbench's package folder, located without importing it."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput("dataset 'imagenet' needs the robustbench extra for RobustBench's 5000-image ImageNet "
                       f"list: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def robustbench_list() -> list[tuple[str, int]]:
    """RobustBench's 5,000 (relative path under val/, class index), in its order."""
    base = _robustbench_dir()
    try:
        lines = (base / LIST_FILE).read_text().split()
        class_to_idx = json.loads((base / CLASS_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"robustbench's ImageNet list cannot be read ({type(exc).__name__}: {exc}); "
                       f"reinstall the extra: {INSTALL_HINT}") from None
    return [(rel, int(class_to_idx[rel.split("/")[0]])) for rel in lines]


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


def load(root: Path, n: int | None, subset_seed: int | None) -> ImageNetVal:
    from benchkit_data.images import missing_lines, require_pillow

    val = root / "val"
    if not val.is_dir():
        raise MissingAsset(f"missing folder {val}: get it from {SOURCE}")
    items = selected(n, subset_seed)
    paths = [val / rel for rel, _ in items]
    missing = missing_lines(paths, SOURCE)
    if missing:
        raise MissingAsset(missing)
    require_pillow("dataset 'imagenet'")
    return ImageNetVal(paths, [label for _, label in items])
