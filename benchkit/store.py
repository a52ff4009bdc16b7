"""The SQLite results store: one file per output folder, written only by the driver process.

Every shard is committed in one transaction, so a killed run loses at most the shard in flight
and a rerun skips what is committed. Schema changes are named migrations applied in order.
"""
from __future__ import annotations

import functools
import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from benchkit.errors import BadInput

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
    # One pipeline: whole-split standard accuracy becomes an ordinary cell of kind 'clean' (its
    # rows have no adversarial verdict), so the split tables move into cells / shards / examples.
    ("0004_clean_cells", """
    ALTER TABLE cells ADD COLUMN kind TEXT NOT NULL DEFAULT 'attack';
    CREATE TABLE examples_new (
        cell_id INTEGER NOT NULL REFERENCES cells(id), image_index INTEGER NOT NULL,
        variant TEXT NOT NULL, label INTEGER NOT NULL,
        clean_flags TEXT NOT NULL,   -- '1'/'0' per evaluation repeat: correct on the clean input
        adv_flags TEXT,              -- '1'/'0' per repeat on the verified adversarial input (NULL in clean cells)
        distance REAL,               -- perturbation size in the threat model's norm
        PRIMARY KEY (cell_id, image_index, variant)
    );
    INSERT INTO examples_new SELECT * FROM examples;
    DROP TABLE examples;
    ALTER TABLE examples_new RENAME TO examples;
    """),
    ("0005_move_split_groups", "python:_move_split_groups"),
    # The attack's own verdict per example (1 robust, 0 broken, NULL: the attack gives none), e.g.
    # AutoAttack's robust flags: what a paper reports, kept beside the host's re-evaluation.
    ("0006_attack_verdict", "ALTER TABLE examples ADD COLUMN attack_verdict INTEGER"),
    # Which iteration of the attack produced the stored example (attacks that keep each image's best
    # iterate under the verification protocol say so); NULL: the attack does not say.
    ("0007_iteration", "ALTER TABLE examples ADD COLUMN iteration INTEGER"),
]


# What identifies a benchkit store: a `migrations (name, applied)` table whose names are this
# list's (all of them, or some of them for a store written by an older benchkit), and exactly the
# tables and columns those migrations make. A file with no tables at all is a new store.
JSON_COLUMNS = [("runs", "suite_json"), ("runs", "provenance_json"), ("cells", "config_json"),
                ("cells", "variants_json"), ("shards", "stats_json"), ("checks", "numbers_json")]
AWAY = "move it away, or use --fresh or another --out"
DAMAGED = f"{AWAY} (sqlite3's .recover may save its rows)"


def _tables(db: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite%'")]
    return {t: tuple(r[1] for r in db.execute(f'PRAGMA table_info("{t}")')) for t in names}


def _create_migrations_table(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)")


def _apply(db: sqlite3.Connection, name: str, sql: str) -> None:
    """One migration and its record, in one transaction."""
    with _Tx(db):
        if sql.startswith("python:"):
            globals()[sql.removeprefix("python:")](db)
        else:
            for stmt in filter(str.strip, sql.split(";")):
                db.execute(stmt)
        db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))


