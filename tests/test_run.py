"""End-to-end runs of the host with an in-process plugin: storage, resume, failures, reports."""
from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from torch import nn

from benchkit.assets import Asset
from benchkit.attack import Attack, AttackResult
from benchkit.cli import main
from benchkit.dataset import TensorDataset
from benchkit.defended import Purifier
from benchkit.hookspecs import hookimpl
from benchkit.params import Budget, Params
from benchkit.threat import Linf
from conftest import write


def blobs(n=24, seed=0):
    """Class c's images are c-th prototype plus small noise: a linear classifier is perfect."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.stack([torch.full((1, 4, 4), v) for v in (0.2, 0.5, 0.8)])
    y = torch.arange(n) % 3
    return (protos[y] + 0.02 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 1), y


class Nearest(nn.Module):
    """Nearest prototype by mean intensity, as logits."""
    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return -((m - torch.tensor([[0.2, 0.5, 0.8]])) ** 2) * 100


class Jitter(Purifier):
    stochastic = True
    gradient_modes = ("exact", "bpda", "none")

    def _purify(self, x, *, gradient, noise):
        return (x + 0.1 * noise.randn_like(x)).clamp(0, 1)


class FGSMParams(Params):
    eps: Budget = 0.1
    cheat: float = 0.0   # >0 returns examples this far outside the budget
    nan: bool = False


class FGSM(Attack):
    def __init__(self, p: FGSMParams):
        self.threat, self.p = Linf(p.eps), p

    def run(self, model, x, y, ctx):
        _, g = model.loss_and_grad(lambda lo, yy: nn.functional.cross_entropy(lo, yy, reduction="none"), x, y, 1)
        x_adv = self.threat.project(x, x + self.p.eps * g.sign())
        if self.p.cheat:
            x_adv = (x + (self.p.eps + self.p.cheat) * g.sign()).clamp(0, 1)
        if self.p.nan:
            x_adv = x_adv.clone()
            x_adv[0, 0, 0, 0] = float("nan")
        return AttackResult(x_adv, stats={"zero_grad_frac": float((g.flatten(1).abs().sum(1) == 0).float().mean())})

    def params_for(self, *, eot=None, unbounded=False):
        return {"eps": 1.0} if unbounded and eot is None else None


class LocalPlugin:
    @hookimpl
    def register_datasets(self, register):
        register("blobs", lambda p: TensorDataset(*blobs(), name="blobs", num_classes=3))

    @hookimpl
    def register_classifiers(self, register):
        register("nearest", lambda p: Nearest())
        register("needs-file", lambda p: Asset("nearest/weights.safetensors", "https://example.org/nearest").require() and Nearest())

    @hookimpl
    def register_defenses(self, register):
        register("jitter", lambda p: Jitter())

    @hookimpl
    def register_attacks(self, register):
        register("fgsm", FGSM, params=FGSMParams, threat=lambda p: Linf(p.eps))

    @hookimpl
    def register_score_models(self, register):
        register("toy-score", lambda p: None, description="listed only")


SUITE = """
suite: blobs
seed: 3
dataset: {plugin: blobs}
classifiers: [{id: near, plugin: nearest}]
defenses: [{id: none, plugin: identity}, {id: jitter, plugin: jitter}]
attacks: [{id: fgsm, plugin: fgsm, params: {eps: 0.2}}, {id: weak, plugin: fgsm, params: {eps: 1/255}}]
grid: all
eval: {batch_size: 8, repeats: 4}
references: [{defense: jitter, attack: fgsm, standard: 99.0, robust: 50.0, source: "Made up et al."}]
"""


@pytest.fixture
def local(plugin_manager):
    from benchkit import registry
    plugin_manager.register(LocalPlugin(), name="local")
    registry.reset()
    return plugin_manager


def examples(out):
    db = sqlite3.connect(out / "results.sqlite")
    return db.execute("SELECT c.key, e.image_index, e.variant, e.clean_flags, e.adv_flags FROM examples e "
                      "JOIN cells c ON c.id = e.cell_id ORDER BY 1, 2, 3").fetchall()


def test_run_stores_reports_and_resumes(tmp_path, local, capsys):
    suite = write(tmp_path / "s.yaml", SUITE)
    out = tmp_path / "out"
    assert main(["run", str(suite), "--out", str(out)]) == 0
    stdout, err = capsys.readouterr()
    assert "4 cells, 12 shard(s) to compute" in err
    assert "Made up et al." in stdout and "leaderboard:" in stdout
    rows = examples(out)
    assert len(rows) == 4 * 24
    by_cell = {}
    for key, _, _, clean, adv in rows:
        by_cell.setdefault(key, []).append((clean, adv))
    # Deterministic defense: one evaluation; stochastic: `repeats` evaluations.
    assert {len(c) for c, _ in by_cell["near/none/fgsm"]} == {1}
    assert {len(c) for c, _ in by_cell["near/jitter/fgsm"]} == {4}
    assert all(c == "1" for c, _ in by_cell["near/none/fgsm"])        # the classifier is perfect
    assert all(a == "0" for _, a in by_cell["near/none/fgsm"])        # eps 0.2 crosses every boundary
    # Clean verdicts depend on (classifier, defense, image) only: equal across attacks.
    assert [c for c, _ in by_cell["near/jitter/fgsm"]] == [c for c, _ in by_cell["near/jitter/weak"]]
    html = (out / "leaderboard.html").read_text()
    assert "<table" in html and "Made up et al." in html and "near" in html
    # The published numbers sit beside ours in the matching cell's row (classifier-less reference: any classifier).
    assert 'title="Made up et al.">99.00 / 50.00</td>' in html
    # Rerun: nothing recomputed, nothing duplicated.
    assert main(["run", str(suite), "--out", str(out)]) == 0
    _, err = capsys.readouterr()
    assert "0 shard(s) to compute" in err
    assert examples(out) == rows
    # Reports from the store alone.
    assert main(["report", str(out), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    cell = next(c for c in data["cells"] if c["key"] == "near/none/fgsm")
    assert cell["clean"]["mean"] == 100.0 and cell["robust"]["mean"] == 0.0
    checks = {c["name"]: c for c in cell["checks"]}
    assert set(checks) == {"attack-undefended", "unbounded-budget", "eot-convergence", "gradient-correctness",
                           "gradients", "robust-le-clean"}
    assert checks["attack-undefended"]["status"] == "pass"            # FGSM 0.2 breaks the classifier
    assert checks["unbounded-budget"]["numbers"]["overrides"] == {"eps": 1.0}
    assert checks["eot-convergence"]["status"] == "skipped"           # identity is deterministic
    assert checks["gradients"]["status"] == "pass" and checks["robust-le-clean"]["status"] == "pass"
    assert main(["report", str(out), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("classifier,defense,attack")


def test_results_do_not_depend_on_shard_size(tmp_path, local):
    a = write(tmp_path / "a.yaml", SUITE)
    b = write(tmp_path / "b.yaml", SUITE.replace("batch_size: 8", "batch_size: 8, shard_size: 24"))
    assert main(["run", str(a), "--out", str(tmp_path / "a")]) == 0
    assert main(["run", str(b), "--out", str(tmp_path / "b")]) == 0
    clean = lambda rows: [(k, i, c) for k, i, _, c, _ in rows]
    assert clean(examples(tmp_path / "a")) == clean(examples(tmp_path / "b"))


def test_changed_params_are_a_new_cell(tmp_path, local, capsys):
    s = write(tmp_path / "s.yaml", SUITE)
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 0
    write(tmp_path / "s.yaml", SUITE.replace("eps: 0.2", "eps: 0.3"))
    capsys.readouterr()
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 0
    assert "6 shard(s) to compute" in capsys.readouterr().err   # the two cells that use fgsm


@pytest.mark.parametrize("params, message", [("{eps: 0.1, cheat: 0.05}", "exceed Linf eps=0.1"),
                                             ("{eps: 0.1, nan: true}", "contain NaN")])
def test_invalid_examples_fail_the_cell_loudly_and_keep_the_rest(tmp_path, local, capsys, params, message):
    text = SUITE.replace("{id: weak, plugin: fgsm, params: {eps: 1/255}}", f"{{id: bad, plugin: fgsm, params: {params}}}")
    s = write(tmp_path / "s.yaml", text)
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 1
    out, err = capsys.readouterr()
    assert "cell failed: near/none/bad: attack bad on images 0..7: returned invalid examples: " in err
    assert message in err and "FAILED" in out
    rows = examples(tmp_path / "o")
    assert {k for k, *_ in rows} == {"near/none/fgsm", "near/jitter/fgsm"}   # good cells kept, bad stored nothing
    db = sqlite3.connect(tmp_path / "o" / "results.sqlite")
    assert db.execute("SELECT count(*) FROM failures").fetchone()[0] == 2


def test_missing_checkpoint_is_bad_input(tmp_path, local, capsys, monkeypatch):
    monkeypatch.setenv("BENCHKIT_HOME", str(tmp_path / "home"))
    s = write(tmp_path / "s.yaml", SUITE.replace("plugin: nearest", "plugin: needs-file"))
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"benchkit: error: {s}: classifiers[0]: missing file {tmp_path}/home/nearest/weights.safetensors: "
                   "get it from https://example.org/nearest and place it there, or set BENCHKIT_HOME"]
    assert not (tmp_path / "o").exists()


def test_ls_lists_plugin_components(local, capsys):
    assert main(["ls", "score-models"]) == 0
    assert "toy-score" in capsys.readouterr().out


def test_html_escapes_plugin_strings_and_shows_provenance_and_checks(tmp_path, local):
    # Ids cannot hold '/', so no closing tag: an opening tag with a handler is the injection here.
    text = SUITE.replace("{id: jitter, plugin: jitter}", "{id: '<b onmouseover=alert(1)>', plugin: jitter}").replace(
        'source: "Made up et al."', 'source: "<img src=x onerror=alert(2)>"').replace("defense: jitter", "defense: '<b onmouseover=alert(1)>'")
    s = write(tmp_path / "s.yaml", text)
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 0
    html = (tmp_path / "o" / "leaderboard.html").read_text()
    assert "<b onmouseover" not in html and "&lt;b onmouseover=alert(1)&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    # provenance: versions, git state, seeds, device; and the per-cell check flags
    for needle in ("torch", "benchkit", "git", "&#34;seed&#34;: 3", "cpu", "robust-le-clean: pass", "gradients: pass"):
        assert needle in html, needle
