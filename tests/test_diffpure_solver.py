"""DiffPure numerics: reverse solvers (solver.py) and the purifier (purifier.py) on analytic toys."""
from __future__ import annotations

import math

import pytest
import torch

from benchkit.defended import DefendedModel
from benchkit.noise import Noise, PerExampleNoise
from benchkit_diffpure import sde
from benchkit_diffpure.purifier import DiffPure
from benchkit_diffpure.solver import T_EPS, integrate
from diffpure_helpers import DiscreteGaussianScore, GaussianScore, TinyConvScore, eq31_gradient

SIGMA2 = [0.01, 0.05, 0.1, 0.5, 1.0]


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: one thread is faster


# (1) Appendix B.5: for Gaussian data the reverse SDE's drift is linear in x, so the pathwise derivative
# d x(0)/d x(t*) is deterministic and equals Eq. 31 in the limit dt -> 0; Euler converges at first order.
@pytest.mark.parametrize("gradient", ["exact", "adjoint"])
def test_eq31_gradient_converges(gradient):
    s2 = torch.tensor(SIGMA2, dtype=torch.float64)
    model = GaussianScore(mu0=0.2, sigma2=s2).double().requires_grad_(False)
    ref = eq31_gradient(0.1, s2)
    errs = []
    for dt in (1e-2, 1e-3, 1e-4):
        x = torch.randn(len(SIGMA2), 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x.requires_grad_(True)
        out = integrate(model, x, 0.1, dt=dt, gradient=gradient, noise=PerExampleNoise(range(len(SIGMA2))))
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.allclose(g, g[:, :1, :1, :1].expand_as(g), rtol=1e-10)  # the same at every pixel and path
        errs.append(((g[:, 0, 0, 0] - ref).abs() / ref))
        print(gradient, f"dt={dt:g}", " ".join(f"s2={s:g}:{e:.2e}" for s, e in zip(SIGMA2, errs[-1].tolist())))
    for coarse, fine in zip(errs, errs[1:]):
        assert ((coarse / fine > 5) & (coarse / fine < 20)).all()  # first order: 10x per decade of dt
    assert (errs[-1] < 5e-3).all()


def _euler_moments(t_star: float, n: int, mu0: float, s2: float) -> tuple[float, float]:
    """Mean and variance after the Euler-Maruyama chain (which is Gaussian for Gaussian data), exactly:
    x <- c_k x + d_k + sqrt(beta h) z with c_k = 1 + beta h/2 (1 - 2/V), d_k = beta h sqrt(a) mu0 / V."""
    h = t_star / n
    a = float(sde.alpha(t_star))
    m, v = math.sqrt(a) * mu0, a * s2 + 1 - a
    for k in range(n):
        t = t_star * (1 - k / n)
        a, b = float(sde.alpha(t)), float(sde.beta(t))
        V = a * s2 + 1 - a
        c = 1 + 0.5 * b * h * (1 - 2 / V)
        m, v = c * m + b * h * math.sqrt(a) * mu0 / V, c * c * v + b * h
    return m, v


# (2) The reverse SDE started from the forward marginal at t* gives back N(mu0, sigma0^2).
def test_reverse_sde_recovers_gaussian():
    mu0, t_star, dt = 0.3, 0.5, 1e-3
    s2 = torch.tensor([0.05] * 8 + [0.5] * 8)
    model = GaussianScore(mu0, s2).requires_grad_(False)
    a = float(sde.alpha(t_star))
    std0 = (a * s2 + 1 - a).sqrt().view(-1, 1, 1, 1)
    g = torch.Generator().manual_seed(1)
    x_t = math.sqrt(a) * mu0 + std0 * torch.randn(16, 1, 32, 32, generator=g)
    out = integrate(model, x_t, t_star, dt=dt, noise=PerExampleNoise(range(100, 116)))
    n = 8 * 32 * 32
    for rows, sigma2 in ((slice(0, 8), 0.05), (slice(8, 16), 0.5)):
        m_hat, v_hat = out[rows].mean().item(), out[rows].var().item()
        m_eu, v_eu = _euler_moments(t_star, round(t_star / dt), mu0, sigma2)
        print(f"s2={sigma2}: mean {m_hat:.4f} (Euler {m_eu:.4f}, true {mu0}), var {v_hat:.4f} "
              f"(Euler {v_eu:.4f}, true {sigma2}); n={n}")
        # Sampling error only (the Euler chain's exact moments): 5 standard errors of n i.i.d. samples.
        assert abs(m_hat - m_eu) < 5 * math.sqrt(v_eu / n)
        assert abs(v_hat - v_eu) < 5 * v_eu * math.sqrt(2 / n)
        # Discretisation error of the chain itself is O(dt): small against the target.
        assert abs(m_eu - mu0) < 1e-2 * math.sqrt(sigma2) and abs(v_eu / sigma2 - 1) < 1e-2


# (3) Checkpointed backprop is plain autograd through the unrolled loop, with per-image t*.
@pytest.mark.parametrize("sampler", ["vp-sde", "vp-ode", "ld-sde", "ddpm", "ddim"])
def test_exact_equals_unrolled_autograd(sampler):
    model = TinyConvScore()  # parameters left trainable: the solver must still give them no gradient
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t_star = torch.tensor([0.008, 0.01, 0.012])
    if sampler in ("ddpm", "ddim"):  # no adjoint for a discrete chain (tests/test_diffpure_samplers.py)
        return _exact_equals_autograd_discrete(model, x, t_star, sampler)
    t_star = t_star * 10
    res = {}
    for mode in ("exact", "autograd", "adjoint"):
        xx = x.clone().requires_grad_(True)
        out = integrate(model, xx, t_star, sampler=sampler, n_steps=12, gradient=mode, noise=PerExampleNoise([1, 2, 3]),
                        ld_sigma2=1e-2)
        if mode != "autograd":
            (out ** 2).sum().backward()
            assert all(p.grad is None for p in model.parameters())
            res[mode] = out.detach(), xx.grad
        else:
            res[mode] = out.detach(), torch.autograd.grad((out ** 2).sum(), xx)[0]
    diff = (res["exact"][1] - res["autograd"][1]).abs().max().item()
    print(sampler, "exact vs autograd max |grad diff|", diff)
    assert torch.equal(res["exact"][0], res["autograd"][0]) and diff <= 1e-6
    # The same Brownian path whatever the mode: the adjoint replays it, "none" draws it step by step.
    assert torch.allclose(res["adjoint"][0], res["exact"][0], atol=1e-5)
    none = integrate(model, x, t_star, sampler=sampler, n_steps=12, noise=PerExampleNoise([1, 2, 3]), ld_sigma2=1e-2)
    assert torch.equal(none, res["exact"][0])
    if sampler == "ld-sde":  # non-stiff (score at a fixed t): the adjoint gradient, x_a term included, agrees
        rel = ((res["adjoint"][1] - res["exact"][1]).norm() / res["exact"][1].norm()).item()
        print("ld-sde adjoint vs exact relative gradient difference", rel)
        assert rel < 0.05  # without the x_a adjoint parameter it is ~0.4


def _exact_equals_autograd_discrete(model, x, t_star, sampler):
    res = {}
    for mode in ("exact", "autograd"):
        xx = x.clone().requires_grad_(True)
        out = integrate(model, xx, t_star, sampler=sampler, n_steps=12, gradient=mode, ddim_eta=0.5,
                        noise=PerExampleNoise([1, 2, 3]))
        (g,) = torch.autograd.grad((out ** 2).sum(), xx)
        assert all(p.grad is None for p in model.parameters())
        res[mode] = out.detach(), g
    diff = (res["exact"][1] - res["autograd"][1]).abs().max().item()
    print(sampler, "exact vs autograd max |grad diff|", diff)
    assert torch.equal(res["exact"][0], res["autograd"][0]) and diff <= 1e-6


# (4) Probability-flow ODE: deterministic, and running it forward on the same grid returns to x(t*).
def test_vp_ode_deterministic_and_invertible():
    model = GaussianScore(0.1, torch.tensor([0.05, 0.5])).double().requires_grad_(False)
    x_t = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = integrate(model, x_t, 0.3, sampler="vp-ode", noise=PerExampleNoise([1, 2]))
    b = integrate(model, x_t, 0.3, sampler="vp-ode", noise=Noise())
    assert torch.equal(a, b)
    errs = []
    for dt in (1e-2, 1e-3):
        x0 = integrate(model, x_t, 0.3, sampler="vp-ode", dt=dt)
        n, x = round(0.3 / dt), x0
        for j in range(n):  # forward Euler up the same grid t_j = j h
            t = torch.full((2,), max(j * dt, T_EPS), dtype=torch.float64)
            beta_t = sde.beta(t).view(-1, 1, 1, 1)
            x = x + dt * sde.probability_flow_drift(x, t, model.score(x, t), beta_t)
        errs.append((x - x_t).abs().max().item())
    print("vp-ode round-trip max error for dt=1e-2, 1e-3:", errs)
    assert errs[1] < errs[0] / 5 and errs[1] < 2e-2


def _purifier(sampler: str, model=None, **kw) -> DiffPure:
    if model is None and sampler in ("ddpm", "ddim"):
        model = DiscreteGaussianScore(0.0, 0.25)
    return DiffPure(model or GaussianScore(0.0, 0.25), sampler=sampler, t_star=0.1, t_delta=0.02, dt=1e-2,
                    ddim_eta=0.5, **kw)


# (5) End to end: shape, per-image noise, gradient modes, frozen parameters; clamp only on request.
@pytest.mark.parametrize("sampler", ["vp-sde", "vp-ode", "ld-sde", "ddpm", "ddim"])
def test_purifier_end_to_end(sampler):
    pur = _purifier(sampler)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    seeds = [11, 12, 13]
    for gradient in ("none", "exact"):
        out = pur.purify(x, gradient=gradient, noise=PerExampleNoise(seeds)).detach()
        assert out.shape == x.shape
        alone = pur.purify(x[1:2], gradient=gradient, noise=PerExampleNoise(seeds[1:2])).detach()
        assert torch.allclose(out[1:2], alone, atol=1e-6)  # image 1's draw ignores its batch mates
    assert not torch.allclose(out, pur.purify(x, gradient="none", noise=PerExampleNoise([1, 2, 3])))
    clamped = _purifier(sampler, clamp=True).purify(x, gradient="none", noise=PerExampleNoise(seeds))
    assert torch.equal(clamped, out.clamp(0, 1)) and (out.min() < 0 or out.max() > 1)
    for gradient in (m for m in pur.gradient_modes if m != "none"):
        xx = x.clone().requires_grad_(True)
        pur.purify(xx, gradient=gradient, noise=PerExampleNoise(seeds)).square().sum().backward()
        assert torch.isfinite(xx.grad).all() and xx.grad.abs().sum() > 0, gradient
    out = pur.purify(x.clone().requires_grad_(True), gradient="none")
    assert not out.requires_grad
    assert all(p.grad is None and not p.requires_grad for p in pur.score_model.parameters())


def test_purifier_discrete_forward_trajectory_and_defended_model():
    class Discrete(GaussianScore):
        discrete_time = True

    pur = _purifier("vp-sde", Discrete(0.0, 0.25))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    frames, labels = pur.trajectory(x, n_frames=5, noise=PerExampleNoise([7, 8]))
    assert labels == ["input", "diffused (t*)", "step 2/4", "step 4/4", "purified"] or len(labels) == 5
    assert frames.shape == (5, *x.shape) and frames.min() >= 0 and frames.max() <= 1
    assert torch.equal(frames[0], x)
    out = pur.purify(x, gradient="none", noise=PerExampleNoise([7, 8]))
    assert torch.allclose(frames[-1], out.clamp(0, 1))  # frames are clamped for display, outputs are not
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))
    model = DefendedModel(clf, pur, gradient="exact")
    loss, grad = model.loss_and_grad(torch.nn.CrossEntropyLoss(reduction="none"), x, torch.tensor([0, 1]), n=2)
    assert loss.shape == (2,) and torch.isfinite(grad).all()


# (6) Memory of exact mode: saved tensors grow by one state + one increment per step, no activations.
def test_exact_mode_saves_states_only():
    model = TinyConvScore(hidden=16).requires_grad_(False)
    x0 = torch.randn(2, 3, 8, 8)
    state = x0.numel() * x0.element_size()

    def saved_bytes(mode: str, n: int) -> int:
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        x = x0.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            integrate(model, x, 0.1, n_steps=n, gradient=mode)
        return total[0]

    exact_slope = (saved_bytes("exact", 8) - saved_bytes("exact", 4)) / 4
    unrolled_slope = (saved_bytes("autograd", 8) - saved_bytes("autograd", 4)) / 4
    print(f"saved bytes per step: exact {exact_slope:.0f} (state {state}), unrolled autograd {unrolled_slope:.0f}")
    assert exact_slope == 2 * state  # x_k and z_k
    assert saved_bytes("exact", 4) == 4 * 2 * state
    assert unrolled_slope > 5 * exact_slope
