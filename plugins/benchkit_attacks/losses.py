"""Per-example attack losses (reduction none: EOT averages them per image), all to be maximised."""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _true_and_best_other(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    true = logits.gather(1, y[:, None]).squeeze(1)
    # Mask with -inf rather than subtracting a constant so huge logits cannot win by accident.
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return true, others.amax(1)


def cw_margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """max_{j != y} z_j - z_y (Carlini & Wagner f6 with kappa = inf): positive once misclassified."""
    true, other = _true_and_best_other(logits, y)
    return other - true


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020): the CW margin made scale-invariant."""
    true, other = _true_and_best_other(logits, y)
    top = logits.sort(1, descending=True).values
    third = top[:, 2] if logits.shape[1] > 2 else top[:, -1]
    return (other - true) / (top[:, 0] - third + 1e-12)


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "cw": cw_margin_loss, "dlr": dlr_loss}
