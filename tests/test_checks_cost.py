"""What the checks cost (benchkit.checks: Demand, fit, Budget) and the exact tests behind their
verdicts, against scipy; end to end, that a run records each check's images, iterations, seconds
and cost, and that `checks: {cost: full}` runs the whole subset. No timing is asserted: the plans
depend only on ratios of the cell's seconds."""
from __future__ import annotations

import json
import sqlite3

import pytest
from scipy.stats import binomtest

from benchkit import checks, report
from benchkit import check_budget
from benchkit.check_budget import Budget, Demand, Plan, allot, fit
from benchkit.cli import main
from benchkit.store import Store
from benchkit.suite import ChecksSpec
from conftest import TINY_SUITE, write

# ------------------------------------------------------------------ the planner (pure)

def demands() -> dict[str, Demand]:
    """A DiffPure cell attacked by AutoAttack (n_iter 100), a subset of 16 images."""
    return {"unbounded-budget": Demand(16, 1.0, 100, cap=check_budget.CHECK_ITERATIONS),
            "eot-convergence": Demand(16, 2.0, 100)}


def test_a_bounded_plan_cuts_images_then_iterations_within_the_budget():
    # 24 images in 240 s (10 s each); budget 0.25 -> 60 s for the checks. Every estimate is
    # images x 10 s x multiplier x RERUN_OVERHEAD (1.5) x the fraction of iterations kept.
    # attack-undefended: the bare classifier costs 1/32 of the defended model per image.
    b = Budget(ChecksSpec(), cell_seconds=240.0, cell_images=24,
               demands={"attack-undefended": Demand(16, 1 / 32)} | demands())
    assert b.total == 60.0 and check_budget.RERUN_OVERHEAD == 1.5
    # Each first gets its least run (8 images, 10 iterations): 3.75 s, 12 s and 24 s; the 20.25 s
    # spare split equally, attack-undefended taking only the 3.75 s its whole subset needs: the
    # others 8.25 s more each.
    assert b.plan("attack-undefended") == Plan(16, None, 7.5)
    assert b.plan("unbounded-budget") == Plan(13, 10, 19.5)          # 20.25 s: 13 of its 16 images
    # 8 images at its own 100 iterations would cost 240 s: 8 images at 32.25 / 2.4 -> 13 iterations.
    assert b.plan("eot-convergence") == Plan(8, 13, pytest.approx(31.2))
    assert 7.5 + 19.5 + 31.2 <= b.total


def test_plans_depend_on_ratios_not_on_the_machine():
    plans = []
    for seconds in (240.0, 2400.0, 24000.0):      # the same cell on slower machines
        b = Budget(ChecksSpec(), seconds, 24, demands())
        plans.append([(p.images, p.iterations) for p in (b.plan("unbounded-budget"), b.plan("eot-convergence"))])
    assert plans[0] == plans[1] == plans[2] == [(16, 10), (8, 15)]


def test_fit_keeps_all_it_can_and_refuses_what_it_cannot():
    d = Demand(16, 2.0, 100)                                         # 3 s per image at 1 s per cell image
    assert fit(d, 1e9, 1.0) == Plan(16, 100, 48.0)                  # affordable: everything, own iterations
    assert fit(d, 30.0, 1.0) == Plan(10, 100, 30.0)                 # fewer images first
    assert fit(d, 4.5, 1.0) == Plan(8, 18, pytest.approx(4.32))     # then fewer iterations
    assert fit(d, 2.5, 1.0) == Plan(8, 10, pytest.approx(2.4))      # down to CHECK_ITERATIONS
    assert fit(d, 2.3, 1.0) is None                                  # below that: skipped
    assert fit(Demand(16, 1.0), 6.0, 1.0) is None                    # no iterations to cut: 8 images or none
    assert fit(Demand(4, 1.0), 6.0, 1.0) == Plan(4, None, 6.0)       # a subset below MIN_IMAGES is its own floor
    assert fit(Demand(4, 1.0), 5.9, 1.0) is None
    assert fit(Demand(16, 1.0, 5, cap=10), 1e9, 1.0) == Plan(16, 5, 24.0)   # the cap never adds iterations


def test_allot_pays_each_least_run_first_and_drops_the_costliest():
    d = demands()                     # least runs: 12 s and 24 s at 10 s per image; most: 24 s and 480 s
    assert allot(d, 60.0, 10.0) == {"unbounded-budget": 24.0, "eot-convergence": 36.0}
    assert allot(d, 30.0, 10.0) == {"unbounded-budget": 24.0}       # both least runs (36 s) do not fit
    assert allot(d, 11.0, 10.0) == {}


