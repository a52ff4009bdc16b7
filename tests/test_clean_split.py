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
    groups = {k: (gid, n) for gid, k, n in db.execute("SELECT id, key, n_images FROM split_groups")}
    assert set(groups) == {"cnn/none", "cnn/dp"} and all(n == 450 for _, n in groups.values())
    rows = db.execute("SELECT image_index, label, flags FROM split_examples WHERE group_id=? ORDER BY image_index",
                      (groups["cnn/none"][0],)).fetchall()
    assert [r[0] for r in rows] == list(range(450)) and [r[1] for r in rows] == y.tolist()
    assert [r[2] == "1" for r in rows] == correct            # deterministic defense: one verdict per image
    dp_flags = [r[0] for r in db.execute("SELECT flags FROM split_examples WHERE group_id=?", (groups["cnn/dp"][0],))]
    assert len(dp_flags) == 450 and {len(f) for f in dp_flags} == {2}  # stochastic: `repeats` verdicts
    dp_acc = 100 * sum(f.count("1") for f in dp_flags) / 900
    # the attacked cells still measure clean accuracy on their own 16 images
    assert db.execute("SELECT COUNT(DISTINCT image_index) FROM examples").fetchone()[0] == 16

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
    assert db.execute("SELECT COUNT(*) FROM split_examples").fetchone()[0] == 900


def test_limit_applies_to_the_split_too(tmp_path, plugin_manager, one_thread, capsys):
    suite = write(tmp_path / "s.yaml", SUITE.replace("clean_on: split", "clean_on: split, batch_size: 8")
                  .replace("eval: {batch_size: 256, ", "eval: {"))
    assert main(["run", str(suite), "--out", str(tmp_path / "run"), "--limit", "12"]) == 0
    db = sqlite3.connect(tmp_path / "run" / "results.sqlite")
    assert db.execute("SELECT DISTINCT n_images, n_shards FROM split_groups").fetchall() == [(12, 2)]
    assert db.execute("SELECT COUNT(*) FROM split_shards").fetchone()[0] == 4


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
