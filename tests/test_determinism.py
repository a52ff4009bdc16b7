"""End to end: every random draw is seeded per image, so DiffPure's per-image rows are identical for
any shard size and any --limit prefix (the issue measured 35.94 vs 37.50 from shard size alone)."""
from __future__ import annotations

import sqlite3

from benchkit.cli import main
from conftest import ROOT, write

SUITE = f"""
suite: determinism
include: [{ROOT}/suites/_base/digits.yaml]
dataset: {{plugin: digits, params: {{split: test, n: 24}}}}
defenses:
  - {{id: diffpure, plugin: diffpure, params: {{score_model: digits-unet, t_star: 0.1, dt: 0.025}}}}
attacks:
  - {{id: pgd, plugin: pgd-eot, params: {{eps: 0.3, steps: 2, eot: 2}}}}
  - {{id: l2, plugin: pgd-eot, params: {{norm: L2, eps: 1.5, steps: 1, eot: 2}}}}
grid: all
eval: {{batch_size: BS, repeats: 2}}
checks: {{enabled: [robust-le-clean]}}
"""


def rows(out):
    # Distances to 1e-4: BLAS may sum in another order for another batch size (float rounding only).
    db = sqlite3.connect(out / "results.sqlite")
    return db.execute("SELECT c.key, e.image_index, e.variant, e.label, e.clean_flags, e.adv_flags, "
                      "round(e.distance, 4) FROM examples e JOIN cells c ON c.id = e.cell_id ORDER BY 1, 2, 3").fetchall()


def test_rows_identical_for_shard_sizes_and_limit_prefixes(tmp_path, plugin_manager, one_thread):
    results = {}
    for bs in (1, 5, 8, 24):
        s = write(tmp_path / f"s{bs}.yaml", SUITE.replace("BS", str(bs)))
        assert main(["run", str(s), "--out", str(tmp_path / f"o{bs}")]) == 0
        results[bs] = rows(tmp_path / f"o{bs}")
    assert len(results[24]) == 2 * 24
    # Not a trivial pass: the defense is stochastic and the attacks move the images.
    assert {r[5] for r in results[24]} != {"11"} and any(r[6] > 0 for r in results[24])
    for bs in (1, 5, 8):
        assert results[bs] == results[24], f"shard size {bs} differs from 24"
    s = write(tmp_path / "lim.yaml", SUITE.replace("BS", "8"))
    assert main(["run", str(s), "--out", str(tmp_path / "lim"), "--limit", "7"]) == 0
    assert rows(tmp_path / "lim") == [r for r in results[24] if r[1] < 7]
    # Resuming the prefix to the whole set computes only the rest, and matches.
    assert main(["run", str(s), "--out", str(tmp_path / "lim")]) == 0
    assert rows(tmp_path / "lim") == results[24]
