"""The defense contract: bpda and none come free with every purifier, the host classifies with none,
attacks fix their own gradient modes, and `validate` checks every cell's mode against the modes a
defense declared at registration (a defense that declares none is checked when built, and a built
purifier that lacks a declared mode fails the build)."""
from __future__ import annotations

import sqlite3

import pytest
import torch
from pydantic import Field
from torch import nn

from benchkit import registry
from benchkit.cli import main
from benchkit.defended import DefendedModel, Identity, Purifier, supported_modes
from benchkit.errors import BadInput
from benchkit.hookspecs import hookimpl
from benchkit.params import Params
from conftest import write

# Purifiers built by the plugin below, by their `tag` param: the tests read what each one was asked.
BUILT: dict[str, "Shrink"] = {}


class TagParams(Params):
    tag: str = Field("", description="key of the built purifier in BUILT")


class Shrink(Purifier):
    """0.8 x + 0.1: differentiable (exact), deterministic; records every mode `_purify` receives."""

    gradient_modes = ("exact",)

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def _purify(self, x, *, gradient, noise):
        self.seen.add(gradient)
        return 0.8 * x + 0.1


class Rounding(Shrink):
    """An output that cannot be differentiated: only the host's bpda / none."""

    gradient_modes = ()

    def _purify(self, x, *, gradient, noise):
        self.seen.add(gradient)
        return torch.round(x * 4) / 4


def tagged(cls):
    def make(p: TagParams):
        BUILT[p.tag] = cls()
        return BUILT[p.tag]
    return make


class ContractPlugin:
    @hookimpl
    def register_defenses(self, register):
        register("shrink", tagged(Shrink), params=TagParams, gradient_modes=("exact",))
        register("rounding", tagged(Rounding), params=TagParams, gradient_modes=())
        register("rounding-undeclared", tagged(Rounding), params=TagParams)
        # Declares an adjoint its purifier does not have: the build must refuse it.
        register("overclaims", tagged(Shrink), params=TagParams, gradient_modes=("exact", "adjoint"))


@pytest.fixture
def contract(plugin_manager):
    plugin_manager.register(ContractPlugin(), name="contract")
    registry.reset()
    BUILT.clear()
    return plugin_manager


def suite(tmp_path, defenses: str, cells: str, attacks: str | None = None):
    attacks = attacks or """
  - {id: pgd, plugin: pgd-eot, params: {eps: 0.1, steps: 2, eot: 1}}
  - {id: bpda, plugin: bpda-eot, params: {eps: 0.1, steps: 2, eot: 1}}
  - {id: sq, plugin: square, params: {eps: 0.1, n_queries: 5}}"""
    return write(tmp_path / "s.yaml", f"""
suite: contract
dataset: {{plugin: digits, params: {{split: test, n: 8}}}}
classifiers: [{{id: cnn, plugin: digits-cnn}}]
defenses:{defenses}
attacks:{attacks}
cells:{cells}
eval: {{batch_size: 8, repeats: 1}}
checks: {{enabled: []}}
""")


def errors(capsys) -> list[str]:
    return [l for l in capsys.readouterr().err.splitlines() if l.startswith("benchkit: error: ")]


# ------------------------------------------------------------------ the purifier side


def test_bpda_and_none_come_free():
    assert Purifier.gradient_modes == ("exact",)
    assert supported_modes(Shrink()) == ("exact", "bpda", "none")
    assert supported_modes(Rounding()) == ("bpda", "none")
    assert supported_modes(Identity()) == ("exact", "adjoint", "bpda", "none")
    assert supported_modes(("none", "exact", "bpda")) == ("exact", "bpda", "none")   # listing them is harmless


