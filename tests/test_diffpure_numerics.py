"""DiffPure's numerical options: forward noising against the authors' code, randomised t* per call,
the clamp, half precision, the LD-SDE step, and the gradient-correctness check's reference."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from benchkit.checks import gradient_correctness, gradient_note
from benchkit.noise import Noise, PerExampleNoise
from benchkit_diffpure import sde, solver
from benchkit_diffpure.purifier import DiffPure
from benchkit_diffpure.score import ContinuousTimeScore, DiscreteTimeScore
from conftest import SHARED, needs_shared
from diffpure_helpers import DiscreteGaussianScore, GaussianScore, TinyConvScore

REF = SHARED / "reference"


def shared(fn):
    for mark in needs_shared(REF):
        fn = mark(fn)
    return fn


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: one thread is faster


class Fixed(Noise):
    """randn returns a fixed tensor (the fixture's eps)."""

    def __init__(self, eps):
        self.eps = eps

    def randn(self, shape, *, device, dtype):
        return self.eps.to(device=device, dtype=dtype)


@shared
def test_forward_discrete_matches_the_authors_forward_noising():
    """diffpure_revvpsde_io: x_t = sqrt(abar[99]) x0 + sqrt(1 - abar[99]) eps with RevVPSDE's float32
    table at t* = 0.1, reproduced to 1e-6 by forward="discrete" for a continuous-time model; the
    default continuous alpha(t*) is off by 4.3e-3."""
    ref = load_file(str(REF / "diffpure_revvpsde_io.safetensors"))
    x01 = sde.from_centered(ref["x0"])
    errs = {}
    for forward in ("discrete", "continuous"):
        pur = DiffPure(TinyConvScore(), t_star=0.1, forward=forward)
        _, t_star, x_t = pur._start(x01, Fixed(ref["eps"]))
        errs[forward] = (x_t - ref["x_t"]).abs().max().item()
        assert torch.equal(t_star, torch.full((2,), 0.1))
    print("max |x_t - reference|:", errs)
    assert errs["discrete"] <= 1e-6 and 4e-3 < errs["continuous"] < 5e-3


def test_per_call_t_delta_offsets_the_forward_noise_only():
    """The authors' rand_t: one integer offset in [-D, D - 1] (numpy randint(-D, D)) per call, for
    the forward noise; the solve starts from the nominal t*. per-image: a t* per image for both."""
    x = torch.rand(3, 1, 2, 2)
    pur = DiffPure(GaussianScore(), t_star=0.1, t_delta=0.002, t_delta_mode="per-call", forward="discrete")
    assert pur.n_steps == 100  # the reverse solve: nominal t* / dt
    offsets = []
    for seed in range(200):
        t_noise, t_solve = pur._draw_t_star(x, PerExampleNoise([seed, 1000 + seed, 2000 + seed]))
        assert torch.equal(t_solve, torch.full((3,), 0.1)) and (t_noise == t_noise[0]).all()
        offsets.append(round((t_noise[0].item() - 0.1) * 1000))
    counts = {d: offsets.count(d) for d in sorted(set(offsets))}
    print("per-call offsets over 200 calls:", counts)
    assert set(counts) == {-2, -1, 0, 1} and min(counts.values()) > 30
    # One uniform per image is drawn in either mode, so the Eq. 3 noise that follows is the same.
    per_image = DiffPure(GaussianScore(), t_star=0.1, t_delta=0.002, forward="discrete")
    assert per_image.n_steps == 102
    n1, n2 = PerExampleNoise([5, 6, 7]), PerExampleNoise([5, 6, 7])
    t_noise, t_solve = per_image._draw_t_star(x, n1)
    pur._draw_t_star(x, n2)
    assert torch.equal(t_noise, t_solve) and len(set(t_noise.tolist())) > 1
    assert torch.equal(n1.randn((3, 4), device="cpu", dtype=torch.float32), n2.randn((3, 4), device="cpu", dtype=torch.float32))
    # And end to end: the offset moves the forward noise level, the chain still walks K .. 1 (DDPM 99 .. 0).
    model = DiscreteGaussianScore(0.0, 0.5)
    ddpm = DiffPure(model, sampler="ddpm", t_star=0.1, t_delta=0.015, t_delta_mode="per-call")
    ddpm.purify(x, gradient="none", noise=PerExampleNoise([1, 2, 3]))
    assert [c[0] for c in model.calls] == list(range(99, -1, -1))


def test_clamp_false_keeps_gradients_on_saturated_pixels():
    """Pixel-wise toy (Gaussian score: each output pixel depends on its input pixel only): with
    clamp=True the pixels purified past 0 or 1 get exactly zero gradient, without it none does."""
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x[:, :, :8] = (x[:, :, :8] > 0.5).float()  # saturated half: black or white
    zero = {}
    for clamp in (False, True):
        pur = DiffPure(GaussianScore(0.0, 0.25), t_star=0.1, dt=1e-2, clamp=clamp)
        xx = x.clone().requires_grad_(True)
        out = pur.purify(xx, gradient="exact", noise=PerExampleNoise([1, 2]))
        out.sum().backward()
        outside = ((out < 0) | (out > 1)).detach() if not clamp else outside
        zero[clamp] = (xx.grad == 0)[:, :, :8].float().mean().item()
        assert (xx.grad[outside] == 0).all() == clamp
    print(f"saturated pixels with zero gradient: clamp=False {zero[False]:.0%}, clamp=True {zero[True]:.0%}")
    assert zero[False] == 0 and zero[True] > 0.1


@shared
@pytest.mark.parametrize("precision, tol", [("bf16", 5e-2), ("fp16", 5e-3)])
def test_half_precision_stays_near_fp32(precision, tol):
    """The three reference architectures (fan-in weights, outputs of order one) under autocast on the
    CPU: max |eps - upstream fp32| / max |upstream| below tol (measured bf16 1.3e-2 to 2.0e-2, fp16
    1.6e-3 to 2.3e-3); eps comes back in float32 and exact gradients flow through."""
    from benchkit_diffpure.architectures.ddpm_unet import DDPMUNet
    from benchkit_diffpure.architectures.guided_unet import GuidedUNet
    from benchkit_diffpure.architectures.ncsnpp import NCSNpp

    for name, cls in (("ncsnpp_cifar10", NCSNpp), ("guided_unet_imagenet256", GuidedUNet),
                      ("ddpm_unet_celebahq", DDPMUNet)):
        net = cls.from_config(json.loads((REF / f"{name}_small_config.json").read_text()))
        net.load_state_dict(load_file(str(REF / f"{name}_small_fanin.safetensors")))
        io = load_file(str(REF / f"{name}_small_fanin_io.safetensors"))
        ref = io["output"][:, :3]
        if cls is NCSNpp:
            model = ContinuousTimeScore(net, precision=precision)
            with torch.no_grad():
                out = model.eps(io["x"], io["t"])
        else:
            model = DiscreteTimeScore(net, precision=precision)
            with torch.no_grad():
                out = model.eps_index(io["x"], io["timesteps"])
        rel = ((out - ref).abs().max() / ref.abs().max()).item()
        print(f"{name} {precision}: {rel:.2e}")
        assert out.dtype == torch.float32 and rel < tol
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    pur = DiffPure(model, sampler="ddim", t_star=0.02, dt=1e-2)
    pur.purify(x, gradient="exact", noise=PerExampleNoise([1])).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_ld_sde_takes_the_common_dt():
    """The authors' LD-SDE steps dt = 1e-2: 10 score evaluations at t* = 0.1."""
    calls = []

    class Count(GaussianScore):
        def eps(self, x, t):
            calls.append(t)
            return super().eps(x, t)

    pur = DiffPure(Count(), sampler="ld-sde", t_star=0.1, dt=1e-2)
    pur.purify(torch.rand(1, 1, 2, 2), gradient="none", noise=PerExampleNoise([1]))
    assert pur.n_steps == 10 and len(calls) == 10 and all(float(t) == pytest.approx(sde.LD_SCORE_TIME) for t in calls)


def _run_check(purifier, gradient: str = "exact", access: str = "gradient", follows=None):
    """benchkit.checks' gradient-correctness on 4 images of a cell whose attack uses `gradient`."""
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    class Data:
        get = staticmethod(lambda idx: (x[list(idx)], torch.zeros(len(idx))))
        __len__ = lambda self: 4

    model = SimpleNamespace(gradient=gradient, purifier=purifier)
    # The attack differentiates the defense itself, or `follows` (a surrogate purifier).
    attack = SimpleNamespace(access=access, view=lambda m: m if follows is None else SimpleNamespace(purifier=follows))
    comps = SimpleNamespace(dataset=lambda cell: Data(), device="cpu", defenses={"d": purifier}, attacks={"a": attack},
                            defended=lambda cell, attack: model)
    resolved = SimpleNamespace(suite=SimpleNamespace(checks=SimpleNamespace(subset=16)))
    cell = SimpleNamespace(defense=SimpleNamespace(id="d"), attack=SimpleNamespace(id="a"))
    return gradient_correctness(resolved=resolved, cell=cell, comps=comps)


def test_gradient_check_passes_exact_and_fails_a_broken_gradient(monkeypatch):
    """On 2 images, against central finite differences: the checkpointed gradient passes (cosine 1);
    the same solver with an identity backward (what BPDA assumes) fails."""
    pur = DiffPure(TinyConvScore(seed=3), t_star=0.2, dt=1e-2)
    ok = _run_check(pur)
    print(ok.status, ok.reason)
    assert ok.status == "pass" and ok.numbers["n"] == 2 and ok.numbers["cosine_exact"] > 0.9999
    assert "central finite differences along 8 random directions per image" in ok.reason and "2 image(s)" in ok.reason
    monkeypatch.setattr(solver._Checkpointed, "backward", staticmethod(lambda ctx, grad: (None, None, grad, None)))
    bad = _run_check(pur)
    print(bad.status, bad.reason)
    assert bad.status == "fail" and bad.numbers["cosine_exact"] < 0.5
    assert bad.reason.startswith("exact gradient has cosine") and "2 image(s), same noise" in bad.reason
    ddim = DiffPure(TinyConvScore(seed=3), sampler="ddim", t_star=0.2, dt=1e-2)  # the same checkpointing: broken too
    assert _run_check(ddim).status == "fail"
    monkeypatch.undo()
    ok = _run_check(ddim)
    assert ok.status == "pass" and "cosine_adjoint" not in ok.numbers  # no adjoint for a discrete chain


@pytest.mark.parametrize("access", ["query", "transfer"])
def test_gradient_check_skips_attacks_that_do_not_differentiate_the_defense(access):
    result = _run_check(DiffPure(TinyConvScore(seed=3), t_star=0.2, dt=1e-2), access=access)
    assert result.status == "skipped" and result.reason == "the attack does not differentiate the defense"


def test_gradient_check_says_when_the_attack_follows_a_surrogate():
    pur = DiffPure(TinyConvScore(seed=3), t_star=0.2, dt=1e-2)
    result = _run_check(pur, follows=pur.surrogate("fewer-steps", steps=2))
    assert result.status == "skipped" and result.numbers["mode"] == "surrogate"
    assert result.reason.startswith("the attack follows a surrogate of the defense")
    assert gradient_note([{"name": "gradient-correctness", "numbers": result.numbers}]) == "surrogate (its own solve)"


class _NoImplicitDevice(torch.overrides.TorchFunctionMode):
    """Tensor constructors called without device= create on 'meta': mixing one with the run's CPU
    tensors then raises, as a CPU-made tensor would on a GPU run (see tests/test_device.py)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _constructors() and kwargs.get("device") is None and not (args and isinstance(args[0], torch.Tensor)):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _constructors():
    from torch.utils._device import _device_constructors
    return _device_constructors()


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) + t.to(x.dtype).view(-1, 1, 1, 1) / 1000


@pytest.mark.parametrize("sampler", ["vp-sde", "vp-ode", "ld-sde", "ddpm", "ddim"])
def test_every_tensor_is_made_on_the_inputs_device(sampler):
    """Every option, gradient mode, the trajectory and the gradient check, with implicit-device
    constructors sent to 'meta' (a CPU-only stand-in for a GPU run)."""
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    options = [dict(), dict(t_delta=0.01, forward="discrete", clamp=True)]
    if sampler != "ld-sde":
        options.append(dict(t_delta=0.01, t_delta_mode="per-call"))
    for model in (ContinuousTimeScore(_Net()), DiscreteTimeScore(_Net()), ContinuousTimeScore(_Net(), precision="bf16")):
        for kw in options:
            pur = DiffPure(model, sampler=sampler, t_star=0.02, dt=5e-3, ddim_eta=0.3, **kw)
            with _NoImplicitDevice():
                for mode in pur.gradient_modes:
                    xx = x.clone().requires_grad_(True)
                    out = pur.purify(xx, gradient=mode, noise=PerExampleNoise([1, 2]))
                    if mode != "none":
                        out.sum().backward()
                        assert xx.grad.device == x.device
                float(out.sum())
    with _NoImplicitDevice():
        float(pur.trajectory(x, noise=PerExampleNoise([1, 2]))[0].sum())
        assert pur.gradient_agreement(x)["exact"] > 0.999
