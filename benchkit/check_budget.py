"""What a cell's checks may cost: each check that computes again states its demand (images, each
costing some images of the cell, at the attack's iterations), and the budget of the suite's
`checks:` settings shares the cell's measured seconds among them (see benchkit.checks).

Estimates, not measurements, decide the shares: a cell plans the same way on a faster machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from benchkit.suite import ChecksSpec

FREE_SECONDS = 10.0      # a cell's checks may always spend this much: bounding less saves nothing worth waiting for
MIN_IMAGES = 8           # bounded checks give up images down to this many (or the subset), then iterations
CHECK_ITERATIONS = 10    # ... down to this many (or the attack's own); unbounded-budget never runs more
# A rerun on a subset costs more per image and iteration than the cell did: its own setup and
# verification, smaller batches, and (AutoAttack) a second member running on the images a shorter
# first one left robust. Measured on the digits DiffPure with AutoAttack rand: 1.1x to 1.4x.
RERUN_OVERHEAD = 1.5


@dataclass(frozen=True)
class Demand:
    """What a check would run: `images` (at most), each costing `multiplier` images of the cell at
    the attack's own `iterations` (None: it has none to cut; fewer cost their fraction of it), never
    more than `cap` iterations in a bounded run."""
    images: int
    multiplier: float
    iterations: int | None = None
    cap: int | None = None

    def seconds(self, images: int, iterations: int | None, per_image: float) -> float:
        """The estimate: images x per_image x multiplier x iterations / own iterations x RERUN_OVERHEAD."""
        cost = images * per_image * self.multiplier * RERUN_OVERHEAD
        return cost if iterations is None else cost * iterations / self.iterations

    def most(self) -> tuple[int, int | None]:
        """The largest run a bounded check makes: all its images at its own iterations (at most cap)."""
        return self.images, (self.iterations if self.iterations is None or self.cap is None
                             else min(self.iterations, self.cap))

    def least(self) -> tuple[int, int | None]:
        """The smallest run it makes before it gives up: MIN_IMAGES at CHECK_ITERATIONS."""
        return min(MIN_IMAGES, self.images), None if self.iterations is None else min(CHECK_ITERATIONS, self.most()[1])


@dataclass(frozen=True)
class Plan:
    images: int
    iterations: int | None   # the attack's own, or fewer; None: it has none
    seconds: float           # the estimate


def fit(d: Demand, seconds: float, per_image: float) -> Plan | None:
    """The most of `d` that costs at most `seconds` at `per_image` seconds per image of the cell:
    d.most(); else fewer images, down to MIN_IMAGES; else also fewer iterations, down to
    CHECK_ITERATIONS; None when even d.least() costs more."""
    seconds *= 1 + 1e-9   # an exact fit stays one through float rounding
    m, k = d.most()
    if d.seconds(m, k, per_image) > seconds:
        m = max(d.least()[0], min(m, math.floor(seconds / d.seconds(1, k, per_image))))
    if d.seconds(m, k, per_image) > seconds and k is not None:
        k = max(d.least()[1], min(k, math.floor(seconds / d.seconds(m, 1, per_image))))
    cost = d.seconds(m, k, per_image)
    return Plan(m, k, cost) if cost <= seconds else None


def allot(demands: dict[str, Demand], seconds: float, per_image: float) -> dict[str, float]:
    """Shares of `seconds` for checks with these demands: each first gets the cost of its least run
    (the costliest dropped until the rest fit: as many checks run as can), then what is left is
    split equally, no check getting more than its most run costs (the rest passing to the others)."""
    least = {n: d.seconds(*d.least(), per_image) for n, d in demands.items()}
    most = {n: d.seconds(*d.most(), per_image) for n, d in demands.items()}
    keep = sorted(demands, key=least.get)
    while keep and sum(least[n] for n in keep) > seconds:
        keep.pop()
    spare, shares = seconds - sum(least[n] for n in keep), {}
    for i, n in enumerate(sorted(keep, key=lambda n: most[n] - least[n])):
        extra = min(most[n] - least[n], spare / (len(keep) - i))
        shares[n], spare = least[n] + extra, spare - extra
    return shares


class Budget:
    """Each costly check's share of a cell's checks budget, max(checks.budget x cell seconds,
    FREE_SECONDS) (see the module doc). gradient-correctness, which cannot be cut, spends first and
    its measured seconds come off; the checks that attack again (`demands`) share the rest (allot).
    Shares come from estimates, not from the seconds the checks take, so a cell plans the same way
    on a faster machine."""

    def __init__(self, spec: ChecksSpec, cell_seconds: float, cell_images: int, demands: dict[str, Demand]):
        self.full = spec.cost == "full"
        self.per_image = cell_seconds / max(cell_images, 1)
        self.total = max(spec.budget * cell_seconds, FREE_SECONDS)
        self.pool = self.total
        self.demands = demands
        self.shares: dict[str, float] | None = None

    def spend(self, seconds: float) -> None:
        """What a check that cannot be cut spent (gradient-correctness)."""
        self.pool -= seconds

    def plan(self, name: str) -> Plan | None:
        """What check `name` runs: all of its demand under cost: full, else what fits its share."""
        demand = self.demands[name]
        if self.full:
            return Plan(demand.images, demand.iterations,
                        demand.seconds(demand.images, demand.iterations, self.per_image))
        if self.shares is None:
            self.shares = allot(self.demands, max(self.pool, 0.0), self.per_image)
        return fit(demand, self.shares.get(name, 0.0), self.per_image)

    def refusal(self, name: str) -> str:
        """The reason of a check its share cannot pay for."""
        demand = self.demands[name]
        m, k = demand.least()
        return (f"over budget: its least run ({m} images{'' if k is None else f', {k} iterations'}) would cost "
                f"~{demand.seconds(m, k, self.per_image):.1f} s; the checks' budget is {self.total:.1f} s, "
                f"{max(self.pool, 0.0):.1f} s of it for the checks that attack again, each first paying for its "
                "least run: raise checks.budget or set checks.cost: full")
