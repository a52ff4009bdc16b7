"""What a cell's checks cost against the cell itself, bounded (the default) and full, on the digits DiffPure.

One suite through `benchkit run` (benchkit.cli.main, into a temporary folder): the digits CNN behind
DiffPure (digits-unet score model, t* = 0.1, --dt) attacked with AutoAttack rand (Linf --eps, EOT
--eot, n_iter --n-iter) on the first --images test digits, every check enabled on a subset of
--subset images. The run's checks are first bounded (`checks: {budget: --budget}`), then the same
suite reruns with `checks: {cost: full}`: the cell is computed once (its key does not include the
checks, and a change of `checks:` reruns only them), so both variants are measured against the same
cell seconds.

The library lets a cell's checks spend at least check_budget.FREE_SECONDS (10 s) whatever the budget; on
this benchmark's small default cell that floor would dominate, so it is set to --free-seconds (0)
here, to measure the fraction a long cell gets. Timing is a ratio of seconds measured in this one
process (the checks' seconds over the cell's). Prints one JSON object; its `legend` says what each
key means. Exit status 1 if the run failed, else 0.

Default: 24 images, AutoAttack's own n_iter 100, dt 0.02 (5 reverse steps): about 3 minutes on 1
thread. --held-back: the issue's configuration, dt 1e-3 (100 steps: tens of minutes for the cell alone
on a CPU).
Usage: python benchmarks/bench_checks.py [--images 24] [--subset 16] [--dt 0.02] [--eot 2] [--n-iter 100]
                                         [--eps 0.3] [--budget 0.25] [--free-seconds 0] [--threads 1]
                                         [--held-back] [--bounded-only]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HELD_BACK = {"dt": 1e-3}

LEGEND = {
    "cell_seconds": "the cell's compute seconds (the sum of its stored shards' seconds)",
    "checks.<name>": "status, seconds, cost (seconds / cell_seconds), images and iterations (the attack's own: "
                     "attack_iterations) each check ran on",
    "total_seconds": "seconds of all the cell's checks together",
    "total_cost": "total_seconds / cell_seconds; the bound is budget (for bounded)",
    "full_over_bounded": "full total_seconds / bounded total_seconds",
    "within_budget": "bounded total_cost <= budget",
}


def suite_text(a: argparse.Namespace, checks: str) -> str:
    return f"""
suite: bench_checks
include: [{ROOT}/suites/_base/digits.yaml]
seed: 0
dataset: {{plugin: digits, params: {{split: test, n: {a.images}}}}}
defenses:
  - {{id: diffpure, plugin: diffpure, gradient: exact,
     params: {{score_model: digits-unet, sampler: vp-sde, t_star: 0.1, dt: {a.dt}}}}}
attacks:
  - {{id: aa-rand, plugin: autoattack, params: {{norm: Linf, eps: {a.eps}, versions: [rand], eot: {a.eot},
                                                n_iter: {a.n_iter}}}}}
grid: all
checks: {checks}
"""


def stored(out: Path) -> tuple[float, dict]:
    db = sqlite3.connect(out / "results.sqlite")
    cell_seconds = db.execute("SELECT SUM(seconds) FROM shards").fetchone()[0]
    rows = {}
    for name, status, numbers in db.execute("SELECT name, status, numbers_json FROM checks ORDER BY name"):
        nums = json.loads(numbers)
        rows[name] = {"status": status} | {k: nums.get(k) for k in ("seconds", "cost", "images", "iterations",
                                                                    "attack_iterations")}
    db.close()
    return cell_seconds, rows


def variant(checks: dict, cell_seconds: float) -> dict:
    total = sum(c["seconds"] or 0.0 for c in checks.values())
    return {"checks": checks, "total_seconds": total, "total_cost": total / cell_seconds}


def run(a: argparse.Namespace) -> dict:
    from benchkit import check_budget
    from benchkit.cli import main

    check_budget.FREE_SECONDS = a.free_seconds
    result: dict = {"config": {k: getattr(a, k) for k in ("images", "subset", "dt", "eot", "n_iter", "eps", "budget",
                                                          "free_seconds", "threads")}}
    with tempfile.TemporaryDirectory(prefix="bench-checks-") as tmp:
        out, suite = Path(tmp) / "out", Path(tmp) / "suite.yaml"
        cells = {}
        variants = (("bounded", f"{{subset: {a.subset}, budget: {a.budget}}}"),
                    ("full", f"{{subset: {a.subset}, cost: full}}"))
        for name, setting in variants[:1] if a.bounded_only else variants:
            suite.write_text(suite_text(a, setting))
            with contextlib.redirect_stdout(sys.stderr):   # benchkit's table; stdout carries the JSON alone
                code = main(["run", str(suite), "--out", str(out)])
            if code != 0:
                return result | {"error": f"benchkit run ({name}) exited {code}"}
            cells[name] = stored(out)   # changing `checks:` reruns only the checks: the same cell seconds
    cell_seconds = cells["bounded"][0]
    bounded = variant(cells["bounded"][1], cell_seconds)
    if a.bounded_only:
        return result | {"cell_seconds": cell_seconds, "bounded": bounded,
                         "within_budget": bounded["total_cost"] <= a.budget, "legend": LEGEND}
    full = variant(cells["full"][1], cell_seconds)
    return result | {"cell_seconds": cell_seconds, "bounded": bounded, "full": full,
                     "full_over_bounded": full["total_seconds"] / bounded["total_seconds"],
                     "within_budget": bounded["total_cost"] <= a.budget, "legend": LEGEND}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--subset", type=int, default=16, help="checks.subset")
    p.add_argument("--dt", type=float, default=0.02, help="DiffPure's reverse step (0.02: 5 steps at t* = 0.1)")
    p.add_argument("--eot", type=int, default=2)
    p.add_argument("--n-iter", type=int, default=100, help="AutoAttack's n_iter")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--budget", type=float, default=0.25, help="checks.budget of the bounded run")
    p.add_argument("--free-seconds", type=float, default=0.0, help="check_budget.FREE_SECONDS for this run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bounded-only", action="store_true", help="skip the full-cost variant (no full_over_bounded)")
    p.add_argument("--held-back", action="store_true", help=f"the issue's configuration: {HELD_BACK}")
    a = p.parse_args(argv)
    if a.held_back:
        for k, v in HELD_BACK.items():
            setattr(a, k, v)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    result = run(a)
    print(json.dumps(result, indent=2))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
