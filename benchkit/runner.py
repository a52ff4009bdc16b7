"""THE run pipeline: plan every cell's shards, hand tasks to an executor, commit results, record
failures, run checks, finish the run. Executors (local, Ray) only turn tasks into results, with
`execute` on whichever process holds the models.

Policy, in one place:
- a shard's rows are committed in one transaction; a rerun skips every stored image;
- any exception while a cell runs fails that cell only: its message is recorded in one line, its
  other shards are cancelled, and the run goes on (status 'failed', exit 1);
- a cell's checks run once all its images are stored; the cross-cell check at the end.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Callable, Protocol

from benchkit import checks, memory, metrics
from benchkit.evaluate import CellFailure, ShardResult, evaluate_shard, one_line
from benchkit.progress import CellWork, Progress
from benchkit.provenance import config_changes
from benchkit.resolve import Cell, Components, ResolvedSuite
from benchkit.store import Store
from benchkit.suite import stable_hash


@dataclass(frozen=True)
class Task:
    kind: str                         # "shard" | "checks"
    cell_key: str
    indices: tuple[int, ...] = ()
    # checks: the cell's stored example rows and per-shard attack stats
    examples: tuple = ()
    shard_stats: tuple = ()
    # checks: the cell's compute seconds (its stored shards'), which bound the checks' own cost
    seconds: float = 0.0


@dataclass
class Failed:
    """A task's exception, as one line (returned rather than raised: executors never retry it)."""
    message: str


def execute(task: Task, resolved: ResolvedSuite, comps: Components,
            progress: Callable[[float], None] | None = None) -> ShardResult | list | Failed:
    """Run one task where the models live. Never raises for a cell's own failure. `progress`, for
    an executor that shows it live, receives the fraction of a shard's attack done."""
    try:
        cell = resolved.cell(task.cell_key)
        if task.kind == "shard":
            return evaluate_shard(resolved, comps, cell, task.indices, progress)
        return checks.run_checks(resolved, comps, cell, list(task.examples), list(task.shard_stats),
                                 cell_seconds=task.seconds)
    except CellFailure as exc:
        return Failed(str(exc))
    except Exception as exc:  # noqa: BLE001 - a plugin bug or out of memory fails the cell, not the run
        return Failed(one_line(exc))


class Executor(Protocol):
    """Optionally also `watch(listener: benchkit.progress.Listener)`: an executor that runs tasks in
    this process tells the listener when each starts and how far its attack has got."""
    def submit(self, task: Task, *, urgent: bool = False) -> None: ...
    def cancel(self, cell_key: str) -> None: ...
    def next(self) -> tuple[Task, object] | None: ...
    def close(self) -> None: ...


@dataclass
class Plan:
    cell: Cell
    cell_id: int
    n: int
    shards: list[list[int]]          # the images still to compute
    left: int = 0
    failed: bool = False
    computed: bool = False           # this run committed something: its checks are stale


def chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[s:s + size] for s in range(0, len(items), size)]


def plan(resolved: ResolvedSuite, sizes: dict[str, int], store: Store, limit: int | None) -> list[Plan]:
    """Every cell's stored id and the shards of its images not yet stored. sizes: dataset length per cell."""
    suite = resolved.suite
    size = suite.eval.shard_size or suite.eval.batch_size
    plans = []
    for cell in resolved.cells:
        n = sizes[cell.key] if limit is None else min(limit, sizes[cell.key])
        variants = [v for v, _ in resolved.attack_objects[cell.attack.id].variants()] if cell.attack else [""]
        config = cell.config(suite)   # hashes the cell's files: once, not twice
        cell_id = store.ensure_cell(cell.key, stable_hash(config), cell.kind, cell.classifier.id, cell.defense.id,
                                    cell.attack.id if cell.attack else "", config, variants, n,
                                    suite.eval.repeats)
        done = store.stored_images(cell_id)
        if not done and (why := changed_since(store, cell.key, cell_id, config)):
            print(f"benchkit: {cell.key}: {why}; recomputing", file=sys.stderr)
        shards = chunks([i for i in range(n) if i not in done], size)
        plans.append(Plan(cell, cell_id, n, shards, left=len(shards)))
    return plans


def changed_since(store: Store, key: str, cell_id: int, config: dict) -> str | None:
    """What changed (provenance.config_changes) since the latest stored results of this cell key whose
    configuration differs from `config` only in file digests or plugin versions; None when there are
    none. Those results stay in the store under their own configuration."""
    return next((why for old in store.earlier_configs(key, cell_id) if (why := config_changes(old, config))), None)


def stored_inputs(store: Store, cell_id: int) -> tuple[tuple, tuple, float]:
    """What a cell's checks get: its example rows, per-shard attack stats and compute seconds."""
    shards = store.shards(cell_id)
    return (tuple(dict(r) for r in store.examples(cell_id)), tuple(json.loads(s["stats_json"]) for s in shards),
            sum(s["seconds"] for s in shards))


@dataclass
class Outcome:
    run_id: int
    status: str                       # done | failed | interrupted
    failures: list[str] = field(default_factory=list)


