"""Low-frequency attack `lowfreq`: PGD-EOT on perturbations restricted to the lowest DCT frequencies.

Why: DiffBreak (Kassis, Hengartner & Yu 2025, arXiv 2411.16598; github andrekassis/DiffBreak) finds
that perturbations that are smooth across the image ("systemic" changes) defeat diffusion
purification where norm-bounded PGD's pixel-wise noise, whose high frequencies the purifier's
Gaussian noise drowns, does not.

What DiffBreak's own `LF` attack does (DiffBreak/attacks/lf.py, defaults in utils/registry.py): it is
not norm-bounded. It optimises, with Adam, a tanh-space image (C&W's change of variables) AND a chain
of learnable per-pixel, edge-aware low-pass filters applied to it: joint-bilateral kernels guided by
the clean image (colour sigma 0.05), box (1, 1), initialised as near-identity Gaussians (sigma 0.2),
kernel sizes [5,5],[7,7],[5,5],[3,3] on CIFAR-10 and nine kernels up to [47,5] on the other datasets;
learning rates 0.05 (filters) and 0.008 (image); 100 iterations; C&W margin loss (kappa inf); the
budget is perceptual, LPIPS-VGG < 0.05, enforced by a penalty of weight 1e8 (CIFAR-10) / 1e4
(others); EOT by accumulating gradients over 1 (CIFAR-10) / 2 (others) passes of the defense's EOT
batch (128 / 8 purifications); it stops at the first success. That does not map onto a Linf / L2
ball: filtering the clean image moves its edges by far more than 8/255.

What ours does: a norm-bounded low-frequency attack inside the suite's threat model. Like Guo, Frank
& Weinberger (UAI 2019, "Low Frequency Adversarial Perturbation") it keeps the top-left DCT block;
unlike their LF-PGD (low-pass the gradient, then sign and clip) the perturbation itself is
band-limited before the budget is applied:
    u      the optimised perturbation is band-limited: its orthonormal 2-D DCT-II (per channel) is
           zero outside the lowest k_H x k_W frequencies, k = max(1, floor(cutoff * side)).
           `LowPass` is the orthogonal projector P onto that band (P d = A_H d A_W with
           A = C^T diag(mask) C: separable and exact). u is kept in a ball of radius headroom * eps
           (Linf) or eps (L2) by scaling it as a whole, never by clipping it pixel-wise (which would
           add high frequencies); for L2 this is the Euclidean projection onto band ∩ ball.
    image  x_adv = clamp(x + clip(u, -eps, eps), 0, 1) for Linf with headroom > 1, else
           clamp(x + u, 0, 1) (u is already inside the eps ball). Exactly what is low-frequency
           after projection: x_adv - x equals the band-limited u at every pixel where |u| <= eps
           and x + u stays in [0, 1]; elsewhere the pixel is moved back towards x (so the budget
           holds a fortiori), and those clipped pixels are the only source of energy above the
           cutoff. For L2, and for Linf with headroom 1, there is no eps clip: on an image with no
           pixel clamped to [0, 1], x_adv - x has zero DCT energy above the cutoff (to float
           rounding). Headroom > 1 (Linf, default 2) lets a smooth u overshoot eps and be clipped
           flat there: a band-limited signal scaled down to peak at eps spends little of a Linf
           budget (digits test CNN, eps 0.3, cutoff 0.5, 20 steps: 12% accuracy left with
           headroom 1, 0% with headroom 2). stats["highfreq_energy_frac"] is the mean share of
           the returned perturbations' energy above the cutoff.
    steps  `pgd()` over the iterate z = x + u: the objective evaluates the loss at x_adv(z), with
           EOT through `DefendedModel.loss_and_grad` (exact gradients through the defense), and
           returns the gradient in the band-limited parametrisation (P applied to the chain rule
           through the clips), so the iterate stays band-limited: a Linf step is P(sign(P g)), an
           L2 step P g / |P g|. Callbacks (iterate selection, logging) see x_adv(z), the example
           whose loss was computed.

Defaults and their sources: steps 100, loss cw, no random start (DiffBreak's LF: 100 iterations,
margin loss with kappa inf, optimisation from the clean image); eot 20 (Lee & Kim 2023, as pgd-eot;
DiffBreak's LF draws 128 purifications per step on CIFAR-10, 16 elsewhere); step_size eps / 4
(pgd-eot); cutoff 0.25 (ours: the lowest quarter of frequencies per axis, 1/16 of the coefficients,
8 x 8 of CIFAR-10's 32 x 32; Guo et al.'s code keeps 1/8 per axis on 224-px ImageNet); headroom 2
(ours). DiffBreak has no frequency cutoff: its filters are learnt.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError
from torch import Tensor

from benchkit.attack import AttackContext, AttackResult
from benchkit.defended import DefendedModel
from benchkit.threat import L2, Linf, ThreatModel

from benchkit_attacks.losses import LOSSES, LossFn
from benchkit_attacks.params import EOTAverage, GradientMode, LossName, PGDSchedule
from benchkit_attacks.pgd import Callback, GradientAttack, Objective, _per_image, chain, pgd, reporting, with_best


def dct_matrix(n: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal DCT-II matrix C ([n, n]): C @ v is v's spectrum, C.T @ c the inverse."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(device=device, dtype=dtype)


def kept_frequencies(n: int, cutoff: float) -> int:
    """Frequencies kept along an axis of n pixels: floor(cutoff * n), at least 1 (the mean)."""
    # The epsilon absorbs float error in cutoff * n (0.29 * 100 = 28.999...).
    return max(1, min(n, math.floor(cutoff * n + 1e-9)))


class LowPass:
    """The orthogonal projector onto the lowest kept_frequencies(H) x kept_frequencies(W) DCT
    frequencies of the last two dims (every channel alike). Matrices are built per (size, device,
    dtype) on first use."""

    def __init__(self, cutoff: float):
        if not 0 < cutoff <= 1:
            raise ValueError(f"cutoff must be in (0, 1], got {cutoff}")
        self.cutoff = cutoff
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _axis(self, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        c = dct_matrix(n, dtype=torch.float64)[: kept_frequencies(n, self.cutoff)]
        # C^T diag(mask) C from the kept rows only: symmetric and idempotent (built in float64).
        return (c.T @ c).to(device=device, dtype=dtype)

    def matrices(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (h, w, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = (self._axis(h, device, dtype), self._axis(w, device, dtype))
        return self._cache[key]

    def __call__(self, d: Tensor) -> Tensor:
        a_h, a_w = self.matrices(d.shape[-2], d.shape[-1], d.device, d.dtype)
        return a_h @ d @ a_w

    def highfreq_energy_frac(self, d: Tensor) -> Tensor:
        """Per image ([B]): the share of d's energy above the cutoff (0 for a zero perturbation)."""
        total = d.flatten(1).pow(2).sum(1)
        high = (d - self(d)).flatten(1).pow(2).sum(1)
        return torch.where(total > 0, high / total.clamp_min(1e-30), torch.zeros_like(total))


