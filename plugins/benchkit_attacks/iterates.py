"""Each image's best example over an attack's iterations, judged by the suite's verification protocol.

DiffHammer (Wang et al., NeurIPS 2024) showed that judging only the final iterate, once, overstates a
stochastic defense: an iterate that fools some purifications may be followed by one that fools none.
`BestIterate` re-judges iterates with fresh purifications under `AttackContext.protocol` (the protocol
the host will verify with, on the attack's own noise) and keeps, per image, the iterate with the
fewest correct verdicts: the worst-of-N (N = repeats) evaluation at every iteration.
"""
from __future__ import annotations

import torch
from torch import Tensor

from benchkit.defended import DefendedModel
from benchkit.protocol import Protocol


def _rows(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


class BestIterate:
    """A pgd callback (step, x_adv, loss, grad). Every `every` steps (and always at step 0, the
    starting point) the images not yet broken in every verdict are judged; an iterate replaces an
    image's best when strictly fewer of its verdicts are correct (ties keep the earlier iterate).

    After the attack: `examples` (the best iterates), `iteration` (the step that produced each),
    `robust` (correct in every verdict at its best iterate: the worst-of-N verdict)."""

    def __init__(self, model: DefendedModel, x: Tensor, y: Tensor, protocol: Protocol, every: int = 1):
        self.model, self.y, self.protocol, self.every = model, y, protocol, max(1, every)
        self.examples = x.detach().clone()
        self.correct = torch.full((x.shape[0],), float("inf"), device=x.device)   # share of correct verdicts
        self.iteration = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.judged = 0

    def __call__(self, step: int, x_adv: Tensor, _loss: Tensor | None = None, _grad: Tensor | None = None) -> None:
        if step % self.every and step != 0:
            return
        todo = (self.correct > 0).nonzero().flatten()
        if len(todo) == 0:
            return
        self.judged += len(todo)
        share = self.protocol.correct(self.model, x_adv[todo].detach(), self.y[todo]).float().mean(0).to(self.correct)
        better = share < self.correct[todo]
        idx = todo[better]
        self.correct[idx] = share[better]
        self.examples[idx] = x_adv[idx].detach()
        self.iteration[idx] = step

    @property
    def robust(self) -> Tensor:
        return self.correct >= 1.0

    def stats(self) -> dict[str, float]:
        return {"best_iterate_robust": float(self.robust.float().mean() * 100),
                "best_iterate_judged": float(self.judged)}
