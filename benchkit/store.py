"""The SQLite results store: one file per output folder, written only by the driver process.

Every shard is committed in one transaction, so a killed run loses at most the shard in flight
and a rerun skips what is committed. Schema changes are named migrations applied in order.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

MIGRATIONS: list[tuple[str, str]] = [
    ("0001_initial", """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY, started REAL NOT NULL, finished REAL, status TEXT NOT NULL,
        suite_name TEXT NOT NULL, suite_path TEXT, suite_hash TEXT NOT NULL, suite_json TEXT NOT NULL,
        provenance_json TEXT NOT NULL
    );
    CREATE TABLE cells (
        id INTEGER PRIMARY KEY, key TEXT NOT NULL, config_hash TEXT NOT NULL,
        classifier TEXT NOT NULL, defense TEXT NOT NULL, attack TEXT NOT NULL,
        config_json TEXT NOT NULL, variants_json TEXT NOT NULL, n_images INTEGER NOT NULL,
        n_shards INTEGER NOT NULL, repeats INTEGER NOT NULL,
        UNIQUE (key, config_hash)
    );
    CREATE TABLE shards (
        cell_id INTEGER NOT NULL REFERENCES cells(id), shard INTEGER NOT NULL,
        run_id INTEGER NOT NULL REFERENCES runs(id), first_index INTEGER NOT NULL, n INTEGER NOT NULL,
        seconds REAL NOT NULL, stats_json TEXT NOT NULL, committed REAL NOT NULL,
        PRIMARY KEY (cell_id, shard)
    );
    CREATE TABLE examples (
        cell_id INTEGER NOT NULL REFERENCES cells(id), image_index INTEGER NOT NULL,
        variant TEXT NOT NULL, label INTEGER NOT NULL,
        clean_flags TEXT NOT NULL,   -- '1'/'0' per evaluation repeat: correct on the clean input
        adv_flags TEXT NOT NULL,     -- '1'/'0' per repeat: correct on the verified adversarial input
        distance REAL,               -- perturbation size in the threat model's norm
        PRIMARY KEY (cell_id, image_index, variant)
    );
    CREATE TABLE checks (
        cell_id INTEGER NOT NULL REFERENCES cells(id), name TEXT NOT NULL, status TEXT NOT NULL,
        reason TEXT NOT NULL, numbers_json TEXT NOT NULL, run_id INTEGER NOT NULL,
        PRIMARY KEY (cell_id, name)
    );
    CREATE TABLE failures (
        cell_id INTEGER NOT NULL REFERENCES cells(id), run_id INTEGER NOT NULL,
        shard INTEGER, message TEXT NOT NULL, at REAL NOT NULL
    );
    """),
    # Display images for the report's purification strips (first few images of cells whose
    # defense has a `trajectory` method): frame 0 the adversarial input ... the purified image,
    # then the clean image. PNG bytes, committed with the shard that holds the image.
    ("0002_samples", """
    CREATE TABLE samples (
        cell_id INTEGER NOT NULL REFERENCES cells(id), image_index INTEGER NOT NULL,
        frame INTEGER NOT NULL, kind TEXT NOT NULL, png BLOB NOT NULL,
        PRIMARY KEY (cell_id, image_index, frame)
    );
    """),
    # Standard accuracy on the dataset's whole split (eval.clean_on: split), per (classifier,
    # defense) group, sharded and resumable like the cells.
    ("0003_split_clean", """
    CREATE TABLE split_groups (
        id INTEGER PRIMARY KEY, key TEXT NOT NULL, config_hash TEXT NOT NULL,
        classifier TEXT NOT NULL, defense TEXT NOT NULL, config_json TEXT NOT NULL,
        n_images INTEGER NOT NULL, n_shards INTEGER NOT NULL, repeats INTEGER NOT NULL,
        UNIQUE (key, config_hash)
    );
    CREATE TABLE split_shards (
        group_id INTEGER NOT NULL REFERENCES split_groups(id), shard INTEGER NOT NULL,
        run_id INTEGER NOT NULL REFERENCES runs(id), n INTEGER NOT NULL, seconds REAL NOT NULL,
        committed REAL NOT NULL,
        PRIMARY KEY (group_id, shard)
    );
    CREATE TABLE split_examples (
        group_id INTEGER NOT NULL REFERENCES split_groups(id), image_index INTEGER NOT NULL,
        label INTEGER NOT NULL,
        flags TEXT NOT NULL,         -- '1'/'0' per evaluation repeat: correct on the clean input
        PRIMARY KEY (group_id, image_index)
    );
    """),
]


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)")
        done = {r[0] for r in self.db.execute("SELECT name FROM migrations")}
        for name, sql in MIGRATIONS:
            if name in done:
                continue
            with self.transaction():
                for stmt in filter(str.strip, sql.split(";")):
                    self.db.execute(stmt)
                self.db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))

    def transaction(self):
        return _Tx(self.db)

    def close(self) -> None:
        self.db.close()

    # -------------------------------------------------------------- runs and cells

    def start_run(self, suite_name: str, suite_path: str | None, suite_hash: str, suite_json: dict,
                  provenance: dict) -> int:
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO runs (started, status, suite_name, suite_path, suite_hash, suite_json, provenance_json)"
                " VALUES (?, 'running', ?, ?, ?, ?, ?)",
                (time.time(), suite_name, suite_path, suite_hash, json.dumps(suite_json), json.dumps(provenance)))
            return int(cur.lastrowid)

    def finish_run(self, run_id: int, status: str) -> None:
        with self.transaction():
            self.db.execute("UPDATE runs SET finished=?, status=? WHERE id=?", (time.time(), status, run_id))

    def ensure_cell(self, key: str, config_hash: str, classifier: str, defense: str, attack: str,
                    config: dict, variants: list[str], n_images: int, n_shards: int, repeats: int) -> int:
        row = self.db.execute("SELECT id FROM cells WHERE key=? AND config_hash=?", (key, config_hash)).fetchone()
        if row:
            return int(row[0])
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO cells (key, config_hash, classifier, defense, attack, config_json, variants_json,"
                " n_images, n_shards, repeats) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (key, config_hash, classifier, defense, attack, json.dumps(config), json.dumps(variants),
                 n_images, n_shards, repeats))
            return int(cur.lastrowid)

    def committed_shards(self, cell_id: int) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT shard FROM shards WHERE cell_id=?", (cell_id,))}

    def commit_shard(self, cell_id: int, shard: int, run_id: int, first_index: int, rows: Iterable[tuple],
                     seconds: float, stats: dict, samples: Iterable[tuple] = ()) -> None:
        """rows: (image_index, variant, label, clean_flags, adv_flags, distance);
        samples: (image_index, frame, kind, png bytes). All or nothing."""
        rows = list(rows)
        with self.transaction():
            self.db.executemany("INSERT INTO samples (cell_id, image_index, frame, kind, png) VALUES (?,?,?,?,?)",
                                [(cell_id, *s) for s in samples])
            self.db.executemany(
                "INSERT INTO examples (cell_id, image_index, variant, label, clean_flags, adv_flags, distance)"
                " VALUES (?,?,?,?,?,?,?)", [(cell_id, *r) for r in rows])
            self.db.execute(
                "INSERT INTO shards (cell_id, shard, run_id, first_index, n, seconds, stats_json, committed)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (cell_id, shard, run_id, first_index, len({r[0] for r in rows}), seconds,
                 json.dumps(stats), time.time()))

    def ensure_split_group(self, key: str, config_hash: str, classifier: str, defense: str, config: dict,
                           n_images: int, n_shards: int, repeats: int) -> int:
        row = self.db.execute("SELECT id FROM split_groups WHERE key=? AND config_hash=?", (key, config_hash)).fetchone()
        if row:
            return int(row[0])
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO split_groups (key, config_hash, classifier, defense, config_json, n_images, n_shards,"
                " repeats) VALUES (?,?,?,?,?,?,?,?)",
                (key, config_hash, classifier, defense, json.dumps(config), n_images, n_shards, repeats))
            return int(cur.lastrowid)

    def committed_split_shards(self, group_id: int) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT shard FROM split_shards WHERE group_id=?", (group_id,))}

    def commit_split_shard(self, group_id: int, shard: int, run_id: int, rows: Iterable[tuple], seconds: float) -> None:
        """rows: (image_index, label, flags). All or nothing."""
        rows = list(rows)
        with self.transaction():
            self.db.executemany("INSERT INTO split_examples (group_id, image_index, label, flags) VALUES (?,?,?,?)",
                                [(group_id, *r) for r in rows])
            self.db.execute("INSERT INTO split_shards (group_id, shard, run_id, n, seconds, committed) VALUES (?,?,?,?,?,?)",
                            (group_id, shard, run_id, len(rows), seconds, time.time()))

    def split_group(self, group_id: int) -> sqlite3.Row:
        return self.db.execute("SELECT * FROM split_groups WHERE id=?", (group_id,)).fetchone()

    def split_examples(self, group_id: int) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM split_examples WHERE group_id=? ORDER BY image_index", (group_id,)))

    def split_seconds(self, group_id: int) -> tuple[int, float]:
        """(committed shards, seconds spent)."""
        row = self.db.execute("SELECT COUNT(*), COALESCE(SUM(seconds), 0) FROM split_shards WHERE group_id=?",
                              (group_id,)).fetchone()
        return int(row[0]), float(row[1])

    def record_failure(self, cell_id: int, run_id: int, shard: int | None, message: str) -> None:
        with self.transaction():
            self.db.execute("INSERT INTO failures VALUES (?,?,?,?,?)", (cell_id, run_id, shard, message, time.time()))

    def save_checks(self, cell_id: int, run_id: int, results: list[Any]) -> None:
        with self.transaction():
            for r in results:
                self.db.execute("INSERT OR REPLACE INTO checks VALUES (?,?,?,?,?,?)",
                                (cell_id, r.name, r.status, r.reason, json.dumps(r.numbers), run_id))

    # -------------------------------------------------------------- reading

    def runs(self) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM runs ORDER BY id"))

    def latest_run(self) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()

    def cell(self, cell_id: int) -> sqlite3.Row:
        return self.db.execute("SELECT * FROM cells WHERE id=?", (cell_id,)).fetchone()

    def find_cell(self, key: str, config_hash: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM cells WHERE key=? AND config_hash=?", (key, config_hash)).fetchone()

    def examples(self, cell_id: int) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM examples WHERE cell_id=? ORDER BY image_index, variant", (cell_id,)))

    def shards(self, cell_id: int) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM shards WHERE cell_id=? ORDER BY shard", (cell_id,)))

    def checks(self, cell_id: int) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM checks WHERE cell_id=? ORDER BY name", (cell_id,)))

    def samples(self, cell_id: int) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM samples WHERE cell_id=? ORDER BY image_index, frame", (cell_id,)))

    def failures(self, cell_id: int) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM failures WHERE cell_id=? ORDER BY at", (cell_id,)))


class _Tx:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
