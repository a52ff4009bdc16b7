"""The evaluation checks catch what they are for, end to end through `benchkit run`."""
from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from benchkit.cli import main
from benchkit.defended import Purifier
from benchkit.hookspecs import hookimpl
from conftest import ROOT, write


class Quantize(Purifier):
    """Rounds to 4 grey levels; its exact gradient is zero everywhere (gradient masking)."""
    gradient_modes = ("exact", "bpda", "none")

    def _purify(self, x, *, gradient, noise):
        return torch.round(x * 3) / 3


class Gauss(Purifier):
    """Adds N(0, 0.3^2) noise: a stochastic defense where EOT matters."""
    stochastic = True
    gradient_modes = ("exact", "bpda", "none")

    def _purify(self, x, *, gradient, noise):
        return (x + 0.3 * noise.randn_like(x)).clamp(0, 1)


class Defenses:
    @hookimpl
    def register_defenses(self, register):
        register("quantize", lambda p: Quantize())
        register("gauss", lambda p: Gauss())


@pytest.fixture
def defenses(plugin_manager):
    from benchkit import registry
    plugin_manager.register(Defenses(), name="test-defenses")
    registry.reset()


def checks(out):
    db = sqlite3.connect(out / "results.sqlite")
    rows = db.execute("SELECT c.attack, k.name, k.status, k.numbers_json, k.reason FROM checks k JOIN cells c ON c.id = k.cell_id")
    return {(a, n): (s, json.loads(nums), r) for a, n, s, nums, r in rows}


def robust(out, attack):
    db = sqlite3.connect(out / "results.sqlite")
    flags = [f for (f,) in db.execute("SELECT e.adv_flags FROM examples e JOIN cells c ON c.id = e.cell_id WHERE c.attack = ?", (attack,))]
    return 100 * sum(f.count("1") for f in flags) / sum(len(f) for f in flags)


def suite(tmp_path, defense, attacks, checks="{subset: 16, cost: full}"):
    # cost: full: these verdicts must not depend on how long the cell took (test_checks_cost.py: the budget)
    return write(tmp_path / "s.yaml", f"""
suite: checks
include: [{ROOT}/suites/_base/digits.yaml]
dataset: {{plugin: digits, params: {{n: 32}}}}
defenses: [{{id: d, plugin: {defense}}}]
attacks: {attacks}
grid: all
eval: {{batch_size: 32, repeats: 4}}
checks: {checks}
""")


def test_gradient_masking_is_flagged_and_bpda_breaks_it(tmp_path, defenses):
    s = suite(tmp_path, "quantize", "[{id: pgd, plugin: pgd-eot, params: {eps: 0.3, steps: 20, eot: 1}},"
                                    " {id: bpda, plugin: bpda-eot, params: {eps: 0.3, steps: 20, eot: 1}}]")
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 0
    c = checks(tmp_path / "o")
    assert c[("pgd", "gradients")][0] == "fail" and c[("pgd", "gradients")][1]["zero_grad_frac"] == 1.0
    assert c[("pgd", "unbounded-budget")][0] == "fail"
    assert "gradient masking suspected" in c[("pgd", "unbounded-budget")][2]
    assert c[("pgd", "attack-undefended")][0] == "pass"   # the attack itself is fine
    assert robust(tmp_path / "o", "pgd") > 80
    assert robust(tmp_path / "o", "bpda") < 5
    assert c[("bpda", "unbounded-budget")][0] == "pass"


def test_eot_matters_and_the_convergence_check_says_so(tmp_path, defenses):
    # On all 32 images: on 16, EOT 1 -> 2 breaks 3 more images and spares none, short of significance
    # (sign test p = 1/8), and the check rightly passes.
    s = suite(tmp_path, "gauss", "[{id: eot1, plugin: pgd-eot, params: {eps: 0.1, steps: 10, eot: 1}},"
                                 " {id: eot8, plugin: pgd-eot, params: {eps: 0.1, steps: 10, eot: 8}}]",
              checks="{subset: 32, cost: full}")
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 0
    assert robust(tmp_path / "o", "eot8") < robust(tmp_path / "o", "eot1") - 5
    status, nums, reason = checks(tmp_path / "o")[("eot1", "eot-convergence")]
    assert status == "fail" and reason.startswith("EOT not converged"), reason
    assert nums["robust_eot2"] < nums["robust_eot1"] and nums["images"] == 32 and nums["p_value"] < 0.05
    assert nums["broken_only_2n"] > nums["broken_only_n"]


def test_black_box_stronger_than_white_box_is_flagged(tmp_path, defenses):
    # Against the quantiser, gradient PGD is masked while Square, which needs no gradient, is not.
    s = suite(tmp_path, "quantize", "[{id: pgd, plugin: pgd-eot, params: {eps: 0.3, steps: 10, eot: 1}},"
                                    " {id: square, plugin: square, params: {eps: 0.3, n_queries: 300}}]")
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 0
    status, nums, reason = checks(tmp_path / "o")[("square", "black-box-vs-white-box")]
    assert status == "fail" and nums["black_box"] < nums["white_box"] - 2, reason
