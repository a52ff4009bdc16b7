"""The low-frequency attack (plugins/benchkit_attacks/lowfreq.py): it breaks the undefended digits
CNN, climbs its loss, follows the true gradient of its band-limited parametrisation, and returns
perturbations that are as low-frequency as its docstring says, inside the host's budget."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from benchkit.defended import DefendedModel
from benchkit.threat import L2, Linf

from benchkit_attacks import plugin
from benchkit_attacks.lowfreq import LowFrequencyMap, LowPass, dct_matrix, kept_frequencies
from benchkit_attacks.losses import LOSSES

from test_attacks import GaussianNoise, accuracy, build, cnn, data, run  # noqa: F401 - fixtures, host-style runner

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the band and its projector


def test_lowpass_is_the_orthogonal_projector_onto_the_dct_block() -> None:
    c = dct_matrix(8, dtype=torch.float64)
    assert torch.allclose(c @ c.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert kept_frequencies(8, 0.5) == 4 and kept_frequencies(32, 0.25) == 8 and kept_frequencies(8, 0.01) == 1
    assert kept_frequencies(100, 0.29) == 29
    lp = LowPass(0.5)
    d = torch.randn(3, 2, 8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pd = lp(d)
    assert torch.allclose(lp(pd), pd, atol=1e-12)                              # idempotent
    assert torch.allclose((d * pd).sum(), (pd * pd).sum(), atol=1e-10)          # orthogonal: <d - Pd, Pd> = 0
    spec = dct_matrix(8, dtype=torch.float64) @ pd @ dct_matrix(6, dtype=torch.float64).T
    assert spec[..., 4:, :].abs().max() < 1e-12 and spec[..., :, 3:].abs().max() < 1e-12   # 4 x 3 block
    assert torch.allclose(spec[..., :4, :3], (dct_matrix(8, dtype=torch.float64) @ d @
                                              dct_matrix(6, dtype=torch.float64).T)[..., :4, :3], atol=1e-12)
    assert float(lp.highfreq_energy_frac(pd).max()) < 1e-20
    assert float(lp.highfreq_energy_frac(torch.zeros(1, 1, 8, 8)).max()) == 0.0
    with pytest.raises(ValueError):
        LowPass(0.0)


# ---------------------------------------------------------------- params and registration


def test_params_defaults_and_validation() -> None:
    spec = plugin.ATTACKS["lowfreq"]
    p = spec.params()
    assert (p.steps, p.loss, p.random_start, p.eot, p.cutoff, p.headroom) == (100, "cw", False, 20, 0.25, 2.0)
    t = spec.threat(p)
    assert isinstance(t, Linf) and t.eps == 8 / 255
    attack = build("lowfreq")
    assert attack.gradient == "exact" and attack.eot_samples() == 20 and attack.goal == "misclassify"
    assert attack.params_for(unbounded=True) == {"eps": 1.0}
    l2 = spec.params.model_validate({"norm": "L2", "eps": 0.5})
    assert isinstance(spec.threat(l2), L2) and spec.threat(l2).eps == 0.5
    for bad in ({"norm": "L2"}, {"norm": "L2", "eps": 0.5, "headroom": 2}, {"cutoff": 0}, {"cutoff": 1.5},
                {"headroom": 0.5}, {"loss": "mse"}, {"frequency": 0.5}):
        with pytest.raises(ValidationError):
            spec.params.model_validate(bad)
    assert spec.params.model_validate({"norm": "L2", "eps": 0.5, "headroom": 1}).headroom == 1


# ---------------------------------------------------------------- (a) the undefended CNN falls


@pytest.mark.parametrize("params", [{"eps": 0.3}, {"norm": "L2", "eps": 2.0}], ids=["Linf", "L2"])
def test_lowfreq_breaks_the_undefended_cnn(cnn, data, params: dict) -> None:
    x, y = data
    model = DefendedModel(cnn)
    assert accuracy(model, x, y) > 0.9
    result = run(model, build("lowfreq", cutoff=0.5, steps=20, **params), x, y)   # run() verifies the budget
    assert accuracy(model, result.x_adv, y) <= 0.02
    assert result.stats["zero_grad_frac"] == 0.0 and result.stats["nonfinite_grad_frac"] == 0.0


# ---------------------------------------------------------------- (b) it maximises its loss


def test_loss_goes_up_over_iterations(cnn, data) -> None:
    x, y = data
    model = DefendedModel(cnn, GaussianNoise(0.1))
    attack, seen = build("lowfreq", eps=0.1, cutoff=0.5, steps=12, eot=4, loss="ce"), []

    def record(step: int, x_adv: Tensor, loss: Tensor, grad: Tensor) -> None:
        # Callbacks see the example whose loss was computed: valid, inside the budget.
        assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
        assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
        seen.append(float(loss.mean()))

    attack.callback = record
    run(model, attack, x, y)
    assert len(seen) == 13
    # A fixed step climbs steadily, then hovers near the top (mean CE 0.04 -> ~0.45 here).
    assert all(b > a for a, b in zip(seen[:6], seen[1:6])), seen
    assert seen[-1] > seen[0] + 0.25 and max(seen) > 10 * seen[0], seen


# ---------------------------------------------------------------- (c) the gradient it follows


class _Smooth(nn.Module):
    """A tiny deterministic classifier with smooth activations (finite differences need no kinks)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1).double()
        self.fc = nn.Linear(4 * 8 * 6, 5).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("norm,eps,headroom", [("Linf", 0.1, 2.0), ("Linf", 0.1, 1.0), ("L2", 1.0, 1.0)])
