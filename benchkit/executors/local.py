"""Run every cell and shard in this process, committing each shard as it completes."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass


from benchkit import checks
from benchkit.evaluate import CellFailure, Components, evaluate_shard, evaluate_split_shard
from benchkit.store import Store
from benchkit.suite import Cell, Suite, numbers_config, stable_hash


@dataclass
class Plan:
    cell: Cell
    cell_id: int
    shards: list[list[int]]
    todo: list[int]


@dataclass
class SplitPlan:
    """Standard accuracy of one (classifier, defense) group on the dataset's whole split."""
    classifier: str
    defense: str
    group_id: int
    shards: list[list[int]]
    todo: list[int]

    @property
    def key(self) -> str:
        return f"{self.classifier}/{self.defense}"


class Progress:
    """A one-line progress bar on stderr (no dependency; quiet when stderr is not a terminal
    except for one line per shard)."""

    def __init__(self, total: int, stream=None):
        stream = stream or sys.stderr
        self.total, self.done, self.stream, self.t0 = total, 0, stream, time.time()
        self.tty = stream.isatty()

    def update(self, n: int, label: str) -> None:
        self.done += n
        frac = self.done / max(1, self.total)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        line = f"[{bar}] {self.done}/{self.total} images  {time.time() - self.t0:6.1f}s  {label}"
        self.stream.write(("\r" + line.ljust(110)) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def stored_inputs(store: Store, cell_id: int) -> tuple[list[dict], list[dict]]:
    """A cell's example rows and per-shard attack stats, as the checks read them."""
    return ([dict(r) for r in store.examples(cell_id)],
            [json.loads(s["stats_json"]) for s in store.shards(cell_id)])


def shard_indices(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def plan(suite: Suite, cells: list[Cell], comps: Components, store: Store, limit: int | None) -> list[Plan]:
    n = len(comps.dataset) if limit is None else min(limit, len(comps.dataset))
    shards = shard_indices(n, suite.eval.shard_size or suite.eval.batch_size)
    plans = []
    for cell in cells:
        attack = comps.attacks[cell.attack.id]
        config = cell.config(suite) | {"n_images": n}
        cell_id = store.ensure_cell(cell.key, stable_hash(config), cell.classifier.id, cell.defense.id,
                                    cell.attack.id, config, [v for v, _ in attack.variants()], n, len(shards),
                                    suite.eval.repeats)
        done = store.committed_shards(cell_id)
        plans.append(Plan(cell, cell_id, shards, [i for i in range(len(shards)) if i not in done]))
    return plans


def plan_split(suite: Suite, cells: list[Cell], comps: Components, store: Store, limit: int | None) -> list[SplitPlan]:
    """One group per (classifier, defense) of the cells, when eval.clean_on is 'split'."""
    if comps.split is None:
        return []
    n = len(comps.split) if limit is None else min(limit, len(comps.split))
    shards = shard_indices(n, suite.eval.shard_size or suite.eval.batch_size)
    plans = []
    groups = {(c.classifier.id, c.defense.id): (c.classifier, c.defense) for c in cells}
    for clf, dfn in groups.values():
        config = {"dataset": suite.dataset.whole_split().model_dump(), "seed": suite.seed, "eval": numbers_config(suite.eval),
                  "classifier": clf.model_dump(exclude={"description"}),
                  "defense": dfn.model_dump(exclude={"description"}), "n_images": n}
        gid = store.ensure_split_group(f"{clf.id}/{dfn.id}", stable_hash(config), clf.id, dfn.id, config, n,
                                       len(shards), suite.eval.repeats)
        done = store.committed_split_shards(gid)
        plans.append(SplitPlan(clf.id, dfn.id, gid, shards, [i for i in range(len(shards)) if i not in done]))
    return plans


def run(suite: Suite, plans: list[Plan], comps: Components, store: Store, run_id: int,
        split_plans: list[SplitPlan] = ()) -> list[str]:
    """Returns the failure messages (empty when every cell succeeded). The whole-split standard
    accuracy groups run after the cells: the attacked numbers come first."""
    failures: list[str] = []
    progress = Progress(sum(len(p.shards[i]) for p in [*plans, *split_plans] for i in p.todo))
    for p in plans:
        failed = False
        for i in p.todo:
            try:
                res = evaluate_shard(suite, p.cell, comps, p.shards[i])
            except CellFailure as exc:
                exc = f"attack {p.cell.attack.id} on images {p.shards[i][0]}..{p.shards[i][-1]}: {exc}"
                msg = f"{p.cell.key}: {exc}"
                store.record_failure(p.cell_id, run_id, i, str(exc))
                failures.append(msg)
                failed = True
                break
            store.commit_shard(p.cell_id, i, run_id, p.shards[i][0], res.rows, res.seconds, res.stats, res.samples)
            progress.update(len(p.shards[i]), p.cell.key)
        if not failed and (p.todo or not store.checks(p.cell_id)):
            store.save_checks(p.cell_id, run_id, checks.run_checks(suite, p.cell, comps, *stored_inputs(store, p.cell_id)))
    for sp in split_plans:
        for i in sp.todo:
            res = evaluate_split_shard(suite, sp.classifier, sp.defense, comps, sp.shards[i])
            store.commit_split_shard(sp.group_id, i, run_id, res.rows, res.seconds)
            progress.update(len(sp.shards[i]), f"{sp.key} (standard, whole split)")
    progress.close()
    _black_box_checks(plans, store, run_id)
    return failures


def _black_box_checks(plans: list[Plan], store: Store, run_id: int) -> None:
    """The one check that compares cells: black-box (Square) vs white-box on the same group."""
    from benchkit import metrics

    rows = []
    for p in plans:
        examples = store.examples(p.cell_id)
        if examples and len(store.committed_shards(p.cell_id)) == len(p.shards):
            rows.append({"key": p.cell.key, "cell_id": p.cell_id, "plugin": p.cell.attack.plugin,
                         "classifier": p.cell.classifier.id, "defense": p.cell.defense.id,
                         "robust": metrics.summarise(examples)["robust"].mean})
    ids = {r["key"]: r["cell_id"] for r in rows}
    for key, result in checks.black_box_vs_white_box(rows).items():
        store.save_checks(ids[key], run_id, [result])
