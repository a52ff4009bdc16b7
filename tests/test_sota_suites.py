"""The suites that reproduce later attacks on DiffPure, checked without running anything:
cifar10_diffattack (Kang, Song & Li, NeurIPS 2023), cifar10_diffhammer (Wang, Fu, Han & Xiang,
NeurIPS 2024) and cifar10_diffbreak (Kassis, Hengartner & Yu, NeurIPS 2025). Each validates, runs the
paper's settings (images, t*, sampler and steps, budgets, attack iterations, EOT, N, verification
protocol) and carries exactly the published numbers listed here, each with the table, row and column
it comes from.

The settings and numbers are written out from the papers' text and the authors' code (DiffAttack:
Table 1 and run_scripts/cifar10 of its code; DiffHammer: Table 1, App. C.1 and config.py; DiffBreak:
Tables 1, 3, 4, App. E-H and registry.py), not derived from the suites. Fast: no model is built."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from benchkit import resolve
from benchkit.cli import main
from conftest import ROOT
from test_paper_suites import _dump, _subset

SUITES = {"cifar10_diffattack", "cifar10_diffhammer", "cifar10_diffbreak"}


def _path(name: str):
    return ROOT / "suites" / f"{name}.yaml"


# ---------------------------------------------------------------- the papers' settings

def vp(t_star: float) -> dict:
    """Score-based DiffPure as Nie et al. (and Kang et al., Kassis et al.): the DDPM++ VP model, the
    reverse VP-SDE with dt = 1e-3, discrete alpha-bar forward, no clamp."""
    return {"score_model": "ddpmpp", "sampler": "vp-sde", "t_star": t_star, "dt": 0.001, "forward": "discrete",
            "clamp": False, "t_delta": 0.0}


# DiffHammer App. C.1.1: the score_sde model as a DDPM chain, t* = 0.1, defense interval 0.005 (20 steps),
# attack interval 0.01 (10 steps: the surrogate).
DH_DEFENSE = {"score_model": "ddpmpp", "sampler": "ddpm", "t_star": 0.1, "dt": 0.005, "clamp": False, "t_delta": 0.0}
DH_SURROGATE = {"kind": "fewer-steps", "steps": 10}


def diffattack(norm: str, eps: float, states: int) -> tuple:
    """Kang et al.: AutoAttack rand's APGD (100 iterations, EOT 20, one restart) on CE then DLR, plus
    lambda = 1 times the deviated-reconstruction loss over every 10th solver state."""
    return ("diffattack", {"norm": norm, "eps": eps, "steps": 100, "eot": 20, "restarts": 1, "random_start": True,
                           "losses": ["ce", "dlr"], "lambda_dev": 1.0, "deviation_states": states})


def apgd_margin(steps: int, eot: int, select: str) -> tuple:
    """DiffBreak's AA-Linf: its APGD on the margin loss (MarginLoss kappa inf), one restart, exact
    gradients; diffattack with lambda_dev 0 is that APGD on the classifier loss alone."""
    return ("diffattack", {"norm": "Linf", "eps": 8 / 255, "steps": steps, "eot": eot, "restarts": 1,
                           "random_start": True, "losses": ["cw"], "lambda_dev": 0.0, "select": select})


@dataclass
class Expect:
    data: dict                      # dataset params (subset of)
    verdict: tuple                  # (repeats, aggregate, samples)
    clean_on: str
    classifiers: dict               # id -> (plugin, params subset)
    defenses: dict                  # id -> (params subset, gradient)
    attacks: dict                   # id -> (plugin, params subset)
    cells: set = field(default_factory=set)


WRN_28_10 = ("robustbench", {"name": "Standard", "dataset": "cifar10", "threat_model": "Linf"})
WRN_70_16 = ("diffpure-cifar10", {"arch": "wrn-70-16-dropout"})

EXPECTED: dict[str, Expect] = {
    # Kang et al. Table 1: DiffPure's 512 images (--num_sub 64, data seeds), t* 0.1 (Linf) / 0.075 (L2),
    # one-evaluation numbers (3 single verdicts here, their mean the comparable one).
    "cifar10_diffattack": Expect(
        {"split": "test", "n": 512, "authors_subset": True, "authors_batch": 64}, (3, "single", 1), "split",
        {"wrn-28-10": WRN_28_10, "wrn-70-16": WRN_70_16},
        {"diffpure-t0.1": (vp(0.1), "exact"), "diffpure-t0.075": (vp(0.075), "exact")},
        {"diffattack-linf": diffattack("Linf", 8 / 255, 10), "diffattack-linf-4": diffattack("Linf", 4 / 255, 10),
         "diffattack-l2": diffattack("L2", 0.5, 8)},
        {f"{c}/{d}/{a}" for c in ("wrn-28-10", "wrn-70-16")
         for d, a in (("diffpure-t0.1", "diffattack-linf"), ("diffpure-t0.1", "diffattack-linf-4"),
                      ("diffpure-t0.075", "diffattack-l2"))}),
    # Wang et al. Table 1 (Linf 8/255): the first 512 test images, WRN-70-16, N = 10 evaluations,
    # 3 restarts x 50 iterations, CW/CE/DLR, EOT 1 (config.py N_EOT), EM lambda 5 and alpha 0.5.
    "cifar10_diffhammer": Expect(
        {"split": "test", "n": 512, "authors_subset": False, "subset_seed": None}, (10, "single", 1), "subset",
        {"wrn-70-16": WRN_70_16},
        {"diffpure": (DH_DEFENSE, "exact")},
        {"diffhammer": ("diffhammer", {"norm": "Linf", "eps": 8 / 255, "steps": 50, "restarts": 3,
                                       "losses": ["cw", "ce", "dlr"], "n": 10, "em_lambda": 5.0, "em_alpha": 0.5,
                                       "random_start": True, "surrogate": DH_SURROGATE, "select": "samples"}),
         "pgd-eot": ("pgd-eot", {"norm": "Linf", "eps": 8 / 255, "steps": 50, "restarts": 3, "step_size": 0.007,
                                 "eot": 1, "random_start": True, "gradient": "exact", "surrogate": DH_SURROGATE,
                                 "select": "protocol", "select_every": 1}),
         "bpda-eot": ("bpda-eot", {"norm": "Linf", "eps": 8 / 255, "steps": 50, "restarts": 3, "eot": 1,
                                   "random_start": True, "select": "protocol", "select_every": 1})},
        {f"wrn-70-16/diffpure/{a}" for a in ("diffhammer", "pgd-eot", "bpda-eot")}),
    # Kassis et al.: 256 images, DiffPure VP-SDE t* 0.1 with exact (DiffGrad) gradients, N = 10 copies;
    # Table 1 (WRN-70-16, 100 iterations, EOT 10), App. F Table 4 (WRN-28-10, 10 iterations, EOT 128).
    "cifar10_diffbreak": Expect(
        {"split": "test", "n": 256, "authors_subset": True, "authors_batch": 64}, (10, "single", 1), "subset",
        {"wrn-28-10": WRN_28_10, "wrn-70-16": WRN_70_16},
        {"diffpure": (vp(0.1), "exact")},
        {"apgd-full-dg": apgd_margin(100, 10, "protocol"), "apgd-oneshot": apgd_margin(10, 128, "loss"),
         "lowfreq-linf": ("lowfreq", {"norm": "Linf", "eps": 8 / 255, "steps": 100, "eot": 10, "loss": "cw",
                                      "random_start": False, "gradient": "exact", "select": "protocol"})},
        {"wrn-70-16/diffpure/apgd-full-dg", "wrn-28-10/diffpure/apgd-oneshot",
         "wrn-28-10/diffpure/lowfreq-linf", "wrn-70-16/diffpure/lowfreq-linf"}),
}

# ---------------------------------------------------------------- the published numbers

# (classifier, cell 'classifier/defense/attack' or None for a labelled row, table, row, column,
#  standard, robust)
KANG_T1 = [  # Table 1: Models / T / lp eps / Method -> Cl-Acc, Rob-Acc
    ("wrn-28-10", "diffpure-t0.1", "diffattack-linf", "WideResNet-28-10 / T=0.1 / Linf 8/255", 89.02, 46.88, 70.64),
    ("wrn-28-10", "diffpure-t0.1", "diffattack-linf-4", "WideResNet-28-10 / T=0.1 / Linf 4/255", 89.02, 71.88, 82.81),
    ("wrn-28-10", "diffpure-t0.075", "diffattack-l2", "WideResNet-28-10 / T=0.075 / L2 0.5", 91.03, 64.06, 78.58),
    ("wrn-70-16", "diffpure-t0.1", "diffattack-linf", "WideResNet-70-16 / T=0.1 / Linf 8/255", 90.07, 45.31, 71.29),
    ("wrn-70-16", "diffpure-t0.1", "diffattack-linf-4", "WideResNet-70-16 / T=0.1 / Linf 4/255", 90.07, 75.00, 81.25),
    ("wrn-70-16", "diffpure-t0.075", "diffattack-l2", "WideResNet-70-16 / T=0.075 / L2 0.5", 92.68, 70.31, 80.60),
]

# DiffHammer Table 1, Linf 8/255 block, DiffPure: (row, Avg.Rob, Wor.Rob); Clean 90.98 / 76.56.
DH_AVG_CLEAN, DH_WOR_CLEAN = 90.98, 76.56
DH_T1 = {"DH": ("diffhammer", 42.54, 22.66), "PGD": ("pgd-eot", 52.73, 31.05), "BPDA": ("bpda-eot", 70.74, 36.72),
         "DA/AA": (None, 57.60, 33.79)}

EXPECTED_REFERENCES: dict[str, list[tuple]] = {
    "cifar10_diffattack": [
        *[(c, f"{c}/{d}/{a}", "Table 1", f"{row} / DiffAttack", None, std, rob) for c, d, a, row, std, rob, _ in KANG_T1],
        *[(c, None, "Table 1", f"{row} / AdjAttack", None, std, adj) for c, d, a, row, std, _, adj in KANG_T1]],
    "cifar10_diffhammer": [
        *[("wrn-70-16", f"wrn-70-16/diffpure/{a}" if a else None, "Table 1", f"Linf 8/255 / {row}",
           "DiffPure Wor.Rob", DH_WOR_CLEAN, wor) for row, (a, _, wor) in DH_T1.items()],
        *[("wrn-70-16", None, "Table 1", f"Linf 8/255 / {row}", "DiffPure Avg.Rob", DH_AVG_CLEAN, avg)
          for row, (a, avg, _) in DH_T1.items()]],
    "cifar10_diffbreak": [
        # Table 1: Wor.Rob (Cl-Acc 89.06, one purification) / MV.Rob (Cl-Acc 91.02, majority of 10).
        ("wrn-70-16", "wrn-70-16/diffpure/apgd-full-dg", "Table 1", "DiffPure / Full-DiffGrad", "Wor.Rob", 89.06, 17.19),
        ("wrn-70-16", None, "Table 1", "DiffPure / Full-DiffGrad", "MV.Rob", 91.02, 39.45),
        ("wrn-70-16", None, "Table 1", "DiffPure / DiffAttack-DiffGrad", "Wor.Rob", 89.06, 15.63),
        ("wrn-70-16", None, "Table 1", "DiffPure / DiffAttack-DiffGrad", "MV.Rob", 91.02, 39.45),
        ("wrn-70-16", None, "Table 1", "DiffPure / DiffHammer-DiffGrad", "Wor.Rob", 89.06, 10.16),
        ("wrn-70-16", None, "Table 1", "DiffPure / DiffHammer-DiffGrad", "MV.Rob", 91.02, 38.28),
        ("wrn-70-16", None, "Table 1", "DiffPure / BPDA", "Wor.Rob", 89.06, 32.81),
        ("wrn-70-16", None, "Table 1", "DiffPure / BPDA", "MV.Rob", 91.02, 72.27),
        # App. F Table 4: one-shot, WRN-28-10.
        ("wrn-28-10", "wrn-28-10/diffpure/apgd-oneshot", "Table 4", "DiffPure / Full-DiffGrad (Ours)", None, 89.46, 48.05),
        ("wrn-28-10", None, "Table 4", "DiffPure / Surrogate (Lee and Kim)", None, 90.07, 48.28),
        ("wrn-28-10", None, "Table 4", "DiffPure / Full (Liu et al.)", None, 89.26, 62.11),
        # Table 3: LF under majority vote (LPIPS-bounded: labelled rows, never a lowfreq cell's reference).
        ("wrn-28-10", None, "Table 3", "DiffPure / CIFAR-10 / WideResNet-28-10", None, 92.19, 2.73),
        ("wrn-70-16", None, "Table 3", "DiffPure / CIFAR-10 / WideResNet-70-16", None, 92.19, 3.13)],
}

CITATION = {"cifar10_diffattack": "Kang et al. 2023", "cifar10_diffhammer": "Wang et al. 2024",
            "cifar10_diffbreak": "Kassis et al. 2025"}
SOURCE = re.compile(r"^(?P<paper>[A-Z][a-z]+ et al\. \d{4}), (?P<table>Table \d+), row '(?P<row>[^']+)'"
                    r"(?:, column '(?P<column>[^']+)')?")


def _published(ref) -> tuple:
    m = SOURCE.match(ref.source)
    assert m, f"source must start \"<Author> et al. <year>, Table N, row '...'\": {ref.source!r}"
    cell = f"{ref.classifier}/{ref.defense}/{ref.attack}" if ref.defense is not None and ref.attack is not None else None
    return m["paper"], (ref.classifier, cell, m["table"], m["row"], m["column"], ref.standard, ref.robust)


# ---------------------------------------------------------------- tests


def test_every_sota_suite_is_checked_here_and_not_as_nie_et_al():
    import test_paper_suites as paper

    assert set(EXPECTED) == set(EXPECTED_REFERENCES) == SUITES == paper.SOTA
    assert all(_path(n).is_file() for n in SUITES)
    assert not {p.stem for p in paper.PAPER} & SUITES


@pytest.mark.parametrize("name", sorted(SUITES))
def test_suite_validates(name, plugin_manager, capsys):
    path = _path(name)
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"{path}: ok")


@pytest.mark.parametrize("name", sorted(SUITES))
def test_paper_settings(name, plugin_manager):
    """Images, classifiers, t*, sampler, steps, budgets, attack iterations, EOT, N and the verification
    protocol are the paper's."""
    resolved = resolve.load(_path(name))
    suite, want = resolved.suite, EXPECTED[name]
    assert suite.suite == name
    assert suite.dataset.plugin == "cifar10"
    _subset(_dump(resolved.dataset.params), want.data, f"{name}: dataset")
    repeats, aggregate, samples = want.verdict
    assert (suite.eval.repeats, suite.eval.verdict.aggregate, suite.eval.verdict.samples) == (repeats, aggregate, samples)
    assert suite.eval.clean_on == want.clean_on and suite.eval.device is None
    assert set(resolved.classifiers) == set(want.classifiers)
    for cid, (plugin, params) in want.classifiers.items():
        assert resolved.classifiers[cid].spec.plugin == plugin, cid
        _subset(_dump(resolved.classifiers[cid].params), params, f"{name}: classifiers.{cid}")
    assert set(resolved.defenses) == set(want.defenses)
    for did, (params, gradient) in want.defenses.items():
        comp = resolved.defenses[did]
        assert comp.spec.plugin == "diffpure" and comp.spec.gradient == gradient, did
        _subset(_dump(comp.params), params, f"{name}: defenses.{did}")
    assert set(resolved.attacks) == set(want.attacks)
    for aid, (plugin, params) in want.attacks.items():
        comp = resolved.attacks[aid]
        assert comp.spec.plugin == plugin, aid
        _subset(_dump(comp.params), params, f"{name}: attacks.{aid}")
        assert resolved.threats[aid].eps == pytest.approx(params["eps"]), (name, aid)
    assert {c.key for c in resolved.cells if c.kind == "attack"} == want.cells


