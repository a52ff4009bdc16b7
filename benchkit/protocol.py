"""The verification protocol: how purifications of one example become verdicts.

The host verifies every returned example with it (evaluate.verdicts, its own seeds); an attack may
judge its iterates with the same protocol (`Protocol.correct`, the attack's own noise streams) to keep
each image's best example across iterations (DiffHammer's N-evaluation). Both aggregate the same way:
single: one purification; mean-logits: the argmax of the averaged logits; majority: the true label must
have strictly more votes than any other label (a tie is not correct).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from benchkit.defended import DefendedModel

AGGREGATES = ("single", "mean-logits", "majority")


def tally(logits: Tensor, aggregate: str) -> Tensor:
    """What one purification adds to its verdict's total ([..., classes]): its logits, or under
    majority a one-hot vote for its predicted label."""
    if aggregate == "majority":
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return logits


def decide(total: Tensor, y: Tensor, aggregate: str) -> Tensor:
    """Correct or not per image ([B] bool) from the summed tallies [B, classes]."""
    if aggregate != "majority":
        return total.argmax(1) == y
    true = total.gather(1, y[:, None]).squeeze(1)
    others = total.scatter(1, y[:, None], float("-inf")).amax(1)
    return true > others


@dataclass(frozen=True)
class Protocol:
    """`repeats` verdicts per example, each from `samples` purifications combined by `aggregate`."""

    repeats: int = 1
    aggregate: str = "single"
    samples: int = 1

    def __post_init__(self):
        if self.aggregate not in AGGREGATES or self.repeats < 1 or self.samples < 1:
            raise ValueError(f"bad protocol {self}")

    @torch.no_grad()
    def correct(self, model: DefendedModel, x: Tensor, y: Tensor) -> Tensor:
        """[repeats, B] bool: each verdict on x, from fresh purifications drawn from the model's own
        noise (one verdict for a deterministic defense: it would give the same answer every time)."""
        if not model.stochastic:
            return (model.logits(x).argmax(1) == y)[None]
        k = self.samples
        logits = model.sample_logits(x, self.repeats * k).float()   # [repeats * k, B, classes]
        total = tally(logits, self.aggregate).view(self.repeats, k, *logits.shape[1:]).sum(1)
        return torch.stack([decide(t, y, self.aggregate) for t in total])
