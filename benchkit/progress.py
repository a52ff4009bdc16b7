"""The progress of a run: which cell runs now, how far it has got, and when the run will end.

Work is weighed by its measured cost, never by image count: a standard-accuracy image of the whole
split costs a few milliseconds, an attacked one seconds to minutes. Each cell's cost per image is
what it measured so far (this run; before that, its own earlier runs in the store; a whole-split
standard-accuracy cell, the clean verdicts its group's attack shards computed); a cell not
measured yet borrows the rate of the cells most like it (same kind and attack and defense, then same
defense, then same attack, then same kind). While some cell left to run has no such estimate (no
attack has reported anything yet) the fraction and the ETA are unknown ("?") rather than guessed.

On a terminal a tqdm bar redraws as a shard progresses: executors that run tasks in this process
report when a task starts and, through `AttackContext.progress`, how far its attack has got.
Elsewhere (a log, CI) one line per finished shard. Executors that report nothing (Ray) still get
the per-shard picture.
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, TextIO

from tqdm import tqdm

if TYPE_CHECKING:
    from benchkit.runner import Task

# Fallbacks for a cell's cost per image before it has measured one, most alike first.
LIKENESS: tuple[tuple[str, ...], ...] = (("kind", "attack", "defense"), ("kind", "defense"), ("kind", "attack"), ("kind",))
# Seconds between two redraws of the bar on in-shard reports (tqdm's own default, 0.1 s, redraws too
# eagerly for attacks that report hundreds of steps a second on tiny models).
REDRAW_S = 0.2


@dataclass(frozen=True)
class CellWork:
    """One cell's share of a run's work."""
    key: str
    kind: str                  # "clean" | "attack"
    attack: str                # the attack's id; "" for a clean cell
    defense: str
    todo: int                  # images this run computes
    done: float = 0.0          # of those, finished (a shard in flight adds the part it has done)
    seconds: float = 0.0       # spent on them this run
    prior_images: int = 0      # images stored by earlier runs, and their seconds: a rate before this run has one
    prior_seconds: float = 0.0
    shards: int = 0            # shards this run computes (shown as 'shard i/k')

    def measured(self) -> tuple[float, float] | None:
        """(images, seconds) this cell's own rate rests on: this run's once it has done any image,
        else its earlier runs' (another machine, maybe), else None."""
        if self.done > 0:
            return self.done, self.seconds
        if self.prior_images > 0:
            return float(self.prior_images), self.prior_seconds
        return None


def seconds_per_image(cells: Sequence[CellWork]) -> list[float | None]:
    """Each cell's estimated seconds per image: its own measurement, else the pooled measurement
    (total seconds / total images) of the cells most like it (LIKENESS), else None."""
    measured = [(c, m) for c in cells if (m := c.measured()) is not None]
    rates: list[float | None] = []
    for cell in cells:
        own = cell.measured()
        if own is not None:
            rates.append(own[1] / own[0])
            continue
        rate = None
        for attrs in LIKENESS:
            alike = [m for other, m in measured if all(getattr(other, a) == getattr(cell, a) for a in attrs)]
            if alike:
                rate = sum(s for _, s in alike) / sum(n for n, _ in alike)
                break
        rates.append(rate)
    return rates


@dataclass(frozen=True)
class Estimate:
    spent: float               # seconds of work done this run, summed over cells (and workers)
    remaining: float | None    # seconds of work left; None while some cell's cost is unknown

    @property
    def fraction(self) -> float | None:
        """The done share of the run's estimated cost."""
        if self.remaining is None:
            return None
        total = self.spent + self.remaining
        return self.spent / total if total > 0 else 1.0   # 0 only when nothing was left to do

    def eta(self, elapsed: float) -> float | None:
        """Wall-clock seconds left: the work left at the pace of the run so far, elapsed wall time per
        second of work (about 1 in one process, plus its checks and commits; below 1 with parallel
        workers)."""
        if self.remaining is None:
            return None
        return self.remaining * (elapsed / self.spent if self.spent > 0 else 1.0)


def estimate(cells: Sequence[CellWork]) -> Estimate:
    """Work spent and left over a run's cells, weighted by each cell's seconds per image."""
    spent = sum(c.seconds for c in cells)
    remaining = 0.0
    for cell, rate in zip(cells, seconds_per_image(cells)):
        left = max(0.0, cell.todo - cell.done)
        if left > 0:
            if rate is None:
                return Estimate(spent, None)
            remaining += left * rate
    return Estimate(spent, remaining)


def label(cell: CellWork) -> str:
    return f"{cell.key} (standard accuracy)" if cell.kind == "clean" else cell.key


def duration(seconds: float | None) -> str:
    return "?" if seconds is None else tqdm.format_interval(seconds)


class Listener(Protocol):
    """What an executor that runs tasks in this process may report (Executor.watch)."""

    def started(self, task: Task) -> None: ...

    def advance(self, task: Task, fraction: float) -> None: ...


@dataclass
class _Running:
    task: Task
    t0: float
    fraction: float | None = None   # of the shard, as its attack reported it


