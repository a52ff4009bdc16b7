"""DiffAttack (Kang, Song & Li, NeurIPS 2023): APGD-EOT on the classifier loss plus a deviated-
reconstruction loss on the purifier's intermediate states.

    L = L_cls(f(purify(x))) + lambda L_dev,   L_dev = mean_k MSE(x'_k, x_k)                (their Eq. 8, 11)

x'_k is the reverse solve's state at step k, x_k the attacked input diffused forward to the same time
with the same Eq. 3 noise; k runs over `deviation_states` evenly spaced steps (their code: every 10th of
100), unit weights (their App. D.2: alpha(t) = 1/|steps|); lambda = 1 (their Table 8). As in AutoAttack's
rand version, which their attack runs inside: APGD, 100 iterations, EOT 20, one restart, CE then DLR,
the host taking the per-image worst case over the two (`losses`). Gradients are exact: the solve is
checkpointed segment by segment between the compared states (their Sec. 3.3), so memory stays bounded;
the authors' score-SDE code used torchsde's adjoint instead (whose gradient is far from the true one at
DiffPure's settings: see the README), so our DiffAttack is at least as strong as theirs.

The purifier supplies the pairs through `deviation_pairs(x, noise=, states=, gradient=)` (DiffPure does);
without a purifier (the undefended classifier of the host's checks) the deviation term is zero.
"""
from __future__ import annotations

from pydantic import Field

from benchkit.attack import AttackContext, AttackResult
from benchkit.defended import DefendedModel, Identity
from benchkit.threat import make_threat

from benchkit_attacks.apgd import apgd
from benchkit_attacks.losses import LOSSES
from benchkit_attacks.params import LossName, NormBudget, Select
from benchkit_attacks.pgd import GradientAttack, chain, reporting, with_best


class DiffAttackParams(NormBudget):
    steps: int = Field(100, ge=1, description="APGD iterations per loss (Kang et al.: AutoAttack's 100)")
    eot: int = Field(20, ge=1, description="EOT samples per gradient (Kang et al.: 20)")
    restarts: int = Field(1, ge=1)
    random_start: bool = True
    losses: list[LossName] = Field(default_factory=lambda: ["ce", "dlr"], min_length=1,
                                   description="classifier losses, one variant each (Kang et al.: CE, then DLR)")
    lambda_dev: float = Field(1.0, ge=0, description="weight of the deviated-reconstruction loss (Kang et al. Table 8: 1)")
    deviation_states: int = Field(10, ge=1, description="evenly spaced reverse states compared (their code: 10 of 100)")
    select: Select = "loss"
    select_every: int = Field(1, ge=1)


class DiffAttackLoss(GradientAttack):
    """One classifier loss of DiffAttack (a variant)."""

    def __init__(self, params: DiffAttackParams, loss: str):
        self.params, self.loss_name, self.loss_fn = params, loss, LOSSES[loss]
        self.threat = make_threat(params.norm, params.eps)
        self.gradient = "exact"

    def objective(self, model: DefendedModel, y):
        p, b = self.params, y.shape[0]
        pairs_of = getattr(model.purifier, "deviation_pairs", None)
        if pairs_of is None and not isinstance(model.purifier, Identity):
            raise ValueError(f"diffattack needs a diffusion purifier offering deviation_pairs; "
                             f"{type(model.purifier).__name__} does not")

        def row_loss(xr, noise):
            labels = y.repeat(xr.shape[0] // b)
            if pairs_of is None or p.lambda_dev == 0:
                return self.loss_fn(model.classifier(model.purifier.purify(xr, gradient=model.gradient, noise=noise)), labels)
            out, pairs = pairs_of(xr, noise=noise, states=p.deviation_states, gradient=model.gradient)
            dev = sum(((a - r) ** 2).flatten(1).mean(1) for a, r in pairs) / len(pairs)
            return self.loss_fn(model.classifier(out), labels) + p.lambda_dev * dev

        return lambda z: model.eot_loss_and_grad(row_loss, z, p.eot)

    def run(self, model: DefendedModel, x, y, ctx: AttackContext) -> AttackResult:
        m, p = self.view(model), self.params
        best = self.selector(model, x, y, ctx)
        out = apgd(self.objective(m, y), x, self.threat, steps=p.steps, noise=ctx.noise, restarts=p.restarts,
                   random_init=p.random_start,
                   callback=chain(best, self.callback, reporting(ctx, p)))
        return with_best(AttackResult(out.x_adv, stats=out.stats), best)


class DiffAttack(GradientAttack):
    def __init__(self, params: DiffAttackParams):
        self.params = params
        self.gradient = "exact"
        self.losses = [(loss, DiffAttackLoss(params, loss)) for loss in dict.fromkeys(params.losses)]

    def variants(self):
        return list(self.losses)

    def run(self, model, x, y, ctx):  # pragma: no cover - the host runs the variants
        raise RuntimeError("run each DiffAttack loss through variants()")


def make_diffattack(params: DiffAttackParams) -> DiffAttack:
    return DiffAttack(params)
