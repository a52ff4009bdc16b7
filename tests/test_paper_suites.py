"""The shipped suites, checked without running anything: every suite validates; each CIFAR-10 paper
suite (Nie et al. 2022) stops at once with the missing-asset checklist on an empty BENCHKIT_HOME;
the published numbers they carry as references name their source. Fast: no model is built."""
from __future__ import annotations

import pytest

from benchkit import resolve
from benchkit.cli import main
from conftest import ROOT

SUITES = sorted((ROOT / "suites").glob("*.yaml"))
CIFAR10 = [p for p in SUITES if p.name.startswith("cifar10_")]

# One suite per CIFAR-10 table or figure of the paper, plus Lee & Kim's stronger evaluation.
PAPER_SUITES = {
    "cifar10_linf_aa", "cifar10_l2_aa", "cifar10_unseen", "cifar10_bpda", "cifar10_samplers",
    "cifar10_tstar", "cifar10_advtrain_plus_diffpure", "cifar10_eot", "cifar10_transfer",
    "cifar10_square", "cifar10_random_tstar", "cifar10_diffusion_only", "cifar10_pgd_exact",
}

# The paper's budgets (Nie et al. 2022: Linf 8/255, L2 0.5; unseen threats, Table 4: L2 1.0, StAdv 0.05).
BUDGETS = {"Linf": 8 / 255, "L2": 0.5, "StAdv": 0.05}
UNSEEN_BUDGETS = {"Linf": 8 / 255, "L2": 1.0, "StAdv": 0.05}

# Published numbers that must stay beside ours: (classifier, defense, attack) -> robust accuracy (%).
EXPECTED_REFERENCES = {
    "cifar10_linf_aa": {("wrn-70-16", "diffpure", "aa-linf"): 71.29},
    "cifar10_l2_aa": {("wrn-70-16", "diffpure", "aa-l2"): 80.60, ("wrn-28-10", "diffpure", "aa-l2"): 78.58},
    "cifar10_bpda": {("wrn-28-10", "diffpure-t0.1", "bpda-eot"): 81.40},
}
SOURCES = ("Nie et al. 2022, Table ", "Nie et al. 2022, Figure ", "Lee & Kim 2023")


def test_every_paper_suite_is_shipped():
    assert PAPER_SUITES <= {p.stem for p in CIFAR10}


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_suite_validates(path, plugin_manager, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"{path}: ok")


@pytest.mark.parametrize("path", CIFAR10, ids=lambda p: p.name)
def test_run_without_assets_prints_the_checklist(path, tmp_path, monkeypatch, plugin_manager, capsys):
    """Nothing is downloaded or run: exit 2 at once, one line per missing file, no traceback."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("BENCHKIT_HOME", str(home))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "checkpoint_8.pth" in err and "test_batch" in err, err
    assert "[MISSING]" in err
    assert not out.exists()


@pytest.mark.parametrize("path", CIFAR10, ids=lambda p: p.name)
def test_protocol_and_references(path, plugin_manager):
    resolved = resolve.load(path)  # also checks every reference names a defined component
    suite = resolved.suite
    ds = suite.dataset
    assert ds.plugin == "cifar10" and ds.params["split"] == "test" and ds.params["subset_seed"] == 0
    assert ds.params["n"] == (1000 if path.stem == "cifar10_bpda" else 512)
    # Every example is verified against the budget its attack plugin registers for the suite's params.
    budgets = UNSEEN_BUDGETS if path.stem == "cifar10_unseen" else BUDGETS
    assert set(resolved.threats) == {a.id for a in suite.attacks}
    for attack_id, threat in resolved.threats.items():
        assert threat.eps == pytest.approx(budgets[threat.name]), (path.stem, attack_id, threat.name)
    # Robust accuracy on the subset, standard accuracy on the whole test split: one clean cell per group.
    attacked = [c for c in resolved.cells if c.kind == "attack"]
    clean = [c for c in resolved.cells if c.kind == "clean"]
    assert suite.eval.clean_on == "split"
    assert sorted(c.key for c in clean) == sorted({c.group for c in attacked})
    assert all(c.attack is None and c.dataset.params["n"] is None for c in clean)   # n unset: the whole split
    for ref in suite.references:
        assert ref.source.strip().startswith(SOURCES), ref.source
        assert ref.standard is not None or ref.robust is not None
        for value in (ref.standard, ref.robust):
            assert value is None or 0.0 <= value <= 100.0
    published = {(r.classifier, r.defense, r.attack): r.robust for r in suite.references}
    for key, robust in EXPECTED_REFERENCES.get(path.stem, {}).items():
        assert published.get(key) == pytest.approx(robust), (path.stem, key)
    # A stand-in classifier is said so where its numbers are read: the suite's description.
    if any(c.description.startswith("PROXY") for c in suite.classifiers):
        assert "PROXY" in suite.description
