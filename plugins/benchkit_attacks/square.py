"""Square Attack (Andriushchenko et al. 2020), black-box, through pyautoattack's implementation.

Queries are EOT-free, one stochastic draw each, as AutoAttack runs Square: the attack only sees
the defended model's logits, never its gradients.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from pyautoattack.square import SquareAttack
from torch import Tensor

from benchkit.attack import Attack, AttackContext, AttackResult
from benchkit.defended import DefendedModel
from benchkit.threat import make_threat

from benchkit_attacks.params import NormBudget


class SquareParams(NormBudget):
    n_queries: int = Field(5000, ge=1)
    p_init: float = Field(0.8, gt=0, le=1)
    restarts: int = Field(1, ge=1)
    loss: Literal["margin", "ce"] = "margin"


class Square(Attack):
    gradient = None  # never differentiates: whatever mode the host passes serves for forwards
    access = "query"

    def __init__(self, params: SquareParams):
        self.params = params
        self.threat = make_threat(params.norm, params.eps)

    def run(self, model: DefendedModel, x: Tensor, y: Tensor, ctx: AttackContext) -> AttackResult:
        p = self.params

        @torch.no_grad()
        def predict(z: Tensor) -> Tensor:
            return model(z)

        # pyautoattack reseeds the global RNG with its own seed: draw that seed from the host-seeded
        # stream and fork the RNG so the host's stream continues as if untouched.
        # On the CPU, named: the host seeded the CPU generator, and the draw must not follow a default
        # device set elsewhere (torch.set_default_device).
        seed = int(torch.randint(0, 2**31 - 1, (1,), device="cpu"))
        attack = SquareAttack(predict, norm=p.norm, n_queries=p.n_queries, eps=p.eps, p_init=p.p_init,
                              n_restarts=p.restarts, seed=seed, loss=p.loss, device=x.device)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            x_adv = attack.perturb(x.detach().clone(), y.detach().clone())
        return AttackResult(self.threat.project(x, x_adv.detach()))

    def params_for(self, *, eot: int | None = None, unbounded: bool = False,
                   iterations: int | None = None) -> dict | None:
        return {"eps": 1.0 if self.params.norm == "Linf" else 1e3} if unbounded and eot is None else None


def make_square(params: SquareParams) -> Square:
    return Square(params)
