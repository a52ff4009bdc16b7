"""CelebA-HQ at 256x256 with one binary CelebA attribute as the label, as DiffPure evaluates it.

DiffPure (data/datasets.py, CelebAHQDataset, after Chai et al. 2021's gan-ensembling) orders the
30,000 CelebA-HQ images by their CelebA file name, takes the labels from CelebA's
list_attr_celeba.txt (-1 -> 0) and the split from CelebA's list_eval_partition.txt (0 train,
1 val, 2 test), evaluates the *val* partition, and resizes with torchvision's Resize(256) (the
published images are 1024x1024). Two on-disk layouts give that same order and those labels:

``layout: diffpure`` (DiffPure's ./dataset/celebahq, gan-ensembling's dataset/celebahq)::

    root/images/<CelebA name>.png          000004.png, 000009.png, ... (30,000 images)
    root/list_attr_celeba.txt              CelebA's attribute file
    root/list_eval_partition.txt           CelebA's partition file

``layout: celebamask-hq`` (the CelebAMask-HQ release, plus CelebA's partition file)::

    root/CelebA-HQ-img/<i>.jpg             0.jpg ... 29999.jpg
    root/CelebAMask-HQ-attribute-anno.txt  the same 40 attributes, keyed by <i>.jpg
    root/CelebA-HQ-to-CelebA-mapping.txt   idx, orig_idx, orig_file (the CelebA name of image i)
    root/list_eval_partition.txt           CelebA's partition file

With the mapping, image i takes the place of its CelebA name in DiffPure's order, so the same
subset_seed picks the same faces in both layouts (the pixels differ slightly: CelebAMask-HQ
re-encodes them as JPEG).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from benchkit.assets import Asset
from benchkit.dataset import Dataset
from benchkit.errors import BadInput, MissingAsset

ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")
SPLITS = {"train": 0, "val": 1, "test": 2}
N_IMAGES = 30_000
SIZE = 256
IMAGE_EXTS = (".png", ".jpg", ".jpeg")

CELEBA = "CelebA (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html)"
SOURCES = {
    "images": "CelebA-HQ 1024x1024, built with progressive_growing_of_gans' dataset_tool.py create_celebahq "
              "(https://github.com/tkarras/progressive_growing_of_gans) and saved as PNGs named after their "
              "CelebA image (000004.png, ...), the layout of DiffPure's README and gan-ensembling's "
              "(https://github.com/chail/gan-ensembling)",
    "list_attr_celeba.txt": f"{CELEBA}, Anno/list_attr_celeba.txt",
    "list_eval_partition.txt": f"{CELEBA}, Eval/list_eval_partition.txt",
    "CelebA-HQ-img": "CelebAMask-HQ (https://github.com/switchablenorms/CelebAMask-HQ), CelebAMask-HQ.zip",
    "CelebAMask-HQ-attribute-anno.txt": "CelebAMask-HQ (https://github.com/switchablenorms/CelebAMask-HQ), "
                                        "CelebAMask-HQ.zip",
    "CelebA-HQ-to-CelebA-mapping.txt": "CelebAMask-HQ (https://github.com/switchablenorms/CelebAMask-HQ), "
                                       "CelebAMask-HQ.zip",
}
# CelebA's own files on its Google Drive (needs gdown, else a manual step), with the file ids and md5
# torchvision downloads and checks (datasets/celeba.py, CelebA.file_list). The images (built with a
# script from CelebA and its deltas) and CelebAMask-HQ have no direct address: manual steps.
DRIVE = {"list_attr_celeba.txt": ("https://drive.google.com/uc?id=0B7EVK8r0v71pblRyaVFSWGxPY0U",
                                  "75e246fa4810816ffd6ee81facbd244c"),
         "list_eval_partition.txt": ("https://drive.google.com/uc?id=0B7EVK8r0v71pY0NSMzRuSXJEVkk",
                                     "d32c9cbf5e040fd4025c592c306e6668")}
LAYOUT_FILES = {
    "diffpure": ("images", "list_attr_celeba.txt", "list_eval_partition.txt"),
    "celebamask-hq": ("CelebA-HQ-img", "CelebAMask-HQ-attribute-anno.txt", "CelebA-HQ-to-CelebA-mapping.txt",
                      "list_eval_partition.txt"),
}


def files(root: Path, layout: str) -> list[tuple[Asset, Path]]:
    """Every file or folder the layout needs: (asset, its path under root)."""
    def asset(name: str) -> Asset:
        url, md5 = DRIVE.get(name, (None, None))
        return Asset(f"celebahq/{name}", SOURCES[name], url=url, md5=md5)

    return [(asset(name), root / name) for name in LAYOUT_FILES[layout]]


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MissingAsset(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def read_attributes(path: Path, attribute: str) -> dict[str, int]:
    """file name -> 0/1 for one attribute, from a CelebA-style attribute file
    (line 1: count, line 2: the attribute names, then `name v1 ... v40` with v in {-1, 1})."""
    lines = _lines(path)
    if len(lines) < 2:
        raise MissingAsset(f"{path}: not a CelebA attribute file (fewer than 2 lines)")
    names = lines[1].split()
    if attribute not in names:
        raise MissingAsset(f"{path}: no attribute '{attribute}' in its header; is it a CelebA attribute file?")
    col = names.index(attribute) + 1
    out = {}
    for lineno, line in enumerate(lines[2:], 3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1 or parts[col] not in ("1", "-1"):
            raise MissingAsset(f"{path}: line {lineno}: expected a file name and {len(names)} values of 1 or -1")
        out[parts[0]] = int(parts[col] == "1")
    return out


def read_partition(path: Path) -> dict[str, int]:
    out = {}
    for lineno, line in enumerate(_lines(path), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise MissingAsset(f"{path}: line {lineno}: expected '<file> <0|1|2>'")
        out[parts[0]] = int(parts[1])
    return out


def read_mapping(path: Path) -> dict[str, str]:
    """CelebAMask-HQ image name (<idx>.jpg) -> its CelebA file name."""
    lines = _lines(path)
    if not lines or lines[0].split()[:3] != ["idx", "orig_idx", "orig_file"]:
        raise MissingAsset(f"{path}: not CelebAMask-HQ's CelebA-HQ-to-CelebA-mapping.txt (header 'idx orig_idx orig_file')")
    out = {}
    for lineno, line in enumerate(lines[1:], 2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise MissingAsset(f"{path}: line {lineno}: expected 'idx orig_idx orig_file'")
        out[f"{parts[0]}.jpg"] = parts[2]
    return out


def index(root: Path, layout: str, attribute: str, allow_partial: bool = False) -> list[tuple[Path, int, int]]:
    """(image path, label, partition) of every image, in DiffPure's order (by CelebA file name)."""
    missing = [f"missing {'folder' if not Path(n).suffix else 'file'} {p}: get it from {a.source}"
               for (a, p), n in zip(files(root, layout), LAYOUT_FILES[layout]) if not p.exists()]
    if missing:
        raise MissingAsset(missing)
    partition = read_partition(root / "list_eval_partition.txt")
    if layout == "diffpure":
        folder = root / "images"
        if not any(f.lower().endswith(IMAGE_EXTS) for f in os.listdir(folder)) and (folder / "images").is_dir():
            folder = folder / "images"  # gan-ensembling's README nests them: images/images/
        names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
        if len(names) != N_IMAGES and not allow_partial:
            raise BadInput(f"{folder}: {len(names)} images, not CelebA-HQ's {N_IMAGES:,}; DiffPure's subset is drawn "
                           "from the sorted listing of all of them (set allow_partial: true to use these anyway)")
        labels = read_attributes(root / "list_attr_celeba.txt", attribute)
        entries = [(folder / f, f"{os.path.splitext(f)[0]}.jpg") for f in names]
    else:
        mapping = read_mapping(root / "CelebA-HQ-to-CelebA-mapping.txt")
        hq_labels = read_attributes(root / "CelebAMask-HQ-attribute-anno.txt", attribute)
        labels = {mapping[k]: v for k, v in hq_labels.items() if k in mapping}
        entries = sorted(((root / "CelebA-HQ-img" / k, v) for k, v in mapping.items()), key=lambda e: e[1])
    out = []
    for path, celeba_name in entries:
        if celeba_name not in labels or celeba_name not in partition:
            where = "attribute" if celeba_name not in labels else "partition"
            raise MissingAsset(f"{path}: its CelebA name {celeba_name} is not in the {where} file; "
                               "is the folder CelebA-HQ with images named as the layout expects?")
        out.append((path, labels[celeba_name], partition[celeba_name]))
    return out