class _BandLimited:
    """Mixin for a norm ball whose points are band-limited: project(x, z) = x + s P(z - x), the
    scale s <= 1 putting it inside the ball. Idempotent, and no [0, 1] clamp: the iterate is mapped
    to its example by LowFrequencyMap (a clamp here would add high frequencies to the iterate, and
    pgd() re-projects its best iterate at the end)."""

    lowpass: LowPass
    eps: float

    def project(self, x: Tensor, x_adv: Tensor) -> Tensor:
        d = self.lowpass(x_adv - x)
        flat = d.flatten(1)
        norm = flat.abs().amax(1) if isinstance(self, Linf) else flat.norm(dim=1)
        return x + d * _per_image(torch.clamp(self.eps / norm.clamp_min(1e-12), max=1.0), x)


class BandLinf(_BandLimited, Linf):
    """Linf ball of band-limited perturbations (a Linf, so pgd() steps with the sign)."""

    def __init__(self, eps: float, lowpass: LowPass):
        Linf.__init__(self, eps)
        object.__setattr__(self, "lowpass", lowpass)   # ThreatModel is a frozen dataclass


class BandL2(_BandLimited, L2):
    """L2 ball of band-limited perturbations (P then scaling is the exact projection)."""

    def __init__(self, eps: float, lowpass: LowPass):
        L2.__init__(self, eps)
        object.__setattr__(self, "lowpass", lowpass)


