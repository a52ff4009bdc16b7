"""AutoAttack standard and rand as one benchkit attack whose variants are its versions.

The host takes the per-image worst case over the listed versions (the paper only took the
minimum of the two accuracies) and re-classifies every returned example itself. AutoAttack's own
verdict (its robust flags during the run: one draw of a randomised defense per check) is returned
as the attack's verdict: the number the paper reports, stored beside the host's, never the result.

Besides its two versions, pyautoattack's targeted attacks run alone as versions of their own
(its version='custom' with one attack to run): "apgd-t" (APGD on the targeted DLR loss) and
"fab-t" (targeted FAB), each over its `n_target_classes` highest-logit wrong classes. Both are
already part of "standard"; alone they serve where standard's other members do not apply or cost
too much, and apgd-t alone takes EOT gradients on a stochastic defense (standard never does).

Those EOT gradients run as a few large batches (BatchedEOT) instead of pyautoattack's one model call
per sample, each sample with the noise its sequential call would have drawn: the same examples.
"""
from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from benchkit.attack import Attack, AttackContext, AttackResult
from benchkit.defended import DefendedModel
from benchkit.hookspecs import hookimpl
from benchkit.noise import ImageStreams
from benchkit.params import Budget, Params
from benchkit.threat import make_threat


# "standard" and "rand" are AutoAttack's versions; the others are its targeted attacks run alone.
Version = Literal["standard", "rand", "apgd-t", "fab-t"]
TARGETED = ("apgd-t", "fab-t")


class AutoAttackParams(Params):
    norm: Literal["Linf", "L2"] = "Linf"
    eps: Budget = Field(8 / 255, description="budget in [0,1] pixel units, e.g. 8/255")
    versions: list[Version] = Field(default_factory=lambda: ["standard"], min_length=1, description=(
        "standard, rand (AutoAttack's versions), apgd-t, fab-t (its targeted attacks alone)"))
    eot: int = Field(20, ge=1, description=(
        "EOT iterations of the rand version's APGD (AutoAttack: 20), and of apgd-t on a stochastic defense"))
    n_queries: int = Field(5000, ge=1, description="Square attack queries in the standard version")
    n_iter: int = Field(100, ge=1, description="iterations of APGD, APGD-T and FAB (AutoAttack: 100)")
    n_target_classes: int = Field(9, ge=1, description=(
        "target classes of APGD-T and FAB-T, in standard and alone: the highest-logit wrong classes "
        "(AutoAttack standard, Linf and L2: 9); capped at the number of classes - 1"))
    gradient: Literal["exact", "adjoint"] | None = Field(
        None, description="the defense's gradient AutoAttack differentiates (None: the suite's defense setting); "
                          "exact as DiffBreak's AutoAttack, adjoint as the paper's")


def _set_apgd_iterations(apgd, n: int) -> None:
    """APGD derives its step-size checkpoints from n_iter when built; keep them consistent."""
    apgd.n_iter = apgd.n_iter_orig = n
    apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr = max(int(0.22 * n), 1), max(int(0.06 * n), 1), max(int(0.03 * n), 1)


def _report_members(adversary, ctx: AttackContext, n_images: int) -> None:
    """Report each member attack's finished batch to the host (ctx.progress). AutoAttack runs its
    members one after another, each on batches of the images still robust: out of members x batches
    of all images, a count that ends short when images break early (the host closes the shard)."""
    total = len(adversary.attacks_to_run) * math.ceil(n_images / ctx.batch_size)
    done = 0

    def counted(perturb):
        def run(*args, **kwargs):
            nonlocal done
            out = perturb(*args, **kwargs)
            done = min(done + 1, total)
            ctx.progress(done, total)
            return out
        return run

    # Each member's perturb, shadowed on the instance (apgd and fab serve two members each).
    for member in (adversary.apgd, adversary.apgd_targeted, adversary.fab, adversary.square):
        member.perturb = counted(member.perturb)


def _n_classes(model: DefendedModel, x: torch.Tensor) -> int:
    """The classifier's number of classes, from the bare classifier: a pass through a stochastic
    purifier would consume draws of the per-image noise streams."""
    with torch.no_grad():
        return int(model.classifier(x[:1]).shape[1])


