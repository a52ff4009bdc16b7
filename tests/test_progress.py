"""The run's progress: a cost-weighted estimator (pure, synthetic timings), the per-shard log,
the live terminal bar, and attacks reporting their iterations through AttackContext.progress."""
from __future__ import annotations

import dataclasses
import io
import re
from typing import Callable

import pytest
import torch

from benchkit import progress as progress_module
from benchkit.cli import main
from benchkit.defended import DefendedModel
from benchkit.evaluate import ShardResult
from benchkit.executors.local import LocalExecutor
from benchkit.progress import CellWork, Progress, estimate, seconds_per_image
from benchkit.resolve import load
from benchkit.runner import Task, execute
from benchkit.threat import Linf
from conftest import ROOT, write
from test_attacks import build, cnn, data, make_ctx, run  # noqa: F401 - fixtures
from test_run import SUITE, local  # noqa: F401 - the fixture registering test_run's plugin


class Clock:
    """A clock the test moves by hand: no sleeps, no timing in any assertion."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def clean(todo=100, **kw) -> CellWork:
    return CellWork("near/none", "clean", "", "none", todo, **kw)


def attacked(attack="pgd", defense="none", todo=10, classifier="near", **kw) -> CellWork:
    return CellWork(f"{classifier}/{defense}/{attack}", "attack", attack, defense, todo, **kw)


# ---------------------------------------------------------------- the estimator


def test_the_fraction_weighs_measured_cost_not_images():
    # 100 clean images at 0.01 s done; 10 attacked images at 1 s each (an earlier run measured 2).
    cells = [clean(done=100, seconds=1.0), attacked(prior_images=2, prior_seconds=2.0)]
    est = estimate(cells)
    assert est.spent == 1.0 and est.remaining == pytest.approx(10.0)
    assert est.fraction == pytest.approx(1 / 11)          # 0.09, where counting images says 100/110 = 0.91
    assert est.eta(elapsed=1.0) == pytest.approx(10.0)


def test_an_unmeasured_kind_leaves_fraction_and_eta_unknown():
    est = estimate([clean(done=100, seconds=1.0), attacked()])
    assert est.remaining is None and est.fraction is None and est.eta(1.0) is None
    # once the attack has done part of an image (an in-shard report), it is known
    est = estimate([clean(done=100, seconds=1.0), attacked(done=0.5, seconds=2.0)])
    assert est.remaining == pytest.approx(9.5 * 4.0) and est.fraction == pytest.approx(3.0 / (3.0 + 38.0))


def test_a_cell_not_run_yet_borrows_the_rate_of_the_most_alike():
    cells = [
        attacked("pgd", "none", done=10, seconds=10.0),         # 1 s per image
        attacked("fgsm", "diff", done=2, seconds=10.0),         # 5 s per image
        clean(done=100, seconds=1.0),                           # 0.01 s per image
        attacked("pgd", "none", classifier="other"),            # same attack and defense: 1
        attacked("pgd", "diff"),                                # same defense: 5
        attacked("square", "none"),                             # same defense (none): pgd's 1
        attacked("square", "other"),                            # same kind only: (10 + 10) / (10 + 2)
        CellWork("near/diff", "clean", "", "diff", 100),        # the clean cells: 0.01
    ]
    assert seconds_per_image(cells) == pytest.approx([1.0, 5.0, 0.01, 1.0, 5.0, 1.0, 20 / 12, 0.01])


def test_this_runs_measurement_outweighs_earlier_runs():
    # An earlier run (another machine, maybe) took 3 s per image; this one takes 1 s.
    assert seconds_per_image([attacked(prior_images=4, prior_seconds=12.0)]) == [3.0]
    assert seconds_per_image([attacked(done=2, seconds=2.0, prior_images=4, prior_seconds=12.0)]) == [1.0]


def test_eta_follows_the_pace_of_parallel_workers():
    # Two workers: 40 s of work done in 20 s of wall time; 40 s of work left takes 20 s more.
    est = estimate([attacked(todo=80, done=40, seconds=40.0)])
    assert est.remaining == pytest.approx(40.0) and est.fraction == pytest.approx(0.5)
    assert est.eta(elapsed=20.0) == pytest.approx(20.0)


def test_nothing_to_compute_is_done():
    assert estimate([clean(todo=0)]).fraction == 1.0


# ---------------------------------------------------------------- the display, synthetic


def two_cells() -> list[CellWork]:
    return [CellWork("near/none", "clean", "", "none", 100, shards=1),
            CellWork("near/none/pgd", "attack", "pgd", "none", 10, shards=2)]


def test_the_log_has_one_line_per_shard_with_cell_shard_images_elapsed_and_eta():
    clock, out = Clock(), io.StringIO()
    prog = Progress(two_cells(), stream=out, clock=clock)
    clock.t = 1.0
    prog.finished(Task("shard", "near/none", tuple(range(100))), 1.0)
    clock.t = 6.0
    prog.finished(Task("shard", "near/none/pgd", tuple(range(5))), 5.0)
    # After the attack's first shard: 1 s per attacked image, 5 left -> 5 s of 11; 6 s of 6 s elapsed.
    assert out.getvalue().splitlines() == [
        "benchkit: [  ?%] near/none (standard accuracy): shard 1/1 done in 1.0s; 100/110 images, 00:01 elapsed, ETA ?",
        "benchkit: [ 55%] near/none/pgd: shard 1/2 done in 5.0s; 105/110 images, 00:06 elapsed, ETA 00:05"]
    prog.close()
    assert "\r" not in out.getvalue()


def test_attack_shards_price_their_groups_standard_accuracy_cell_before_it_runs():
    # Attack cells run before the whole-split cells; their clean verdicts are the same work per image.
    clock, out = Clock(), io.StringIO()
    cells = [CellWork("near/none/pgd", "attack", "pgd", "none", 10, shards=1),
             CellWork("near/none", "clean", "", "none", 1000, shards=1)]
    prog = Progress(cells, stream=out, clock=clock)
    clock.t = 10.0
    prog.finished(Task("shard", "near/none/pgd", tuple(range(10))), 10.0, clean_cost=(10, 0.1))
    # 10 s spent; 1000 clean images at 0.01 s left: 10 s -> half done, 10 s to go.
    assert estimate(prog.snapshot()).fraction == pytest.approx(0.5)
    assert out.getvalue().splitlines()[-1].endswith("ETA 00:10")
    # the cell's own measurement replaces the probe as soon as it has one
    prog.finished(Task("shard", "near/none", tuple(range(1000))), 30.0, clean_cost=(0, 0.0))
    assert estimate(prog.snapshot()).remaining == 0.0


def test_a_running_shard_counts_what_its_attack_reported_else_what_its_rate_predicts():
    clock = Clock()
    prog = Progress(two_cells(), stream=io.StringIO(), clock=clock)
    prog.finished(Task("shard", "near/none", tuple(range(100))), 1.0)
    first, second = Task("shard", "near/none/pgd", (0, 1, 2, 3, 4)), Task("shard", "near/none/pgd", (5, 6, 7, 8, 9))
    prog.started(first)
    clock.t = 4.0
    prog.advance(first, 0.4)           # 2 of 5 images in 4 s: 2 s per image, 8 images (16 s) left
    assert prog.now() == "running near/none/pgd shard 1/2 40%"
    assert estimate(prog.snapshot()).fraction == pytest.approx(5.0 / (5.0 + 16.0))
    prog.finished(first, 10.0)
    prog.started(second)
    clock.t += 3.0                     # no report: at 2 s per image, 1.5 images done
    cells = prog.snapshot()
    assert (cells[1].done, cells[1].seconds) == (6.5, 13.0)
    assert prog.now() == "running near/none/pgd shard 2/2"


def test_without_start_reports_it_names_the_first_cell_with_work_left():
    # The Ray executor reports nothing: the shard log and the first unfinished cell still show.
    clock, out = Clock(), io.StringIO()
    prog = Progress(two_cells(), stream=out, clock=clock)
    assert prog.now() == "working on near/none (standard accuracy)"
    clock.t = 2.0
    prog.finished(Task("shard", "near/none", tuple(range(100))), 1.0)
    assert prog.now() == "working on near/none/pgd"
    assert len(out.getvalue().splitlines()) == 1


def test_a_failed_cell_has_no_work_left():
    prog = Progress(two_cells(), stream=io.StringIO(), clock=Clock())
    prog.finished(Task("shard", "near/none", tuple(range(100))), 1.0)
    prog.failed("near/none/pgd")
    assert estimate(prog.snapshot()).fraction == 1.0 and prog.now() == "finishing"


def test_the_terminal_bar_names_the_running_cell():
    clock, tty = Clock(), TTY()
    prog = Progress(two_cells(), stream=tty, clock=clock)
    shard = Task("shard", "near/none/pgd", (0, 1, 2, 3, 4))
    prog.started(shard)
    clock.t = 1.0
    prog.advance(shard, 0.5)
    prog.close()
    text = tty.getvalue()
    assert "\r" in text and text.endswith("\n")
    assert "running near/none/pgd shard 1/2 50%" in text and "0/110 images" in text


# ---------------------------------------------------------------- real runs

PGD_SUITE = """
suite: prog
seed: 1
dataset: {plugin: blobs}
classifiers: [{id: near, plugin: nearest}]
defenses: [{id: none, plugin: identity}]
attacks: [{id: pgd, plugin: pgd-eot, params: {eps: 0.1, steps: 3, restarts: 2, eot: 1}}]
grid: all
eval: {batch_size: 8}
"""



def progress_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("benchkit: [")]


def test_a_run_logs_each_shard_when_stderr_is_not_a_terminal(tmp_path, local, capsys):
    s = write(tmp_path / "s.yaml", SUITE)
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 0
    lines = progress_lines(capsys.readouterr().err)
    # 2 defenses x 2 attacks, 24 images in shards of 8: 12 lines, in the cells' order
    pattern = re.compile(r"benchkit: \[(  \?|[ \d]{2}\d)%\] (near/\w+/\w+): shard (\d)/3 done in \d+\.\ds; "
                         r"(\d+)/96 images, \d\d:\d\d elapsed, ETA (\?|\d\d:\d\d)$")
    parsed = [pattern.match(line) for line in lines]
    assert len(lines) == 12 and all(parsed), lines
    cells = ["near/none/fgsm", "near/none/weak", "near/jitter/fgsm", "near/jitter/weak"]
    assert [(m[2], int(m[3]), int(m[4])) for m in parsed] == [
        (cell, shard, 8 * (3 * c + shard)) for c, cell in enumerate(cells) for shard in (1, 2, 3)]
    assert parsed[-1][1] == "100" and parsed[-1][5] == "00:00"
    # a rerun computes nothing and logs nothing
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 0
    assert progress_lines(capsys.readouterr().err) == []


def test_a_run_on_a_terminal_draws_the_running_cell_live(tmp_path, local, monkeypatch):
    s = write(tmp_path / "p.yaml", PGD_SUITE)
    tty = TTY()
    monkeypatch.setattr("sys.stderr", tty)
    monkeypatch.setattr(progress_module, "REDRAW_S", 0.0)   # draw every in-shard report
    assert main(["run", str(s), "--out", str(tmp_path / "o")]) == 0
    text = tty.getvalue()
    # pgd reports 2 restarts x (3 + 1) evaluations per shard: 12%, 25%, ... of the running shard
    assert "running near/none/pgd shard 1/3 12%" in text and "running near/none/pgd shard 3/3 50%" in text
    assert "\r" in text and "100% ETA 00:00" in text and "24/24 images" in text


# ---------------------------------------------------------------- attacks reporting iterations


class Recorder:
    """A Listener keeping what the executor tells it."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.fractions: list[float] = []

    def started(self, task: Task) -> None:
        self.tasks.append(task)

    def advance(self, task: Task, fraction: float) -> None:
        assert task is self.tasks[-1]
        self.fractions.append(fraction)


