"""The output folder and the results store, where a case needs more than files and argv (the
corpus, tests/malformed/store.yaml, has the rest): an --out that cannot be written, `report`
reading without writing, a full disk mid-run, and two runs on one folder."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchkit import outdir, report
from benchkit.cli import main
from benchkit.errors import BadInput
from benchkit.store import MIGRATIONS, Store
from conftest import ROOT, TINY_SUITE, write
from malformed.contract import assert_one_line_errors

TINY = TINY_SUITE


def errors_only(err: str) -> str:
    """stderr without a run's own lines (its announcement and per-shard progress)."""
    return "\n".join(line for line in err.splitlines() if not re.match(r"benchkit: (tiny: |\[)", line))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file of a folder with its digest: what `report` must leave exactly as it was."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def runs(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT id, status FROM runs ORDER BY id").fetchall()
    finally:
        con.close()


@pytest.fixture
def no_models(monkeypatch):
    """Fails the test if a model is built: the folder must be refused before any work."""
    from benchkit import resolve

    def build(*args, **kwargs):
        raise AssertionError("models were built before --out was checked")

    monkeypatch.setattr(resolve.ResolvedSuite, "build", build)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished run of the tiny suite (report tests copy it)."""
    root = tmp_path_factory.mktemp("tiny")
    suite = write(root / "tiny.yaml", TINY)
    assert main(["run", str(suite), "--out", str(root / "out")]) == 0
    return root / "out"


# ------------------------------------------------------------------ --out that cannot be written

def test_out_not_writable_by_permission(tmp_path, monkeypatch, capsys, no_models):
    # Tests run as root, which chmod does not stop: the permission check is what is faked here.
    suite = write(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "ro"
    out.mkdir()
    monkeypatch.setattr(outdir.os, "access", lambda *a, **k: False)
    status = main(["run", str(suite), "--out", str(out)])
    assert_one_line_errors(status, capsys.readouterr().err, [rf"^--out {re.escape(str(out))}: not writable "
                                                              r"\(permission denied\)$"])
    assert list(out.iterdir()) == []


def test_out_not_writable_when_the_probe_fails(tmp_path, monkeypatch, capsys, no_models):
    # A read-only mount: the folder exists and looks writable, but writing a file fails.
    suite = write(tmp_path / "tiny.yaml", TINY)

    def read_only_fs(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(outdir.tempfile, "TemporaryFile", read_only_fs)
    status = main(["run", str(suite), "--out", str(tmp_path / "out")])
    assert_one_line_errors(status, capsys.readouterr().err, [r"^--out .*/out: not writable \(Read-only file system\)$"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode 0o555 folder: the permission cannot bite")
def test_out_not_writable_for_real(tmp_path, capsys, no_models):
    suite = write(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    try:
        status = main(["run", str(suite), "--out", str(out)])
    finally:
        out.chmod(0o755)
    assert_one_line_errors(status, capsys.readouterr().err, [r"^--out .*/ro: not writable \(permission denied\)$"])


def test_out_file_refused_before_any_model_is_built(tmp_path, capsys, no_models):
    suite = write(tmp_path / "tiny.yaml", TINY)
    write(tmp_path / "taken", "mine\n")
    status = main(["run", str(suite), "--out", str(tmp_path / "taken" / "sub")])
    assert_one_line_errors(status, capsys.readouterr().err,
                           [r"^--out .*/taken/sub: cannot create the folder: .*/taken is a file$"])
    assert (tmp_path / "taken").read_text() == "mine\n"


def test_fresh_replaces_a_file_that_is_not_a_store(tmp_path, capsys):
    """Without --fresh such a file is refused untouched (corpus: store-run-*); with it, replaced."""
    suite = write(tmp_path / "tiny.yaml", TINY)
    write(tmp_path / "out" / "results.sqlite", "not a database\n" * 100)
    assert main(["run", str(suite), "--out", str(tmp_path / "out"), "--fresh"]) == 0
    assert runs(tmp_path / "out" / "results.sqlite") == [(1, "done")]


def test_report_html_makes_missing_folders(tiny_run, tmp_path, capsys):
    page = tmp_path / "missing" / "dir" / "x.html"
    assert main(["report", str(tiny_run), "--html", str(page)]) == 0
    assert "<table" in page.read_text()
    assert f"leaderboard: {page.resolve()}" in capsys.readouterr().err


# ------------------------------------------------------------------ report reads, never writes

def copy_run(tiny_run: Path, to: Path) -> Path:
    shutil.copytree(tiny_run, to)
    (to / outdir.LOCK_NAME).unlink(missing_ok=True)
    return to


def downgrade(db: Path, keep: int) -> None:
    """Make a current store look written by a benchkit that knew only the first `keep` migrations
    (the later ones here only add columns)."""
    con = sqlite3.connect(db)
    for name, sql in MIGRATIONS[keep:]:
        table, column = re.fullmatch(r"ALTER TABLE (\w+) ADD COLUMN (\w+) .*", sql).groups()
        con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        con.execute("DELETE FROM migrations WHERE name=?", (name,))
    con.commit()
    con.close()


def test_report_on_an_older_store_migrates_a_copy_in_memory(tiny_run, tmp_path, capsys):
    assert main(["report", str(tiny_run), "--format", "csv"]) == 0
    expected = capsys.readouterr().out
    out = copy_run(tiny_run, tmp_path / "old")
    downgrade(out / "results.sqlite", keep=5)
    con = sqlite3.connect(out / "results.sqlite")
    assert [n for (n,) in con.execute("SELECT name FROM migrations")] == [name for name, _ in MIGRATIONS[:5]]
    con.close()
    before = snapshot(out)
    assert main(["report", str(out), "--format", "csv"]) == 0
    assert capsys.readouterr().out == expected          # the same numbers...
    assert snapshot(out) == before                      # ...and not a byte written, no -wal / -shm left


def test_report_leaves_a_current_store_and_its_folder_alone(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path / "cur")
    before = snapshot(out)
    assert main(["report", str(out)]) == 0
    assert "cnn           none       pgd" in capsys.readouterr().out
    assert snapshot(out) == before


def test_report_on_a_read_only_folder(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path / "ro")
    before = snapshot(out)
    (out / "results.sqlite").chmod(0o444)
    out.chmod(0o555)
    try:
        assert main(["report", str(out)]) == 0
    finally:
        out.chmod(0o755)
    assert "cnn           none       pgd" in capsys.readouterr().out
    assert snapshot(out) == before


def test_report_reads_a_killed_runs_wal(tiny_run, tmp_path, capsys, monkeypatch):
    """Rows committed only to results.sqlite-wal (a run writing, or killed) are reported, from the
    files in place or, where SQLite cannot open them read-only there, from a private copy."""
    from benchkit import store as store_module

    live = copy_run(tiny_run, tmp_path / "live")
    writer = Store(live / "results.sqlite")
    writer.db.execute("PRAGMA wal_autocheckpoint=0")   # keep what follows in the -wal
    writer.finish_run(1, "interrupted")
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("results.sqlite", "results.sqlite-wal"):   # what a SIGKILL leaves, as copied elsewhere
        shutil.copyfile(live / name, killed / name)
    try:
        for folder, patched in ((live, False), (live, True), (killed, False)):
            if patched:
                def cannot_open(path):
                    raise sqlite3.OperationalError("unable to open database file")

                monkeypatch.setattr(store_module, "_read_only", cannot_open)
            before = snapshot(folder)
            assert main(["report", str(folder), "--format", "json"]) == 0
            assert '"status": "interrupted"' in capsys.readouterr().out   # committed only in the -wal
            after = snapshot(folder)
            assert sorted(after) == sorted(before)
            # The writer's -shm holds readers' marks; every other file is as it was.
            assert {k: v for k, v in after.items() if not k.endswith("-shm")} == \
                {k: v for k, v in before.items() if not k.endswith("-shm")}
    finally:
        writer.close()


def test_report_while_a_run_writes_and_holds_the_lock(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path / "busy")
    with outdir.lock(out):
        writer = Store(out / "results.sqlite")   # -wal and -shm exist, as during a run
        try:
            before = snapshot(out)
            assert main(["report", str(out)]) == 0
            assert "cnn           none       pgd" in capsys.readouterr().out
            assert sorted(snapshot(out)) == sorted(before)
        finally:
            writer.close()


def test_store_read_only_never_migrates_the_file(tmp_path):
    db = tmp_path / "results.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)")
    for name, sql in MIGRATIONS[:3]:
        con.executescript(sql)
        con.execute("INSERT INTO migrations VALUES (?, 0)", (name,))
    con.commit()
    con.close()
    before = db.read_bytes()
    store = Store.read_only(db)
    assert {r[0] for r in store.db.execute("SELECT name FROM migrations")} == {n for n, _ in MIGRATIONS}
    assert report.collect(store)["run"] is None
    store.close()
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"]


# ------------------------------------------------------------------ a full disk

def test_disk_full_mid_run_keeps_what_is_committed_and_resumes(tmp_path, monkeypatch, capsys):
    """SQLite's own 'database or disk is full' (PRAGMA max_page_count) after two shards: one line,
    the run marked interrupted, the two shards kept; a rerun computes only the rest."""
    suite = write(tmp_path / "tiny.yaml", TINY.replace("n: 4", "n: 32"))   # 8 shards of 4 images
    out = tmp_path / "out"
    db = out / "results.sqlite"
    out.mkdir()
    con = sqlite3.connect(db)
    con.execute("PRAGMA page_size=512")   # small pages: the store grows every shard or two
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    Store(db).close()
    con = sqlite3.connect(db)
    con.execute("VACUUM")   # no free pages left by the migrations: growth is real growth
    con.close()
    commit, done = Store.commit_shard, []

    def commit_then_cap(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        done.append(1)
        if len(done) == 2:   # the disk is full from now on: no page beyond the current ones
            self.db.execute(f"PRAGMA max_page_count={self.db.execute('PRAGMA page_count').fetchone()[0]}")

    monkeypatch.setattr(Store, "commit_shard", commit_then_cap)
    status = main(["run", str(suite), "--out", str(out)])
    _, err = capsys.readouterr()
    assert_one_line_errors(status, errors_only(err), [
        rf"^{re.escape(str(db))}: disk full; the committed shards are kept: free space and rerun to resume$"])
    con = sqlite3.connect(db)
    kept = con.execute("SELECT image_index, clean_flags, adv_flags, distance FROM examples ORDER BY 1").fetchall()
    shards = con.execute("SELECT count(*) FROM shards").fetchone()[0]
    con.close()
    assert 2 <= shards < 8 and len(kept) == 4 * shards
    # Marking the run interrupted needs room too: on this full disk it may stay `running` until
    # the next run, which holds the folder's lock, marks it (below).
    assert runs(db) in ([(1, "interrupted")], [(1, "running")])
    monkeypatch.undo()
    assert main(["run", str(suite), "--out", str(out)]) == 0
    assert f"{8 - shards} shard(s) to compute" in capsys.readouterr().err
    con = sqlite3.connect(db)
    rows = con.execute("SELECT image_index, clean_flags, adv_flags, distance FROM examples ORDER BY 1").fetchall()
    con.close()
    assert [r[0] for r in rows] == list(range(32)) and rows[:len(kept)] == kept
    assert runs(db) == [(1, "interrupted"), (2, "done")]


def test_disk_full_marks_the_run_interrupted_when_it_can(tmp_path, monkeypatch, capsys):
    suite = write(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"

    def full(self, *args, **kwargs):   # a full disk that frees a little once the shard is rolled back
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Store, "commit_shard", full)
    status = main(["run", str(suite), "--out", str(out)])
    assert_one_line_errors(status, errors_only(capsys.readouterr().err), [
        r"^.*/out/results\.sqlite: disk full; the committed shards are kept: free space and rerun to resume$"])
    assert runs(out / "results.sqlite") == [(1, "interrupted")]


def test_disk_full_writing_the_leaderboard(tmp_path, monkeypatch, capsys):
    suite = write(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"

    def no_space(data, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report, "render_html", no_space)
    status = main(["run", str(suite), "--out", str(out)])
    assert_one_line_errors(status, errors_only(capsys.readouterr().err), [
        r"^.*/out/leaderboard\.html: disk full; the committed shards are kept: free space and rerun to resume$"])
    assert runs(out / "results.sqlite") == [(1, "done")]   # every shard was in before the page failed
    status = main(["report", str(out), "--html", str(tmp_path / "page.html")])
    assert_one_line_errors(status, capsys.readouterr().err, [
        r"^.*/page\.html: disk full; free space and run the command again$"])


# ------------------------------------------------------------------ one run per folder

def test_stale_running_run_is_marked_interrupted(tmp_path, capsys):
    suite = write(tmp_path / "tiny.yaml", TINY)
    db = tmp_path / "out" / "results.sqlite"
    dead = Store(db)
    dead.start_run("tiny", None, "h", {"suite": "tiny"}, {})   # its process died: never finished
    dead.close()
    assert main(["run", str(suite), "--out", str(tmp_path / "out")]) == 0
    assert runs(db) == [(1, "interrupted"), (2, "done")]
    con = sqlite3.connect(db)
    started, finished = con.execute("SELECT started, finished FROM runs WHERE id=1").fetchone()
    assert finished == started   # it committed nothing: it is last seen when it started


def run_cmd(suite: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "benchkit.cli", "run", str(suite), "--out", str(out)]


def env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


IN_USE = r"^--out {out}: in use by another benchkit run \(pid {pid}, since \d\d:\d\d:\d\d\); wait for it to " \
         r"finish or use another --out$"


def test_second_run_on_a_locked_folder_is_one_line(tmp_path):
    """The lock held by this test process: a real second process answers one line, writes nothing."""
    suite = write(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"
    out.mkdir()
    with outdir.lock(out):
        r = subprocess.run(run_cmd(suite, out), capture_output=True, text=True, env=env(), timeout=300)
    assert_one_line_errors(r.returncode, r.stderr, [IN_USE.format(out=re.escape(str(out)), pid=os.getpid())],
                           stdout=r.stdout)
    assert sorted(p.name for p in out.iterdir()) == [outdir.LOCK_NAME]   # no store was opened


def test_lock_is_released_and_reusable(tmp_path):
    lock = outdir.lock(tmp_path)
    with pytest.raises(BadInput, match=rf"in use by another benchkit run \(pid {os.getpid()}, since "):
        outdir.lock(tmp_path)
    lock.release()
    outdir.lock(tmp_path).release()
    assert (tmp_path / outdir.LOCK_NAME).read_text() == ""   # a released lock names nobody


def wait_for_lock_holder(lock_file: Path, pid: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while f'"pid": {pid},' not in (lock_file.read_text() if lock_file.exists() else ""):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the first run never took the lock"
        time.sleep(0.02)


@pytest.mark.slow
def test_two_real_runs_on_one_folder(tmp_path):
    """Two processes: the first takes the lock and is paused (SIGSTOP) so the second certainly
    overlaps it; the second answers one line; the first, resumed, completes alone."""
    suite = write(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"
    first = subprocess.Popen(run_cmd(suite, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env())
    try:
        wait_for_lock_holder(out / outdir.LOCK_NAME, first.pid, first)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(run_cmd(suite, out), capture_output=True, text=True, env=env(), timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_one_line_errors(second.returncode, second.stderr, [IN_USE.format(out=re.escape(str(out)), pid=first.pid)],
                           stdout=second.stdout)
    db = out / "results.sqlite"
    assert runs(db) == [(1, "done")]
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*), count(DISTINCT image_index) FROM examples").fetchone() == (4, 4)
    assert con.execute("SELECT count(*) FROM shards").fetchone()[0] == 1
