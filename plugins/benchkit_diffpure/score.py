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


class ContinuousTimeScore(ScoreModel):
    """Networks trained on continuous t that take the label t * 999 (score_sde DDPM++, digits-unet)."""

    def __init__(self, net: nn.Module, label_scale: float = 999.0):
        super().__init__()
        # Frozen and in eval mode from the start: dropout off, no parameter gradients ever.
        self.net, self.label_scale = net.eval().requires_grad_(False), label_scale

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        # float32 labels, not rounded: the network was trained on fractional labels.
        return self.net(x, (t * self.label_scale).to(x.dtype))


class DiscreteTimeScore(ScoreModel):
    """Networks trained on the discrete 1000-step DDPM schedule (guided-diffusion ADM, SDEdit DDPM):
    they take the integer step floor(t * 1000) (as DiffPure calls them, bypassing guided-diffusion's
    timestep rescaling) and their first `eps_channels` outputs are the noise prediction (ADM also
    predicts variances). The input is diffused with the discrete alpha-bar."""

    discrete_forward = True

    def __init__(self, net: nn.Module, eps_channels: int = 3, steps: int = sde.DISCRETE_STEPS):
        super().__init__()
        self.net, self.eps_channels, self.steps = net.eval().requires_grad_(False), eps_channels, steps

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        timesteps = torch.floor(t.float() * self.steps).long().clamp(0, self.steps - 1)
        return self.net(x, timesteps)[:, : self.eps_channels]