def test_full_cost_and_the_free_floor():
    p = Budget(ChecksSpec(cost="full"), 240.0, 24, demands()).plan("eot-convergence")
    assert (p.images, p.iterations) == (16, 100)
    tiny = Budget(ChecksSpec(), 0.4, 4, {"eot-convergence": Demand(4, 2.0, 20)})   # a 0.4 s cell: FREE_SECONDS
    assert tiny.total == check_budget.FREE_SECONDS
    p = tiny.plan("eot-convergence")
    assert (p.images, p.iterations) == (4, 20)


def test_a_refused_check_says_what_it_would_cost():
    b = Budget(ChecksSpec(budget=0.01), 1000.0, 10, demands())       # 100 s per image, 10 s to spend
    assert b.plan("unbounded-budget") is None and b.plan("eot-convergence") is None
    why = b.refusal("eot-convergence")
    assert why.startswith("over budget: its least run (8 images, 10 iterations) would cost ~240.0 s")
    assert why.endswith("raise checks.budget or set checks.cost: full")


# ------------------------------------------------------------------ the exact tests

@pytest.mark.parametrize("k, n, p", [(0, 16, 0.05), (1, 16, 0.05), (2, 16, 0.05), (3, 16, 0.05), (16, 16, 0.05),
                                     (1, 16, 0.01), (2, 16, 0.01), (5, 5, 0.5), (4, 4, 0.5), (7, 9, 0.5), (3, 200, 0.01)])
def test_binomial_tail_is_scipys_one_sided_binomial_test(k, n, p):
    assert checks.binomial_tail(k, n, p) == pytest.approx(binomtest(k, n, p, alternative="greater").pvalue, rel=1e-9)


def test_what_it_takes_to_fail():
    # by hand: 0.95^16 = 0.4401, 16 * 0.05 * 0.95^15 = 0.3706 -> P(X >= 2) = 0.189, P(X >= 3) = 0.0429
    assert checks.fewest_failing(16, 0.05) == 3
    assert checks.fewest_failing(16, 0.01) == 2       # P(X >= 2) = 0.0109; P(X >= 1) = 0.149
    assert checks.fewest_failing(1, 0.05) is None      # one image can never be significant at 5%


def flags(robust: int, images: int) -> list[bool]:
    return [i < robust for i in range(images)]


def test_eot_more_samples_that_do_better_pass():
    # digits_quick --limit 8 printed "EOT not converged 6.2% vs 18.8%": 1 vs 3 robust of 16, where
    # 2n samples gave the HIGHER accuracy; noise, not an unconverged attack.
    r = checks.eot_verdict(flags(1, 16), flags(3, 16), 2, {})
    assert r.status == "pass" and r.numbers["broken_only_2n"] == 0 and r.numbers["broken_only_n"] == 2
    assert "6.2% at EOT 2 vs 18.8% at EOT 4 on 16 images" in r.reason and "p = 1" in r.reason


def test_eot_significantly_stronger_fails_with_its_p_value():
    r = checks.eot_verdict(flags(16, 16), flags(8, 16), 2, {})      # 0 broken of 16 at n, 8 at 2n
    p = binomtest(8, 8, 0.5, alternative="greater").pvalue
    assert r.status == "fail" and r.reason.startswith("EOT not converged") and r.numbers["p_value"] == pytest.approx(p)
    assert (r.numbers["robust_eot2"], r.numbers["robust_eot4"], r.numbers["images"]) == (100.0, 50.0, 16)


@pytest.mark.parametrize("one_way, status", [(4, "pass"), (5, "fail")])
def test_eot_sign_test_boundary(one_way, status):
    # 1/2^4 = 0.0625 is not significant, 1/2^5 = 0.031 is; both drop far more than 2 points.
    assert checks.eot_verdict(flags(16, 16), flags(16 - one_way, 16), 2, {}).status == status


def test_eot_needs_the_drop_too():
    # 6 images broken only at 2n, none the other way, are significant (1/64); on 200 images they drop
    # 3 points (fail), on 400 images 1.5 points (pass).
    assert checks.eot_verdict(flags(200, 200), flags(194, 200), 2, {}).status == "fail"
    assert checks.eot_verdict(flags(400, 400), flags(394, 400), 2, {}).status == "pass"


