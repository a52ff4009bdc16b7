"""The attack interface. An attack returns adversarial inputs, never accuracy."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from benchkit.defended import DefendedModel
from benchkit.threat import ThreatModel


@dataclass
class AttackResult:
    x_adv: Tensor
    # Per-example tensors the host needs to verify the examples (StAdv: {"flow": [B, 2, H, W]}).
    extra: dict[str, Tensor] = field(default_factory=dict)
    # Numbers worth keeping (e.g. zero-gradient counts) for checks; JSON-serialisable.
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class AttackContext:
    """What the host tells an attack beyond the model: the device, the seed it set, and the
    undefended classifier (for transfer attacks)."""
    device: torch.device
    seed: int
    undefended: nn.Module | None = None
    batch_size: int = 64


class Attack:
    """Base class. `threat` is the threat model the host verifies against; `gradient` is the
    DefendedModel gradient mode the attack wants (None: the suite's / defense's default)."""

    threat: ThreatModel
    gradient: str | None = None
    # Names of the stochastic-aware parts that differ between variants ("standard", "rand"):
    # an attack may expand into several evaluated variants; see `variants`.

    def variants(self) -> list[tuple[str, "Attack"]]:
        """The sub-attacks whose per-image worst case the host takes (AutoAttack lists versions)."""
        return [("", self)]

    def run(self, model: DefendedModel, x: Tensor, y: Tensor, ctx: AttackContext) -> AttackResult:  # pragma: no cover
        raise NotImplementedError