# DiffPure (utils.load_data, domain celebahq) builds CelebAHQDataset('val', attribute, fraction=2,
# data_seed=s): RandomState(s).choice(partition_idx, int(0.02 * len(partition_idx)), replace=False),
# partition_idx the val rows in the order above, and evaluates the DataLoader's first batch of
# adv_batch_size * ngpus = 2 * 4 = 8 images (run_scripts/celebahq: --adv_batch_size 2 on
# CUDA_VISIBLE_DEVICES=0,1,2,3). choice without replacement is permutation(N)[:k], so those 8 are
# the val rows at RandomState(s).choice(len(val), 8, replace=False): the rule every authors_subset
# dataset follows. It holds while int(0.02 * len(val)) >= 8 (CelebA-HQ's val partition has a few
# thousand images); the README's 64 data seeds x 8 = 512 images.


class CelebAHQ(Dataset):
    """Selected images, decoded and resized to 256x256 on access."""

    num_classes = 2

    def __init__(self, paths: list[Path], labels: list[int], name: str):
        self.paths, self.labels, self.name = paths, torch.tensor(labels, dtype=torch.long), name

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        from benchkit_data.images import load_image

        idx = [int(i) for i in indices]
        out = []
        for i in idx:
            img = load_image(self.paths[i], resize=SIZE)
            if img.shape[-2:] != (SIZE, SIZE):
                raise BadInput(f"{self.paths[i]}: not square ({tuple(img.shape[-2:])} after Resize({SIZE})); "
                               "CelebA-HQ images are 1024x1024")
            out.append(img)
        x = torch.stack(out) if out else torch.zeros(0, 3, SIZE, SIZE)
        return x, self.labels[idx]


def load(root: Path, layout: str, split: str, attribute: str, n: int | None, subset_seed: int | None,
         allow_partial: bool = False, authors_batch: int | None = None) -> CelebAHQ:
    """The split's images in DiffPure's order: all, the first n, n drawn with subset_seed, or
    (authors_batch) DiffPure's own draws over the split's positions (see the comment above CelebAHQ)."""
    from benchkit_data.images import missing_lines, require_pillow, subset

    rows = [r for r in index(root, layout, attribute, allow_partial) if r[2] == SPLITS[split]]
    if not rows:
        raise BadInput(f"{root}: no images in the {split} partition")
    chosen = [rows[i] for i in subset(len(rows), n, subset_seed, authors_batch)]
    missing = missing_lines([p for p, _, _ in chosen], SOURCES["CelebA-HQ-img" if layout != "diffpure" else "images"])
    if missing:
        raise MissingAsset(missing)
    require_pillow("dataset 'celebahq'")
    return CelebAHQ([p for p, _, _ in chosen], [y for _, y, _ in chosen], name=f"celebahq-{split}-{attribute}")
