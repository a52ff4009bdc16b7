"""benchkit.store: migrations, one transaction per shard, per-image resume."""
from __future__ import annotations

import json
import sqlite3

import pytest

from benchkit import report
from benchkit.store import MIGRATIONS, Store


def old_store(path):
    """A results file as benchkit wrote it before clean cells (migrations up to 0003)."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)")
    for name, sql in MIGRATIONS[:3]:
        db.executescript(sql)
        db.execute("INSERT INTO migrations VALUES (?, 0)", (name,))
    suite = {"suite": "old", "references": []}
    db.execute("INSERT INTO runs VALUES (1, 0, 1, 'done', 'old', NULL, 'h', ?, ?)",
               (json.dumps(suite), json.dumps({"cell_ids": {}, "split_ids": {"cnn/none": 1}})))
    db.execute("INSERT INTO split_groups VALUES (1, 'cnn/none', 'c', 'cnn', 'none', '{}', 3, 1, 1)")
    db.executemany("INSERT INTO split_examples VALUES (1, ?, ?, ?)", [(0, 4, "1"), (1, 2, "0"), (2, 7, "1")])
    db.execute("INSERT INTO split_shards VALUES (1, 0, 1, 3, 0.5, 0)")
    db.commit()
    db.close()


def test_old_split_groups_become_clean_cells(tmp_path):
    path = tmp_path / "results.sqlite"
    old_store(path)
    store = Store(path)
    tables = {t for (t,) in store.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert not {"split_groups", "split_examples", "split_shards"} & tables
    data = report.collect(store)
    (row,) = data["split"]
    assert (row["key"], row["n"], row["complete"]) == ("cnn/none", 3, True)
    assert row["clean"].mean == pytest.approx(200 / 3)
    assert [m[0] for m in store.db.execute("SELECT name FROM migrations ORDER BY name")] == [m for m, _ in MIGRATIONS]


def test_shards_commit_whole_and_images_resume(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    run = store.start_run("s", None, "h", {}, {})
    cell = store.ensure_cell("a/b/c", "h1", "attack", "a", "b", "c", {}, [""], 4, 1)
    assert store.ensure_cell("a/b/c", "h1", "attack", "a", "b", "c", {}, [""], 6, 1) == cell   # same cell, new n
    store.commit_shard(cell, run, [(0, "", 1, "1", "0", 0.1, None, None), (1, "", 2, "1", "1", 0.1, 1, 7)], 1.0,
                       {"k": 1})
    with pytest.raises(sqlite3.IntegrityError):   # a duplicate row: nothing of this shard is kept
        store.commit_shard(cell, run, [(2, "", 1, "1", "0", 0.1, None, None), (1, "", 2, "1", "1", 0.1, None, None)],
                           1.0, {})
    assert store.stored_images(cell) == {0, 1}
    assert [(r["attack_verdict"], r["iteration"]) for r in store.examples(cell)] == [(None, None), (1, 7)]
    assert [s["shard"] for s in store.shards(cell)] == [0]
    assert store.cell(cell)["n_images"] == 6