def test_diffpure_steps_are_the_papers(plugin_manager):
    """Solver steps as the papers count them: Kang et al.'s deviation states are every 10th Euler step
    (range(0, t, 10) with t = 100 or 75); DiffHammer's defense runs 20 DDPM steps (0.005) and its attacks
    differentiate 10 (0.01); every gradient mode asked for is one the sampler offers (no adjoint
    through a DDPM chain)."""
    from benchkit_diffpure.solver import default_steps, solver_gradients

    def steps(params) -> int:
        return default_steps(params.sampler, params.t_star, params.dt)

    for name in SUITES:
        resolved = resolve.load(_path(name))
        for did, comp in resolved.defenses.items():
            assert comp.spec.gradient in solver_gradients(comp.params.sampler), (name, did)
        for cell in resolved.cells:
            if cell.kind != "attack":
                continue
            d, a = resolved.defenses[cell.defense.id].params, resolved.attacks[cell.attack.id].params
            if cell.attack.plugin == "diffattack" and a.lambda_dev > 0:
                assert a.deviation_states == len(range(0, steps(d), 10)), cell.key
            surrogate = getattr(a, "surrogate", None)
            if surrogate is not None:
                assert steps(d) == round(0.1 / 0.005) and surrogate.steps == round(0.1 / 0.01), cell.key
    dh = resolve.load(_path("cifar10_diffhammer"))
    assert dh.attacks["diffhammer"].params.n == dh.suite.eval.repeats == 10   # N = 10 in the loop and after


