"""benchkit.runner: one pipeline that no plugin can fool. Hostile and careless attacks, end to end
through `benchkit run`: each broken rule fails its cell only, with one line naming the rule; the
run goes on, the leaderboard is written, the run is 'failed' and the exit status 1."""
from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from benchkit.attack import Attack, AttackResult
from benchkit.cli import main
from benchkit.hookspecs import hookimpl
from benchkit.params import Budget, Params
from benchkit.threat import Linf
from conftest import write
from test_run import blobs, local  # noqa: F401 - local is a fixture


class HostileParams(Params):
    eps: Budget = 0.1
    # how to misbehave: honest | inplace-x | inplace-y | declare-big | raise | none | numpy | float16 |
    # float64 | oom | zero-variants
    mode: str = "honest"


class Hostile(Attack):
    def __init__(self, p: HostileParams):
        self.p = p
        # The attack object claims a huge budget: the host must not believe it.
        self.threat = Linf(1.0 if p.mode == "declare-big" else p.eps)

    def variants(self):
        return [] if self.p.mode == "zero-variants" else [("", self)]

    def run(self, model, x, y, ctx):
        mode = self.p.mode
        if mode == "raise":
            raise RuntimeError("plugin bug")
        if mode == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if mode == "none":
            return None
        if mode == "inplace-x":   # an aliasing bug: the batch itself moves by 0.5
            x.add_(0.5).clamp_(0, 1)
            return AttackResult(x)
        if mode == "inplace-y":   # writes into the labels, then returns honest examples
            y.copy_(model(x).argmax(1))
            return AttackResult(x.clone())
        x_adv = (x + (0.5 if mode == "declare-big" else self.p.eps) * torch.sign(torch.randn_like(x))).clamp(0, 1)
        x_adv = self.threat.project(x, x_adv) if mode != "declare-big" else x_adv
        if mode == "numpy":
            return AttackResult(x_adv.numpy())
        if mode in ("float16", "float64"):
            return AttackResult(x_adv.to(getattr(torch, mode)))
        return AttackResult(x_adv)


class Plugin:
    @hookimpl
    def register_attacks(self, register):
        register("hostile", Hostile, params=HostileParams, threat=lambda p: Linf(p.eps))


@pytest.fixture
def hostile(local):
    """test_run's blobs data and nearest classifier, plus the hostile attack."""
    from benchkit import registry
    local.register(Plugin(), name="hostile")
    registry.reset()


def suite(tmp_path, *modes, extra=""):
    attacks = ", ".join(f"{{id: {m}, plugin: hostile, params: {{mode: {m}}}}}" for m in modes)
    return write(tmp_path / "s.yaml", f"""
suite: hostile
dataset: {{plugin: blobs}}
classifiers: [{{id: near, plugin: nearest}}]
defenses: [{{id: none, plugin: identity}}]
attacks: [{attacks}]
grid: all
eval: {{batch_size: 8}}
checks: {{enabled: [robust-le-clean]}}
{extra}""")


def db(out):
    return sqlite3.connect(out / "results.sqlite")


