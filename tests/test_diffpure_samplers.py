"""The discrete samplers (ddpm, ddim) and exact integer steps: upstream's coefficients bit for bit,
Gaussian data where the chain's law is known in closed form, gradients against autograd and finite
differences."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchkit.noise import PerExampleNoise
from benchkit_diffpure import sde
from benchkit_diffpure.purifier import DiffPure
from benchkit_diffpure.solver import integrate
from diffpure_helpers import DiscreteGaussianScore, TinyConvScore


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: one thread is faster


BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ABAR = torch.cumprod(1 - BETAS, 0)


def test_ddpm_coefficients_are_upstreams_bit_for_bit():
    """SDEdit / runners/diffpure_ddpm.py: betas = float64 linspace cast to float32; 1/sqrt(alpha_i) and
    beta_i/sqrt(1 - abar_i) in float32; fixedsmall logvar = log(max(beta_tilde, 1e-20)) in float64, cast,
    exp(0.5 logvar) in float32; the step into the data (i = 0) masked noise-free."""
    b64 = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    b32 = torch.from_numpy(b64).float()
    abar32 = torch.cumprod(1.0 - b32, 0)
    abar64 = np.cumprod(1.0 - b64)
    beta_tilde = b64 * (1.0 - np.append(1.0, abar64[:-1])) / (1.0 - abar64)
    std = torch.exp(0.5 * torch.tensor(np.log(np.maximum(beta_tilde, 1e-20)), dtype=torch.float32))
    la = torch.arange(1, 1001)
    c1, c2, s = sde.ddpm_coefficients(la, la - 1)
    assert torch.equal(c1, 1 / torch.sqrt(1.0 - b32)) and torch.equal(c2, b32 / torch.sqrt(1 - abar32))
    assert torch.equal(s[1:], std[1:]) and s[0] == 0 and std[0] < 1e-9  # the clip: 1e-10, masked anyway
    # The forward noising of the ddpm sampler uses the same float32 table at index K - 1.
    assert torch.equal(sde.discrete_alpha_bar(torch.tensor([0.5]), linspace_dtype=torch.float64), abar32[499:500])
    # Respaced steps (guided-diffusion's respacing): beta' = 1 - abar_a/abar_b; a zero-length step is the identity.
    c1, c2, s = sde.ddpm_coefficients(torch.tensor([500, 7]), torch.tensor([490, 7]))
    beta = 1 - ABAR[499] / ABAR[489]
    assert c1[0] == pytest.approx(float(1 / (1 - beta).sqrt()), rel=1e-6)
    assert s[0] ** 2 == pytest.approx(float(beta * (1 - ABAR[489]) / (1 - ABAR[499])), rel=1e-5)
    assert (c1[1], c2[1], s[1]) == (1, 0, 0)


def test_level_grid_is_exact_integer_and_ends_with_the_unit_step():
    K = torch.tensor([500, 499, 37, 1000])
    grid = sde.level_grid(K, 500)
    assert torch.equal(grid[:, 0], torch.arange(500, -1, -1))               # the full chain
    steps = grid[:-1] - grid[1:]
    assert torch.equal(grid[0], K) and (grid[-1] == 0).all() and grid[-2].tolist() == [1, 1, 1, 2]
    assert ((steps >= 0) & (steps <= 2)).all() and (steps[:, 1:3] <= 1).all()
    assert steps[:, 2].sum() == 37 and (grid[:-1, 2] >= 1).all()             # zero-length steps never at level 0
    assert torch.equal(sde.level_grid(torch.tensor([500]), 50)[:, 0], torch.arange(500, -1, -10))


def _ddpm_moments(K: int, mu0: float, s2: float) -> tuple[float, float]:
    """Mean and variance after the DDPM chain from the exact marginal at level K (Gaussian all along):
    x <- A x + B + std z with A = c1 (1 - c2 sqrt(1 - a)/V), B = c1 c2 sqrt(1 - a) sqrt(a) mu0/V."""
    a = ABAR[K - 1].item()
    m, v = math.sqrt(a) * mu0, a * s2 + 1 - a
    for i in range(K - 1, -1, -1):
        a, beta = ABAR[i].item(), BETAS[i].item()
        a_prev = ABAR[i - 1].item() if i else 1.0
        V = a * s2 + 1 - a
        c1, c2 = 1 / math.sqrt(1 - beta), beta / math.sqrt(1 - a)
        A, B = c1 * (1 - c2 * math.sqrt(1 - a) / V), c1 * c2 * math.sqrt(1 - a) * math.sqrt(a) * mu0 / V
        m, v = A * m + B, A * A * v + (beta * (1 - a_prev) / (1 - a) if i else 0.0)
    return m, v


def test_ddpm_recovers_gaussian_data():
    """From x(t*) ~ the exact marginal at t* = 0.5 (K = 500), the ancestral chain with the exact eps is
    Gaussian with known moments: the samples match them to Monte Carlo error; the chain's mean is mu0
    exactly, its variance a little below sigma0^2 (fixedsmall leaves out Var(x0 | x_t))."""
    mu0, K = 0.3, 500
    s2 = torch.tensor([0.05] * 16 + [0.5] * 16, dtype=torch.float64)
    model = DiscreteGaussianScore(mu0, s2)
    a = ABAR[K - 1].item()
    g = torch.Generator().manual_seed(1)
    x_t = math.sqrt(a) * mu0 + (a * s2 + 1 - a).sqrt().view(-1, 1, 1, 1) * torch.randn(32, 1, 64, 64, generator=g, dtype=torch.float64)
    out = integrate(model, x_t, K / 1000, sampler="ddpm", noise=PerExampleNoise(range(200, 232)))
    assert len(model.calls) == K and [c[0] for c in model.calls] == list(range(K - 1, -1, -1))
    n = 16 * 64 * 64
    for rows, sigma2 in ((slice(0, 16), 0.05), (slice(16, 32), 0.5)):
        m_hat, v_hat = out[rows].mean().item(), out[rows].var().item()
        m, v = _ddpm_moments(K, mu0, sigma2)
        print(f"s2={sigma2}: mean {m_hat:.5f} (chain {m:.5f}), var {v_hat:.5f} (chain {v:.5f}, data {sigma2}); n={n}")
        assert abs(m_hat - m) < 5 * math.sqrt(v / n) and abs(v_hat - v) < 5 * v * math.sqrt(2 / n)
        assert abs(m - mu0) < 1e-12 and -0.04 < v / sigma2 - 1 < 0


def _ddim_ratio(levels: list[int], s2: float) -> float:
    """DDIM (eta 0) with the exact eps maps the standardised zeta = (x - sqrt(a) mu0)/sqrt(V_a) of each
    level to zeta r(a, b), r = (sqrt(a b) s2 + sqrt((1 - a)(1 - b)))/sqrt(V_a V_b) (a cosine, <= 1)."""
    r = 1.0
    for la, lb in zip(levels, levels[1:]):
        a, b = ABAR[la - 1].item(), (ABAR[lb - 1].item() if lb else 1.0)
        r *= (math.sqrt(a * b) * s2 + math.sqrt((1 - a) * (1 - b))) / math.sqrt((a * s2 + 1 - a) * (b * s2 + 1 - b))
    return r


def test_ddim_eta0_is_deterministic_and_maps_x_t_to_the_known_point():
    """Deterministic (no draw), exactly the closed-form point (to float32 coefficient rounding), and
    converging to the probability-flow map mu0 + sigma0 zeta at first order in the step."""
    mu0, K = -0.2, 300
    s2 = torch.tensor([0.05, 0.5, 1.0], dtype=torch.float64)
    model = DiscreteGaussianScore(mu0, s2)
    x_t = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = ABAR[K - 1].item()
    deficits = []
    for dt in (1e-2, 1e-3):
        out = integrate(model, x_t, K / 1000, sampler="ddim", dt=dt, noise=PerExampleNoise([1, 2, 3]))
        assert torch.equal(out, integrate(model, x_t, K / 1000, sampler="ddim", dt=dt, noise=PerExampleNoise([4, 5, 6])))
        n = round(K / 1000 / dt)
        levels = list(range(K, -1, -K // n))
        deficits.append([])
        for i, sigma2 in enumerate(s2.tolist()):
            zeta = (x_t[i] - math.sqrt(a) * mu0) / math.sqrt(a * sigma2 + 1 - a)
            r = _ddim_ratio(levels, sigma2)
            expected = mu0 + math.sqrt(sigma2) * r * zeta  # at level 0, V = sigma0^2
            err = (out[i] - expected).abs().max().item()
            print(f"dt={dt} s2={sigma2}: ratio {r:.6f}, max error {err:.2e}")
            assert err < 1e-6 * expected.abs().max().item()
            deficits[-1].append(1 - r)
    for coarse, fine in zip(*deficits):
        assert 5 < coarse / fine < 20


def test_ddim_eta1_is_the_ddpm_chain():
    """DDIM with eta = 1 is the ancestral step with fixedsmall variance (Song et al. 2021, Sec. 4.1),
    on the full chain and respaced: the same noise gives the same samples (those of a random network
    wander off to |x| ~ 7 over 200 steps, which is why the tolerance is relative)."""
    model = TinyConvScore(channels=1, hidden=8).double()
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for dt in (1e-3, 2e-2):
        a = integrate(model, x, 0.2, sampler="ddpm", dt=dt, noise=PerExampleNoise([7, 8]))
        b = integrate(model, x, 0.2, sampler="ddim", ddim_eta=1.0, dt=dt, noise=PerExampleNoise([7, 8]))
        rel = ((a - b).abs().max() / a.abs().max()).item()
        print(f"dt={dt}: max |ddim(eta=1) - ddpm| / max |ddpm| = {rel:.1e}")
        assert rel < 2e-5  # the same chain; the coefficients are rounded to float32 along different paths


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_discrete_exact_gradient_equals_autograd_and_finite_differences(sampler, eta):
    model = TinyConvScore(hidden=8).double()  # continuous time: eps at t = level/1000
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t_star = torch.tensor([0.03, 0.02], dtype=torch.float64)  # per-image: 30 lockstep steps, image 1 with 10 zero steps
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    run = lambda xx, mode: integrate(model, xx, t_star, sampler=sampler, ddim_eta=eta, n_steps=30, gradient=mode,
                                     noise=PerExampleNoise([1, 2]))
    grads = {}
    for mode in ("exact", "autograd"):
        xx = x.clone().requires_grad_(True)
        (grads[mode],) = torch.autograd.grad((run(xx, mode) * v).sum(), xx)
    assert torch.equal(run(x, "none"), run(x.clone().requires_grad_(True), "exact").detach())
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    h = 1e-5
    fd = ((run(x + h * u, "none") - run(x - h * u, "none")) * v).sum().item() / (2 * h)
    ana = (grads["exact"] * u).sum().item()
    diff = (grads["exact"] - grads["autograd"]).abs().max().item()
    print(f"{sampler} eta={eta}: exact vs autograd {diff:.1e}; directional {ana:.8f} vs FD {fd:.8f}")
    assert diff < 1e-12 and abs(ana - fd) < 1e-7 * abs(fd)
    with pytest.raises(ValueError, match="no continuous-time adjoint"):
        run(x, "adjoint")


@pytest.mark.parametrize("sampler, dt, expected", [
    ("vp-sde", 1e-3, list(range(500, 0, -1))),   # the reference feeds floor(t 1000): 500 .. 1
    ("vp-ode", 1e-3, list(range(500, 0, -1))),
    ("ddpm", 1e-3, list(range(499, -1, -1))),    # SDEdit's loop: i = K-1 .. 0
    ("ddim", 1e-2, list(range(499, 0, -10))),    # levels 500, 490, .., 10 -> 0
    ("ld-sde", 1e-2, [sde.LD_SCORE_INDEX] * 50),  # the score at t = 1e-2, one call per dt = 1e-2
])
def test_every_step_index_is_called_exactly_once(sampler, dt, expected):
    """t* = 0.5: each index exactly once, in order (a float32 floor(t 1000) on the grid t*(1 - s/N)
    skips 251 and 253 and calls 250 and 252 twice; at t* = 0.1 it skips six steps)."""
    model = DiscreteGaussianScore(0.0, 0.5)
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(7))
    integrate(model, x, 0.5, sampler=sampler, dt=dt, noise=PerExampleNoise([1]))
    assert [c[0] for c in model.calls] == expected
    if sampler == "vp-sde":  # what the float floor of the same grid gives
        floor = [int(torch.floor(torch.tensor([0.5]) * (1.0 - s / 500) * 1000)) for s in range(500)]
        assert sorted(set(range(1, 501)) - set(floor)) == [251, 253]


def test_purifier_discrete_samplers_noise_the_input_as_sdedit():
    """ddpm / ddim diffuse with SDEdit's float32 abar at index K - 1 (also for a continuous-time model),
    then walk the chain; per-image t* on the 1/1000 grid."""
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(8))
    pur = DiffPure(TinyConvScore(channels=1, hidden=4), sampler="ddim", t_star=0.1, dt=1e-2)
    assert pur.gradient_modes == ("exact", "bpda", "none") and pur.n_steps == 10
    noise = PerExampleNoise([3, 4])
    x_c, t_star, x_t = pur._start(x, noise)
    eps = PerExampleNoise([3, 4]).randn((2, 1, 4, 4), device="cpu", dtype=torch.float32)
    a = sde.discrete_alphas_cumprod(linspace_dtype=torch.float64)[99]
    assert torch.equal(x_t, a.sqrt() * x_c + (1 - a).sqrt() * eps) and torch.equal(t_star, torch.full((2,), 0.1))
    with pytest.raises(ValueError, match="supports gradient modes"):
        pur.purify(x, gradient="adjoint")
    pur = DiffPure(DiscreteGaussianScore(0.0, 0.5), sampler="ddpm", t_star=0.1, t_delta=0.02, dt=1e-3)
    assert pur.n_steps == 120
    out = pur.purify(x, gradient="none", noise=PerExampleNoise([5, 6]))
    alone = pur.purify(x[1:], gradient="none", noise=PerExampleNoise([6]))
    assert torch.allclose(out[1:], alone, atol=1e-6)  # lockstep with batch-independent N
