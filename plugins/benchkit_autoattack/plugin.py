"""AutoAttack standard and rand as one benchkit attack whose variants are its versions.

The host takes the per-image worst case over the listed versions (the paper only took the
minimum of the two accuracies) and re-classifies every returned example itself. AutoAttack's own
verdict (its robust flags during the run: one draw of a randomised defense per check) is returned
as the attack's verdict: the number the paper reports, stored beside the host's, never the result.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field

from benchkit.attack import Attack, AttackContext, AttackResult
from benchkit.defended import DefendedModel
from benchkit.hookspecs import hookimpl
from benchkit.params import Budget, Params
from benchkit.threat import make_threat


class AutoAttackParams(Params):
    norm: Literal["Linf", "L2"] = "Linf"
    eps: Budget = Field(8 / 255, description="budget in [0,1] pixel units, e.g. 8/255")
    versions: list[Literal["standard", "rand"]] = Field(default_factory=lambda: ["standard"], min_length=1)
    eot: int = Field(20, ge=1, description="EOT iterations of the rand version's APGD (AutoAttack: 20)")
    n_queries: int = Field(5000, ge=1, description="Square attack queries in the standard version")
    n_iter: int = Field(100, ge=1, description="iterations of APGD, APGD-T and FAB (AutoAttack: 100)")


def _set_apgd_iterations(apgd, n: int) -> None:
    """APGD derives its step-size checkpoints from n_iter when built; keep them consistent."""
    apgd.n_iter = apgd.n_iter_orig = n
    apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr = max(int(0.22 * n), 1), max(int(0.06 * n), 1), max(int(0.03 * n), 1)


class AutoAttackVersion(Attack):
    def __init__(self, norm: str, eps: float, version: str, eot: int, n_queries: int, n_iter: int = 100):
        self.norm, self.eps, self.version, self.eot, self.n_queries = norm, eps, version, eot, n_queries
        self.n_iter = n_iter

    def run(self, model: DefendedModel, x: torch.Tensor, y: torch.Tensor, ctx: AttackContext) -> AttackResult:
        from pyautoattack import AutoAttack

        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        adversary = AutoAttack(model, norm=self.norm, eps=self.eps, version=self.version,
                               seed=ctx.seed % (2**31), device=ctx.device)
        adversary.verbose = False
        if self.version == "rand":
            adversary.apgd.eot_iter = self.eot
        adversary.square.n_queries = self.n_queries
        if self.n_iter != 100:
            for apgd in (adversary.apgd, adversary.apgd_targeted):
                _set_apgd_iterations(apgd, self.n_iter)
            adversary.fab.n_iter = self.n_iter
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=ctx.batch_size)
        # y_adv holds, per image, the label AutoAttack last saw: the true one exactly when it still
        # counted the image robust (its robust_flags are not returned).
        return AttackResult(x_adv.detach(), verdict=(y_adv.to(y.device) == y))


class AutoAttackSuite(Attack):
    def __init__(self, p: AutoAttackParams):
        self.params = p
        self.versions = [(v, AutoAttackVersion(p.norm, p.eps, v, p.eot, p.n_queries, p.n_iter)) for v in p.versions]

    def variants(self):
        return list(self.versions)

    def run(self, model, x, y, ctx):  # pragma: no cover - the host runs the variants
        raise RuntimeError("run each AutoAttack version through variants()")

    def eot_samples(self) -> int | None:
        # Only the rand version averages gradients over EOT samples.
        return self.params.eot if "rand" in self.params.versions else None

    def params_for(self, *, eot: int | None = None, unbounded: bool = False) -> dict | None:
        over: dict = {}
        if eot is not None:
            over["eot"] = eot
        if unbounded:
            over["eps"] = 1.0 if self.params.norm == "Linf" else 1e3
        return over


def autoattack_threat(p: AutoAttackParams):
    return make_threat(p.norm, p.eps)


@hookimpl
def register_attacks(register):
    register("autoattack", AutoAttackSuite, params=AutoAttackParams, threat=autoattack_threat,
             description="AutoAttack (pyautoattack) standard and/or rand; per-image worst case over versions")
