"""APGD (Croce & Hein, ICML 2020, Alg. 1): the step-size-free PGD that AutoAttack runs, as a loop over
any `Objective` (x_adv -> per-image loss, gradient), like `pgd.pgd`, so the attacks built on it
(DiffAttack, DiffHammer) bring their own losses and gradients and keep the host's per-image noise.

Per image: step eta = 2 eps, momentum alpha = 0.75:
    z_{k+1} = P(x_k + eta dir(g_k));  x_{k+1} = P(x_k + alpha (z_{k+1} - x_k) + (1 - alpha)(x_k - x_{k-1}))
At the checkpoints w_j (p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) of the N iterations)
eta is halved and the iterate restarts from the best point when fewer than rho = 0.75 of the steps
since the last checkpoint raised the loss, or when neither eta nor the best loss changed since then.
"""
from __future__ import annotations

import torch
from torch import Tensor

from benchkit.noise import Noise
from benchkit.threat import ThreatModel

from benchkit_attacks.pgd import Callback, GradStats, Objective, PGDOutput, _per_image, ascent_direction, random_start

MOMENTUM = 0.75
RHO = 0.75


def checkpoints(n: int) -> list[int]:
    """The iterations at which APGD may halve its step, in AutoAttack's integer arithmetic: the first
    after int(0.22 n), each next interval shorter by int(0.03 n) down to int(0.06 n) (n = 100: 22, 41,
    57, 70, 80, 87, 93, 99)."""
    length, decrease, shortest = max(int(0.22 * n), 1), max(int(0.03 * n), 1), max(int(0.06 * n), 1)
    marks, at = [], length
    while at < n:
        marks.append(at)
        length = max(length - decrease, shortest)
        at += length
    return marks


def apgd(objective: Objective, x: Tensor, threat: ThreatModel, *, steps: int, noise: Noise, restarts: int = 1,
         random_init: bool = True, callback: Callback | None = None) -> PGDOutput:
    """Maximise the objective from x in `steps` APGD steps per restart (steps + 1 evaluations, as `pgd`);
    per image, the iterate with the highest objective over all restarts is returned."""
    x = x.detach()
    b = x.shape[0]
    best_x, best_loss = x.clone(), torch.full((b,), float("-inf"), device=x.device)
    stats = GradStats(b, x.device)
    marks = set(checkpoints(steps))
    for r in range(restarts):
        x_cur = random_start(threat, x, noise) if random_init else x.clone()
        x_prev = x_cur.clone()
        eta = torch.full((b,), 2.0 * threat.eps, device=x.device, dtype=x.dtype)
        run_x, run_loss = x_cur.clone(), torch.full((b,), float("-inf"), device=x.device)
        run_grad = torch.zeros_like(x)
        rises = torch.zeros(b, device=x.device)
        last_loss = torch.full((b,), float("-inf"), device=x.device)
        mark_eta, mark_best, last_mark = eta.clone(), run_loss.clone(), 0
        for t in range(steps + 1):
            loss, g = objective(x_cur)
            loss, g = loss.detach(), stats.update(g.detach())
            if callback is not None:
                callback(r * (steps + 1) + t, x_cur, loss, g)
            if t > 0:
                rises += (loss > last_loss).float()
            last_loss = loss
            better = torch.isfinite(loss) & (loss > run_loss)
            run_x[better], run_loss[better], run_grad[better] = x_cur[better], loss[better], g[better]
            if t == steps:
                break
            if t in marks:
                few = rises < RHO * (t - last_mark)
                stuck = (eta == mark_eta) & (run_loss == mark_best)
                halve = few | stuck
                eta = torch.where(halve, eta / 2, eta)
                # Restart the halved images from their best point (AutoAttack's reset).
                x_cur, g = torch.where(_per_image(halve, x), run_x, x_cur), torch.where(_per_image(halve, x), run_grad, g)
                x_prev = torch.where(_per_image(halve, x), run_x, x_prev)
                rises.zero_()
                mark_eta, mark_best, last_mark = eta.clone(), run_loss.clone(), t
            z = threat.project(x, x_cur + _per_image(eta, x) * ascent_direction(threat, g))
            alpha = MOMENTUM if t > 0 else 1.0
            x_next = threat.project(x, x_cur + alpha * (z - x_cur) + (1 - alpha) * (x_cur - x_prev))
            x_prev, x_cur = x_cur, x_next.detach()
        improve = run_loss > best_loss
        best_x[improve], best_loss[improve] = run_x[improve], run_loss[improve]
    return PGDOutput(threat.project(x, best_x), best_loss, stats.as_dict())