def run_shard(tmp_path, suite_text: str, cell: str) -> tuple[Recorder, ShardResult, Callable[[], object]]:
    """One shard of 8 images through the local executor, watched by a Recorder; and the same shard
    as the Ray executor runs it (no receiver)."""
    resolved = load(write(tmp_path / "s.yaml", suite_text))
    comps = resolved.build(torch.device("cpu"))
    rec, executor = Recorder(), LocalExecutor(resolved, comps)
    executor.watch(rec)
    task = Task("shard", cell, tuple(range(8)))
    executor.submit(task)
    done, result = executor.next()
    assert done is task and rec.tasks == [task]
    return rec, result, lambda: execute(task, resolved, comps)


def test_pgd_reports_every_gradient_evaluation_to_the_local_executor(tmp_path, local):
    rec, result, unwatched = run_shard(tmp_path, PGD_SUITE, "near/none/pgd")
    assert len(result.rows) == 8
    # As the Ray executor calls it: the reports go nowhere, the numbers are the same.
    assert unwatched().rows == result.rows
    # restarts x (steps + 1) reports, the last one the whole shard's attack
    assert rec.fractions == [k / 8 for k in range(1, 9)]


AA_SUITE = f"""
suite: aa
include: [{ROOT}/suites/_base/digits.yaml]
dataset: {{plugin: digits, params: {{n: 8}}}}
defenses: [{{id: none, plugin: identity}}]
attacks: [{{id: aa, plugin: autoattack, params: {{eps: 1/255, versions: [standard, apgd-t], n_iter: 2, n_queries: 4,
                         n_target_classes: 1}}}}]
grid: all
eval: {{batch_size: 8}}
"""


