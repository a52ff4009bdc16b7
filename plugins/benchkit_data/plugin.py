"""Registers the datasets."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

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


AUTHORS_SUBSET_HELP = ("DiffPure's own fixed images (NVlabs/DiffPure data/datasets.py): data seed s = 0 .. "
                       "n/authors_batch - 1 draws numpy.random.RandomState(s).choice(N, authors_batch, "
                       "replace=False) over the split's N images; image i is draw i % authors_batch of seed "
                       "i // authors_batch, duplicates across seeds kept. Needs n (a multiple of authors_batch); "
                       "an explicit n: null is the whole split. Exclusive with subset_seed")


class AuthorsSubset(Params):
    """The `authors_subset` / `authors_batch` params shared by the datasets DiffPure evaluates.
    Subclasses set authors_batch's default to the authors' images per data seed and declare
    `n` and `subset_seed`."""

    authors_subset: bool = Field(False, description=AUTHORS_SUBSET_HELP)
    authors_batch: int = Field(64, ge=1, description="images per data seed with authors_subset")

    @model_validator(mode="after")
    def _authors_subset_rules(self):
        if not self.authors_subset:
            return self
        if getattr(self, "subset_seed", None) is not None:
            raise PydanticCustomError("authors_subset", "authors_subset and subset_seed are exclusive: "
                                      "authors_subset fixes the images by DiffPure's data seeds")
        # n absent is a mistake; n given as null is the whole split (the host rebuilds the dataset
        # that way for eval.clean_on: split), where the draws do not apply.
        if "n" not in self.model_fields_set:
            raise PydanticCustomError("authors_subset", "authors_subset needs n, a multiple of authors_batch = "
                                      "{batch} (that many images per data seed)", {"batch": self.authors_batch})
        n = getattr(self, "n", None)
        if n is not None and n % self.authors_batch:
            raise PydanticCustomError("authors_subset", "authors_subset: n = {n} is not a multiple of "
                                      "authors_batch = {batch} (images per data seed)",
                                      {"n": n, "batch": self.authors_batch})
        return self

    def authors_batch_or_none(self) -> int | None:
        """authors_batch when the authors' draws apply, for the loaders."""
        return self.authors_batch if self.authors_subset else None


class Cifar10Params(AuthorsSubset):
    split: Literal["train", "test"] = "test"
    n: int | None = Field(None, ge=1, description="number of images (default: all)")
    subset_seed: int | None = Field(None, description="draw the n images at random with this seed (else the first n)")
    root: str | None = Field(None, description="folder holding cifar-10-batches-py/ (default BENCHKIT_HOME/cifar10)")
    # run_scripts/cifar10/*.sh: --num_sub 64 per data seed (README: seeds 0..7, 512 images);
    # the BPDA script draws 200 per seed (seeds 0..4).
    authors_batch: int = Field(64, ge=1, description="images per data seed with authors_subset (DiffPure: 64)")


def _cifar10_root(p: Cifar10Params) -> Path:
    from benchkit.assets import home

    return Path(p.root).expanduser() if p.root else home() / "cifar10"


def cifar10(p: Cifar10Params):
    from benchkit_data import cifar10 as c

    return c.load(_cifar10_root(p), p.split, p.n, p.subset_seed, p.authors_batch_or_none())


def cifar10_assets(p: Cifar10Params) -> list:
    from benchkit_data import cifar10 as c

    return [(c.batch_asset(str(f.relative_to(_cifar10_root(p))), f.name), f) for f in c.files(_cifar10_root(p), p.split)]


class ImageNetParams(AuthorsSubset):
    n: int | None = Field(None, ge=1, le=5000, description="number of images of RobustBench's 5000 (default: all); "
                                                           "with authors_subset, of DiffPure's draws")
    subset_seed: int | None = Field(None, description="draw the n images at random with this seed (else the first n "
                                                      "in RobustBench's order)")
    root: str | None = Field(None, description="folder holding val/<wnid>/<file>.JPEG (default BENCHKIT_HOME/imagenet)")
    # run_scripts/imagenet/*.sh: --num_sub 16 per data seed (README: seeds 0..31, 512 images). The
    # draws are over all 50,000 val images in ImageFolder order, not RobustBench's 5,000.
    authors_batch: int = Field(16, ge=1, description="images per data seed with authors_subset (DiffPure: 16)")
    allow_partial: bool = Field(False, description="authors_subset: accept a val/ folder with fewer than the "
                                                   "50,000 images (the draws then differ from the paper's)")


def _imagenet_root(p: ImageNetParams) -> Path:
    from benchkit.assets import home

    return Path(p.root).expanduser() if p.root else home() / "imagenet"


def imagenet(p: ImageNetParams):
    from benchkit_data import imagenet as m

    return m.load(_imagenet_root(p), p.n, p.subset_seed, p.authors_batch_or_none(), p.allow_partial)


def imagenet_assets(p: ImageNetParams) -> list:
    """The val/ folder; once it is there, every selected image that is not (needs robustbench's list)."""
    from benchkit.assets import Asset
    from benchkit_data import imagenet as m

    val = _imagenet_root(p) / "val"
    out = [(Asset("imagenet/val", m.SOURCE), val)]
    if p.authors_subset and p.n is not None:
        return out  # the draws index the folder's whole listing: load() checks it has all 50,000
    if val.is_dir():
        out += [(Asset(f"imagenet/val/{rel}", m.SOURCE), val / rel) for rel, _ in m.selected(p.n, p.subset_seed)
                if not (val / rel).is_file()]
    return out


class CelebAHQParams(AuthorsSubset):
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
    # run_scripts/celebahq/*.sh: --adv_batch_size 2 on 4 GPUs, the first batch of 8 per data seed
    # (README: seeds 0..63, 512 images); see benchkit_data.celebahq.
    authors_batch: int = Field(8, ge=1, description="images per data seed with authors_subset (DiffPure: 8)")

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

    return m.load(_celebahq_root(p), p.layout, p.split, p.attribute, p.n, p.subset_seed, p.allow_partial,
                  p.authors_batch_or_none())


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