def test_a_non_differentiable_purifier_is_attacked_through_bpda_only():
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    ce = lambda logits, yy: nn.functional.cross_entropy(logits, yy, reduction="none")
    rounding = Rounding()
    _, g = DefendedModel(clf, rounding, gradient="bpda").loss_and_grad(ce, x, y, 1)
    # BPDA: the classifier's gradient at the purified image, passed straight to the input.
    xp = (torch.round(x * 4) / 4).requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ce(clf(xp), y).sum(), xp)
    assert torch.allclose(g, g_ref, atol=1e-6) and rounding.seen == {"none"}
    with pytest.raises(ValueError, match="does not support gradient mode 'exact'"):
        DefendedModel(clf, rounding, gradient="exact")
    with pytest.raises(ValueError, match=r"supports gradient modes \('bpda', 'none'\), not 'adjoint'"):
        rounding.purify(x, gradient="adjoint")


def test_exact_only_purifier_runs_under_bpda_and_is_classified_with_none(tmp_path, contract, capsys):
    p = suite(tmp_path, """
  - {id: a, plugin: shrink, params: {tag: a}}
  - {id: b, plugin: shrink, params: {tag: b}}""", """
  - {classifier: cnn, defense: a, attack: bpda}
  - {classifier: cnn, defense: b, attack: pgd}""")
    assert main(["validate", str(p)]) == 0
    assert main(["run", str(p), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    # BPDA's forward passes and every verdict run _purify without gradient; only PGD asks for exact.
    assert BUILT["a"].seen == {"none"}
    assert BUILT["b"].seen == {"exact", "none"}
    db = sqlite3.connect(tmp_path / "out" / "results.sqlite")
    assert db.execute("SELECT count(*) FROM examples").fetchone()[0] == 16


# ------------------------------------------------------------------ validate, before anything runs


def test_validate_refuses_a_gradient_setting_the_defense_lacks(tmp_path, contract, capsys):
    p = suite(tmp_path, """
  - {id: s, plugin: shrink, gradient: adjoint}""", """
  - {classifier: cnn, defense: s, attack: sq}""")
    assert main(["validate", str(p)]) == 2
    assert errors(capsys) == [
        f"benchkit: error: {p}: defenses[0].gradient: defense 's' (shrink) supports exact, bpda, none, not "
        "'adjoint': set one of those, or leave gradient unset"]
    assert BUILT == {}   # nothing was built


def test_validate_refuses_an_exact_gradient_attack_on_a_bpda_only_defense(tmp_path, contract, capsys):
    p = suite(tmp_path, """
  - {id: r, plugin: rounding}""", """
  - {classifier: cnn, defense: r, attack: sq}
  - {classifier: cnn, defense: r, attack: pgd}
  - {classifier: cnn, defense: r, attack: bpda}""")
    assert main(["validate", str(p)]) == 2
    assert errors(capsys) == [
        f"benchkit: error: {p}: cells[1]: defense 'r' (rounding) supports bpda, none; attack 'pgd' (pgd-eot) "
        "differentiates with exact: use an attack in one of those modes (a BPDA attack for bpda), or a defense "
        "with exact gradients"]
    # square fixes no mode (it only queries) and BPDA's comes free: the same defense passes with them.
    p = suite(tmp_path, """
  - {id: r, plugin: rounding}""", """
  - {classifier: cnn, defense: r, attack: sq}
  - {classifier: cnn, defense: r, attack: bpda}""")
    assert main(["validate", str(p)]) == 0


def test_builtin_gan_inversion_declares_its_modes_by_mode(tmp_path, contract, capsys):
    """The optimising GAN inversion is bpda-only; its encoder mode is exact. A grid names the cells
    by key, and the params the modes depend on are shown."""
    p = write(tmp_path / "g.yaml", """
suite: gan
dataset: {plugin: digits, params: {split: test, n: 8}}
classifiers: [{id: cnn, plugin: digits-cnn}]
defenses:
  - {id: gan, plugin: gan-inversion, params: {mode: opt}}
  - {id: enc, plugin: gan-inversion, params: {mode: enc}}
attacks: [{id: pgd, plugin: pgd-eot, params: {eps: 0.1}}]
grid: all
""")
    assert main(["validate", str(p)]) == 2
    assert errors(capsys) == [
        f"benchkit: error: {p}: grid: cnn/gan/pgd: defense 'gan' (gan-inversion, mode: opt) supports bpda, none; "
        "attack 'pgd' (pgd-eot) differentiates with exact: use an attack in one of those modes (a BPDA attack for "
        "bpda), or a defense with exact gradients"]


def test_builtin_diffpure_has_no_adjoint_on_a_discrete_chain(tmp_path, contract, capsys):
    p = write(tmp_path / "d.yaml", """
suite: dp
dataset: {plugin: digits, params: {split: test, n: 8}}
classifiers: [{id: cnn, plugin: digits-cnn}]
defenses:
  - {id: ddim, plugin: diffpure, gradient: adjoint, params: {score_model: digits-unet, sampler: ddim}}
  - {id: sde, plugin: diffpure, gradient: adjoint, params: {score_model: digits-unet}}
attacks: [{id: sq, plugin: square, params: {eps: 0.1}}]
grid: all
""")
    assert main(["validate", str(p)]) == 2
    assert errors(capsys) == [
        f"benchkit: error: {p}: defenses[0].gradient: defense 'ddim' (diffpure, score_model: digits-unet, "
        "sampler: ddim) supports exact, bpda, none, not 'adjoint': set one of those, or leave gradient unset"]


# ------------------------------------------------------------------ at build, before any cell


def test_undeclared_defense_is_checked_when_built(tmp_path, contract, capsys):
    p = suite(tmp_path, """
  - {id: r, plugin: rounding-undeclared, params: {tag: r}}""", """
  - {classifier: cnn, defense: r, attack: pgd}""")
    assert main(["validate", str(p)]) == 0   # nothing declared: validate cannot know
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["run", str(p), "--out", str(out)]) == 2
    assert errors(capsys) == [
        f"benchkit: error: {p}: cells[0]: defense 'r' (rounding-undeclared) supports bpda, none; attack 'pgd' "
        "(pgd-eot) differentiates with exact: use an attack in one of those modes (a BPDA attack for bpda), or "
        "a defense with exact gradients"]
    assert BUILT["r"].seen == set()   # refused before any cell ran


def test_a_purifier_lacking_a_declared_mode_fails_the_build(tmp_path, contract, capsys):
    p = suite(tmp_path, """
  - {id: o, plugin: overclaims, params: {tag: o}, gradient: adjoint}""", """
  - {classifier: cnn, defense: o, attack: sq}""")
    assert main(["validate", str(p)]) == 0   # validate trusts the declaration
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(tmp_path / "out")]) == 2
    assert errors(capsys) == [
        f"benchkit: error: {p}: defenses[0]: the plugin registered gradient_modes exact, adjoint, but its Shrink "
        "supports only exact, bpda, none (no adjoint): the plugin's registration is wrong"]
    assert BUILT["o"].seen == set()


