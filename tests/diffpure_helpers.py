"""Score models for the DiffPure tests: an analytic Gaussian toy and a tiny random conv net."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from benchkit_diffpure import sde
from benchkit_diffpure.score import ScoreModel


def _col(v: Tensor, x: Tensor) -> Tensor:
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))


class GaussianScore(ScoreModel):
    """Data N(mu0, sigma0^2 I) (sigma0^2 may differ per image). The forward marginal at t is
    N(sqrt(a) mu0, v I) with a = alpha(t), v = a sigma0^2 + 1 - a, so score = -(x - sqrt(a) mu0)/v and
    eps = -std(t) score = sqrt(1 - a)(x - sqrt(a) mu0)/v."""

    def __init__(self, mu0: float = 0.0, sigma2: float | Tensor = 1.0):
        super().__init__()
        self.mu0 = nn.Parameter(torch.tensor(float(mu0)))  # a parameter, to check none ever gets a gradient
        self.register_buffer("sigma2", torch.as_tensor(sigma2, dtype=torch.float32).reshape(-1))

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        a = _col(sde.alpha(t), x)
        s2 = _col(self.sigma2, x)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu0) / (a * s2 + 1 - a)


class DiscreteGaussianScore(ScoreModel):
    """The same Gaussian data on the discrete 1000-step chain: at step index i, x ~ N(sqrt(abar_i) mu0,
    abar_i sigma0^2 + 1 - abar_i), so the exact eps is sqrt(1 - abar_i)(x - sqrt(abar_i) mu0)/V_i, with
    abar the (float64) cumulative product of SDEdit's betas. Float times t map to step floor(1000 t)."""

    discrete_time = True

    def __init__(self, mu0: float = 0.0, sigma2: float | Tensor = 1.0):
        super().__init__()
        self.mu0 = float(mu0)
        self.register_buffer("sigma2", torch.as_tensor(sigma2, dtype=torch.float64).reshape(-1))
        betas = torch.linspace(1e-4, 0.02, sde.DISCRETE_STEPS, dtype=torch.float64)
        self.register_buffer("abar", torch.cumprod(1 - betas, 0))
        self.calls: list[list[int]] = []

    def eps_index(self, x: Tensor, index: Tensor) -> Tensor:
        self.calls.append(index.tolist())
        a = _col(self.abar[index], x)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu0) / (a * _col(self.sigma2, x) + 1 - a)

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        return self.eps_index(x, torch.floor(t.float() * sde.DISCRETE_STEPS).long())


def eq31_gradient(t_star: float, sigma2: Tensor) -> Tensor:
    """Appendix B.5, Eq. 31: d x(0)/d x(t*) = sqrt(a) sigma0^2 / (1 - a + sigma0^2 a), a = alpha(t*)."""
    a = sde.alpha(torch.tensor(t_star, dtype=torch.float64))
    return a.sqrt() * sigma2 / (1 - a + sigma2 * a)


class TinyConvScore(ScoreModel):
    """A small random conv net with a time input, standing in for a real noise predictor."""

    def __init__(self, channels: int = 3, hidden: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.temb = nn.Linear(1, hidden)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.tanh(self.conv1(x) + self.temb(t.view(-1, 1).to(x.dtype))[:, :, None, None])
        return self.conv2(h)
