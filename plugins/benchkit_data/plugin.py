"""Registers the datasets."""
from __future__ import annotations

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


@hookimpl
def register_datasets(register):
    register("digits", digits, params=DigitsParams,
             description="scikit-learn's 8x8 digits in [0,1], 1 channel; fixed split: 450 test / 1347 train")