class BatchedEOT:
    """A DefendedModel as APGD sees it through pyautoattack's is_tf_model hook, its EOT samples in
    large batches.

    On that path APGD calls criterion(x_adv, y[, y_target]) -> (logits, per-image loss, input gradient)
    eot_iter times in a row at the same x_adv and averages the gradients. The first call computes all
    eot_iter samples in DefendedModel's EOT passes (eot_passes: as many copies of the batch per pass as
    fit max_batch), the following calls hand them out in order. APGD's sum / eot_iter is then the mean of
    exact per-sample gradients, and the logits and loss it keeps (its last call's) are the last sample's,
    as in its sequential loop. The losses are pyautoattack's own: CE, its dlr_loss and dlr_loss_targeted.

    Noise: each sample opens its own evaluation of the ImageStreams, as each of the sequential loop's model
    calls did, so sample s draws exactly the noise its sequential call would have drawn. A deterministic
    defense is evaluated once and that sample handed out eot_iter times (as DefendedModel's EOT does).
    """

    def __init__(self, model: DefendedModel, apgd) -> None:
        self.model, self.apgd = model, apgd
        self._queue: list[tuple[Tensor, Tensor, Tensor]] = []
        self._at: tuple = ()   # (x, y, y_target, loss) the queued samples were drawn for

    def predict(self, x: Tensor) -> Tensor:
        """APGD's clean prediction on this path: one model call, as on the other."""
        return self.model(x)

    def get_logits_loss_grad_xent(self, x: Tensor, y: Tensor):
        return self._next(x, y, "ce")

    def get_logits_loss_grad_dlr(self, x: Tensor, y: Tensor):
        return self._next(x, y, "dlr")

    def get_logits_loss_grad_target(self, x: Tensor, y: Tensor, y_target: Tensor):
        return self._next(x, y, "dlr-targeted")

    def _next(self, x: Tensor, y: Tensor, loss: str) -> tuple[Tensor, Tensor, Tensor]:
        at = (x, y, self.apgd.y_target, loss)
        # The same tensors (identity: APGD makes a new x_adv per iterate) and loss: the next queued sample.
        if not (self._queue and all(a is b for a, b in zip(at[:3], self._at)) and self._at[3] == loss):
            self._queue, self._at = self._samples(x, y, loss), at
        return self._queue.pop(0)

    def _samples(self, x: Tensor, y: Tensor, loss: str) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(logits, loss, gradient) of each of the eot_iter samples at x, in sample order."""
        # pyautoattack's own losses, as its other path picks them (dlr_loss_targeted reads apgd.y_target)
        criterion = (nn.CrossEntropyLoss(reduction="none") if loss == "ce" else
                     self.apgd.dlr_loss if loss == "dlr" else self.apgd.dlr_loss_targeted)
        m, n, b = self.model, self.apgd.eot_iter, x.shape[0]
        noise = m.noise
        streams = isinstance(noise, ImageStreams)
        keys = [noise.open(x) for _ in range(n)] if streams else None
        n_eff = n if m.stochastic else 1

        def run(start: int, stop: int) -> list[tuple[Tensor, Tensor, Tensor]]:
            k = stop - start
            if streams:   # copy c of this pass is sample start + c: its own evaluation's rows
                noise.bind([row for sample in keys[start:stop] for row in sample], range(1))
            xr = x.detach().repeat(k, *([1] * (x.dim() - 1))).requires_grad_(True)
            with torch.enable_grad():
                logits = m.classifier(m.purifier.purify(xr, gradient=m.gradient, noise=noise))
                losses = [criterion(z, y) for z in logits.view(k, b, -1)]   # per sample, as APGD calls it
                (g,) = torch.autograd.grad(torch.stack(losses).sum(), xr)
            return [(logits[c * b:(c + 1) * b].detach(), losses[c].detach(), g[c * b:(c + 1) * b]) for c in range(k)]

        # DefendedModel's EOT passes: whole copies of the batch up to max_batch rows, a pass that runs out
        # of memory run as its halves (each sample's streams can be opened again), the size remembered.
        out = [sample for _, _, part in m.eot_passes(x, n_eff, run) for sample in part]
        return out if n_eff == n else out * n


def _batch_eot(apgd, model: DefendedModel) -> None:
    """Route an APGD's EOT loop through BatchedEOT (pyautoattack's is_tf_model hook)."""
    apgd.model, apgd.is_tf_model = BatchedEOT(model, apgd), True


class AutoAttackVersion(Attack):
    def __init__(self, norm: str, eps: float, version: str, eot: int, n_queries: int, n_iter: int = 100,
                 n_target_classes: int = 9):
        self.norm, self.eps, self.version, self.eot, self.n_queries = norm, eps, version, eot, n_queries
        self.n_iter, self.n_target_classes = n_iter, n_target_classes

    def run(self, model: DefendedModel, x: torch.Tensor, y: torch.Tensor, ctx: AttackContext) -> AttackResult:
        from pyautoattack import AutoAttack

        targeted = self.version in TARGETED
        # Its "randomized defense, use version rand" warning is moot for apgd-t, which takes EOT here.
        logging.getLogger("auto-attack").setLevel(logging.ERROR if targeted and model.stochastic else logging.WARNING)
        # A targeted attack alone is pyautoattack's 'custom' version with that one attack to run.
        adversary = AutoAttack(model, norm=self.norm, eps=self.eps, version="custom" if targeted else self.version,
                               attacks=[self.version] if targeted else None,
                               seed=ctx.seed % (2**31), device=ctx.device)
        adversary.verbose = False
        if self.version == "rand":
            adversary.apgd.eot_iter = self.eot
            _batch_eot(adversary.apgd, model)
        if self.version == "apgd-t" and model.stochastic:
            # As rand does for APGD: average gradients over EOT draws of a randomised defense.
            adversary.apgd_targeted.eot_iter = self.eot
            _batch_eot(adversary.apgd_targeted, model)
        if self.version in ("standard", *TARGETED):
            # pyautoattack indexes the target_class-th highest logit: more targets than wrong
            # classes would index past the classes.
            n = min(self.n_target_classes, _n_classes(model, x) - 1)
            adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = n
        adversary.square.n_queries = self.n_queries
        if self.n_iter != 100:
            for apgd in (adversary.apgd, adversary.apgd_targeted):
                _set_apgd_iterations(apgd, self.n_iter)
            adversary.fab.n_iter = self.n_iter
        _report_members(adversary, ctx, x.shape[0])
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=ctx.batch_size)
        # y_adv holds, per image, the label AutoAttack last saw: the true one exactly when it still
        # counted the image robust (its robust_flags are not returned).
        return AttackResult(x_adv.detach(), verdict=(y_adv.to(y.device) == y))


class AutoAttackSuite(Attack):
    def __init__(self, p: AutoAttackParams):
        self.params = p
        self.versions = [(v, AutoAttackVersion(p.norm, p.eps, v, p.eot, p.n_queries, p.n_iter, p.n_target_classes))
                         for v in p.versions]
        self.gradient = p.gradient   # the whole suite's, for the host's view of the cell (checks)
        for _, version in self.versions:
            version.gradient = p.gradient

    def variants(self):
        return list(self.versions)

    def run(self, model, x, y, ctx):  # pragma: no cover - the host runs the variants
        raise RuntimeError("run each AutoAttack version through variants()")

    def eot_samples(self) -> int | None:
        # Only the rand version (and apgd-t alone, on a stochastic defense) averages gradients over
        # EOT samples.
        return self.params.eot if {"rand", "apgd-t"} & set(self.params.versions) else None

    def iterations(self) -> int | None:
        # APGD's, APGD-T's and FAB's; Square's queries stay as set.
        return self.params.n_iter

    def params_for(self, *, eot: int | None = None, unbounded: bool = False,
                   iterations: int | None = None) -> dict | None:
        over: dict = {}
        if eot is not None:
            over["eot"] = eot
        if unbounded:
            over["eps"] = 1.0 if self.params.norm == "Linf" else 1e3
        if iterations is not None:
            over["n_iter"] = iterations
        return over


def autoattack_threat(p: AutoAttackParams):
    return make_threat(p.norm, p.eps)


@hookimpl
def register_attacks(register):
    register("autoattack", AutoAttackSuite, params=AutoAttackParams, threat=autoattack_threat,
             description="AutoAttack (pyautoattack) standard, rand, or APGD-T / FAB-T alone; per-image worst "
                         "case over versions")
