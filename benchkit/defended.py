"""DefendedModel = classifier o purifier: what every attack receives.

Gradient modes (the purifier declares which it supports):
  exact    backpropagation through the purifier (checkpointed solvers keep memory bounded)
  adjoint  the purifier's adjoint method (torchsde), as DiffPure evaluates itself
  bpda     forward through the purifier, identity backward (Athalye et al. 2018)
  none     no gradient through the purifier at all (the input gets none either)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from benchkit.noise import GLOBAL_NOISE, Noise

GRADIENT_MODES = ("exact", "adjoint", "bpda", "none")


class Purifier(nn.Module):
    """Base class of defenses: `purify(x)` maps [0,1] images to [0,1] images.

    Subclasses implement `_purify(x, gradient, noise)` for the modes they list in
    `gradient_modes` other than bpda/none, which the host derives generically.
    """

    stochastic: bool = False
    gradient_modes: tuple[str, ...] = ("exact", "bpda", "none")

    def purify(self, x: Tensor, *, gradient: str = "exact", noise: Noise | None = None) -> Tensor:
        if gradient not in self.gradient_modes:
            raise ValueError(f"{type(self).__name__} supports gradient modes {self.gradient_modes}, not {gradient!r}")
        noise = noise or GLOBAL_NOISE
        if gradient in ("bpda", "none"):
            with torch.no_grad():
                out = self._purify(x.detach(), gradient="none", noise=noise)
            # Straight-through: the value of the purified image, the gradient of the identity.
            return x + (out - x).detach() if gradient == "bpda" else out
        return self._purify(x, gradient=gradient, noise=noise)

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.purify(x)


class Identity(Purifier):
    """No defense: the 'static' undefended classifier of the paper's tables. Every gradient mode
    is the true gradient here, so attacks configured for adjoint gradients run unchanged."""

    gradient_modes = ("exact", "adjoint", "bpda", "none")

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:
        return x


LossFn = Callable[[Tensor, Tensor], Tensor]


class DefendedModel(nn.Module):
    """classifier(purifier(x)) with a chosen gradient mode and batched EOT."""

    def __init__(self, classifier: nn.Module, purifier: Purifier | None = None, *,
                 gradient: str = "exact", max_batch: int = 256):
        super().__init__()
        self.classifier = classifier
        self.purifier = purifier if purifier is not None else Identity()
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode {gradient!r}; expected one of {GRADIENT_MODES}")
        if gradient not in self.purifier.gradient_modes:
            raise ValueError(f"{type(self.purifier).__name__} does not support gradient mode {gradient!r} "
                             f"(supports {self.purifier.gradient_modes})")
        self.gradient = gradient
        self.max_batch = max_batch

    @property
    def stochastic(self) -> bool:
        return bool(self.purifier.stochastic)

    def purify(self, x: Tensor, *, noise: Noise | None = None, gradient: str | None = None) -> Tensor:
        return self.purifier.purify(x, gradient=gradient or self.gradient, noise=noise)

    def forward(self, x: Tensor, *, noise: Noise | None = None) -> Tensor:
        return self.classifier(self.purify(x, noise=noise))

    def with_gradient(self, gradient: str) -> "DefendedModel":
        """The same defended model seen through another gradient mode (shares all modules)."""
        return DefendedModel(self.classifier, self.purifier, gradient=gradient, max_batch=self.max_batch)

    def _chunks(self, batch: int, n: int) -> list[int]:
        """EOT sample counts per forward pass: as many whole copies of the batch as fit max_batch."""
        per = max(1, self.max_batch // max(1, batch))
        sizes = [per] * (n // per)
        if n % per:
            sizes.append(n % per)
        return sizes

    def expectation(self, loss_fn: LossFn, x: Tensor, y: Tensor, n: int, *, noise: Noise | None = None) -> Tensor:
        """Mean over n EOT samples of loss_fn(logits, y) per example ([B]); differentiable in x.

        loss_fn must return one value per row (reduction='none'). Samples run as few large batches.
        """
        total = x.new_zeros(x.shape[0])
        if not self.stochastic:
            n_eff, scale = 1, 1.0
        else:
            n_eff, scale = n, 1.0 / n
        for k in self._chunks(x.shape[0], n_eff):
            logits = self(x.repeat(k, *([1] * (x.dim() - 1))), noise=noise)
            total = total + loss_fn(logits, y.repeat(k)).view(k, -1).sum(0)
        return total * scale

    def loss_and_grad(self, loss_fn: LossFn, x: Tensor, y: Tensor, n: int, *,
                      noise: Noise | None = None) -> tuple[Tensor, Tensor]:
        """EOT-averaged loss per example and its gradient w.r.t. x, one backward per chunk so
        memory is bounded by the chunk, not by n."""
        x = x.detach()
        n_eff = n if self.stochastic else 1
        loss_total = x.new_zeros(x.shape[0])
        grad_total = torch.zeros_like(x)
        for k in self._chunks(x.shape[0], n_eff):
            xr = x.repeat(k, *([1] * (x.dim() - 1))).requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(self(xr, noise=noise), y.repeat(k))
                (g,) = torch.autograd.grad(loss.sum(), xr)
            loss_total += loss.detach().view(k, -1).sum(0)
            grad_total += g.view(k, *x.shape).sum(0)
        return loss_total / n_eff, grad_total / n_eff

    @torch.no_grad()
    def predict(self, x: Tensor, *, noise: Noise | None = None) -> Tensor:
        """Predicted labels, one stochastic draw, no gradient machinery."""
        return self.classifier(self.purifier.purify(x, gradient="none", noise=noise)).argmax(1)
