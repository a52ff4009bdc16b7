"""PGD with EOT: the loop every gradient attack of this plugin shares (pgd-eot, bpda-eot,
diffusion-mse).

`pgd` maximises an `Objective` (x_adv -> per-image loss and its gradient); the objectives here
draw their EOT samples through `DefendedModel.loss_and_grad`, so samples run as large batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError
from torch import Tensor

from benchkit.attack import Attack, AttackContext, AttackResult
from benchkit.defended import DefendedModel
from benchkit.noise import Noise
from benchkit.threat import L2, Linf, ThreatModel, make_threat

from benchkit_attacks.iterates import BestIterate
from benchkit_attacks.losses import LOSSES
from benchkit_attacks.params import EOTAverage, GradientMode, LossName, PGDSchedule, SurrogateSpec
from benchkit_attacks.targets import TargetHow, choose_targets, targeted_objective

Objective = Callable[[Tensor], tuple[Tensor, Tensor]]
# callback(step, x_adv, loss, grad) after every gradient evaluation (adaptive attacks, logging); step
# counts evaluations across restarts (restart r's step t is r (steps + 1) + t).
Callback = Callable[[int, Tensor, Tensor, Tensor], None]


def chain(*callbacks: Callback | None) -> Callback | None:
    """One callback calling each given one in order (None: none given)."""
    cbs = [c for c in callbacks if c is not None]
    if len(cbs) <= 1:
        return cbs[0] if cbs else None

    def each(*args) -> None:
        for c in cbs:
            c(*args)
    return each


class Schedule(Protocol):
    """The params of an attack that runs pgd or apgd: `restarts` runs of `steps` iterations."""
    restarts: int
    steps: int


def reporting(ctx: AttackContext, schedule: Schedule) -> Callback:
    """A callback reporting each gradient evaluation to the host (ctx.progress), out of the
    restarts x (steps + 1) evaluations pgd and apgd make under `schedule`."""
    total = schedule.restarts * (schedule.steps + 1)
    return lambda step, *_: ctx.progress(step + 1, total)


def _per_image(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def random_start(threat: ThreatModel, x: Tensor, noise: Noise) -> Tensor:
    """A uniform point of the Linf ball, or a random direction at a uniform radius of the L2 ball,
    drawn per image from `noise` (the host's per-image streams)."""
    shape, kw = tuple(x.shape), {"device": x.device, "dtype": x.dtype}
    if isinstance(threat, Linf):
        delta = (noise.rand(shape, **kw) * 2 - 1) * threat.eps
    elif isinstance(threat, L2):
        d = noise.randn(shape, **kw)
        d = d / _per_image(d.flatten(1).norm(dim=1).clamp_min(1e-12), x)
        delta = d * _per_image(noise.rand((x.shape[0],), **kw) * threat.eps, x)
    else:
        raise TypeError(f"no random start for threat model {threat.name}")
    return threat.project(x, x + delta)


def ascent_direction(threat: ThreatModel, g: Tensor) -> Tensor:
    """The steepest-ascent unit step of the norm: sign for Linf, the normalised gradient for L2."""
    if isinstance(threat, Linf):
        return g.sign()
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / _per_image(norm, g)


@dataclass
class PGDOutput:
    x_adv: Tensor
    loss: Tensor
    stats: dict[str, float] = field(default_factory=dict)


class GradStats:
    """zero_grad_frac: images whose gradient at the first evaluation is exactly zero (gradient
    masking, e.g. a quantiser); nonfinite_grad_frac: images with a NaN/inf gradient at any step."""

    def __init__(self, batch: int, device: torch.device):
        self.zero: Tensor | None = None
        self.nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)

    def update(self, g: Tensor) -> Tensor:
        """Records g and returns it with non-finite entries zeroed so the iterate stays finite."""
        flat = g.flatten(1)
        bad = ~torch.isfinite(flat).all(1)
        self.nonfinite |= bad
        if self.zero is None:
            self.zero = (flat == 0).all(1) & ~bad
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)

    def as_dict(self) -> dict[str, float]:
        zero = self.zero if self.zero is not None else self.nonfinite
        return {"zero_grad_frac": float(zero.float().mean()),
                "nonfinite_grad_frac": float(self.nonfinite.float().mean())}


