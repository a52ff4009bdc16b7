"""Attack the purifier alone (DiffPure, Table 15): maximise the MSE between purify(x_adv) and the
clean image; the host then classifies the examples as usual."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from benchkit.attack import AttackContext, AttackResult
from benchkit.defended import DefendedModel  # noqa: F401 - the type attacks receive
from benchkit.threat import make_threat

from benchkit_attacks.params import GradientMode, PGDSchedule
from benchkit_attacks.pgd import GradientAttack, chain, pgd, reporting


class _Flatten(nn.Module):
    """Stands in for the classifier so the purified image itself is the 'logits' row."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class DiffusionMSEParams(PGDSchedule):
    steps: int = Field(100, ge=1)
    gradient: GradientMode = "exact"


class DiffusionMSE(GradientAttack):
    # Maximises a purifier loss, not a classifier loss: on an undefended model (identity purifier)
    # it need not fool the classifier, so host checks that expect that skip it.
    goal = "other"

    def __init__(self, params: DiffusionMSEParams):
        self.params = params
        self.threat = make_threat(params.norm, params.eps)
        self.gradient = params.gradient

    def run(self, model: DefendedModel, x: Tensor, y: Tensor, ctx: AttackContext) -> AttackResult:
        m, p = self.view(model), self.params
        purifier_only = m.with_classifier(_Flatten())
        target = x.detach().flatten(1)
        # loss_and_grad hands labels to the loss replicated like the batch, so image indices in
        # place of labels tell each EOT row which clean image it is compared with.
        index = torch.arange(x.shape[0], device=x.device)

        def mse(purified: Tensor, i: Tensor) -> Tensor:
            return (purified - target[i]).pow(2).mean(1)

        out = pgd(lambda z: purifier_only.loss_and_grad(mse, z, index, p.eot), x, self.threat,
                  steps=p.steps, step_size=p.resolved_step(), noise=ctx.noise, restarts=p.restarts,
                  random_init=p.random_start,
                  callback=chain(self.callback, reporting(ctx, p)))
        stats = dict(out.stats)
        if torch.isfinite(out.loss).all():
            stats["purified_mse"] = float(out.loss.mean())
        return AttackResult(out.x_adv, stats=stats)


def make_diffusion_mse(params: DiffusionMSEParams) -> DiffusionMSE:
    return DiffusionMSE(params)