def run(resolved: ResolvedSuite, store: Store, executor: Executor, *, sizes: dict[str, int], limit: int | None,
        provenance: dict, suite_json: dict, announce=None) -> Outcome:
    """Plan, execute, commit and check every cell; the run's status is always recorded."""
    plans = plan(resolved, sizes, store, limit)
    suite = resolved.suite
    prov = provenance | {"cell_ids": {p.cell.key: p.cell_id for p in plans},
                         "cell_n": {p.cell.key: p.n for p in plans}, "limit": limit,
                         "dataset_n": {p.cell.key: sizes[p.cell.key] for p in plans},
                         # The budget each attack's examples are verified against, as the report shows it.
                         "threats": {k: {"norm": t.name, "eps": t.eps} for k, t in resolved.threats.items()}}
    run_id = store.start_run(suite.suite, str(resolved.path.resolve()), stable_hash(suite_json), suite_json, prov)
    if announce:
        announce(plans)
    outcome = Outcome(run_id, "running")
    try:
        _loop(resolved, store, executor, plans, outcome)
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted")
        outcome.status = "interrupted"
        raise
    finally:
        executor.close()
    outcome.status = "failed" if outcome.failures else "done"
    store.finish_run(run_id, outcome.status)
    return outcome


def work(plans: list[Plan], store: Store) -> list[CellWork]:
    """Each cell's images to compute, with the seconds its stored shards took (its cost so far)."""
    cells = []
    for p in plans:
        stored = store.shards(p.cell_id)
        cells.append(CellWork(p.cell.key, p.cell.kind, p.cell.attack.id if p.cell.attack else "", p.cell.defense.id,
                              sum(len(s) for s in p.shards), prior_images=sum(s["n"] for s in stored),
                              prior_seconds=sum(s["seconds"] for s in stored), shards=len(p.shards)))
    return cells


def _loop(resolved: ResolvedSuite, store: Store, executor: Executor, plans: list[Plan], outcome: Outcome) -> None:
    progress = Progress(work(plans, store))
    try:
        _dispatch(resolved, store, executor, plans, outcome, progress)
    finally:
        progress.close()   # an interrupted run leaves the terminal on a fresh line
    if checks.enabled(resolved, "black-box-vs-white-box"):
        _cross_cell_checks(resolved, store, plans, outcome.run_id)


def _dispatch(resolved: ResolvedSuite, store: Store, executor: Executor, plans: list[Plan], outcome: Outcome,
              progress: Progress) -> None:
    by_key = {p.cell.key: p for p in plans}
    backoff: dict[str, dict] = {}   # per cell: what ran out of memory and was split (benchkit.memory)
    watch = getattr(executor, "watch", None)
    if watch is not None:
        watch(progress)

    def submit_checks(p: Plan) -> None:
        if p.cell.kind == "attack":
            examples, stats, seconds = stored_inputs(store, p.cell_id)
            executor.submit(Task("checks", p.cell.key, examples=examples, shard_stats=stats, seconds=seconds),
                            urgent=True)

    for p in plans:
        for shard in p.shards:
            executor.submit(Task("shard", p.cell.key, tuple(shard)))
        if not p.shards and p.n and checks.stale(store.checks(p.cell_id), resolved):
            submit_checks(p)
    while (item := executor.next()) is not None:
        task, result = item
        p = by_key[task.cell_key]
        if task.kind == "checks":
            if isinstance(result, Failed):
                result = [checks.CheckResult("checks", "fail", f"checks could not run: {result.message}")]
            store.save_checks(p.cell_id, outcome.run_id, result)
            continue
        if p.failed:
            continue
        if isinstance(result, Failed):
            what = "standard accuracy" if p.cell.kind == "clean" else f"attack {p.cell.attack.id}"
            msg = f"{what} on images {task.indices[0]}..{task.indices[-1]}: {result.message}"
            store.record_failure(p.cell_id, outcome.run_id, msg)
            outcome.failures.append(f"{p.cell.key}: {msg}")
            p.failed = True
            executor.cancel(p.cell.key)   # the cell cannot be trusted: stop its other shards
            progress.failed(p.cell.key)
            continue
        store.commit_shard(p.cell_id, outcome.run_id, result.rows, result.seconds, result.stats, result.samples)
        if result.memory:
            memory.merge(backoff.setdefault(p.cell.key, {}), result.memory)
            store.update_provenance(outcome.run_id, {"memory_backoff": backoff})
        progress.finished(task, result.seconds, clean_cost=result.clean_cost if p.cell.kind == "attack" else None)
        p.left -= 1
        if p.left == 0:
            submit_checks(p)


def _cross_cell_checks(resolved: ResolvedSuite, store: Store, plans: list[Plan], run_id: int) -> None:
    rows = []
    for p in plans:
        if p.cell.kind != "attack" or p.failed or not p.n or len(store.stored_images(p.cell_id)) < p.n:
            continue
        attack = resolved.attack_objects[p.cell.attack.id]
        rows.append({"key": p.cell.key, "cell_id": p.cell_id, "access": attack.access, "goal": attack.goal,
                     "classifier": p.cell.classifier.id, "defense": p.cell.defense.id,
                     "robust": metrics.summarise(store.examples(p.cell_id))["robust"].mean})
    ids = {r["key"]: r["cell_id"] for r in rows}
    for key, result in checks.black_box_vs_white_box(rows).items():
        store.save_checks(ids[key], run_id, [result])