def pgd(objective: Objective, x: Tensor, threat: ThreatModel, *, steps: int, step_size: float, noise: Noise,
        restarts: int = 1, random_init: bool = True, callback: Callback | None = None) -> PGDOutput:
    """Projected gradient ascent keeping, per image, the iterate with the highest objective over all
    steps and restarts (for a stochastic defense: the best EOT-averaged loss). Random starts are
    drawn from `noise`, one stream per image."""
    x = x.detach()
    best_x, best_loss = x.clone(), torch.full((x.shape[0],), float("-inf"), device=x.device)
    stats = GradStats(x.shape[0], x.device)
    for r in range(restarts):
        x_adv = random_start(threat, x, noise) if random_init else x.clone()
        # steps + 1 evaluations: the last one scores the final iterate.
        for t in range(steps + 1):
            loss, g = objective(x_adv)
            loss, g = loss.detach(), stats.update(g.detach())
            if callback is not None:
                callback(r * (steps + 1) + t, x_adv, loss, g)
            better = torch.isfinite(loss) & (loss > best_loss)
            best_x[better], best_loss[better] = x_adv[better], loss[better]
            if t < steps:
                x_adv = threat.project(x, x_adv + step_size * ascent_direction(threat, g)).detach()
    return PGDOutput(threat.project(x, best_x), best_loss, stats.as_dict())


def unbounded_eps(norm: str) -> float:
    """A budget no [0, 1] image can exceed: the whole cube for Linf, its diameter (and more) for L2."""
    return 1.0 if norm == "Linf" else 1e3


class GradientAttack(Attack):
    """Base of attacks that differentiate through the defended model, with `params.eot` EOT samples."""

    callback: Callback | None = None
    params: PGDSchedule

    def eot_samples(self) -> int | None:
        return self.params.eot

    def iterations(self) -> int | None:
        return getattr(self.params, "steps", None)

    def params_for(self, *, eot: int | None = None, unbounded: bool = False,
                   iterations: int | None = None) -> dict | None:
        over: dict = {}
        if eot is not None:
            over["eot"] = eot
        if unbounded:
            over["eps"] = unbounded_eps(self.params.norm)
        if iterations is not None:
            over["steps"] = iterations
        return over

    def view(self, model: DefendedModel) -> DefendedModel:
        """The model this attack differentiates: the defense in the attack's gradient mode, or the
        cheaper surrogate the defense offers (params.surrogate). Verdicts stay on `model` itself."""
        # The host should already pass the model in self.gradient; re-viewing keeps the attack honest
        # when it does not (transfer clears self.gradient to use its surrogate as it is).
        if self.gradient is not None and model.gradient != self.gradient:
            model = model.with_gradient(self.gradient)
        spec = getattr(self.params, "surrogate", None)
        if spec is None:
            return model
        make = getattr(model.purifier, "surrogate", None)
        if make is None:
            raise ValueError(f"{type(model.purifier).__name__} offers no surrogate, so '{spec.kind}' cannot stand in for it")
        return model.with_purifier(make(spec.kind, **({"steps": spec.steps} if spec.steps is not None else {})))

    def selector(self, model: DefendedModel, x: Tensor, y: Tensor, ctx: AttackContext) -> BestIterate | None:
        """With select: protocol, the tracker of each image's best iterate on the real defense."""
        if self.params.select != "protocol":
            return None
        return BestIterate(model, x, y, ctx.protocol, self.params.select_every)


def with_best(result: AttackResult, best: BestIterate | None) -> AttackResult:
    """The result with each image's best iterate under the protocol, when the attack kept them."""
    if best is None:
        return result
    result.x_adv, result.iteration, result.verdict = best.examples, best.iteration.clone(), best.robust.clone()
    result.stats = result.stats | best.stats()
    return result


class BPDAParams(PGDSchedule):
    """BPDA+EOT (Athalye et al. 2018; Hill et al. 2021 protocol)."""

    steps: int = Field(50, ge=1)
    eot: int = Field(15, ge=1)
    loss: LossName = "ce"
    eot_average: EOTAverage = "loss"
    iterate_samples: int = Field(0, ge=0, description=(
        "0: off. Else the paper's BPDA verdict (Hill et al. 2021's code as DiffPure ran it): every iterate "
        "is judged by the mean logits of the attack's EOT samples, and where those are wrong, re-judged by "
        "the mean logits of this many fresh purifications; an image is broken once any iterate fails both "
        "(DiffPure: 150 on CIFAR-10, 20 on CelebA-HQ). Returned as the attack's verdict; a broken image's "
        "example is the first iterate that broke it"))

    @model_validator(mode="after")
    def _one_selection(self) -> "BPDAParams":
        if self.iterate_samples and self.select == "protocol":
            raise PydanticCustomError("select", "iterate_samples (the paper's BPDA verdict) and select: protocol "
                                                "both choose the returned iterate: use one")
        return self


