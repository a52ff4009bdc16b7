"""Target choice and targeted losses (plugins/benchkit_attacks/targets.py), on hand-made logits
whose answers are known and against pyautoattack's own targeted DLR; and AutoAttack's targeted
attacks (APGD-T, FAB-T) run alone as versions of the autoattack plugin."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from benchkit.defended import DefendedModel, Purifier
from benchkit.noise import Noise, PerExampleNoise, derive_seed

from benchkit_attacks.targets import (choose_targets, targeted_loss, targeted_loss_fn, targeted_objective,
                                      top_targets)

from test_attacks import cnn, data, run  # noqa: F401 - fixtures and the host-style runner

pytestmark = pytest.mark.usefixtures("one_thread")


def _noise(indices: list[int], seed: int = 0) -> PerExampleNoise:
    """The host's per-image streams for these image indices."""
    return PerExampleNoise([derive_seed(seed, i, "attack") for i in indices])


def _logits(b: int, n: int, seed: int = 0) -> Tensor:
    return torch.randn(b, n, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- choose_targets


@pytest.mark.parametrize("n", [2, 3, 10])
@pytest.mark.parametrize("how", ["random", "least-likely", "second"])
def test_targets_are_never_the_true_label(how: str, n: int) -> None:
    b = 500
    logits = _logits(b, n)
    # Half the labels are the argmax, half the argmin: the true class is the answer the mask must skip.
    y = torch.where(torch.arange(b) % 2 == 0, logits.argmax(1), logits.argmin(1))
    t = choose_targets(logits, y, n, how, _noise(list(range(b))))
    assert t.dtype == torch.long and t.shape == (b,)
    assert bool((t != y).all()) and int(t.min()) >= 0 and int(t.max()) < n
    if n == 2:
        assert torch.equal(t, 1 - y)   # the only other class


def test_least_likely_and_second_on_known_logits() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, -3.0],     # y=1 is top: second = 2, least = 3
                           [9.0, 2.0, 8.0, -1.0],     # y=3 is the minimum: least skips it -> 1
                           [1.0, 1.5, 3.0, 2.0]])     # y=0, misclassified: second = top = 2
    y = torch.tensor([1, 3, 0])
    noise = _noise([0, 1, 2])
    assert choose_targets(logits, y, 4, "second", noise).tolist() == [2, 0, 2]
    assert choose_targets(logits, y, 4, "least-likely", noise).tolist() == [3, 1, 1]


def test_second_is_autoattacks_first_target_and_top_targets_its_list() -> None:
    # AutoAttack (APGD-T, FAB-T) targets output.sort()[1][:, -c] for c = 2 .. n_target_classes + 1 on
    # images it still counts robust, i.e. correctly classified ones (y = argmax).
    logits = _logits(64, 10, seed=3)
    y = logits.argmax(1)
    ranked = logits.sort(dim=1)[1]
    assert torch.equal(choose_targets(logits, y, 10, "second", _noise(list(range(64)))), ranked[:, -2])
    top = top_targets(logits, y, 9)
    assert torch.equal(top, torch.stack([ranked[:, -c] for c in range(2, 11)], dim=1))
    with pytest.raises(ValueError):
        top_targets(logits, y, 10)


def test_random_targets_are_per_image_whatever_the_batch() -> None:
    n, idx = 10, list(range(40))
    y = torch.arange(40) % n
    whole = choose_targets(None, y, n, "random", _noise(idx))
    sub = [3, 17, 5, 38, 22]
    alone = choose_targets(None, y[sub], n, "random", _noise(sub))
    assert torch.equal(whole[sub], alone)
    rev = idx[::-1]
    assert torch.equal(choose_targets(None, y[rev], n, "random", _noise(rev)), whole.flip(0))
    assert torch.equal(choose_targets(None, y, n, "random", _noise(idx)), whole)   # same seeds, same draw
    assert not torch.equal(choose_targets(None, y, n, "random", _noise(idx, seed=1)), whole)


def test_random_targets_are_uniform_over_the_other_classes() -> None:
    b, n = 9000, 10
    y = torch.full((b,), 4)
    t = choose_targets(None, y, n, "random", _noise(list(range(b))))
    counts = torch.bincount(t, minlength=n).float()
    assert counts[4] == 0
    others = counts[torch.arange(n) != 4]
    # 1000 expected per class; 5 standard deviations (~150) of slack.
    assert float((others - 1000).abs().max()) < 150, counts.tolist()


