"""One interface for every score network: noise prediction eps(x, t) and score = -eps / std(t).

x is in [-1, 1]; t is the forward diffusion time in [0, 1], one value per image ([B] tensor).
Each wrapper converts t to what its network was trained on.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from benchkit_diffpure import sde


class ScoreModel(nn.Module):
    """Base class: subclasses implement `eps`. `discrete_forward` says whether the forward
    diffusion uses the discrete 1000-step alpha-bar (models trained on that schedule)."""

    discrete_forward: bool = False

    def eps(self, x: Tensor, t: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        std = sde.marginal_std(t).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return -self.eps(x, t) / std