@pytest.mark.parametrize("name", sorted(SUITES))
def test_references_are_the_published_numbers(name, plugin_manager):
    """Exactly the listed numbers, each on its cell (or as a labelled row), with a source naming the
    paper, table, row and (for N-evaluation tables) the column and which leaderboard column it matches."""
    resolved = resolve.load(_path(name))
    suite = resolved.suite
    cells = {c.key for c in resolved.cells if c.kind == "attack"}
    got = [_published(r) for r in suite.references]
    assert {paper for paper, _ in got} == {CITATION[name]}, "every reference cites the suite's paper"
    numbers = [t for _, t in got]
    assert len(numbers) == len(set(numbers)), "a reference is listed twice"
    assert sorted(numbers, key=repr) == sorted(EXPECTED_REFERENCES[name], key=repr)
    keys = [n[1] for n in numbers if n[1] is not None]
    assert len(keys) == len(set(keys)), "two references on one cell: the leaderboard shows only the first"
    for ref, (_, cell, *_rest) in zip(suite.references, numbers):
        assert ref.standard_std is None and ref.robust_std is None   # none of these tables gives a ±
        assert cell is None or cell in cells, f"{name}: reference for {cell}, which the suite does not run"
        if cell is None:
            assert ref.label and ref.label.strip(), f"{name}: a reference without a cell needs a label ({ref.source})"
            assert ref.attack is None or ref.attack in resolved.attacks
        elif suite.eval.repeats > 1 and name != "cifar10_diffattack":
            assert "compare with the" in ref.source, f"{name}: say which leaderboard column matches: {ref.source}"


def test_low_frequency_numbers_are_not_a_lowfreq_cells_reference(plugin_manager):
    """DiffBreak's LF is bounded by LPIPS, not Linf: its numbers must not sit on the lowfreq cells."""
    resolved = resolve.load(_path("cifar10_diffbreak"))
    for ref in resolved.suite.references:
        if "Table 3" in ref.source:
            assert ref.defense is None and ref.attack is None and "LPIPS" in ref.label
    assert "LPIPS" in resolved.suite.description and "another threat model" in resolved.suite.description