@pytest.mark.parametrize("mode, rule", [
    ("inplace-x", "exceed Linf eps=0.1"),
    ("declare-big", "exceed Linf eps=0.1"),
    ("raise", "RuntimeError: plugin bug"),
    ("oom", "OutOfMemoryError: CUDA out of memory"),
    ("none", "returned NoneType, not an AttackResult"),
    ("numpy", "x_adv is a numpy.ndarray, not a torch tensor"),
    ("float16", "x_adv has dtype torch.float16, expected torch.float32"),
    ("float64", "x_adv has dtype torch.float64, expected torch.float32"),
])
def test_a_broken_attack_fails_its_cell_only(tmp_path, hostile, capsys, mode, rule):
    # The broken attack runs first: the honest cell after it must still run and be stored.
    s = suite(tmp_path, mode, "honest")
    out = tmp_path / "o"
    assert main(["run", str(s), "--out", str(out)]) == 1
    stdout, err = capsys.readouterr()
    failed = [line for line in err.splitlines() if line.startswith("benchkit: cell failed:")]
    assert failed == [f"benchkit: cell failed: near/none/{mode}: attack {mode} on images 0..7: " + failed[0].split(": ", 4)[-1]]
    assert rule in failed[0] and "Traceback" not in err
    con = db(out)
    assert con.execute("SELECT status FROM runs").fetchall() == [("failed",)]
    keys = {k for (k,) in con.execute("SELECT DISTINCT c.key FROM examples e JOIN cells c ON c.id = e.cell_id")}
    assert keys == {"near/none/honest"}                          # nothing of the broken cell is stored
    assert con.execute("SELECT count(*) FROM examples e JOIN cells c ON c.id = e.cell_id "
                       "WHERE c.key = 'near/none/honest'").fetchone()[0] == 24
    assert (out / "leaderboard.html").is_file()
    row = next(line for line in stdout.splitlines() if f" {mode} " in line)
    assert "FAILED" in row and "0/24" in row                     # never shown as complete


def test_labels_written_by_the_attack_do_not_reach_the_store(tmp_path, hostile, capsys):
    s = suite(tmp_path, "inplace-y")
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 0
    labels = [y for (y,) in db(tmp_path / "o").execute("SELECT label FROM examples ORDER BY image_index")]
    assert labels == blobs()[1].tolist()


def test_zero_variants_and_unknown_checks_fail_validation(tmp_path, hostile, capsys):
    s = suite(tmp_path, "zero-variants", extra="").read_text().replace("enabled: [robust-le-clean]", "enabled: [bogus]")
    path = write(tmp_path / "bad.yaml", s)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"benchkit: error: {path}: attacks[0]: attack 'hostile' has no variants to run",
                   f"benchkit: error: {path}: checks.enabled: unknown check 'bogus' (known: robust-le-clean, gradients, "
                   "attack-undefended, unbounded-budget, eot-convergence, gradient-correctness, black-box-vs-white-box)"]


@pytest.mark.parametrize("bad", ["a/b", "tab\there", "esc\x1b[31m"])
def test_ids_that_would_collide_or_reach_a_terminal_are_refused(tmp_path, hostile, capsys, bad):
    text = suite(tmp_path, "honest").read_text().replace("{id: honest,", f"{{id: {json.dumps(bad)},")
    path = write(tmp_path / "ids.yaml", text)
    assert main(["validate", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"benchkit: error: {path}: attacks[0].id: ")
    assert ("'/' is not allowed" if "/" in bad else "control characters") in line


def test_an_interrupted_run_shows_unrun_cells_as_not_run(tmp_path, hostile, capsys, monkeypatch):
    from benchkit import runner

    s = suite(tmp_path, "honest", "raise")
    calls = {"n": 0}
    real = runner.execute

    def interrupt_third(task, *a):
        calls["n"] += 1
        if calls["n"] == 3:   # the honest cell's last shard
            raise KeyboardInterrupt
        return real(task, *a)

    monkeypatch.setattr("benchkit.executors.local.execute", interrupt_third)
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 130
    assert db(tmp_path / "o").execute("SELECT status FROM runs").fetchall() == [("interrupted",)]
    capsys.readouterr()
    assert main(["report", str(tmp_path / "o")]) == 0
    table = capsys.readouterr().out
    assert "PARTIAL" in table and "NOT RUN" in table


def test_checks_are_recorded_and_disabled_ones_do_not_run(tmp_path, hostile, capsys):
    assert main(["run", str(suite(tmp_path, "honest")), "--out", str(tmp_path / "o")]) == 0
    names = [n for (n,) in db(tmp_path / "o").execute("SELECT name FROM checks")]
    assert names == ["robust-le-clean"]