class Progress:
    """A run's progress on `stream` (stderr): a live tqdm bar on a terminal, else one line per shard.

    The runner calls `finished` / `failed` as results come back; an executor that runs tasks in this
    process calls `started` and `advance` (Listener). `clock` is injectable for tests."""

    def __init__(self, cells: Sequence[CellWork], stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cells = {c.key: c for c in cells}
        self.stream = stream or sys.stderr
        self.clock, self.t0, self.last_draw = clock, clock(), float("-inf")
        self.shards = {c.key: 0 for c in cells}         # finished this run, per cell
        self.running: _Running | None = None
        self.reporting = False                          # the executor says when tasks start (local, not Ray)
        self.live = True                                # off after a display error: never cost a shard
        self.total = sum(c.todo for c in cells)
        self.bar = None
        if self.total and self.stream.isatty():
            fraction, text = self._bar_text()
            self.bar = tqdm(total=1.0, initial=fraction, desc=text, file=self.stream, bar_format="|{bar:20}| {desc}",
                            dynamic_ncols=True, leave=True, mininterval=0)

    # ------------------------------------------------------------------ events

    def started(self, task: Task) -> None:
        self.running, self.reporting = _Running(task, self.clock()), True
        self._draw()

    def advance(self, task: Task, fraction: float) -> None:
        if self.running is None or self.running.task is not task or not self.live:
            return
        try:
            self.running.fraction = min(1.0, max(0.0, float(fraction)))
            if self.clock() - self.last_draw >= REDRAW_S:
                self._draw()
        except Exception as exc:  # noqa: BLE001 - a display aid must never fail the attack that reports to it
            self.live = False
            warnings.warn(f"progress display stopped: {type(exc).__name__}: {exc}")

    def finished(self, task: Task, seconds: float, clean_cost: tuple[int, float] | None = None) -> None:
        """A shard's results are committed; `seconds` is what it measured where it ran. `clean_cost`:
        the (images, seconds) of the clean verdicts an attack shard computed, the same work per image
        as its group's whole-split standard-accuracy cell, which thus has a rate before it runs."""
        cell = self.cells[task.cell_key]
        self.cells[task.cell_key] = replace(cell, done=cell.done + len(task.indices), seconds=cell.seconds + seconds)
        group = self.cells.get(task.cell_key.rsplit("/", 1)[0])   # cell keys: classifier/defense[/attack]
        if clean_cost and clean_cost[0] > 0 and group is not None and group.kind == "clean" and group.done == 0:
            self.cells[group.key] = replace(group, prior_images=group.prior_images + clean_cost[0],
                                            prior_seconds=group.prior_seconds + clean_cost[1])
        self.shards[task.cell_key] += 1
        if self.running is not None and self.running.task is task:
            self.running = None
        if self.bar is not None:
            self._draw()
        else:
            self.stream.write(self.log_line(task, seconds) + "\n")
            self.stream.flush()

    def failed(self, cell_key: str) -> None:
        """The cell failed: its other shards are cancelled, so its work left is none."""
        cell = self.cells[cell_key]
        self.cells[cell_key] = replace(cell, todo=int(cell.done))
        if self.running is not None and self.running.task.cell_key == cell_key:
            self.running = None

    def close(self) -> None:
        if self.bar is not None:
            self._draw()
            self.bar.close()
            self.bar = None

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> list[CellWork]:
        """The cells with the shard in flight counted in: its reported fraction, or, for an attack
        that reports none, the images its cell's rate so far says it has done (at most all)."""
        cells = dict(self.cells)
        run = self.running
        if run is not None and run.task.kind == "shard":
            cell = cells[run.task.cell_key]
            n, spent = len(run.task.indices), max(0.0, self.clock() - run.t0)
            if run.fraction is not None:
                part = run.fraction * n
            else:
                rate = dict(zip(cells, seconds_per_image(list(cells.values()))))[cell.key]
                part = min(float(n), spent / rate) if rate else 0.0
            cells[cell.key] = replace(cell, done=cell.done + part, seconds=cell.seconds + spent)
        return list(cells.values())

    def done_images(self) -> int:
        return int(sum(c.done for c in self.cells.values()))

    def _status(self, est: Estimate) -> tuple[str, str, str]:
        """(fraction done, ETA, images and elapsed) as shown."""
        frac, elapsed = est.fraction, self.clock() - self.t0
        pct = "  ?%" if frac is None else f"{100 * frac:3.0f}%"
        return (pct, f"ETA {duration(est.eta(elapsed))}",
                f"{self.done_images()}/{self.total} images, {duration(elapsed)} elapsed")

    def _shard_of(self, cell_key: str, offset: int) -> str:
        return f"shard {self.shards[cell_key] + offset}/{self.cells[cell_key].shards}"

    def now(self) -> str:
        """What runs now: the task the executor said it started; between two tasks, the next cell;
        for executors that never say (Ray: tasks start in submission order as workers free up),
        the first cell with work left."""
        run = self.running
        if run is not None:
            cell = self.cells[run.task.cell_key]
            if run.task.kind != "shard":
                return f"checks of {label(cell)}"
            part = "" if run.fraction is None else f" {100 * run.fraction:.0f}%"
            return f"running {label(cell)} {self._shard_of(cell.key, 1)}{part}"
        left = [c for c in self.cells.values() if c.done < c.todo]
        if not left:
            return "finishing"
        return f"{'next' if self.reporting else 'working on'} {label(left[0])}"

    def log_line(self, task: Task, seconds: float) -> str:
        """One finished shard, for a log: run fraction, cell and shard, images, elapsed, ETA."""
        pct, eta, images = self._status(estimate(self.snapshot()))
        cell = self.cells[task.cell_key]
        return f"benchkit: [{pct}] {label(cell)}: {self._shard_of(cell.key, 0)} done in {seconds:.1f}s; {images}, {eta}"

    def _bar_text(self) -> tuple[float, str]:
        est = estimate(self.snapshot())
        pct, eta, images = self._status(est)
        # Images and elapsed time last: a narrow terminal trims the end of the line.
        return est.fraction or 0.0, f"{pct} {eta} | {self.now()} | {images}"

    def _draw(self) -> None:
        if self.bar is None:
            return
        self.bar.n, text = self._bar_text()
        self.bar.set_description_str(text, refresh=False)
        self.bar.refresh()
        self.last_draw = self.clock()
