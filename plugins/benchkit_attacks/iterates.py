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


class KeptIterates:
    """Per image, the iterate with the smallest share of correct verdicts so far (ties: the higher
    loss, where one is given; else the earlier iterate), and the step that produced it."""

    def __init__(self, x: Tensor):
        self.examples = x.detach().clone()
        self.share = torch.full((x.shape[0],), float("inf"), device=x.device)
        self.loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        self.iteration = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def update(self, step: int, x_adv: Tensor, share: Tensor, loss: Tensor | None = None,
               rows: Tensor | None = None) -> None:
        """share (and loss) of the images `rows` (default: all) at this iterate."""
        rows = torch.arange(len(self.share), device=self.share.device) if rows is None else rows
        share = share.to(self.share)
        better = share < self.share[rows]
        if loss is not None:
            loss = loss.to(self.loss)
            better |= (share == self.share[rows]) & (loss > self.loss[rows])
        idx = rows[better]
        self.share[idx], self.examples[idx], self.iteration[idx] = share[better], x_adv[idx].detach(), step
        if loss is not None:
            self.loss[idx] = loss[better]

    @property
    def robust(self) -> Tensor:
        """Correct in every verdict at the kept iterate: the worst-of-N verdict."""
        return self.share >= 1.0


class BestIterate(KeptIterates):
    """A pgd callback (step, x_adv, loss, grad). Every `every` steps (and always at step 0, the
    starting point) the images not yet broken in every verdict are judged; an iterate replaces an
    image's best when strictly fewer of its verdicts are correct (ties keep the earlier iterate).

    After the attack: `examples` (the best iterates), `iteration` (the step that produced each),
    `robust` (correct in every verdict at its best iterate: the worst-of-N verdict)."""

    def __init__(self, model: DefendedModel, x: Tensor, y: Tensor, protocol: Protocol, every: int = 1):
        super().__init__(x)
        self.model, self.y, self.protocol, self.every = model, y, protocol, max(1, every)
        self.judged = 0

    def __call__(self, step: int, x_adv: Tensor, _loss: Tensor | None = None, _grad: Tensor | None = None) -> None:
        if step % self.every and step != 0:
            return
        todo = (self.share > 0).nonzero().flatten()
        if len(todo) == 0:
            return
        self.judged += len(todo)
        share = self.protocol.correct(self.model, x_adv[todo].detach(), self.y[todo]).float().mean(0)
        self.update(step, x_adv, share, rows=todo)

    def stats(self) -> dict[str, float]:
        return {"best_iterate_robust": float(self.robust.float().mean() * 100),
                "best_iterate_judged": float(self.judged)}
