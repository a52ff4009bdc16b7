"""The attack contract. An attack proposes adversarial inputs; it never reports accuracy.

The host gives an attack copies of the images and labels, verifies every returned example against
the budget that the suite's params declare (through the `threat=` mapping the attack plugin
registered, never the attack object's own say), and classifies the examples itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from benchkit.defended import DefendedModel
from benchkit.noise import Noise
from benchkit.protocol import Protocol

# What an attack maximises: the classifier's error, or something else (e.g. a purifier's
# reconstruction error), in which case checks that expect misclassification do not apply.
Goal = Literal["misclassify", "other"]
# How it reaches the defended model: its gradients, only its outputs under a query budget, or
# not at all (examples crafted on another model).
Access = Literal["gradient", "query", "transfer"]


@dataclass
class AttackResult:
    x_adv: Tensor
    # Per-example tensors the host needs to verify the examples (StAdv: {"flow": [B, 2, H, W]}).
    extra: dict[str, Tensor] = field(default_factory=dict)
    # Numbers worth keeping (e.g. zero-gradient counts) for checks; JSON-serialisable.
    stats: dict[str, float] = field(default_factory=dict)
    # The attack's own verdict per image (True: robust), as its authors' protocol decides it, e.g.
    # AutoAttack's robust flags during its run. Stored and shown beside the host's verdict so a
    # published number can be compared like for like; never used for benchkit's own numbers.
    verdict: Tensor | None = None
    # Per image, the iteration that produced its example (0: the attack's starting point, counted
    # across restarts), for attacks that keep each image's best iterate under the verification
    # protocol (AttackContext.protocol). Stored with the host's re-verification of that example.
    iteration: Tensor | None = None


@dataclass
class AttackContext:
    """What the host tells an attack beyond the model.

    `noise` holds one random stream per image (row r of a draw of B rows belongs to image r):
    an attack draws its own randomness (random starts, ...) there, so an image's result does not
    depend on which other images share its batch. `seed` is per (cell, variant), for libraries
    that only take one seed. `undefended` is the bare classifier (transfer attacks). `protocol` is
    the suite's verification protocol, for attacks that judge their own iterates the way the host
    will judge the returned example (with their own noise: the host's verification seeds are its own).
    An attack may report how far it has got with `progress(done, total)`; the host draws it as
    progress inside the running shard. `on_progress` is the host's receiver of those reports (None:
    nobody shows them, e.g. on a Ray worker); attacks call `progress`, never `on_progress`.
    """
    device: torch.device
    seed: int
    noise: Noise
    undefended: nn.Module | None = None
    batch_size: int = 64
    protocol: Protocol = field(default_factory=Protocol)
    on_progress: Callable[[int, int], None] | None = None

    def progress(self, done: int, total: int) -> None:
        """Report that `done` of `total` units of this call's work are finished, in units of the
        attack's choosing (e.g. gradient evaluations over all restarts), `total` fixed for the call.
        Optional: an attack that never reports still runs; it only shows as one block per shard."""
        if self.on_progress is not None and total > 0:
            self.on_progress(done, total)


class Attack:
    """Base class. `gradient` is the DefendedModel gradient mode the attack wants (None: the
    defense's / suite's default)."""

    gradient: str | None = None
    goal: Goal = "misclassify"
    access: Access = "gradient"

    def variants(self) -> list[tuple[str, "Attack"]]:
        """The sub-attacks whose per-image worst case the host takes (AutoAttack lists versions).
        Must not be empty."""
        return [("", self)]

    def run(self, model: DefendedModel, x: Tensor, y: Tensor, ctx: AttackContext) -> AttackResult:  # pragma: no cover
        raise NotImplementedError

    def eot_samples(self) -> int | None:
        """EOT samples per gradient estimate, or None if the attack has no such setting."""
        return None

    def view(self, model: DefendedModel) -> DefendedModel:
        """The model whose gradients this attack follows, given the defended model it receives: the
        model itself, or e.g. a cheaper surrogate of its purifier. The host verifies on `model`."""
        return model

    def iterations(self) -> int | None:
        """The attack's own iterations (steps per restart, AutoAttack's n_iter), or None if it has no
        such setting. Bounded checks may run fewer, through params_for(iterations=k)."""
        return None

    def params_for(self, *, eot: int | None = None, unbounded: bool = False,
                   iterations: int | None = None) -> dict | None:
        """Params overrides under which this attack draws `eot` EOT samples, has a budget no image
        can resist (unbounded), or runs `iterations` iterations (asked only of an attack whose
        iterations() is not None); None when it has no such setting. Checks rebuild the attack from
        the suite's params with these merged, and verify against the registered threat."""
        return None