def test_too_few_images_can_never_fail_and_say_so():
    r = checks.eot_verdict(flags(4, 4), flags(0, 4), 2, {})     # all 4 broken only at 2n: p = 1/16
    assert r.status == "pass" and "4 images can never fail it" in r.reason
    r = checks.rate_verdict("unbounded-budget", flags(1, 1), 0.05, "it", "masked", {})
    assert r.status == "pass" and "1 images can never fail it" in r.reason


@pytest.mark.parametrize("robust, limit, status", [(2, 0.05, "pass"), (3, 0.05, "fail"), (1, 0.01, "pass"),
                                                   (2, 0.01, "fail"), (0, 0.05, "pass")])
def test_rate_verdicts_are_exact_binomial_tests(robust, limit, status):
    r = checks.rate_verdict("unbounded-budget", flags(robust, 16), limit, "it", "masked", {})
    assert r.status == status
    assert r.numbers["p_value"] == pytest.approx(binomtest(robust, 16, limit, alternative="greater").pvalue)
    assert f"{robust} of 16 images robust" in r.reason


# ------------------------------------------------------------------ end to end

@pytest.fixture
def blobs(plugin_manager):
    """test_run's blobs: 24 images of 4x4 pixels, a nearest-prototype classifier, a jitter defense
    (stochastic, so EOT applies): a cell costs well under a second."""
    from benchkit import registry
    from test_run import LocalPlugin
    plugin_manager.register(LocalPlugin(), name="local")
    registry.reset()


SUITE = """
suite: cost
seed: 3
dataset: {plugin: blobs}
classifiers: [{id: near, plugin: nearest}]
defenses: [{id: jitter, plugin: jitter}]
attacks: [{id: pgd, plugin: pgd-eot, params: {eps: 0.1, steps: 30, eot: 2}}]
grid: all
eval: {batch_size: 8, repeats: 2}
"""


def stored_checks(out) -> tuple[dict, float]:
    db = sqlite3.connect(out / "results.sqlite")
    rows = db.execute("SELECT name, status, numbers_json, reason FROM checks")
    cell_seconds = db.execute("SELECT SUM(seconds) FROM shards").fetchone()[0]
    return {n: (s, json.loads(nums), r) for n, s, nums, r in rows}, cell_seconds


def test_a_bounded_run_records_images_iterations_seconds_and_cost(tmp_path, blobs, monkeypatch, capsys):
    # Without the FREE_SECONDS floor a budget of 1.25 binds on this cell of 24 images, and the plan
    # follows from ratios (in cell-seconds, x RERUN_OVERHEAD 1.5) and attack-undefended's measured
    # multiplier (at most 1: its 8 images at most 8 / 24 x 1.5 = 0.5). unbounded-budget gets all it
    # wants, 8 images at 10 of 30 iterations (8 / 24 x 1.5 x 10 / 30 = 0.167); eot-convergence its
    # least run (8 images, 10 iterations: 0.333) plus the spare, at least 0.25:
    # 8 / 24 x 2 x 1.5 x k / 30 <= 0.583 -> k >= 17.
    monkeypatch.setattr(check_budget, "FREE_SECONDS", 0.0)
    s = write(tmp_path / "s.yaml", SUITE + "checks: {subset: 8, budget: 1.25}\n")
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 0
    got, cell_seconds = stored_checks(tmp_path / "o")
    unb, eot = got["unbounded-budget"][1], got["eot-convergence"][1]
    assert (unb["images"], unb["iterations"], unb["attack_iterations"]) == (8, 10, 30)
    assert unb["overrides"] == {"eps": 1.0, "steps": 10} and "10 of the attack's 30 iterations" in got["unbounded-budget"][2]
    assert eot["images"] == 8 and 17 <= eot["iterations"] < 30 and eot["attack_iterations"] == 30
    assert f"on 8 images, EOT 4 at {eot['iterations']} of the attack's 30 iterations" in got["eot-convergence"][2]
    for name in ("unbounded-budget", "eot-convergence"):
        nums = got[name][1]
        assert nums["seconds"] > 0 and nums["cost"] == pytest.approx(nums["seconds"] / cell_seconds)
    # attack-undefended's per-image cost is measured (a probe), rounded up to a power of two.
    undef = got["attack-undefended"][1]
    assert undef["images"] == 8 and undef["iterations"] == 30 and undef["multiplier"] in [2.0 ** -k for k in range(21)]
    # The report shows each check's cost and their total.
    capsys.readouterr()
    assert main(["report", str(tmp_path / "o")]) == 0
    total = report.checks_cost(report.collect(Store(tmp_path / "o" / "results.sqlite"))["rows"][0]["checks"])
    assert f"({total:.2f}x cell)" in capsys.readouterr().out
    page = (tmp_path / "o" / "leaderboard.html").read_text()
    assert "Cost: " in page and "of the cell" in page and f"checks: {total:.2f}&times; cell" in page


