"""Registers the datasets."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

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


@hookimpl
def register_datasets(register):
    register("digits", digits, params=DigitsParams,
             description="scikit-learn's 8x8 digits in [0,1], 1 channel; fixed split: 450 test / 1347 train")
    register("cifar10", cifar10, params=Cifar10Params, assets=cifar10_assets,
             description="CIFAR-10 from the python-pickle batches under BENCHKIT_HOME/cifar10 (or root)")
