"""DiffHammer (Wang et al., NeurIPS 2024): a selective, EM-style attack on stochastic purification with
gradient grafting and an in-loop worst-of-N evaluation.

Each iteration draws N purifications phi_1..phi_N of the current example (no graph through the solver)
and, at every purified image, the classifier loss L_i and its cheap gradient g_i = dL_i/dphi_i:
  E-step   the purification a* whose step direction is expected to raise the most losses,
           a* = argmax_a sum_i ELU(L_i + eps <u(g_a), g_i>), u = sign (Linf) or g/|g| (L2); weights
           q_i = sigmoid(lambda (L_i + eps <u(g_a*), g_i>)), the posterior that purification i shares
           the vulnerability a step along a*'s direction exploits (their Eq. 9): near 1 for those that
           step breaks or keeps broken (with a margin loss, L_i > 0 once misclassified), near 0 for those
           out of its reach, whose gradients would only pull the common step elsewhere
  M-step   g~ = sum_i q_i g_i / sum_i q_i, grafted onto the one full backpropagation through
           purification a* (same noise): grad = (d phi_a*/dx)^T g~ (their Eq. 10-11), so an iteration
           costs N forward solves and one backward solve instead of N backward solves
  momentum grad <- v grad + (1 - v) grad_prev with v = (t + 1)^-alpha (their stepwise EM, alpha = 0.5)
The step is APGD's (their default base attack). The N purifications double as the N-evaluation of the
iterate: per image the kept example is the one the fewest of its N purifications classify correctly
(ties: the higher mean loss), and the attack's verdict is robust only if all N were correct there.
Defaults are theirs (App. C.1, config.py): N = 10, lambda = 5, 3 restarts x 50 iterations with the
losses cycling CW, CE, DLR. The gradient may follow a cheaper surrogate (their App. C.1: a solver with
half the defense's steps) while the N-evaluation runs on the real defense.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from benchkit.attack import AttackContext, AttackResult
from benchkit.defended import DefendedModel
from benchkit.noise import PerExampleNoise, derive_seed
from benchkit.threat import Linf, make_threat

from benchkit_attacks.apgd import apgd
from benchkit_attacks.iterates import KeptIterates
from benchkit_attacks.losses import LOSSES
from benchkit_attacks.params import LossName, NormBudget, SurrogateSpec
from benchkit_attacks.pgd import GradientAttack, chain, reporting, with_best


class DiffHammerParams(NormBudget):
    steps: int = Field(50, ge=1, description="APGD iterations per restart (Wang et al.: 50)")
    restarts: int = Field(3, ge=1, description="restarts, each with the next loss of `losses` (Wang et al.: 3)")
    losses: list[LossName] = Field(default_factory=lambda: ["cw", "ce", "dlr"], min_length=1,
                                   description="classifier losses, cycled over the restarts (Wang et al.: CW, CE, DLR)")
    n: int = Field(10, ge=1, description="purifications per iteration: EM samples and the worst-of-N evaluation")
    em_lambda: float = Field(5.0, gt=0, description="sigmoid temperature of the E-step weights (their code: 5)")
    em_alpha: float = Field(0.5, ge=0, description="stepwise-EM momentum exponent (their alpha: 0.5)")
    random_start: bool = True
    surrogate: SurrogateSpec | None = Field(None, description="differentiate a cheaper stand-in of the defense")
    select: Literal["samples", "protocol"] = Field(
        "samples", description="samples: keep each image's best iterate by the attack's own N purifications "
                               "(DiffHammer's N-evaluation); protocol: by the suite's verification protocol")
    select_every: int = Field(1, ge=1)


def _unit(g: Tensor, linf: bool) -> Tensor:
    """The steepest-ascent direction of the norm for flat [..., D] gradients."""
    return g.sign() if linf else g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def em_gradient(loss: Tensor, g: Tensor, eps: float, lam: float, linf: bool) -> tuple[Tensor, Tensor]:
    """loss [N, B], g [N, B, D] (gradients at the purified images) -> (g~ [B, D], a* [B])."""
    u = _unit(g, linf)
    # gain[a, i, b]: how much a step along purification a's direction raises purification i's loss
    gain = torch.einsum("abd,ibd->aib", u, g)
    a_star = F.elu(loss[None] + eps * gain).sum(1).argmax(0)            # [B]
    cols = torch.arange(g.shape[1], device=g.device)
    q = torch.sigmoid(lam * (loss + eps * gain[a_star, :, cols].T))    # [N, B]
    return (q[..., None] * g).sum(0) / q.sum(0)[:, None].clamp_min(1e-12), a_star


def purify_samples(model: DefendedModel, loss_fn, z: Tensor, y: Tensor, seeds: list[list[int]]
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """N purifications of z (seeds[j][i] seeds image i's j-th), no graph through the purifier: the loss
    [N, B], correct [N, B] and the loss gradients at the purified images [N, B, D]."""
    b, n = z.shape[0], len(seeds)
    losses, grads, correct, j0 = [], [], [], 0
    for k in model.chunk_sizes(b, n):
        rows = [seeds[j][i] for j in range(j0, j0 + k) for i in range(b)]
        zr = z.detach().repeat(k, *([1] * (z.dim() - 1)))
        with torch.no_grad():
            purified = model.purifier.purify(zr, gradient="none", noise=PerExampleNoise(rows))
        purified.requires_grad_(True)
        with torch.enable_grad():
            logits = model.classifier(purified)
            loss = loss_fn(logits, y.repeat(k))
            (g,) = torch.autograd.grad(loss.sum(), purified)
        losses.append(loss.detach().view(k, b))
        grads.append(g.view(k, b, -1))
        correct.append((logits.argmax(1) == y.repeat(k)).view(k, b))
        j0 += k
    return torch.cat(losses), torch.cat(correct), torch.cat(grads)


def grafted_gradient(model: DefendedModel, z: Tensor, upstream: Tensor, seeds: list[int]) -> Tensor:
    """(d purify(z)/dz)^T upstream along the purification each image's seed draws: one backward solve
    in the model's gradient mode (gradient grafting)."""
    zg = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model.purifier.purify(zg, gradient=model.gradient, noise=PerExampleNoise(seeds))
        (grad,) = torch.autograd.grad((out.flatten(1) * upstream.flatten(1)).sum(), zg)
    return grad


class DiffHammer(GradientAttack):
    def __init__(self, params: DiffHammerParams):
        self.params = params
        self.threat = make_threat(params.norm, params.eps)
        self.gradient = "exact"

    def eot_samples(self) -> int | None:
        return self.params.n

    def params_for(self, *, eot: int | None = None, unbounded: bool = False,
                   iterations: int | None = None) -> dict | None:
        over = super().params_for(unbounded=unbounded, iterations=iterations) or {}
        return over | ({"n": eot} if eot is not None else {})

    def run(self, model: DefendedModel, x: Tensor, y: Tensor, ctx: AttackContext) -> AttackResult:
        p, b = self.params, x.shape[0]
        grad_model = self.view(model)   # the surrogate, if any; the N-evaluation stays on `model`
        linf = isinstance(self.threat, Linf)
        tracker = KeptIterates(x)   # the N-evaluation
        best = self.selector(model, x, y, ctx) if p.select == "protocol" else None
        state: dict = {"step": 0}

        def objective(z: Tensor) -> tuple[Tensor, Tensor]:
            step = state["step"]
            # Per image and iteration, N fresh purification seeds from the attack's own per-image stream.
            base = (ctx.noise.rand((b,), device="cpu", dtype=torch.float64) * 2**53).long().tolist()
            seeds = [[derive_seed("diffhammer", base[i], j) for i in range(b)] for j in range(p.n)]
            loss, correct, g = purify_samples(model, state["loss_fn"], z, y, seeds)
            tracker.update(step, z, correct.float().mean(0), loss.mean(0))
            em, a_star = em_gradient(loss, g, self.threat.eps, p.em_lambda, linf)
            grad = grafted_gradient(grad_model, z, em, [seeds[int(a_star[i])][i] for i in range(b)])
            t = step % (p.steps + 1)
            if t > 0:
                v = (t + 1) ** -p.em_alpha
                grad = v * grad + (1 - v) * state["past"]
            state["past"], state["step"] = grad, step + 1
            return loss.mean(0), grad

        stats: dict[str, float] = {}
        seen = chain(best, self.callback, reporting(ctx, p))
        for r in range(p.restarts):
            state["loss_fn"] = LOSSES[p.losses[r % len(p.losses)]]
            offset = r * (p.steps + 1)   # steps counted across restarts, as pgd's callbacks
            out = apgd(objective, x, self.threat, steps=p.steps, noise=ctx.noise, random_init=p.random_start,
                       callback=lambda s, *a, o=offset: seen(s + o, *a))
            stats = out.stats
        result = AttackResult(tracker.examples.clone(), stats=stats | {
            "n_eval_robust": float(tracker.robust.float().mean() * 100),
            "purifications": float(state["step"] * p.n * b)},
            verdict=tracker.robust.clone(), iteration=tracker.iteration.clone())
        return with_best(result, best)


def make_diffhammer(params: DiffHammerParams) -> DiffHammer:
    return DiffHammer(params)