def test_full_cost_runs_the_whole_subset_at_the_attacks_own_iterations(tmp_path, blobs, monkeypatch):
    monkeypatch.setattr(check_budget, "FREE_SECONDS", 0.0)
    s = write(tmp_path / "s.yaml", SUITE + "checks: {subset: 8, cost: full}\n")
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 0
    got, _ = stored_checks(tmp_path / "o")
    for name in ("attack-undefended", "unbounded-budget", "eot-convergence"):
        nums = got[name][1]
        assert (nums["images"], nums["iterations"], nums["attack_iterations"]) == (8, 30, 30), name
    assert got["unbounded-budget"][1]["overrides"] == {"eps": 1.0}


@pytest.mark.parametrize("setting, message", [
    ("{budget: 0}", "checks.budget: Input should be greater than 0"),
    ("{budget: -0.5}", "checks.budget: Input should be greater than 0"),
    ("{budget: true}", "checks.budget: expected a number, got a boolean (true)"),
    ("{budget: .inf}", "checks.budget: must be a finite number"),
    ("{cost: cheap}", "checks.cost: Input should be 'bounded' or 'full'"),
    ("{cost: full, budget: 0.5}", "checks: budget bounds cost: bounded only; cost: full runs every check whole"),
])
def test_bad_check_settings_are_one_line(tmp_path, capsys, setting, message):
    s = write(tmp_path / "s.yaml", TINY_SUITE.replace("checks: {enabled: []}", f"checks: {setting}"))
    assert main(["validate", str(s)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("benchkit: error: ") and message in err, err


def test_the_benchmark_prints_its_keys_on_a_tiny_configuration(plugin_manager, one_thread):
    """benchmarks/bench_checks.py on 4 digits, 4 reverse steps, 2 iterations: its JSON keys (no timing)."""
    import importlib.util

    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("bench_checks", ROOT / "benchmarks" / "bench_checks.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    free = check_budget.FREE_SECONDS
    try:
        out = bench.run(bench.parse(["--images", "4", "--subset", "4", "--dt", "0.025", "--n-iter", "2"]))
    finally:
        check_budget.FREE_SECONDS = free
    assert "error" not in out and out["cell_seconds"] > 0
    assert {"config", "cell_seconds", "bounded", "full", "full_over_bounded", "within_budget", "legend"} <= set(out)
    for variant in ("bounded", "full"):
        assert set(out[variant]) == {"checks", "total_seconds", "total_cost"}
        assert out[variant]["total_cost"] == pytest.approx(out[variant]["total_seconds"] / out["cell_seconds"])
    full = out["full"]["checks"]
    assert {full[n]["images"] for n in ("attack-undefended", "unbounded-budget", "eot-convergence")} == {4}


def test_changing_checks_settings_reruns_only_the_checks(tmp_path):
    """`cost: full` is one setting away on a finished cell: the checks run again under the new
    settings, the cell's images are not recomputed."""
    import json
    import sqlite3

    from benchkit import cli
    suite = tmp_path / "s.yaml"
    suite.write_text(TINY_SUITE.replace("checks: {enabled: []}", "checks: {enabled: [eot-convergence]}"))
    out = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    suite.write_text(TINY_SUITE.replace("checks: {enabled: []}", "checks: {enabled: [eot-convergence], cost: full}"))
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    db = sqlite3.connect(out / "results.sqlite")
    runs = [r[0] for r in db.execute("SELECT id FROM runs ORDER BY id")]
    shard_runs = {r[0] for r in db.execute("SELECT run_id FROM shards")}
    checks = [(r[0], json.loads(r[1])) for r in db.execute("SELECT run_id, numbers_json FROM checks")]
    assert shard_runs == {runs[0]}                        # images computed once
    assert checks and all(run == runs[1] and nums["settings"]["cost"] == "full" for run, nums in checks)