def test_choose_targets_rejects_bad_input() -> None:
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="unknown target choice"):
        choose_targets(_logits(2, 3), y, 3, "most-likely", _noise([0, 1]))
    with pytest.raises(ValueError, match="needs the clean logits"):
        choose_targets(None, y, 3, "second", _noise([0, 1]))
    with pytest.raises(ValueError, match="labels must lie"):
        choose_targets(None, torch.tensor([0, 3]), 3, "random", _noise([0, 1]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        choose_targets(None, torch.tensor([0]), 1, "random", _noise([0]))


# ---------------------------------------------------------------- targeted_loss


def test_targeted_losses_on_known_logits() -> None:
    z = torch.tensor([[4.0, 1.0, 0.0, -1.0, -2.0]])
    y, t = torch.tensor([0]), torch.tensor([3])
    lse = math.log(sum(math.exp(v) for v in (4.0, 1.0, 0.0, -1.0, -2.0)))
    assert targeted_loss("ce", z, t).item() == pytest.approx(-1.0 - lse, abs=1e-6)
    assert targeted_loss("cw", z, t).item() == pytest.approx(-1.0 - 4.0)
    # sorted 4, 1, 0, -1: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(4 + 1) / (4 + 0.5)
    assert targeted_loss("dlr", z, t, y).item() == pytest.approx(-5.0 / 4.5, abs=1e-6)
    # Raise z_t to 0.5: sorted 4, 1, 0.5, 0 -> -(4 - 0.5) / (4 - 0.25)
    z2 = torch.tensor([[4.0, 1.0, 0.0, 0.5, -2.0]])
    assert targeted_loss("dlr", z2, t, y).item() == pytest.approx(-3.5 / 3.75, abs=1e-6)
    # Once the target is the top class the margin is positive.
    z3 = torch.tensor([[4.0, 1.0, 0.0, 6.0, -2.0]])
    assert targeted_loss("cw", z3, t).item() == pytest.approx(2.0)
    assert targeted_loss("dlr", z3, t, y).item() > 0


@pytest.mark.parametrize("name", ["ce", "cw", "dlr"])
def test_targeted_loss_increases_with_the_target_logit(name: str) -> None:
    base = _logits(32, 10, seed=5)
    y = base.argmax(1)
    t = choose_targets(base, y, 10, "least-likely", _noise(list(range(32))))
    prev = None
    for step in torch.linspace(0, 12, 25):
        z = base.clone()
        z[torch.arange(32), t] += step
        cur = targeted_loss(name, z, t, y)
        if prev is not None:
            assert bool((cur >= prev - 1e-6).all()), name
        prev = cur
    # and it moved: strictly larger at the end than at the start
    assert bool((prev > targeted_loss(name, base, t, y)).all())


def test_targeted_dlr_matches_pyautoattack() -> None:
    autopgd = pytest.importorskip("pyautoattack.autopgd_base")
    z = _logits(50, 10, seed=7) * 3
    y = z.argmax(1)
    t = top_targets(z, y, 3)[:, 2]
    theirs = autopgd.APGDAttack_targeted.dlr_loss_targeted(SimpleNamespace(y_target=t), z, y)
    assert torch.allclose(targeted_loss("dlr", z, t, y), theirs, atol=1e-6)


def test_targeted_loss_rejects_bad_input() -> None:
    z, t = _logits(2, 5), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="true labels"):
        targeted_loss("dlr", z, t)
    with pytest.raises(ValueError, match="at least 4 classes"):
        targeted_loss("dlr", _logits(2, 3), t, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="unknown targeted loss"):
        targeted_loss("mse", z, t)
    with pytest.raises(ValueError, match="true labels"):
        targeted_loss_fn("dlr")
    with pytest.raises(ValueError, match="like y"):
        targeted_objective("ce", torch.tensor([0, 1]), torch.tensor([2]))


def test_targeted_objective_swaps_the_labels_for_the_targets() -> None:
    """(loss_fn, labels) in place of an untargeted (loss_fn, y): what pgd-eot's targeted mode hands
    DefendedModel.loss_and_grad."""
    z = _logits(4, 10, seed=9)
    y = z.argmax(1)
    t = choose_targets(z, y, 10, "second", _noise([0, 1, 2, 3]))
    for name in ("ce", "cw", "dlr"):
        fn, labels = targeted_objective(name, y, t)
        assert torch.equal(labels, t)
        assert torch.allclose(fn(z, labels), targeted_loss(name, z, t, y))


# ---------------------------------------------------------------- with DefendedModel's EOT


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 10, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.w


class _Noisy(Purifier):
    stochastic = True

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:
        return x + 0.1 * noise.randn_like(x)


@pytest.mark.parametrize("name", ["ce", "cw", "dlr"])
def test_targeted_loss_fn_through_eot(name: str) -> None:
    """Targets go where labels go: EOT copies (chunked, repeat-major) each see their image's target
    and true label, so the EOT loss is the mean over copies of targeted_loss."""
    clf = _Linear().eval()
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    t = torch.tensor([9, 8, 7, 6, 5, 4])
    fn = targeted_loss_fn(name, y)
    plain = DefendedModel(clf)
    loss, grad = plain.loss_and_grad(fn, x, t, 1)
    assert torch.allclose(loss, targeted_loss(name, clf(x), t, y), atol=1e-6)
    assert grad.shape == x.shape and bool(grad.abs().sum() > 0)
    noisy = DefendedModel(clf, _Noisy(), max_batch=12)   # 2 copies per pass: 8 samples in 4 chunks
    seeds = [derive_seed(0, i, "defense") for i in range(6)]
    loss_eot, _ = noisy.for_images(x, seeds).loss_and_grad(fn, x, t, 8)
    expected = noisy.for_images(x, seeds).expectation(lambda z, tt: targeted_loss(name, z, tt, y.repeat(z.shape[0] // 6)),
                                                      x, t, 8)
    assert torch.allclose(loss_eot, expected.detach(), atol=1e-5)


# ---------------------------------------------------------------- AutoAttack's targeted attacks alone


def _autoattack(**params: object):
    """The autoattack plugin's attack and the budget its registered mapping gives (what the host uses)."""
    from benchkit_autoattack.plugin import AutoAttackParams, AutoAttackSuite, autoattack_threat

    p = AutoAttackParams.model_validate(params)
    return AutoAttackSuite(p), autoattack_threat(p)


def test_autoattack_params_accept_the_targeted_versions() -> None:
    pytest.importorskip("pyautoattack")
    from benchkit_autoattack.plugin import AutoAttackParams

    default = AutoAttackParams()
    assert default.versions == ["standard"] and default.n_target_classes == 9 and default.eot == 20
    attack, _ = _autoattack(versions=["standard", "apgd-t", "fab-t"])
    assert [v for v, _ in attack.variants()] == ["standard", "apgd-t", "fab-t"]
    assert _autoattack(versions=["standard", "fab-t"])[0].eot_samples() is None   # no EOT without rand/apgd-t
    assert _autoattack(versions=["apgd-t"], eot=4)[0].eot_samples() == 4
    for bad in ({"versions": ["apgd-x"]}, {"versions": ["APGD-T"]}, {"versions": []}, {"n_target_classes": 0}):
        with pytest.raises(ValidationError):
            AutoAttackParams.model_validate(bad)


@pytest.mark.parametrize("version", ["apgd-t", "fab-t"])
def test_autoattack_targeted_breaks_the_undefended_cnn(cnn, data, version: str) -> None:
    pytest.importorskip("pyautoattack")
    x, y = data
    attack, threat = _autoattack(eps=0.3, versions=[version], n_iter=10, n_target_classes=3)
    (name, sub), = attack.variants()
    assert name == version
    result = run(DefendedModel(cnn), sub, x, y, threat=threat)   # verifies the budget host-style
    assert threat.distance(x, result.x_adv).max() <= 0.3 + 1e-6
    with torch.no_grad():
        pred = cnn(result.x_adv).argmax(1)
    assert float((pred == y).float().mean()) == 0.0
    # AutoAttack's own verdict: robust iff its last label is the true one; here every image fell.
    assert result.verdict is not None and not bool(result.verdict.any())


def test_autoattack_targets_are_capped_at_the_wrong_classes() -> None:
    """9 targets (the default) on a 5-class classifier would index past its classes: capped at 4."""
    pytest.importorskip("pyautoattack")

    class Five(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 5, generator=torch.Generator().manual_seed(0)))

        def forward(self, z: Tensor) -> Tensor:
            return (z.flatten(1) - 0.5) @ self.w

    clf = Five().eval()
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = clf(x).argmax(1)
    for version in ("apgd-t", "fab-t", "standard"):   # standard runs both too
        attack, threat = _autoattack(eps=0.05, versions=[version], n_iter=3, n_queries=20)
        run(DefendedModel(clf), attack.variants()[0][1], x, y, threat=threat)
