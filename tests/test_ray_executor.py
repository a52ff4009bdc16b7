"""`benchkit run --executor ray` on a local Ray cluster: the same numbers as the local executor
(per image, per repeat, checks and whole-split accuracy included); a task whose worker dies is
retried; a shard with invalid examples fails its cell alone, with a one-line reason, and is not
retried. The attacks that crash and cheat come from an outside plugin installed as pip would, so
the Ray workers load it through entry points exactly as the driver does."""
from __future__ import annotations

import importlib.util
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, write

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray (pip install -e '.[ray]')")

PLUGIN = '''
import os
from pathlib import Path

import torch
from benchkit.attack import Attack, AttackResult
from benchkit.hookspecs import hookimpl
from benchkit.params import Params
from benchkit.threat import Linf


class TroubleParams(Params):
    eps: float = 0.2
    crash_once: bool = False      # kill the worker process the first time (marker in $BK_MARKERS)
    cheat: bool = False           # return examples twice the budget away
    explode: bool = False         # raise, as a buggy attack would


class Trouble(Attack):
    """One FGSM step through the defended model; misbehaves on request."""

    def __init__(self, p):
        self.threat, self.p = Linf(p.eps), p

    def run(self, model, x, y, ctx):
        if self.p.explode:
            raise RuntimeError("boom")
        marker = Path(os.environ["BK_MARKERS"]) / "crashed"
        if self.p.crash_once and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(3)
        loss = lambda logits, yy: torch.nn.functional.cross_entropy(logits, yy, reduction="none")
        _, g = model.loss_and_grad(loss, x, y, 1)
        x_adv = self.threat.project(x, x + self.p.eps * g.sign())
        if self.p.cheat:
            x_adv = (x + 2 * self.p.eps * g.sign()).clamp(0, 1)
        return AttackResult(x_adv, {})


@hookimpl
def register_attacks(register):
    register("trouble", lambda p: Trouble(p), params=TroubleParams, threat=lambda p: Linf(p.eps),
             description="outside plugin: FGSM that misbehaves")
'''

SUITE = """
suite: ray_digits
include: [{root}/suites/_base/digits.yaml]
seed: 3
dataset: {{plugin: digits, params: {{n: 24}}}}
defenses:
  - {{id: none, plugin: identity}}
  - {{id: dp, plugin: diffpure, params: {{score_model: digits-unet, t_star: 0.05, dt: 0.025}}}}
attacks:
  - {{id: pgd, plugin: pgd-eot, params: {{norm: Linf, eps: 0.2, steps: 2, eot: 2}}}}
  - {{id: flaky, plugin: trouble, params: {{crash_once: true}}}}
cells:
  - {{classifier: cnn, defense: none, attack: pgd}}
  - {{classifier: cnn, defense: dp, attack: pgd}}
  - {{classifier: cnn, defense: dp, attack: flaky}}
eval: {{batch_size: 8, repeats: 2, clean_on: split}}
checks: {{enabled: [robust-le-clean, gradients, attack-undefended], subset: 4}}
"""


def install(tmp_path):
    """The outside plugin as pip installs one (tmp_path/site, on the run's PYTHONPATH) and an empty HOME."""
    site = tmp_path / "site"
    write(site / "bk_trouble.py", PLUGIN)
    dist = site / "bk_trouble-0.1.dist-info"
    write(dist / "METADATA", "Metadata-Version: 2.1\nName: bk-trouble\nVersion: 0.1\n")
    write(dist / "entry_points.txt", "[benchkit]\ntrouble = bk_trouble\n")
    (tmp_path / "home").mkdir()


