"""Out-of-memory backoff: a batch that runs out of memory is run as its two halves, and the smaller
size is remembered for the rest of the run.

Three sizes back off, each in its own unit (see `Limits`): the rows of one EOT pass of the defended
model (benchkit.defended), the rows of one host verification batch and the images of one attack
call (benchkit.evaluate). Splitting changes no number beyond float rounding: every random draw is
seeded per image (benchkit.noise), so a half draws what its rows would have drawn in the whole.
What was split is recorded per cell in the run's provenance (`memory_backoff`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import torch

T = TypeVar("T")

# The CPU allocator's message (torch 2.x: "DefaultCPUAllocator: can't allocate memory: you tried to
# allocate N bytes. Error code 12 (Cannot allocate memory)"); "out of memory" is MPS's wording.
_CPU_OOM = ("can't allocate memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocator running out of memory: torch.OutOfMemoryError (CUDA's; the same class
    as torch.cuda.OutOfMemoryError) or the RuntimeError of the CPU or MPS allocator. Nothing else."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return type(exc) is RuntimeError and any(s in str(exc) for s in _CPU_OOM)


def release() -> None:
    """Hand cached accelerator memory back before a retry (the failed attempt's tensors are gone
    once its exception is)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


# What backs off, in its unit: the record's keys.
SIZES = {"eot_rows": "rows per EOT pass", "verify_rows": "rows per verification batch",
         "attack_images": "images per attack call"}


@dataclass
class Limits:
    """What one cell has learnt about memory in this process: the largest size of each kind that
    still runs (None: never ran out), and what was split since the last `take`."""
    eot_rows: int | None = None
    verify_rows: int | None = None
    attack_images: int | None = None
    log: dict = field(default_factory=dict)

    def cap(self, what: str, size: int) -> int:
        """`size`, or the learnt limit of `what` when smaller."""
        learnt = getattr(self, what)
        return size if learnt is None else max(1, min(size, learnt))

    def shrink(self, what: str, tried: int, to: int) -> None:
        """A `what` of `tried` ran out of memory; `to` is used from now on."""
        setattr(self, what, self.cap(what, to))
        entry = self.log.setdefault(what, {"from": tried, "to": to})
        entry["from"], entry["to"] = max(entry["from"], tried), min(entry["to"], to)
        self.log["splits"] = self.log.get("splits", 0) + 1

    def take(self) -> dict:
        """The record of the splits since the last take (empty: none), e.g. {"eot_rows": {"from":
        64, "to": 32}, "splits": 1}; the learnt limits stay."""
        out, self.log = self.log, {}
        return out


_SPLIT = object()


def in_halves(run: Callable[[int, int], T], lo: int, hi: int, shrink: Callable[[int, int], None],
              most: Callable[[], int | None] = lambda: None, split: bool = True) -> Iterator[tuple[int, int, T]]:
    """(lo', hi', run(lo', hi')) over consecutive pieces covering [lo, hi): each piece at most most()
    units, asked as the piece starts (so a split also shortens the pieces after it). With split, a
    piece that runs out of memory runs again as its two halves (larger half first), down to one
    unit, calling shrink(units tried, units of the larger half) first. A piece of one unit that runs
    out of memory, and every other exception, is raised."""
    while lo < hi:
        size = most()
        stop = hi if size is None else min(hi, lo + max(1, size))
        try:
            out = run(lo, stop)
        except Exception as exc:
            if not split or stop - lo < 2 or not is_out_of_memory(exc):
                raise
            # Retried outside this block: the exception's traceback holds the failed attempt's tensors.
            out = _SPLIT
        if out is _SPLIT:
            release()
            mid = lo + (stop - lo + 1) // 2
            shrink(stop - lo, mid - lo)
            yield from in_halves(run, lo, mid, shrink, most, split)
            yield from in_halves(run, mid, stop, shrink, most, split)
        else:
            yield lo, stop, out
        lo = stop


def merge(into: dict, record: dict) -> dict:
    """A shard's record merged into a cell's (largest size tried, smallest used, splits summed)."""
    for what, entry in record.items():
        if what == "splits":
            into["splits"] = into.get("splits", 0) + entry
        elif what in into:
            into[what] = {"from": max(into[what]["from"], entry["from"]), "to": min(into[what]["to"], entry["to"])}
        else:
            into[what] = dict(entry)
    return into


def describe(key: str, record: dict) -> str:
    """One line: 'cnn/dp/pgd: out of memory, split 3 times: rows per EOT pass 64 -> 16; ...'."""
    sizes = "; ".join(f"{label} {e.get('from')} -> {e.get('to')}" for w, label in SIZES.items()
                      if isinstance(e := record.get(w), dict))
    n = record.get("splits", 0)
    return f"{key}: out of memory, split {n} time{'s' if n != 1 else ''}: {sizes}"