# ------------------------------------------------------------------ registration


@pytest.mark.parametrize("modes, message", [
    (("exact", "exakt"), "defense 'typo': gradient_modes names 'exakt', not one of exact, adjoint, bpda, none"),
    ("exact", "defense 'typo': gradient_modes must be a tuple of modes, not the string 'exact'"),
])
def test_registration_refuses_unknown_modes(plugin_manager, modes, message):
    class Typo:
        @hookimpl
        def register_defenses(self, register):
            register("typo", lambda p: Shrink(), gradient_modes=modes)

    plugin_manager.register(Typo(), name="typo")
    registry.reset()
    with pytest.raises(BadInput) as exc:
        registry.get("defenses")
    assert exc.value.problems == [f"plugin 'typo': register_defenses failed: ValueError: {message}"]


def test_a_failing_modes_function_is_one_line(tmp_path, plugin_manager, capsys):
    class Broken:
        @hookimpl
        def register_defenses(self, register):
            register("broken", lambda p: Shrink(), gradient_modes=lambda p: ("exact", "sideways"))

    plugin_manager.register(Broken(), name="broken")
    registry.reset()
    p = suite(tmp_path, """
  - {id: b, plugin: broken}""", """
  - {classifier: cnn, defense: b, attack: sq}""")
    assert main(["validate", str(p)]) == 2
    assert errors(capsys) == [
        f"benchkit: error: {p}: defenses[0]: defense plugin 'broken' (broken): gradient_modes names 'sideways', "
        "not one of exact, adjoint, bpda, none"]
