"""Threat models: what an adversarial example may be. The host verifies, never clips silently."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Float slack for budgets: attacks compute in float32, so an exact-budget example may exceed eps
# by a few ulps after projection. Anything beyond this is a violation.
TOLERANCE = 1e-5


@dataclass(frozen=True)
class ThreatModel:
    name: str
    eps: float

    def distance(self, x: Tensor, x_adv: Tensor, extra: dict | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def project(self, x: Tensor, x_adv: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def violations(self, x: Tensor, x_adv: Tensor, extra: dict | None = None) -> list[str]:
        """Reasons the examples are not valid; empty when every example is inside the threat model."""
        problems = []
        if x_adv.shape != x.shape:
            return [f"adversarial batch has shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}"]
        bad = ~torch.isfinite(x_adv).flatten(1).all(1)
        if bad.any():
            problems.append(f"{int(bad.sum())} example(s) contain NaN or inf")
            return problems
        lo, hi = float(x_adv.min()), float(x_adv.max())
        if lo < -TOLERANCE or hi > 1 + TOLERANCE:
            problems.append(f"values outside [0, 1] (min {lo:.6g}, max {hi:.6g})")
        d = self.distance(x, x_adv, extra)
        over = d > self.eps * (1 + TOLERANCE) + TOLERANCE
        if over.any():
            problems.append(f"{int(over.sum())} example(s) exceed {self.name} eps={self.eps:.6g} "
                            f"(max {float(d.max()):.6g})")
        return problems


class Linf(ThreatModel):
    def __init__(self, eps: float):
        super().__init__("Linf", float(eps))

    def distance(self, x, x_adv, extra=None):
        return (x_adv - x).flatten(1).abs().amax(1)

    def project(self, x, x_adv):
        return torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0, 1)


class L2(ThreatModel):
    def __init__(self, eps: float):
        super().__init__("L2", float(eps))

    def distance(self, x, x_adv, extra=None):
        return (x_adv - x).flatten(1).norm(dim=1)

    def project(self, x, x_adv):
        delta = x_adv - x
        norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        return (x + delta * torch.clamp(self.eps / norm, max=1.0)).clamp(0, 1)


def warp(x: Tensor, flow: Tensor) -> Tensor:
    """Bilinear resampling of x at positions displaced by flow ([B, 2, H, W]; channel 0 horizontal,
    channel 1 vertical), in grid_sample's normalised coordinates where the image spans [-1, 1]: a
    bound of 0.05 moves a pixel by at most 0.05 * (W - 1) / 2 pixels, whatever the resolution
    (the convention of perceptual-advex's StAdv that DiffPure evaluates with)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device)
    xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx + flow[:, 0], gy + flow[:, 1]], dim=-1)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


class StAdvFlow(ThreatModel):
    """Spatial flow bounded in Linf by `eps` (normalised coordinates, see `warp`). The attack
    returns its flow as extra["flow"]; the adversarial image must be the clean image warped by it."""

    def __init__(self, eps: float):
        super().__init__("StAdv", float(eps))

    def distance(self, x, x_adv, extra=None):
        if not extra or "flow" not in extra:
            return torch.full((x.shape[0],), float("inf"), device=x.device)
        return extra["flow"].flatten(1).abs().amax(1)

    def project(self, x, x_adv):  # pragma: no cover - flows are projected by the attack itself
        raise NotImplementedError("StAdv examples are projected in flow space")

    def violations(self, x, x_adv, extra=None):
        problems = super().violations(x, x_adv, extra)
        if extra and "flow" in extra and not problems:
            rewarp = warp(x, extra["flow"].to(x))
            err = float((rewarp - x_adv).abs().max())
            if err > 1e-4:
                problems.append(f"adversarial images differ from the clean images warped by their flow "
                                f"(max {err:.3g})")
        return problems


def make_threat(norm: str, eps: float) -> ThreatModel:
    return {"Linf": Linf, "L2": L2, "StAdv": StAdvFlow}[norm](eps)