def test_autoattack_reports_each_member_of_each_version(tmp_path, plugin_manager):
    rec, result, _ = run_shard(tmp_path, AA_SUITE, "cnn/none/aa")
    # At eps 1/255 images stay robust, so every member runs on the one batch of 8: standard's 4
    # members fill the first half of the shard, apgd-t alone the second.
    assert len(result.rows) == 16
    assert rec.fractions == [1 / 8, 2 / 8, 3 / 8, 4 / 8, 1.0]


def test_an_attack_that_never_reports_still_runs(tmp_path, local):
    rec, result, _ = run_shard(tmp_path, SUITE, "near/none/fgsm")
    assert rec.fractions == [] and len(result.rows) == 8


@pytest.mark.parametrize("attack_id, params", [
    ("pgd-eot", {"eps": 0.1, "steps": 3, "restarts": 2, "eot": 1}),
    ("bpda-eot", {"eps": 0.1, "steps": 2, "restarts": 3, "eot": 1}),
    ("diffattack", {"eps": 0.1, "steps": 3, "restarts": 2, "eot": 1}),
    ("diffhammer", {"eps": 0.1, "steps": 3, "restarts": 2, "n": 2}),
])
def test_gradient_attacks_report_each_evaluation_over_all_restarts(cnn, data, attack_id, params):
    x, y = data[0][:4], data[1][:4]
    reports: list[tuple[int, int]] = []
    ctx = dataclasses.replace(make_ctx(indices=range(4)), on_progress=lambda done, total: reports.append((done, total)))
    for _, sub in build(attack_id, **params).variants():
        reports.clear()
        run(DefendedModel(cnn), sub, x, y, ctx=ctx, threat=Linf(params["eps"]))
        total = params["restarts"] * (params["steps"] + 1)
        assert reports == [(k, total) for k in range(1, total + 1)]
