"""StAdv: spatially transformed adversarial examples (Xiao et al., ICLR 2018), configured as
perceptual-advex's StAdvAttack that DiffPure evaluates with: a per-pixel flow in grid_sample's
normalised coordinates, Linf-bounded by `bound` (clipped after every step, as mister_ed does),
loss = CW margin (kappa = inf) - (0.0025 / bound) * flow smoothness, Adam (lr 0.01), 100 steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from benchkit.attack import AttackContext, AttackResult
from benchkit.defended import DefendedModel
from benchkit.threat import StAdvFlow, warp

from benchkit_attacks.losses import cw_margin_loss
from benchkit.params import Budget, Params
from benchkit_attacks.params import GradientMode
from benchkit_attacks.pgd import GradientAttack, GradStats


def flow_smoothness(flow: Tensor) -> Tensor:
    """Xiao et al. eq. 4 per image: sum over pixels and their 4 neighbours of the Euclidean norm of
    the flow difference. Edges compare against themselves (replicate padding), as mister_ed does;
    the 1e-10 keeps the gradient of sqrt finite where the flow is flat."""
    h, w = flow.shape[-2:]
    padded = F.pad(flow, (1, 1, 1, 1), mode="replicate")
    total = flow.new_zeros(flow.shape[0])
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        diff = flow - padded[:, :, dy:dy + h, dx:dx + w]
        total = total + (diff.pow(2).sum(1) + 1e-10).sqrt().flatten(1).sum(1)
    return total


class StAdvParams(Params):
    bound: Budget = 0.05
    steps: int = Field(100, ge=1)
    lr: float = Field(0.01, gt=0)
    # None: 0.0025 / bound, perceptual-advex's weight.
    smoothness: float | None = Field(None, ge=0)
    eot: int = Field(20, ge=1)
    gradient: GradientMode = "exact"


class StAdv(GradientAttack):
    def __init__(self, params: StAdvParams):
        self.params = params
        self.threat = StAdvFlow(params.bound)
        self.gradient = params.gradient

    def run(self, model: DefendedModel, x: Tensor, y: Tensor, ctx: AttackContext) -> AttackResult:
        m, p = self.view(model), self.params
        x = x.detach()
        weight = p.smoothness if p.smoothness is not None else 0.0025 / max(p.bound, 1e-12)
        b, _, h, w = x.shape
        flow = torch.zeros(b, 2, h, w, device=x.device, dtype=x.dtype, requires_grad=True)
        opt = torch.optim.Adam([flow], lr=p.lr)
        best_flow, best = torch.zeros_like(flow), torch.full((b,), float("-inf"), device=x.device)
        stats = GradStats(b, x.device)
        for t in range(p.steps + 1):
            with torch.enable_grad():
                xw = warp(x, flow)
            # EOT through the model's batched API; the flow gradient follows by the chain rule.
            margin, g_img = m.loss_and_grad(cw_margin_loss, xw.detach(), y, p.eot)
            with torch.enable_grad():
                (g_adv,) = torch.autograd.grad(xw, flow, grad_outputs=g_img)
                (g_smooth,) = torch.autograd.grad(flow_smoothness(flow).sum(), flow)
            g_adv = stats.update(g_adv)
            if self.callback is not None:  # here grad is the flow's gradient, not the image's
                self.callback(t, xw.detach(), margin, g_adv)
            # Keep the flow that is most adversarial; smoothness is a regulariser, not the budget.
            better = torch.isfinite(margin) & (margin > best)
            best_flow[better], best[better] = flow.detach()[better], margin[better]
            if t == p.steps:
                break
            flow.grad = -(g_adv - weight * g_smooth)  # Adam minimises
            opt.step()
            with torch.no_grad():
                flow.clamp_(-p.bound, p.bound)
        best_flow = best_flow.clamp(-p.bound, p.bound)
        return AttackResult(warp(x, best_flow).detach(), extra={"flow": best_flow}, stats=stats.as_dict())

    def params_for(self, *, eot: int | None = None, unbounded: bool = False,
                   iterations: int | None = None) -> dict | None:
        # A flow of 1 moves a pixel by half the image: nothing is out of reach.
        return (({"eot": eot} if eot is not None else {}) | ({"bound": 1.0} if unbounded else {})
                | ({"steps": iterations} if iterations is not None else {}))


def stadv_threat(params: StAdvParams) -> StAdvFlow:
    return StAdvFlow(params.bound)


def make_stadv(params: StAdvParams) -> StAdv:
    return StAdv(params)
