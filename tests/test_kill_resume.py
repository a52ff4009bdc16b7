"""A run killed with SIGKILL mid-way resumes: every image stored exactly once, nothing recomputed."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

from conftest import ROOT, write

SUITE = f"""
suite: kill
include: [{ROOT}/suites/_base/digits.yaml]
dataset: {{plugin: digits, params: {{n: 64}}}}
defenses: [{{id: none, plugin: identity}}]
attacks: [{{id: aa, plugin: autoattack, params: {{eps: 0.3, versions: [standard], n_queries: 200}}}}]
grid: all
eval: {{batch_size: 8}}
"""


def committed(db_path) -> int:
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1)
        return db.execute("SELECT count(*) FROM shards").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_sigkill_then_resume(tmp_path):
    suite = write(tmp_path / "kill.yaml", SUITE)
    out, db = tmp_path / "out", tmp_path / "out" / "results.sqlite"
    cmd = [sys.executable, "-m", "benchkit.cli", "run", str(suite), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while committed(db) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = committed(db)
    assert 2 <= done_before < 8
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # only the shards not committed before the kill are computed again
    assert f"benchkit: kill: 1 cells, {8 - done_before} shard(s) to compute -> {out}" in r.stderr
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*), count(DISTINCT image_index) FROM examples").fetchone() == (64, 64)
    # the shard log: 8 commits of 8 images each, those of the first run before the ones of the second
    shards = con.execute("SELECT s.n, r.status FROM shards s JOIN runs r ON r.id = s.run_id ORDER BY s.shard").fetchall()
    assert shards == [(8, "interrupted")] * done_before + [(8, "done")] * (8 - done_before)
    runs = con.execute("SELECT status FROM runs ORDER BY id").fetchall()
    # the killed run never finished: the rerun, holding the folder's lock, marked it interrupted
    assert [s for (s,) in runs] == ["interrupted", "done"]