def run(args, tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(tmp_path / "site"), BK_MARKERS=str(tmp_path), HOME=str(tmp_path / "home"),
               OMP_NUM_THREADS="1", **extra)
    return subprocess.run([sys.executable, "-m", "benchkit.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)


def table(db, sql):
    return sorted(sqlite3.connect(db).execute(sql).fetchall())


EXAMPLES = ("SELECT c.key, e.image_index, e.variant, e.label, e.clean_flags, e.adv_flags, round(e.distance, 6) "
            "FROM examples e JOIN cells c ON c.id = e.cell_id WHERE c.kind = 'attack'")
# Whole-split standard accuracy: clean cells ('<classifier>/<defense>'), no adversarial verdicts.
SPLIT = ("SELECT c.key, e.image_index, e.variant, e.label, e.clean_flags, e.adv_flags, e.distance "
         "FROM examples e JOIN cells c ON c.id = e.cell_id WHERE c.kind = 'clean'")
CHECKS = "SELECT c.key, k.name, k.status FROM checks k JOIN cells c ON c.id = k.cell_id"


def test_without_ray_the_executor_is_a_one_line_error(tmp_path, monkeypatch, plugin_manager, capsys):
    from benchkit.cli import main
    from benchkit.executors import ray as executor

    monkeypatch.setattr(executor.importlib.util, "find_spec", lambda name: None)
    suite = write(tmp_path / "s.yaml", SUITE.format(root=ROOT).split("attacks:")[0] + "attacks: []\ngrid: all\n")
    assert main(["run", str(suite), "--executor", "ray", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "benchkit: error: --executor ray needs Ray: pip install -e '.[ray]'" and not (tmp_path / "out").exists()


@needs_ray
def test_ray_executor_matches_local_retries_crashes(tmp_path):
    install(tmp_path)
    suite = write(tmp_path / "s.yaml", SUITE.format(root=ROOT))

    r = run(["run", str(suite), "--out", str(tmp_path / "ray"), "--executor", "ray", "--limit", "24"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "crashed").is_file()               # a worker died once and its task was retried
    assert not (tmp_path / "home" / ".ray").exists()      # no auth token written

    (tmp_path / "crashed").unlink()
    (tmp_path / "crashed").write_text("local run: do not crash")
    r = run(["run", str(suite), "--out", str(tmp_path / "local"), "--limit", "24"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    ray_db, local_db = tmp_path / "ray" / "results.sqlite", tmp_path / "local" / "results.sqlite"
    ray_rows = table(ray_db, EXAMPLES)
    assert len(ray_rows) == 3 * 24 and ray_rows == table(local_db, EXAMPLES)
    split = table(ray_db, SPLIT)
    assert len(split) == 2 * 24 and split == table(local_db, SPLIT)
    assert {k for k, *_ in split} == {"cnn/none", "cnn/dp"} and {r[-2:] for r in split} == {(None, None)}
    assert len(table(ray_db, CHECKS)) == 3 * 3 and table(ray_db, CHECKS) == table(local_db, CHECKS)
    prov = sqlite3.connect(ray_db).execute("SELECT provenance_json FROM runs").fetchone()[0]
    assert '"executor": "ray"' in prov


@needs_ray
def test_ray_executor_fails_cheating_and_raising_cells_alone(tmp_path):
    install(tmp_path)
    text = (SUITE.format(root=ROOT).replace("crash_once: true", "cheat: true").replace("clean_on: split", "clean_on: subset")
            .replace("cells:", "  - {id: broken, plugin: trouble, params: {explode: true}}\ncells:\n  - {classifier: cnn, defense: none, attack: broken}"))
    suite = write(tmp_path / "s.yaml", text)
    r = run(["run", str(suite), "--out", str(tmp_path / "ray"), "--executor", "ray"], tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    failed = sorted(line for line in r.stderr.splitlines() if line.startswith("benchkit: cell failed:"))
    assert len(failed) == 2, failed
    assert "cnn/dp/flaky: attack flaky on images" in failed[0] and "exceed Linf eps=0.2" in failed[0], failed
    # An exception inside the attack is the cell's failure (as with the local executor), in one line.
    assert "cnn/none/broken: attack broken on images" in failed[1] and failed[1].endswith(": RuntimeError: boom"), failed
    assert "Traceback" not in r.stderr
    db = sqlite3.connect(tmp_path / "ray" / "results.sqlite")
    per_cell = dict(db.execute("SELECT c.key, COUNT(e.image_index) FROM cells c LEFT JOIN examples e ON e.cell_id = c.id "
                               "GROUP BY c.key").fetchall())
    assert per_cell["cnn/none/pgd"] == 24 and per_cell["cnn/dp/pgd"] == 24
    assert per_cell["cnn/dp/flaky"] == 0 and per_cell["cnn/none/broken"] == 0
    assert db.execute("SELECT COUNT(*) FROM failures").fetchone()[0] == 2


@needs_ray
def test_ray_executor_without_gpus_refuses_cuda_at_once(tmp_path):
    install(tmp_path)
    suite = write(tmp_path / "s.yaml", SUITE.format(root=ROOT))
    r = run(["run", str(suite), "--out", str(tmp_path / "ray"), "--executor", "ray", "--device", "cuda"], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("benchkit: error:")]
    assert len(err) == 1 and "--device cuda: the Ray cluster" in err[0] and "has no GPU" in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "ray").exists()  # refused before anything is stored