class LowFrequencyMap:
    """The parametrisation: iterate z = x + u (u band-limited, inside `threat`) -> its example,
    clamp(x + clip(z - x, -eps, eps), 0, 1) for Linf with headroom > 1, else clamp(z, 0, 1)."""

    def __init__(self, norm: str, eps: float, lowpass: LowPass, headroom: float = 1.0):
        if headroom < 1:
            raise ValueError(f"headroom must be >= 1, got {headroom}")
        if norm == "L2" and headroom != 1:
            raise ValueError("headroom applies to Linf only (scaling is already the exact L2 projection)")
        self.norm, self.eps, self.lowpass = norm, float(eps), lowpass
        self.threat: ThreatModel = BandLinf(eps * headroom, lowpass) if norm == "Linf" else BandL2(eps, lowpass)
        # Without headroom u is inside the eps ball by construction (up to float rounding, which the
        # host's tolerance covers): no clip, so no kink where the scaled u peaks exactly at eps.
        self.clips = norm == "Linf" and headroom > 1

    def _shift(self, x: Tensor, z: Tensor) -> Tensor:
        return x + (z - x).clamp(-self.eps, self.eps) if self.clips else z

    def example(self, x: Tensor, z: Tensor) -> Tensor:
        return self._shift(x, z).clamp(0, 1)

    def objective(self, model: DefendedModel, x: Tensor, y: Tensor, loss_fn: LossFn, eot: int,
                  average: str = "loss") -> Objective:
        """z -> (EOT loss at example(z), its gradient in the band-limited parametrisation).

        The gradient is P applied to the chain rule through the clips (torch.clamp's convention: it
        passes where the value lies inside the bounds, ends included), so for any band-limited
        direction v, <grad, v> is the directional derivative of the loss along v."""
        x = x.detach()

        def objective(z: Tensor) -> tuple[Tensor, Tensor]:
            s = self._shift(x, z)
            loss, g = model.loss_and_grad(loss_fn, s.clamp(0, 1), y, eot, average=average)
            passes = (s >= 0) & (s <= 1)
            if self.clips:
                passes &= (z - x).abs() <= self.eps
            return loss, self.lowpass(g * passes)

        return objective


class LowFreqParams(PGDSchedule):
    """Low-frequency PGD-EOT (see the module docstring for DiffBreak's LF and how ours differs)."""

    steps: int = Field(100, ge=1, description="iterations (DiffBreak LF: max_iterations 100)")
    loss: LossName = Field("cw", description="DiffBreak LF: C&W margin loss, kappa inf")
    random_start: bool = Field(False, description="DiffBreak LF starts from the clean image")
    eot_average: EOTAverage = "loss"
    gradient: GradientMode = "exact"
    cutoff: float = Field(0.25, gt=0, le=1, description=(
        "share of DCT frequencies kept per axis (floor(cutoff * side), at least 1): the perturbation "
        "lives in that top-left block of the spectrum (ours; Guo et al. 2019 keep 1/8 on ImageNet)"))
    headroom: float = Field(2.0, ge=1, description=(
        "Linf only: the band-limited perturbation may reach headroom * eps and is clipped to eps "
        "pixel-wise (flat tops); 1 keeps it exactly band-limited at the cost of budget (ours)"))

    @model_validator(mode="after")
    def _headroom_is_linf(self) -> "LowFreqParams":
        if self.norm == "L2" and self.headroom != 1 and "headroom" in self.model_fields_set:
            raise PydanticCustomError("headroom", "headroom applies to Linf only (for L2, scaling into the "
                                                  "ball is already the exact projection)")
        return self


class LowFrequency(GradientAttack):
    def __init__(self, params: LowFreqParams):
        self.params = params
        self.lowpass = LowPass(params.cutoff)
        self.map = LowFrequencyMap(params.norm, params.eps, self.lowpass,
                                   params.headroom if params.norm == "Linf" else 1.0)
        self.threat = self.map.threat
        self.gradient = params.gradient
        self.loss_fn = LOSSES[params.loss]

    def run(self, model: DefendedModel, x: Tensor, y: Tensor, ctx: AttackContext) -> AttackResult:
        m, p = self.view(model), self.params
        x = x.detach()
        best = self.selector(model, x, y, ctx)
        inner = chain(best, self.callback, reporting(ctx, p))
        # pgd()'s iterate is z = x + u; observers get the example whose loss was computed.
        callback: Callback | None = None if inner is None else (
            lambda step, z, loss, grad: inner(step, self.map.example(x, z), loss, grad))
        out = pgd(self.map.objective(m, x, y, self.loss_fn, p.eot, p.eot_average), x, self.threat,
                  steps=p.steps, step_size=p.resolved_step(), noise=ctx.noise, restarts=p.restarts,
                  random_init=p.random_start, callback=callback)
        result = with_best(AttackResult(self.map.example(x, out.x_adv), stats=out.stats), best)
        frac = self.lowpass.highfreq_energy_frac(result.x_adv - x)
        result.stats = result.stats | {"highfreq_energy_frac": float(frac.mean())}
        return result


def make_lowfreq(params: LowFreqParams) -> LowFrequency:
    return LowFrequency(params)
