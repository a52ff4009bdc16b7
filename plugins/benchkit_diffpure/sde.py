"""The VP-SDE of Song et al. (2021) as DiffPure uses it: every formula of the method lives here.

Time t is the forward diffusion time in [0, 1]; images are in the centred [-1, 1] convention.
"""
from __future__ import annotations

import torch
from torch import Tensor

BETA_MIN = 0.1
BETA_MAX = 20.0
DISCRETE_STEPS = 1000


def beta(t: Tensor | float, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> Tensor:
    """beta(t) = beta_min + (beta_max - beta_min) t (linear schedule)."""
    return beta_min + (beta_max - beta_min) * torch.as_tensor(t)


def log_mean_coeff(t: Tensor | float, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> Tensor:
    """m(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2, so that E[x(t)|x(0)] = e^m x(0)."""
    t = torch.as_tensor(t)
    return -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min


def alpha(t: Tensor | float, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> Tensor:
    """alpha(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2)) (paper Eq. 3's alpha)."""
    return torch.exp(2.0 * log_mean_coeff(t, beta_min, beta_max))


def marginal_std(t: Tensor | float, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> Tensor:
    """std(t) = sqrt(1 - alpha(t)), the forward marginal's standard deviation."""
    return torch.sqrt(1.0 - torch.exp(2.0 * log_mean_coeff(t, beta_min, beta_max)))


def discrete_alphas_cumprod(n: int = DISCRETE_STEPS, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's cumulative alpha-bar over betas = linspace(beta_start, beta_end, n), in float32 as upstream."""
    betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def discrete_alpha_bar(t_star: Tensor | float, n: int = DISCRETE_STEPS) -> Tensor:
    """alpha-bar at step round(t* n), index step-1 (as DiffPure's reference code diffuses the input)."""
    steps = torch.round(torch.as_tensor(t_star, dtype=torch.float64) * n).long().clamp(1, n)
    return discrete_alphas_cumprod(n)[steps - 1]


def diffuse(x0: Tensor, alpha_bar: Tensor, noise: Tensor) -> Tensor:
    """Eq. 3: x(t*) = sqrt(alpha) x0 + sqrt(1 - alpha) eps; alpha_bar is a scalar or one value per image."""
    a = torch.as_tensor(alpha_bar, dtype=x0.dtype, device=x0.device)
    if a.dim() == 1:
        a = a.view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def to_centered(x01: Tensor) -> Tensor:
    return 2.0 * x01 - 1.0


def from_centered(x: Tensor) -> Tensor:
    return (x + 1.0) / 2.0



# Drifts of the samplers, all in forward time t (the solver integrates t from t* down to 0).

def reverse_sde_drift(x: Tensor, t: Tensor, score: Tensor, beta_t: Tensor) -> Tensor:
    """Eq. 4-5: f_rev(x, t) = -beta(t)/2 (x + 2 s(x, t)); the reverse SDE has diffusion sqrt(beta(t))."""
    return -0.5 * beta_t * (x + 2.0 * score)


def probability_flow_drift(x: Tensor, t: Tensor, score: Tensor, beta_t: Tensor) -> Tensor:
    """Eq. 28: the probability-flow ODE dx = -beta(t)/2 (x + s(x, t)) dt (no diffusion)."""
    return -0.5 * beta_t * (x + score)


def langevin_drift(x: Tensor, x_a: Tensor, score0: Tensor, lam: float, sigma2: float) -> Tensor:
    """Eq. 26: dx = -(lambda/2)(-s(x, 0) + (x - x_a)/sigma^2) dt + eta sqrt(lambda) dw."""
    return -0.5 * lam * (-score0 + (x - x_a) / sigma2)


def reverse_sde_diffusion(beta_t: Tensor) -> Tensor:
    """Eq. 4-5: the reverse SDE's diffusion coefficient sqrt(beta(t))."""
    return torch.sqrt(beta_t)


# Eq. 26 needs s(x, 0), but std(0) = 0 makes eps/std singular there: the reference code
# (runners/diffpure_ldsde.py) evaluates the score at t = 1e-2 instead; so do we.
LD_SCORE_TIME = 1e-2


def langevin_diffusion(lam: float, eta: float) -> float:
    """Eq. 26: the Langevin SDE's diffusion coefficient eta sqrt(lambda)."""
    return eta * lam**0.5