def test_gradient_matches_finite_differences_of_the_parametrisation(norm: str, eps: float, headroom: float) -> None:
    """f(c) = loss(example(x + sum_k c_k b_k)) over the in-band DCT basis images b_k: the gradient the
    objective returns, read along each b_k, is the central finite difference of f; and it lies in the
    band. The starting point has pixels clipped at eps (Linf, headroom 2) and at [0, 1]."""
    g = torch.Generator().manual_seed(1)
    model = DefendedModel(_Smooth().eval())
    x = torch.rand(3, 2, 8, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    lp = LowPass(0.5)
    fmap = LowFrequencyMap(norm, eps, lp, headroom)
    u0 = lp(torch.randn(x.shape, generator=g, dtype=torch.float64))
    u0 = u0 * (1.5 * eps / u0.abs().amax() if norm == "Linf" else eps / u0.flatten(1).norm(dim=1).max())
    z0 = fmap.threat.project(x, x + u0)
    objective = fmap.objective(model, x, y, LOSSES["ce"], 1)
    _, grad = objective(z0)
    assert torch.allclose(lp(grad), grad, atol=1e-12)           # the step direction is band-limited
    if norm == "Linf" and headroom > 1:
        assert bool(((z0 - x).abs() > eps).any())               # the eps clip is active somewhere
    assert bool(((x + (z0 - x).clamp(-eps, eps) < 0) | (x + (z0 - x).clamp(-eps, eps) > 1)).any())

    ch, cw = dct_matrix(8, dtype=torch.float64), dct_matrix(6, dtype=torch.float64)
    h, fd, analytic = 1e-6, [], []
    for c in range(2):
        for k in range(kept_frequencies(8, 0.5)):
            for l in range(kept_frequencies(6, 0.5)):
                basis = torch.zeros_like(x)
                basis[:, c] = torch.outer(ch[k], cw[l])
                up, _ = objective(z0 + h * basis)
                down, _ = objective(z0 - h * basis)
                fd.append((up - down) / (2 * h))
                analytic.append((grad * basis).flatten(1).sum(1))
    fd_t, an_t = torch.stack(fd, 1), torch.stack(analytic, 1)   # [images, coefficients]
    cos = torch.nn.functional.cosine_similarity(fd_t, an_t, dim=1)
    assert float(cos.min()) > 0.99, cos
    assert torch.allclose(fd_t, an_t, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- (d) what it returns is low-frequency


@pytest.mark.parametrize("params", [{"eps": 0.1, "headroom": 1}, {"norm": "L2", "eps": 0.5}], ids=["Linf", "L2"])
def test_perturbation_is_band_limited_where_nothing_is_clipped(cnn, data, params: dict) -> None:
    """On images kept away from 0 and 1 (no pixel clamped) with no eps clip (L2, or Linf with
    headroom 1), x_adv - x has no energy above the cutoff."""
    x, y = data
    x = 0.3 + 0.4 * x
    model = DefendedModel(cnn)
    result = run(model, build("lowfreq", cutoff=0.5, steps=10, **params), x, y)
    assert bool((result.x_adv > 0).all() & (result.x_adv < 1).all())    # the premise: nothing clamped
    delta = result.x_adv - x
    norms = delta.abs().flatten(1).amax(1) if "norm" not in params else delta.flatten(1).norm(dim=1)
    assert float(norms.min()) > 0.5 * params["eps"]          # it did perturb, with a good share of the budget
    lp = LowPass(0.5)
    frac = lp.highfreq_energy_frac(delta)
    assert float(frac.max()) < 1e-8
    assert result.stats["highfreq_energy_frac"] == pytest.approx(float(frac.mean()), abs=1e-9)
    spec = dct_matrix(8) @ delta @ dct_matrix(8).T
    assert float(spec[..., 4:, :].abs().max()) < 1e-5 and float(spec[..., :, 4:].abs().max()) < 1e-5


def test_headroom_clips_a_smooth_perturbation_far_less_broadband_than_pgd(cnn, data) -> None:
    """With the default headroom the Linf perturbation is a band-limited one clipped flat at eps:
    mostly low-frequency, where PGD's sign steps spread energy over the whole spectrum."""
    x, y = data
    x = 0.25 + 0.5 * x
    model = DefendedModel(cnn)
    low = run(model, build("lowfreq", eps=0.1, cutoff=0.5, steps=10), x, y)
    pgd = run(model, build("pgd-eot", eps=0.1, steps=10), x, y)
    lp = LowPass(0.5)
    ours, theirs = float(lp.highfreq_energy_frac(low.x_adv - x).mean()), float(lp.highfreq_energy_frac(pgd.x_adv - x).mean())
    assert ours < 0.2 < 0.5 < theirs, (ours, theirs)
    assert float((low.x_adv - x).abs().max()) <= 0.1 + 1e-6


# ---------------------------------------------------------------- per-image randomness, iterate selection


def test_results_are_per_image_whatever_the_batch(cnn, data) -> None:
    x, y = data
    model = DefendedModel(cnn, GaussianNoise(0.3))
    params = {"eps": 0.1, "cutoff": 0.5, "steps": 3, "eot": 2, "random_start": True}
    sub = list(range(8, 40, 3))
    whole = run(model, build("lowfreq", **params), x, y)
    alone = run(model, build("lowfreq", **params), x[sub], y[sub], indices=sub)
    assert torch.allclose(whole.x_adv[sub], alone.x_adv, atol=1e-6)


def test_protocol_selection_keeps_valid_examples(cnn, data) -> None:
    """With select: protocol the examples come from the callback's view of the iterates: they must
    be the clipped, clamped examples, inside the budget (run() verifies), never the raw iterate."""
    x, y = data
    result = run(DefendedModel(cnn, GaussianNoise(0.1)),
                 build("lowfreq", eps=0.3, cutoff=0.5, steps=6, eot=2, select="protocol"), x, y)
    assert result.iteration is not None and result.verdict is not None
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