class PGDParams(PGDSchedule):
    """PGD-EOT with full gradients (Lee & Kim, ICCV 2023: 200 steps, 20 EOT samples)."""

    loss: LossName = "ce"
    eot_average: EOTAverage = "loss"
    gradient: GradientMode = "exact"
    surrogate: SurrogateSpec | None = Field(None, description="differentiate a cheaper stand-in of the defense")
    targeted: TargetHow | None = Field(None, description="targeted mode: maximise the target class (chosen per "
                                                         "image, see targets.choose_targets); None: untargeted")


class PGDEOT(GradientAttack):
    def __init__(self, params: PGDParams | BPDAParams, *, gradient: str | None = None):
        self.params = params
        self.threat = make_threat(params.norm, params.eps)
        self.gradient = gradient or getattr(params, "gradient", None)
        self.loss_fn = LOSSES[params.loss]

    def run(self, model: DefendedModel, x: Tensor, y: Tensor, ctx: AttackContext) -> AttackResult:
        m, p = self.view(model), self.params
        samples = getattr(p, "iterate_samples", 0)
        judge = IterateVerdict(m, x, y, samples) if samples else None
        best = self.selector(model, x, y, ctx)
        loss_fn, labels = self.loss_fn, y
        if getattr(p, "targeted", None):
            clean = model.mean_logits(x, p.eot)   # the clean prediction on the real defense
            target = choose_targets(clean, y, clean.shape[1], p.targeted, ctx.noise)
            loss_fn, labels = targeted_objective(p.loss, y, target)
        loss_fn = judge.capturing(loss_fn) if judge else loss_fn
        callback = chain(judge.after if judge else None, best, self.callback,
                         reporting(ctx, p))
        out = pgd(lambda z: m.loss_and_grad(loss_fn, z, labels, p.eot, average=p.eot_average), x, self.threat,
                  steps=p.steps, step_size=p.resolved_step(), noise=ctx.noise, restarts=p.restarts,
                  random_init=p.random_start, callback=callback)
        if judge is None:
            return with_best(AttackResult(out.x_adv, stats=out.stats), best)
        broken = ~judge.defended
        x_adv = torch.where(_per_image(broken, x), judge.breaking, out.x_adv)
        return AttackResult(x_adv, stats=out.stats | judge.stats(), verdict=judge.defended.clone())


class IterateVerdict:
    """The paper's BPDA verdict, iterate by iterate (see BPDAParams.iterate_samples).

    The screen reuses the logits of the EOT samples the gradient step already drew (`capturing`
    wraps the loss to keep them); only images the screen finds wrong pay for `samples` fresh
    purifications. `defended` only ever goes from True to False."""

    def __init__(self, model: DefendedModel, x: Tensor, y: Tensor, samples: int):
        self.model, self.y, self.samples = model, y, samples
        self.defended = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        self.breaking = x.detach().clone()
        self.broken_at = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        self.evaluations = 0
        self._logits: list[Tensor] = []

    def capturing(self, loss_fn):
        def loss(logits: Tensor, y: Tensor) -> Tensor:
            self._logits.append(logits.detach().float())
            return loss_fn(logits, y)
        return loss

    def after(self, step: int, x_adv: Tensor, _loss: Tensor, _grad: Tensor) -> None:
        logits, self._logits = torch.cat(self._logits), []
        screen = logits.view(-1, x_adv.shape[0], logits.shape[1]).mean(0).argmax(1) == self.y
        suspect = (self.defended & ~screen).nonzero().flatten()
        if len(suspect) == 0:
            return
        self.evaluations += len(suspect)
        wrong = self.model.mean_logits(x_adv[suspect], self.samples).argmax(1) != self.y[suspect]
        newly = suspect[wrong]
        self.defended[newly] = False
        self.breaking[newly] = x_adv[newly].detach()
        self.broken_at[newly] = step

    def stats(self) -> dict[str, float]:
        return {"iterate_verdict_robust": float(self.defended.float().mean() * 100),
                "iterate_verifications": float(self.evaluations)}


def make_pgd_eot(params: PGDParams) -> PGDEOT:
    return PGDEOT(params)


def make_bpda_eot(params: BPDAParams) -> PGDEOT:
    return PGDEOT(params, gradient="bpda")


def norm_threat(params: PGDSchedule) -> ThreatModel:
    """The budget the host verifies pgd-eot, bpda-eot, diffusion-mse and square examples against."""
    return make_threat(params.norm, params.eps)

