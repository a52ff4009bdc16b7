"""eval.clean_on: split — standard accuracy on the dataset's whole split beside the attacked subset
(the paper's protocol: robust accuracy on a fixed subset, clean accuracy on the whole test set).
Checked against an independent count on the embedded digits, stored per image, resumable, shown in
every report format; a dataset plugin that cannot give its whole split is a one-line error."""
from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from benchkit import registry
from benchkit.cli import main
from benchkit.dataset import TensorDataset
from benchkit.hookspecs import hookimpl
from benchkit.params import Params
from conftest import write

SUITE = """
suite: split_clean
seed: 5
dataset: {plugin: digits, params: {split: test, n: 16}}
classifiers: [{id: cnn, plugin: digits-cnn}]
defenses:
  - {id: none, plugin: identity}
  - {id: dp, plugin: diffpure, params: {score_model: digits-unet, t_star: 0.05, dt: 0.025}}
attacks: [{id: pgd, plugin: pgd-eot, params: {norm: Linf, eps: 0.1, steps: 1, eot: 1}}]
grid: all
eval: {batch_size: 256, repeats: 2, clean_on: split}
checks: {enabled: []}
"""


def test_whole_split_standard_accuracy_is_stored_and_reported(tmp_path, plugin_manager, one_thread, capsys):
    suite = write(tmp_path / "s.yaml", SUITE)
    out = tmp_path / "run"
    assert main(["run", str(suite), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "standard accuracy of 2 group(s) on the whole split" in printed.err

    # Independent count: the zoo CNN on all 450 test digits (445 correct, the shipped model's number).
    ds = registry.get("datasets").get("digits").build({"split": "test"})
    cnn = registry.get("classifiers").get("digits-cnn").build({}).eval()
    x, y = ds.get(range(len(ds)))
    with torch.no_grad():
        correct = (cnn(x).argmax(1) == y).tolist()
    assert len(correct) == 450 and sum(correct) == 445

    db = sqlite3.connect(out / "results.sqlite")
    # One clean cell per (classifier, defense) group, keyed '<classifier>/<defense>'.
    groups = {k: (cid, n) for cid, k, n in db.execute("SELECT id, key, n_images FROM cells WHERE kind = 'clean'")}
    assert set(groups) == {"cnn/none", "cnn/dp"} and all(n == 450 for _, n in groups.values())
    assert db.execute("SELECT DISTINCT classifier, defense, attack FROM cells WHERE kind = 'clean' ORDER BY defense"
                      ).fetchall() == [("cnn", "dp", ""), ("cnn", "none", "")]
    rows = db.execute("SELECT image_index, variant, label, clean_flags, adv_flags, distance FROM examples "
                      "WHERE cell_id=? ORDER BY image_index", (groups["cnn/none"][0],)).fetchall()
    assert [r[0] for r in rows] == list(range(450)) and [r[2] for r in rows] == y.tolist()
    assert {(r[1], r[4], r[5]) for r in rows} == {("", None, None)}   # no attack: no adversarial verdict
    assert [r[3] == "1" for r in rows] == correct            # deterministic defense: one verdict per image
    dp_flags = [r[0] for r in db.execute("SELECT clean_flags FROM examples WHERE cell_id=?", (groups["cnn/dp"][0],))]
    assert len(dp_flags) == 450 and {len(f) for f in dp_flags} == {2}  # stochastic: `repeats` verdicts
    dp_acc = 100 * sum(f.count("1") for f in dp_flags) / 900
    # the attacked cells still measure clean accuracy on their own 16 images
    assert db.execute("SELECT COUNT(DISTINCT e.image_index) FROM examples e JOIN cells c ON c.id = e.cell_id "
                      "WHERE c.kind = 'attack'").fetchone()[0] == 16
    assert db.execute("SELECT COUNT(*) FROM examples e JOIN cells c ON c.id = e.cell_id "
                      "WHERE c.kind = 'attack' AND e.adv_flags IS NULL").fetchone()[0] == 0

    assert main(["report", str(out), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    split = {g["key"]: g for g in data["clean_split"]}
    assert split["cnn/none"]["clean"]["mean"] == pytest.approx(100 * 445 / 450)
    assert split["cnn/dp"]["clean"]["mean"] == pytest.approx(dp_acc) and split["cnn/dp"]["complete"]
    assert 90.0 < dp_acc <= 100.0   # DiffPure at t* = 0.05 keeps the digits (97-99% at 100 steps)
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "none (whole split)" in table and "450/450" in table and "98.89" in table
    page = (out / "leaderboard.html").read_text()
    assert "standard accuracy on the whole split" in page and "450/450" in page

    # Resume: nothing recomputed, same numbers.
    assert main(["run", str(suite), "--out", str(out)]) == 0
    assert "0 shard(s) to compute" in capsys.readouterr().err
    assert db.execute("SELECT COUNT(*) FROM examples e JOIN cells c ON c.id = e.cell_id "
                      "WHERE c.kind = 'clean'").fetchone()[0] == 900


def test_limit_applies_to_the_split_too(tmp_path, plugin_manager, one_thread, capsys):
    suite = write(tmp_path / "s.yaml", SUITE.replace("clean_on: split", "clean_on: split, batch_size: 8")
                  .replace("eval: {batch_size: 256, ", "eval: {"))
    assert main(["run", str(suite), "--out", str(tmp_path / "run"), "--limit", "12"]) == 0
    db = sqlite3.connect(tmp_path / "run" / "results.sqlite")
    assert db.execute("SELECT DISTINCT n_images FROM cells WHERE kind = 'clean'").fetchall() == [(12,)]
    # 12 images in shards of 8: two shards for each of the two clean cells, 12 images each
    per_cell = db.execute("SELECT c.key, COUNT(*), SUM(s.n) FROM shards s JOIN cells c ON c.id = s.cell_id "
                          "WHERE c.kind = 'clean' GROUP BY c.key ORDER BY c.key").fetchall()
    assert per_cell == [("cnn/dp", 2, 12), ("cnn/none", 2, 12)]
    assert db.execute("SELECT COUNT(*) FROM examples e JOIN cells c ON c.id = e.cell_id "
                      "WHERE c.kind = 'clean'").fetchone()[0] == 24


class NoNParams(Params):
    size: int = 4


class FixedSetPlugin:
    @hookimpl
    def register_datasets(self, register):
        register("fixed-set", lambda p: TensorDataset(torch.rand(p.size, 1, 8, 8), torch.zeros(p.size, dtype=torch.long), "fixed"),
                 params=NoNParams)


def test_split_needs_a_dataset_with_n(tmp_path, plugin_manager, capsys):
    plugin_manager.register(FixedSetPlugin(), name="fixed-set")
    text = SUITE.replace("{plugin: digits, params: {split: test, n: 16}}", "{plugin: fixed-set}")
    suite = write(tmp_path / "s.yaml", text)
    assert main(["validate", str(suite)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("eval.clean_on: 'split' needs a dataset plugin with an 'n' param" in line and "'fixed-set' has none" in line
               and str(suite) in line for line in err), err
