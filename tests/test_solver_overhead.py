"""The no-grad solve's shortcuts change no number: coefficients tabulated up front, increments drawn many
steps per call (Noise.randn_steps), inference mode. Every comparison here is bitwise (torch.equal), against
the step-by-step formulation written out below from sde.py's formulas with one draw per noisy step."""
from __future__ import annotations

import pytest
import torch

from benchkit.noise import GLOBAL_NOISE, ImageStreams, Noise, PerExampleNoise, derive_seed
from benchkit_diffpure import sde, solver
from benchkit_diffpure.purifier import DiffPure
from benchkit_diffpure.solver import integrate
from diffpure_helpers import DiscreteGaussianScore, GaussianScore, TinyConvScore

pytestmark = pytest.mark.usefixtures("one_thread")

LAM, SIGMA2, ETA, DDIM_ETA = 0.1, 100.0, 1.0, 0.5


def reference_solve(model, x, t_star, sampler: str, n: int, noise: Noise, x_a=None):
    """The reverse solve step by step, every coefficient computed at its step and one draw per noisy
    step (the solver before its tables)."""
    col = lambda v: v.view(-1, *([1] * (x.dim() - 1)))
    t_star = torch.as_tensor(t_star, dtype=x.dtype).expand(x.shape[0]).contiguous()
    draw = lambda: noise.randn(tuple(x.shape), device=x.device, dtype=x.dtype)
    with torch.no_grad():
        if sampler in ("ddpm", "ddim"):
            grid = sde.level_grid(sde.levels_of(t_star), n)
            la, lb = grid[:-1], grid[1:]
            coef = sde.ddpm_coefficients(la, lb) if sampler == "ddpm" else sde.ddim_coefficients(la, lb, DDIM_ETA)
            step = sde.ddpm_step if sampler == "ddpm" else sde.ddim_step
            for k in range(n):
                z = draw() if k < n - 1 else None   # nothing drawn for the step into the data
                x = step(x, model.eps_index(x, la[k] - 1), z, *(col(v[k].to(x.dtype)) for v in coef))
            return x
        h = col(t_star / n)
        levels = sde.levels_of(t_star) if model.discrete_time and sampler != "ld-sde" else None
        for k in range(n):
            if sampler == "ld-sde":
                t = torch.full_like(t_star, sde.LD_SCORE_TIME)
                index = torch.full_like(t_star, sde.LD_SCORE_INDEX, dtype=torch.long)
            else:
                t = (t_star * (1.0 - k / n)).clamp_min(solver.T_EPS)
                index = None if levels is None else levels * (n - k) // n
            eps = model.eps_index(x, index) if model.discrete_time else model.eps(x, t)
            score = -eps / col(sde.marginal_std(t))
            if sampler == "ld-sde":
                x = x + h * sde.langevin_drift(x, x_a, score, LAM, SIGMA2)
                x = x + sde.langevin_diffusion(LAM, ETA) * h.sqrt() * draw()
                continue
            beta = col(sde.beta(t))
            f = sde.reverse_sde_drift if sampler == "vp-sde" else sde.probability_flow_drift
            x = x + -h * f(x, t, score, beta)
            if sampler == "vp-sde":
                x = x + torch.sqrt(beta * h) * draw()
    return x


