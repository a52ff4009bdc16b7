"""Run every task in this process, in submission order (checks of a finished cell first)."""
from __future__ import annotations

from collections import deque

from benchkit.progress import Listener
from benchkit.resolve import Components, ResolvedSuite
from benchkit.runner import Task, execute


class LocalExecutor:
    def __init__(self, resolved: ResolvedSuite, comps: Components):
        self.resolved, self.comps = resolved, comps
        self.queue: deque[Task] = deque()
        self.listener: Listener | None = None

    def watch(self, listener: Listener) -> None:
        """Tell `listener` when each task starts and, as its attack reports, how far a shard has got."""
        self.listener = listener

    def submit(self, task: Task, *, urgent: bool = False) -> None:
        (self.queue.appendleft if urgent else self.queue.append)(task)

    def cancel(self, cell_key: str) -> None:
        self.queue = deque(t for t in self.queue if not (t.kind == "shard" and t.cell_key == cell_key))

    def next(self) -> tuple[Task, object] | None:
        if not self.queue:
            return None
        task, listener = self.queue.popleft(), self.listener
        if listener is None:
            return task, execute(task, self.resolved, self.comps)
        listener.started(task)
        return task, execute(task, self.resolved, self.comps, lambda fraction: listener.advance(task, fraction))

    def close(self) -> None:
        self.queue.clear()
