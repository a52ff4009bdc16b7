"""Registers the datasets."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from benchkit.dataset import TensorDataset
from benchkit.hookspecs import hookimpl
from benchkit.params import Params


class DigitsParams(Params):
    split: Literal["train", "test"] = "test"
    n: int | None = Field(None, ge=1, description="use the first n images of the split (default: all)")


def digits(p: DigitsParams) -> TensorDataset:
    from benchkit_data.digits import load_digits_split

    x, y = load_digits_split(p.split)
    if p.n is not None:
        x, y = x[: p.n], y[: p.n]
    return TensorDataset(x, y, name=f"digits-{p.split}")


class Cifar10Params(Params):
    split: Literal["train", "test"] = "test"
    n: int | None = Field(None, ge=1, description="number of images (default: all)")
    subset_seed: int | None = Field(None, description="draw the n images at random with this seed (else the first n)")
    root: str | None = Field(None, description="folder holding cifar-10-batches-py/ (default BENCHKIT_HOME/cifar10)")


def _cifar10_root(p: Cifar10Params) -> Path:
    from benchkit.assets import home

    return Path(p.root).expanduser() if p.root else home() / "cifar10"


def cifar10(p: Cifar10Params):
    from benchkit_data import cifar10 as c

    return c.load(_cifar10_root(p), p.split, p.n, p.subset_seed)


def cifar10_assets(p: Cifar10Params) -> list:
    from benchkit.assets import Asset
    from benchkit_data import cifar10 as c

    return [(Asset(str(f.relative_to(_cifar10_root(p))), c.SOURCE), f) for f in c.files(_cifar10_root(p), p.split)]


class ImageNetParams(Params):
    n: int | None = Field(None, ge=1, le=5000, description="number of images of RobustBench's 5000 (default: all)")
    subset_seed: int | None = Field(None, description="draw the n images at random with this seed (else the first n "
                                                      "in RobustBench's order)")
    root: str | None = Field(None, description="folder holding val/<wnid>/<file>.JPEG (default BENCHKIT_HOME/imagenet)")


def _imagenet_root(p: ImageNetParams) -> Path:
    from benchkit.assets import home

    return Path(p.root).expanduser() if p.root else home() / "imagenet"


def imagenet(p: ImageNetParams):
    from benchkit_data import imagenet as m

    return m.load(_imagenet_root(p), p.n, p.subset_seed)


def imagenet_assets(p: ImageNetParams) -> list:
    """The val/ folder; once it is there, every selected image that is not (needs robustbench's list)."""
    from benchkit.assets import Asset
    from benchkit_data import imagenet as m

    val = _imagenet_root(p) / "val"
    out = [(Asset("imagenet/val", m.SOURCE), val)]
    if val.is_dir():
        out += [(Asset(f"imagenet/val/{rel}", m.SOURCE), val / rel) for rel, _ in m.selected(p.n, p.subset_seed)
                if not (val / rel).is_file()]
    return out


class CelebAHQParams(Params):
    attribute: str = Field("Eyeglasses", description="CelebA attribute giving the binary label (1 = present)")
    split: Literal["train", "val", "test"] = Field("val", description="CelebA partition (DiffPure evaluates val)")
    n: int | None = Field(None, ge=1, description="number of images of the split (default: all)")
    subset_seed: int | None = Field(None, description="draw the n images at random with this seed (else the first n)")
    layout: Literal["diffpure", "celebamask-hq"] = Field(
        "diffpure", description="diffpure: images/<CelebA name>.png + list_attr_celeba.txt; celebamask-hq: "
                                "CelebA-HQ-img/<i>.jpg + CelebAMask-HQ-attribute-anno.txt + CelebA-HQ-to-CelebA-mapping.txt; "
                                "both with CelebA's list_eval_partition.txt")
    root: str | None = Field(None, description="dataset folder (default BENCHKIT_HOME/celebahq)")
    allow_partial: bool = Field(False, description="diffpure layout: accept fewer than the 30,000 images "
                                                   "(the subset then differs from the paper's)")

    @field_validator("attribute")
    @classmethod
    def _known_attribute(cls, v: str) -> str:
        return check_celeba_attribute(v)


def check_celeba_attribute(v: str) -> str:
    import difflib

    from benchkit_data.celebahq import ATTRIBUTES

    if v not in ATTRIBUTES:
        close = difflib.get_close_matches(v, ATTRIBUTES, n=1, cutoff=0.6)
        raise ValueError(f"unknown CelebA attribute '{v}'" + (f"; did you mean '{close[0]}'?" if close else
                                                               f" (one of: {', '.join(ATTRIBUTES)})"))
    return v


def _celebahq_root(p: CelebAHQParams) -> Path:
    from benchkit.assets import home

    return Path(p.root).expanduser() if p.root else home() / "celebahq"


def celebahq(p: CelebAHQParams):
    from benchkit_data import celebahq as m

    return m.load(_celebahq_root(p), p.layout, p.split, p.attribute, p.n, p.subset_seed, p.allow_partial)


def celebahq_assets(p: CelebAHQParams) -> list:
    from benchkit_data import celebahq as m

    return m.files(_celebahq_root(p), p.layout)


@hookimpl
def register_datasets(register):
    register("digits", digits, params=DigitsParams,
             description="scikit-learn's 8x8 digits in [0,1], 1 channel; fixed split: 450 test / 1347 train")
    register("cifar10", cifar10, params=Cifar10Params, assets=cifar10_assets,
             description="CIFAR-10 from the python-pickle batches under BENCHKIT_HOME/cifar10 (or root)")
    register("imagenet", imagenet, params=ImageNetParams, assets=imagenet_assets,
             description="ImageNet val, RobustBench's 5000-image list (robustbench extra), val/<wnid>/<file>.JPEG "
                         "under BENCHKIT_HOME/imagenet (or root); Resize(256) + CenterCrop(224)")
    register("celebahq", celebahq, params=CelebAHQParams, assets=celebahq_assets,
             description="CelebA-HQ 256x256 with one binary CelebA attribute as label, DiffPure's order and split "
                         "(val), under BENCHKIT_HOME/celebahq (or root)")