def images(shape, rows=4, seed=0):
    return torch.rand(rows, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def noises(x):
    """Fresh copies of each kind of noise the host uses, for rows x."""
    seeds = [derive_seed("overhead", i) for i in range(x.shape[0])]

    def streams():   # an attack's streams, two EOT copies of the first half of the rows
        half = x.shape[0] // 2
        s = ImageStreams(x[:half], seeds[:half])
        s.bind(s.open(x[:half]), range(2))
        return s
    return {"per-example": lambda: PerExampleNoise(seeds),
            "eot-copies": lambda: PerExampleNoise(seeds[: x.shape[0] // 2]),   # rows r, r + B/2 share a generator
            "image-streams": streams}


MODELS = {"gaussian": (GaussianScore(sigma2=0.3), (2, 4, 4)),          # 32 values per image: one call per generator
          "conv-odd": (TinyConvScore(channels=1, hidden=4), (1, 3, 3)),  # 9: drawn step by step
          "discrete": (DiscreteGaussianScore(sigma2=0.5), (2, 4, 4))}
CASES = [(s, m) for s in ("vp-sde", "vp-ode", "ld-sde") for m in MODELS] + \
        [(s, m) for s in ("ddpm", "ddim") for m in ("gaussian", "discrete")]


@pytest.mark.parametrize("sampler, model_name", CASES)
@pytest.mark.parametrize("chunk_steps", [None, 3])
def test_no_grad_solve_is_the_step_by_step_solve_bitwise(sampler, model_name, chunk_steps, monkeypatch):
    model, shape = MODELS[model_name]
    x = images(shape)
    t_star = torch.tensor([0.012, 0.02, 0.007, 0.02]) if sampler in ("ddpm", "ddim") else torch.tensor([0.02, 0.013, 0.02, 0.031])
    n = 9
    if chunk_steps:   # increments drawn a few steps at a time (a large problem)
        monkeypatch.setattr(solver, "NOISE_CHUNK_BYTES", chunk_steps * x.numel() * x.element_size())
    for kind, make in noises(x).items():
        ref = reference_solve(model, x, t_star, sampler, n, make(), x_a=x)
        kw = dict(sampler=sampler, n_steps=n, noise=make(), x_a=x, ld_lambda=LAM, ld_sigma2=SIGMA2, ld_eta=ETA,
                  ddim_eta=DDIM_ETA)
        out = integrate(model, x, t_star, gradient="none", **kw)
        assert torch.equal(out, ref), (kind, (out - ref).abs().max())
        assert not out.is_inference()
        # Every gradient mode samples the same path: the exact mode's forward value is the same.
        kw["noise"] = make()
        exact = integrate(model, x.clone().requires_grad_(True), t_star, gradient="exact", **kw)
        assert torch.equal(exact.detach(), ref), kind


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 4, 4), (1, 3, 3), (5,)])
def test_increments_drawn_in_one_call_equal_the_per_step_draws(shape):
    rows = 6
    x = images(shape, rows)
    kw = dict(device="cpu", dtype=torch.float32)
    for kind, make in noises(x).items():
        one, per_step = make(), make()
        drawn = one.randn_steps(7, (rows, *shape), **kw)
        assert torch.equal(drawn, torch.stack([per_step.randn((rows, *shape), **kw) for _ in range(7)])), kind
        # ... and leave the generators where the per-step draws leave them
        assert torch.equal(one.randn((rows, *shape), **kw), per_step.randn((rows, *shape), **kw)), kind
    torch.manual_seed(3)
    drawn = GLOBAL_NOISE.randn_steps(7, (rows, *shape), **kw)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.stack([torch.randn((rows, *shape)) for _ in range(7)]))
    assert GLOBAL_NOISE.randn_steps(0, (rows, *shape), **kw).shape == (0, rows, *shape)


def test_a_noise_that_redefines_randn_gets_its_own_draws():
    class Counting(Noise):
        def randn(self, shape, *, device, dtype):
            self.n = getattr(self, "n", 0) + 1
            return torch.full(shape, float(self.n))

    drawn = Counting().randn_steps(3, (2, 16), device="cpu", dtype=torch.float32)
    assert drawn[:, 0, 0].tolist() == [1.0, 2.0, 3.0]


def test_no_grad_output_enters_autograd_afterwards():
    """The host purifies with gradient none / bpda inside autograd contexts: the purified images are
    ordinary tensors (not inference tensors), so a trainable classifier can save them for backward."""
    pur = DiffPure(TinyConvScore(channels=1, hidden=4), t_star=0.02)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    for mode in ("bpda", "none"):
        out = pur.purify(x, gradient=mode, noise=PerExampleNoise([1, 2]))
        clf(out).sum().backward()
        assert clf[1].weight.grad is not None and not out.is_inference()
    assert x.grad is not None and torch.isfinite(x.grad).all()   # bpda: the identity's gradient
    frames, _ = pur.trajectory(x.detach(), 4, noise=PerExampleNoise([1, 2]))
    assert not frames.is_inference()


def test_bench_purify_overhead_and_options_keys():
    """benchmarks/bench_purify.py's overhead and options on a tiny configuration: their keys, and every
    time a positive number (no timing is asserted: the machine is shared)."""
    import importlib.util
    from types import SimpleNamespace

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_purify", ROOT / "benchmarks" / "bench_purify.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = SimpleNamespace(t_star=0.003, repeats=1, overhead_repeats=1, ddpmpp="small", ddpmpp_batch=1, ddpmpp_steps=2, ddpmpp_compile=False)
    x = torch.rand(2, 1, 8, 8)
    over = bench.overhead(bench.digits_unet(), "digits-unet", x, args)
    assert set(over) == {"network", "digits-unet", "ddpmpp-small", "network_fraction"}
    assert over["digits-unet"]["steps"] == 3 and over["ddpmpp-small"]["steps"] == 2
    assert over["network_fraction"] == min(over[m][n]["network_fraction"] for m in ("digits-unet", "ddpmpp-small")
                                           for n in ("per_example", "global")) > 0
    case = bench.options_case(bench.digits_unet, ["fp32", "bf16"], x, 0.003, 1e-3, 1)
    assert case["fp32_s"] > 0 and set(case["bf16"]) == {"speedup", "seconds", "first_call_s", "max_abs_diff"}
    assert 0 < case["bf16"]["max_abs_diff"] < 0.1   # bf16 arithmetic, the same noise
