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


def discrete_betas(n: int = DISCRETE_STEPS, beta_start: float = 1e-4, beta_end: float = 0.02,
                   linspace_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """DDPM's linear betas in float32. The two reference code paths build them differently, which
    shows at the last ulp (6e-8 in alpha-bar): DiffPure's RevVPSDE (vp-sde forward noising) with a
    float32 linspace, SDEdit / the celebahq-ddpm runner with a float64 (numpy) linspace cast to float32."""
    return torch.linspace(beta_start, beta_end, n, dtype=linspace_dtype, device=device).float()


def discrete_alphas_cumprod(n: int = DISCRETE_STEPS, beta_start: float = 1e-4, beta_end: float = 0.02,
                            linspace_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """DDPM's cumulative alpha-bar: float32 cumprod of 1 - betas, as upstream."""
    return torch.cumprod(1.0 - discrete_betas(n, beta_start, beta_end, linspace_dtype, device), dim=0)


def discrete_alpha_bar(t_star: Tensor | float, n: int = DISCRETE_STEPS,
                       linspace_dtype: torch.dtype = torch.float32) -> Tensor:
    """alpha-bar at step round(t* n), index step-1 (as DiffPure's reference code diffuses the input);
    on t_star's device."""
    t_star = torch.as_tensor(t_star)
    steps = torch.round(t_star.double() * n).long().clamp(1, n)
    return discrete_alphas_cumprod(n, linspace_dtype=linspace_dtype, device=t_star.device)[steps - 1]


def diffuse(x0: Tensor, alpha_bar: Tensor, noise: Tensor) -> Tensor:
    """Eq. 3: x(t*) = sqrt(alpha) x0 + sqrt(1 - alpha) eps; alpha_bar is a scalar or one value per image."""
    a = torch.as_tensor(alpha_bar, dtype=x0.dtype, device=x0.device)
    if a.dim() == 1:
        a = a.view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def score_of_eps(eps: Tensor, std: Tensor) -> Tensor:
    """The forward marginal's score from a noise prediction: s(x, t) = -eps(x, t)/std(t)."""
    return -eps / std


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
# ... and a discrete-time network gets the step floor(1e-2 * 1000) = 10 there (its _scale_timesteps).
LD_SCORE_INDEX = 10


def langevin_diffusion(lam: float, eta: float) -> float:
    """Eq. 26: the Langevin SDE's diffusion coefficient eta sqrt(lambda)."""
    return eta * lam**0.5


# The discrete DDPM chain (Ho et al. 2020) of the ddpm / ddim samplers, as SDEdit and DiffPure's
# celebahq-ddpm runner (runners/diffpure_ddpm.py) run it. A *level* l in 0..1000 is the state after l
# forward steps: x_l = sqrt(abar[l-1]) x0 + sqrt(1 - abar[l-1]) eps, level 0 is the data (abar = 1).
# The network's step index of level l is l - 1; a continuous-time model sees t = l/1000.
# Coefficient tables are float32 like upstream's (SDEdit's float64-linspace betas), except the
# posterior log-variance, which upstream computes in float64 (numpy) and casts.

# DDPM's "fixedsmall" variance is log(max(beta_tilde, 1e-20)); the clip only bites at the last step
# (beta_tilde = 0), whose noise upstream masks out, so it never changes a sample.
LOGVAR_FLOOR = 1e-20


def levels_of(t: Tensor, n: int = DISCRETE_STEPS) -> Tensor:
    """The integer level round(t n) of times on the 1/n grid (long, same device); raises off the grid."""
    k = torch.round(t.double() * n)
    if (k - t.double() * n).abs().max() > 1e-4 or (k < 1).any():
        raise ValueError(f"t* must be a positive multiple of 1/{n} here (discrete-time model or sampler), got {t.tolist()}")
    return k.long()


def level_grid(levels: Tensor, n_steps: int) -> Tensor:
    """[n+1, B] integer levels ceil(K_i (n - k)/n), k = 0..n, from each image's start K_i down to 0.

    Exact integer arithmetic. K_i = n gives every level once (DDPM's full chain), K_i > n evenly spaced
    levels; K_i < n repeats levels (zero-length steps, the identity) but never level 0: the last step
    is then 1 -> 0."""
    k = torch.arange(n_steps + 1, device=levels.device).view(-1, 1)
    return (levels.view(1, -1) * (n_steps - k) + n_steps - 1) // n_steps


def _abar_of_level(table: Tensor, level: Tensor) -> Tensor:
    return torch.where(level > 0, table[(level - 1).clamp_min(0)], torch.ones((), dtype=table.dtype, device=table.device))


def ddpm_coefficients(la: Tensor, lb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(c1, c2, std) of the ancestral step from level la to lb <= la (any shape), float32:
    x_lb = c1 (x - c2 eps) + std z with c1 = 1/sqrt(alpha'), c2 = beta'/sqrt(1 - abar_la) (Ho et al. Eq. 11)
    and std^2 = beta_tilde = beta' (1 - abar_lb)/(1 - abar_la) (fixedsmall), std = 0 into level 0 as upstream.

    A unit step uses upstream's beta_la itself; a longer one the respaced beta' = 1 - abar_la/abar_lb
    (guided-diffusion's timestep respacing), which reduces to it."""
    dev = la.device
    b64 = torch.linspace(1e-4, 0.02, DISCRETE_STEPS, dtype=torch.float64, device=dev)  # SDEdit's, before the cast
    b32 = b64.float()
    ab32 = torch.cumprod(1.0 - b32, dim=0)
    ab64 = torch.cumprod(1.0 - b64, dim=0)
    a = (la - 1).clamp_min(0)
    unit = lb == la - 1
    abar_a64, abar_b64 = _abar_of_level(ab64, la), _abar_of_level(ab64, lb)
    beta64 = torch.where(unit, b64[a], 1.0 - abar_a64 / abar_b64)
    beta32 = torch.where(unit, b32[a], beta64.float())
    c1 = 1.0 / torch.sqrt(1.0 - beta32)
    c2 = beta32 / torch.sqrt(1.0 - ab32[a])
    logvar = torch.log((beta64 * (1.0 - abar_b64) / (1.0 - abar_a64)).clamp_min(LOGVAR_FLOOR)).float()
    std = torch.where((lb > 0) & (lb < la), torch.exp(0.5 * logvar), torch.zeros_like(logvar))
    return c1, c2, std


def ddpm_step(x: Tensor, eps: Tensor, z: Tensor | None, c1: Tensor, c2: Tensor, std: Tensor) -> Tensor:
    """Ho et al. Eq. 11 + fixedsmall noise: x <- c1 (x - c2 eps(x)) + std z (see ddpm_coefficients)."""
    mean = c1 * (x - c2 * eps)
    return mean if z is None else mean + std * z


def ddim_coefficients(la: Tensor, lb: Tensor, eta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(abar_la, abar_lb, sigma) of the DDIM step from level la to lb (float32, SDEdit's table), with
    Song et al. 2021 Eq. 16: sigma = eta sqrt((1 - abar_lb)/(1 - abar_la)) sqrt(1 - abar_la/abar_lb).
    eta = 1 is DDPM's fixedsmall ancestral step, eta = 0 the deterministic DDIM."""
    table = discrete_alphas_cumprod(linspace_dtype=torch.float64, device=la.device)
    abar_a, abar_b = _abar_of_level(table, la), _abar_of_level(table, lb)
    sigma = eta * torch.sqrt((1.0 - abar_b) / (1.0 - abar_a) * (1.0 - abar_a / abar_b).clamp_min(0.0))
    return abar_a, abar_b, sigma


def ddim_step(x: Tensor, eps: Tensor, z: Tensor | None, abar_a: Tensor, abar_b: Tensor, sigma: Tensor) -> Tensor:
    """Song et al. 2021 Eq. 12: x0 = (x - sqrt(1 - abar_a) eps)/sqrt(abar_a),
    x_b = sqrt(abar_b) x0 + sqrt(1 - abar_b - sigma^2) eps + sigma z."""
    x0 = (x - torch.sqrt(1.0 - abar_a) * eps) / torch.sqrt(abar_a)
    out = torch.sqrt(abar_b) * x0 + torch.sqrt((1.0 - abar_b - sigma**2).clamp_min(0.0)) * eps
    return out if z is None else out + sigma * z