@functools.lru_cache(maxsize=None)
def _schema_after(names: frozenset[str]) -> dict[str, tuple[str, ...]]:
    """The tables and columns a store has after the migrations `names` (built in memory)."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.row_factory = sqlite3.Row
    _create_migrations_table(db)
    for name, sql in MIGRATIONS:
        if name in names:
            _apply(db, name, sql)
    tables = _tables(db)
    db.close()
    return tables


def files(path: str | Path) -> list[Path]:
    """The store's file and the journal files SQLite keeps beside it in WAL mode."""
    return [Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm")]


def _require_file(path: Path) -> None:
    if path.exists() and not path.is_file():
        raise BadInput(f"{path}: not a file, so not a benchkit results store; {AWAY}")


def _unreadable(label: str, exc: sqlite3.DatabaseError) -> BadInput:
    if "not a database" in str(exc):
        return BadInput(f"{label}: not a benchkit results store (file is not a database); {AWAY}")
    return BadInput(f"{label}: damaged store ({exc}); {DAMAGED}")


def _inspect(db: sqlite3.Connection, label: str) -> set[str]:
    """The migrations applied to the store open as `db`; BadInput (one line each, starting with
    `label`, the file's path) when it is damaged, is not a benchkit store, was written by a newer
    benchkit, or holds a row benchkit cannot read back."""
    try:
        verdict = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
        tables = _tables(db)
    except sqlite3.DatabaseError as exc:
        raise _unreadable(label, exc) from None
    if verdict != ["ok"]:
        raise BadInput(f"{label}: damaged store ({verdict[0]}); {DAMAGED}")
    if not tables:
        return set()
    if tables.get("migrations") != ("name", "applied"):
        raise BadInput(f"{label}: not a benchkit results store (no benchkit migrations table; its tables: "
                       f"{', '.join(sorted(tables))}); {AWAY}")
    applied = {r[0] for r in db.execute("SELECT name FROM migrations")}
    known = [name for name, _ in MIGRATIONS]
    if unknown := sorted(applied - set(known)):
        if known[0] in applied:
            raise BadInput(f"{label}: written by a newer benchkit (migration {unknown[0]} is unknown to this "
                           "version); upgrade benchkit to read it, or use another --out")
        raise BadInput(f"{label}: not a benchkit results store (its migrations are not benchkit's: {unknown[0]}); "
                       f"{AWAY}")
    expected = _schema_after(frozenset(applied))
    for table in sorted(set(tables) | set(expected)):
        got, want = tables.get(table), expected.get(table)
        if got == want:
            continue
        what = (f"table {table} is not benchkit's" if want is None else f"no table {table}" if got is None else
                f"table {table} has columns {', '.join(got)}; benchkit's are {', '.join(want)}")
        raise BadInput(f"{label}: not a benchkit results store ({what}); {AWAY}")
    problems = []
    for table, column in JSON_COLUMNS:
        if column not in expected.get(table, ()):
            continue
        for rowid, text in db.execute(f"SELECT rowid, {column} FROM {table} ORDER BY rowid"):
            try:
                json.loads(text)
            except (TypeError, ValueError):
                problems.append(f"{label}: {table} row {rowid}: {column} is not valid JSON; {AWAY}")
                break   # the first bad row of a column says enough: the store was damaged
    if problems:
        raise BadInput(problems)
    return applied


class Store:
    """The results store of one output folder. `Store(path)` opens it for writing (created if
    new, migrated if older); `Store.read_only(path)` reads a snapshot and never writes the file.
    Both refuse, in one line, a file that is not a benchkit store or cannot be read back."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _require_file(self.path)
        if self.path.exists() and self.path.stat().st_size > 0:
            # Identified read-only first: nothing is written to a file that turns out not to be
            # a store this benchkit can write (not even a journal rollback, nor a -wal beside it).
            try:
                probe = _read_only(self.path)
            except sqlite3.DatabaseError as exc:
                raise _unreadable(str(self.path), exc) from None
            try:
                _inspect(probe, str(self.path))
            finally:
                probe.close()
        self.db = sqlite3.connect(str(self.path), isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    @classmethod
    def read_only(cls, path: str | Path) -> "Store":
        """The store at `path` copied into memory (and migrated there if an older benchkit wrote
        it): the file is never written, nothing is left beside it, a read-only folder works."""
        self = cls.__new__(cls)
        self.path = Path(path)
        _require_file(self.path)
        self.db = sqlite3.connect(":memory:", isolation_level=None)
        self.db.row_factory = sqlite3.Row
        try:
            try:
                _snapshot(self.path, self.db)
            except sqlite3.DatabaseError as exc:
                raise _unreadable(str(self.path), exc) from None
            _inspect(self.db, str(self.path))
        except BadInput:
            self.db.close()
            raise
        self._migrate()
        return self

    def _migrate(self) -> None:
        _create_migrations_table(self.db)
        done = {r[0] for r in self.db.execute("SELECT name FROM migrations")}
        for name, sql in MIGRATIONS:
            if name not in done:
                _apply(self.db, name, sql)

    def interrupt_stale_runs(self) -> list[int]:
        """Mark every run still `running` as `interrupted`, finished at its last commit. Only the
        holder of the folder's lock may call this: the processes of those runs are gone. Their ids."""
        ids = [r[0] for r in self.db.execute("SELECT id FROM runs WHERE status='running' ORDER BY id")]
        if ids:
            with self.transaction():
                self.db.execute(
                    "UPDATE runs SET status='interrupted', finished=COALESCE("
                    "(SELECT MAX(committed) FROM shards WHERE shards.run_id=runs.id), started) WHERE status='running'")
        return ids

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

    def update_provenance(self, run_id: int, changes: dict) -> None:
        """Set top-level keys of a run's provenance while it runs (e.g. memory_backoff)."""
        with self.transaction():
            row = self.db.execute("SELECT provenance_json FROM runs WHERE id=?", (run_id,)).fetchone()
            self.db.execute("UPDATE runs SET provenance_json=? WHERE id=?",
                            (json.dumps(json.loads(row[0]) | changes), run_id))

    def finish_run(self, run_id: int, status: str) -> None:
        with self.transaction():
            self.db.execute("UPDATE runs SET finished=?, status=? WHERE id=?", (time.time(), status, run_id))

    def ensure_cell(self, key: str, config_hash: str, kind: str, classifier: str, defense: str, attack: str,
                    config: dict, variants: list[str], n_images: int, repeats: int) -> int:
        """The stored cell with this key and configuration (created if new); n_images is the latest
        run's image count."""
        row = self.db.execute("SELECT id FROM cells WHERE key=? AND config_hash=?", (key, config_hash)).fetchone()
        with self.transaction():
            if row:
                self.db.execute("UPDATE cells SET n_images=? WHERE id=?", (n_images, row[0]))
                return int(row[0])
            cur = self.db.execute(
                "INSERT INTO cells (key, config_hash, kind, classifier, defense, attack, config_json, variants_json,"
                " n_images, n_shards, repeats) VALUES (?,?,?,?,?,?,?,?,?,0,?)",
                (key, config_hash, kind, classifier, defense, attack, json.dumps(config), json.dumps(variants),
                 n_images, repeats))
            return int(cur.lastrowid)

    def earlier_configs(self, key: str, cell_id: int) -> list[dict]:
        """The configurations of the other cells stored under `key` that hold results, newest first."""
        rows = self.db.execute("SELECT config_json FROM cells WHERE key=? AND id<>? AND EXISTS "
                               "(SELECT 1 FROM examples WHERE examples.cell_id=cells.id) ORDER BY id DESC",
                               (key, cell_id))
        return [json.loads(r[0]) for r in rows]

    def stored_images(self, cell_id: int) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT DISTINCT image_index FROM examples WHERE cell_id=?", (cell_id,))}

    def commit_shard(self, cell_id: int, run_id: int, rows: Iterable[tuple], seconds: float, stats: dict,
                     samples: Iterable[tuple] = ()) -> None:
        """rows: (image_index, variant, label, clean_flags, adv_flags, distance, attack_verdict, iteration);
        samples: (image_index, frame, label, png bytes). All or nothing."""
        rows = list(rows)
        with self.transaction():
            shard = self.db.execute("SELECT COALESCE(MAX(shard) + 1, 0) FROM shards WHERE cell_id=?",
                                    (cell_id,)).fetchone()[0]
            self.db.executemany("INSERT INTO samples (cell_id, image_index, frame, kind, png) VALUES (?,?,?,?,?)",
                                [(cell_id, *s) for s in samples])
            self.db.executemany(
                "INSERT INTO examples (cell_id, image_index, variant, label, clean_flags, adv_flags, distance,"
                " attack_verdict, iteration) VALUES (?,?,?,?,?,?,?,?,?)", [(cell_id, *r) for r in rows])
            self.db.execute(
                "INSERT INTO shards (cell_id, shard, run_id, first_index, n, seconds, stats_json, committed)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (cell_id, shard, run_id, min((r[0] for r in rows), default=0), len({r[0] for r in rows}), seconds,
                 json.dumps(stats), time.time()))

    def record_failure(self, cell_id: int, run_id: int, message: str) -> None:
        with self.transaction():
            self.db.execute("INSERT INTO failures VALUES (?,?,NULL,?,?)", (cell_id, run_id, message, time.time()))

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

    def failures(self, cell_id: int, run_id: int | None = None) -> list[sqlite3.Row]:
        if run_id is None:
            return list(self.db.execute("SELECT * FROM failures WHERE cell_id=? ORDER BY at", (cell_id,)))
        return list(self.db.execute("SELECT * FROM failures WHERE cell_id=? AND run_id=? ORDER BY at", (cell_id, run_id)))

    def run(self, run_id: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()


def _move_split_groups(db: sqlite3.Connection) -> None:
    """Split groups become clean cells (same numbers, new ids); old runs' provenance follows."""
    moved: dict[int, int] = {}
    for g in db.execute("SELECT * FROM split_groups").fetchall():
        cur = db.execute(
            "INSERT INTO cells (key, config_hash, classifier, defense, attack, config_json, variants_json,"
            " n_images, n_shards, repeats, kind) VALUES (?,?,?,?,'',?,'[\"\"]',?,?,?,'clean')",
            (g["key"], g["config_hash"], g["classifier"], g["defense"], g["config_json"], g["n_images"],
             g["n_shards"], g["repeats"]))
        moved[g["id"]] = int(cur.lastrowid)
        db.execute("INSERT INTO examples SELECT ?, image_index, '', label, flags, NULL, NULL "
                   "FROM split_examples WHERE group_id=?", (cur.lastrowid, g["id"]))
        db.execute("INSERT INTO shards SELECT ?, shard, run_id, 0, n, seconds, '{}', committed "
                   "FROM split_shards WHERE group_id=?", (cur.lastrowid, g["id"]))
    for run in db.execute("SELECT id, provenance_json FROM runs").fetchall():
        prov = json.loads(run["provenance_json"])
        split = prov.pop("split_ids", {})
        if split:
            prov.setdefault("cell_ids", {}).update({k: moved[g] for k, g in split.items() if g in moved})
            db.execute("UPDATE runs SET provenance_json=? WHERE id=?", (json.dumps(prov), run["id"]))
    for table in ("split_examples", "split_shards", "split_groups"):
        db.execute(f"DROP TABLE {table}")


def _read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the store at `path`: immutable when no -wal file is beside it
    (see _snapshot), so SQLite creates no -wal or -shm either."""
    immutable = "" if Path(f"{path}-wal").exists() else "&immutable=1"
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro{immutable}", uri=True)
    db.execute("SELECT 1 FROM sqlite_master LIMIT 1")   # open errors surface here, not later
    return db


def _snapshot(path: Path, into: sqlite3.Connection) -> None:
    """Copy the database at `path` into the connection `into`, writing nothing beside it.
    No -wal file: no run has the store open (a run's connection keeps one) and everything is in
    the main file, read as immutable. A -wal with its -shm: a run may be writing; read through
    SQLite's shared-memory locking, read-only. A -wal alone (a killed run's folder, copied), or a
    store SQLite cannot open read-only in place: read a private copy of the files."""
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    if not wal.exists() or shm.exists():
        try:
            src = _read_only(path)
            try:
                src.backup(into)
                return
            finally:
                src.close()
        except sqlite3.OperationalError:
            if not wal.exists():
                raise
    with tempfile.TemporaryDirectory(prefix="benchkit-store-") as tmp:
        copy = Path(tmp) / "results.sqlite"
        shutil.copyfile(path, copy)
        shutil.copyfile(wal, f"{copy}-wal")
        src = sqlite3.connect(str(copy))
        try:
            src.backup(into)
        finally:
            src.close()


class _Tx:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if not exc_type:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:   # SQLite has already rolled back after some errors (a full disk)
            self.db.execute("ROLLBACK")
        return False
