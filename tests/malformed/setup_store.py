"""Setup functions of the store-* corpus cases (store.yaml): results files benchkit must refuse,
in one line and without changing a byte of them. Each takes the case's folder; the store is
always out/results.sqlite."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from benchkit.store import MIGRATIONS, Store


def _db(folder: Path) -> Path:
    path = folder / "out" / "results.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _store_with_runs(folder: Path, runs: int = 3) -> Path:
    """A real store (every migration) holding `runs` finished runs of one cell with one shard."""
    path = _db(folder)
    store = Store(path)
    for _ in range(runs):
        run = store.start_run("tiny", None, "h", {"suite": "tiny", "references": []}, {"cell_ids": {}})
        store.finish_run(run, "done")
    cell = store.ensure_cell("cnn/none/pgd", "c", "attack", "cnn", "none", "pgd", {}, [""], 2, 1)
    store.commit_shard(cell, 1, [(0, "", 3, "1", "0", 0.3, None, None), (1, "", 5, "1", "1", 0.2, None, None)],
                       0.5, {"steps": 2})
    store.close()
    return path


def _sql(folder: Path, *statements: str) -> None:
    db = sqlite3.connect(_db(folder))
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


def bad_json_run(folder: Path) -> None:
    """runs row 3 holds suite_json '{bad' (a hand edit, a broken tool)."""
    _store_with_runs(folder)
    _sql(folder, "UPDATE runs SET suite_json='{bad' WHERE id=3")


def bad_json_shard(folder: Path) -> None:
    """The shard's stats_json is cut short: a resume would read it."""
    _store_with_runs(folder)
    _sql(folder, "UPDATE shards SET stats_json='{\"steps\": ' WHERE cell_id=1")


def truncated(folder: Path) -> None:
    """A real store cut to its first half (a copy that stopped, a full disk while copying)."""
    path = _store_with_runs(folder, runs=200)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def other_schema(folder: Path) -> None:
    """Some other program's SQLite database: a single table foo."""
    _sql(folder, "CREATE TABLE foo (x INTEGER)", "INSERT INTO foo VALUES (1)")


def runs_other_columns(folder: Path) -> None:
    """A `runs` table, but not benchkit's, and no migrations table."""
    _sql(folder, "CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)", "INSERT INTO runs VALUES (1, 'x')")


def migrations_but_wrong_runs(folder: Path) -> None:
    """benchkit's migration names, but a `runs` table of other columns (a hand-made imitation)."""
    statements = ["CREATE TABLE migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)",
                  "CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)"]
    statements += [f"INSERT INTO migrations VALUES ('{name}', 0)" for name, _ in MIGRATIONS]
    _sql(folder, *statements)


def foreign_migrations(folder: Path) -> None:
    """Another tool's `migrations` table (same columns, names that are not benchkit's)."""
    _sql(folder, "CREATE TABLE migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)",
         "INSERT INTO migrations VALUES ('001_users', 0)", "CREATE TABLE users (id INTEGER)")


def newer(folder: Path) -> None:
    """A store a newer benchkit wrote: one migration this version does not know."""
    _store_with_runs(folder, runs=1)
    _sql(folder, "INSERT INTO migrations VALUES ('0099_from_the_future', 0)")


def db_is_folder(folder: Path) -> None:
    (folder / "out" / "results.sqlite").mkdir(parents=True)



def good_store(folder: Path) -> None:
    """A readable store (for cases whose fault is elsewhere, e.g. --html)."""
    _store_with_runs(folder, runs=1)


def digit_png(folder: Path) -> None:
    """in.png: an 8x8 grey image, the shape of the digits data."""
    import torch

    from benchkit import png

    (folder / "in.png").write_bytes(png.from_tensor(torch.full((1, 8, 8), 0.5)))
