"""The transfer attack takes its source from the host's registry, so an attack of another plugin,
AutoAttack (the paper's Table 8: AutoAttack crafted on the static classifier, evaluated through
DiffPure), can be the source; each AutoAttack version becomes a transfer variant and the host
verifies and judges the examples on the defended model."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from benchkit import registry
from benchkit.defended import DefendedModel, Purifier
from benchkit.evaluate import run_attack
from benchkit.noise import Noise
from benchkit.threat import Linf

pytest.importorskip("pyautoattack")

EPS = 0.3


class Linear(nn.Module):
    """A fixed linear classifier on 1x8x8 images: deterministic, so AutoAttack standard applies."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(64, 10, generator=gen))

    def forward(self, x: Tensor) -> Tensor:
        return (x.flatten(1) - 0.5) @ self.w


class NoisePurifier(Purifier):
    """A stochastic purifier standing in for DiffPure; counts its calls."""

    stochastic = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:
        self.calls += 1
        return (x + 0.01 * noise.randn_like(x)).clamp(0, 1)


@pytest.fixture
def data() -> tuple[Tensor, Tensor, nn.Module]:
    clf = Linear().eval()
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = clf(x).argmax(1)   # every image starts correctly classified
    return x, y, clf


def _entry():
    return registry.get("attacks").get("transfer")


def test_autoattack_is_a_valid_transfer_source(plugin_manager) -> None:
    entry = _entry()
    p = entry.validate({"source": {"plugin": "autoattack",
                                   "params": {"norm": "Linf", "eps": "4/255", "versions": ["standard"]}}}, "t")
    threat = entry.threat(p)
    assert isinstance(threat, Linf) and threat.eps == pytest.approx(4 / 255)   # the source's budget
    attack = entry.build(p)
    assert attack.access == "transfer" and attack.gradient is None
    assert [name for name, _ in attack.variants()] == ["standard"]
    # The source's own params are checked by its own model, errors named under source.params.
    with pytest.raises(ValidationError, match="params.versions"):
        entry.params.model_validate({"source": {"plugin": "autoattack", "params": {"versions": ["fast"]}}})
    with pytest.raises(ValidationError, match="unknown source attack 'auto-attack'.*autoattack"):
        entry.params.model_validate({"source": {"plugin": "auto-attack"}})


def test_one_variant_source_stays_one_attack(plugin_manager) -> None:
    entry = _entry()
    attack = entry.build({"source": {"plugin": "pgd-eot", "params": {"eps": EPS, "steps": 5, "eot": 1}}})
    assert attack.variants() == [("", attack)]


def test_autoattack_transferred_from_the_static_classifier(plugin_manager, data) -> None:
    """Each AutoAttack version crafts on the bare classifier (which it breaks: the paper's 'static
    model' column), the examples respect the budget, and the defended model is what the host
    hands the attack, never what the source attacks."""
    x, y, clf = data
    entry = _entry()
    params = {"source": {"plugin": "autoattack",
                         "params": {"norm": "Linf", "eps": EPS, "versions": ["standard", "rand"], "eot": 2,
                                    "n_iter": 10, "n_queries": 50}}}
    attack = entry.build(params)
    threat = entry.threat(entry.validate(params, "t"))

    purifier = NoisePurifier()
    defended = DefendedModel(clf, purifier)
    ctx_base = {"device": torch.device("cpu"), "undefended": clf, "batch_size": 16}
    got = {}
    for variant, x_adv, extra, result in run_attack(defended, attack, threat, x, y, list(range(len(y))),
                                                    ctx_base, ("transfer-test",)):
        assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert result.verdict is None   # AutoAttack's own verdict was on the surrogate, not this defense
        with torch.no_grad():
            got[variant] = float((clf(x_adv).argmax(1) == y).float().mean())
    assert set(got) == {"standard", "rand"}
    assert got["standard"] == 0.0 and got["rand"] <= 0.2    # the static model falls
    assert purifier.calls == 0                       # the defense is never queried by the source


def test_transfer_needs_the_undefended_classifier(plugin_manager, data) -> None:
    x, y, clf = data
    entry = _entry()
    attack = entry.build({"source": {"plugin": "autoattack", "params": {"eps": EPS, "n_iter": 5}}})
    ctx_base = {"device": torch.device("cpu"), "undefended": None, "batch_size": 16}
    with pytest.raises(Exception, match="undefended"):
        list(run_attack(DefendedModel(clf), attack, Linf(EPS), x, y, list(range(len(y))), ctx_base, ("t",)))
