"""DefendedModel = classifier o purifier: what every attack receives.

Gradient modes:
  exact    backpropagation through the purifier (checkpointed solvers keep memory bounded)
  adjoint  the purifier's adjoint method (torchsde), as DiffPure evaluates itself
  bpda     forward through the purifier, identity backward (Athalye et al. 2018)
  none     no gradient through the purifier at all (the input gets none either)

A purifier declares in `gradient_modes` the modes its `_purify` implements (exact, adjoint). The
host derives bpda and none from any forward pass, so every purifier supports them whatever it
declares: `supported_modes` is the one place that says which modes a purifier offers.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from benchkit.noise import GLOBAL_NOISE, ImageStreams, Noise

GRADIENT_MODES = ("exact", "adjoint", "bpda", "none")
# Modes the host derives from a forward pass without gradient (Purifier.purify): always available.
HOST_MODES = ("bpda", "none")


def supported_modes(source: "Purifier | Iterable[str]") -> tuple[str, ...]:
    """The gradient modes a purifier (or a declaration of modes) offers: the declared ones plus
    bpda and none, in GRADIENT_MODES order. Unknown names are left out (see unknown_modes)."""
    declared = set(source.gradient_modes if isinstance(source, Purifier) else source) | set(HOST_MODES)
    return tuple(m for m in GRADIENT_MODES if m in declared)


def unknown_modes(declared: Iterable[str]) -> list[str]:
    """Declared names that are no gradient mode (a plugin's typo would otherwise vanish silently)."""
    return [m for m in declared if m not in GRADIENT_MODES]


class Purifier(nn.Module):
    """Base class of defenses: `purify(x)` maps [0,1] images to [0,1] images.

    Subclasses implement `_purify(x, *, gradient, noise)` and list in `gradient_modes` the modes it
    implements: exact (autograd through `_purify`) and/or adjoint. bpda and none need nothing from
    the subclass: the host runs `_purify(x, gradient="none")` without a graph for both (see
    `supported_modes`); listing them is harmless.
    """

    stochastic: bool = False
    gradient_modes: tuple[str, ...] = ("exact",)

    def purify(self, x: Tensor, *, gradient: str = "exact", noise: Noise | None = None) -> Tensor:
        if gradient not in supported_modes(self):
            raise ValueError(f"{type(self).__name__} supports gradient modes {supported_modes(self)}, not {gradient!r}")
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

    gradient_modes = ("exact", "adjoint")

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:
        return x

    def surrogate(self, kind: str, **options) -> "Identity":
        """Nothing is cheaper than no purifier: any surrogate an attack asks for is the identity."""
        return self


def default_gradient(purifier: Purifier) -> str:
    """The mode attacks see when neither they nor the suite choose one: the truest the purifier offers."""
    return next(m for m in GRADIENT_MODES if m in supported_modes(purifier))


LossFn = Callable[[Tensor, Tensor], Tensor]


class DefendedModel(nn.Module):
    """classifier(purifier(x)) with a chosen gradient mode and batched EOT.

    `noise` is where the purifier's randomness comes from when a call passes none: the global RNG
    by default; while an attack runs, the host's per-image `ImageStreams` (see `for_images`).
    """

    def __init__(self, classifier: nn.Module, purifier: Purifier | None = None, *,
                 gradient: str = "exact", max_batch: int = 256, noise: Noise | None = None):
        super().__init__()
        self.classifier = classifier
        self.purifier = purifier if purifier is not None else Identity()
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode {gradient!r}; expected one of {GRADIENT_MODES}")
        if gradient not in supported_modes(self.purifier):
            raise ValueError(f"{type(self.purifier).__name__} does not support gradient mode {gradient!r} "
                             f"(supports {supported_modes(self.purifier)})")
        self.gradient = gradient
        self.max_batch = max_batch
        self.noise = noise

    @property
    def stochastic(self) -> bool:
        return bool(self.purifier.stochastic)

    def _view(self, **changes) -> "DefendedModel":
        kw = dict(classifier=self.classifier, purifier=self.purifier, gradient=self.gradient,
                  max_batch=self.max_batch, noise=self.noise) | changes
        return DefendedModel(kw.pop("classifier"), kw.pop("purifier"), **kw)

    def with_gradient(self, gradient: str) -> "DefendedModel":
        """The same defended model seen through another gradient mode (shares all modules and noise)."""
        return self._view(gradient=gradient)

    def with_classifier(self, classifier: nn.Module) -> "DefendedModel":
        """The same purifier, gradient mode and noise in front of another head (e.g. a loss on the
        purified image itself)."""
        return self._view(classifier=classifier)

    def with_purifier(self, purifier: Purifier) -> "DefendedModel":
        """Another purifier (e.g. the defense's cheaper surrogate) in front of the same classifier,
        with the same noise; its own gradient modes decide whether this model's mode carries over."""
        gradient = self.gradient if self.gradient in supported_modes(purifier) else "exact"
        return self._view(purifier=purifier, gradient=gradient)

    def for_images(self, x: Tensor, seeds: list[int]) -> "DefendedModel":
        """This model with one noise stream per image of x (seeded by `seeds`), whatever rows, copies
        or subsets of x it is later called on."""
        return self._view(noise=ImageStreams(x, seeds))

    def purify(self, x: Tensor, *, noise: Noise | None = None, gradient: str | None = None) -> Tensor:
        noise = noise or self.noise
        if isinstance(noise, ImageStreams):
            noise.bind(noise.open(x), range(1))
        return self.purifier.purify(x, gradient=gradient or self.gradient, noise=noise)

    @staticmethod
    def _stacked(x: Tensor, keys, noise: Noise | None, start: int, k: int) -> Tensor:
        """k stacked copies of x (repeat-major), the noise bound to its EOT samples start..start+k-1."""
        if isinstance(noise, ImageStreams):
            noise.bind(keys, range(start, start + k))
        return x.repeat(k, *([1] * (x.dim() - 1))) if k > 1 else x

    def _copies(self, x: Tensor, keys, noise: Noise | None, start: int, k: int) -> Tensor:
        """Logits of k stacked copies of x (repeat-major), copies start..start+k-1 of its EOT samples."""
        xr = self._stacked(x, keys, noise, start, k)
        return self.classifier(self.purifier.purify(xr, gradient=self.gradient, noise=noise))

    def _open(self, x: Tensor, noise: Noise | None):
        noise = noise or self.noise
        return noise, (noise.open(x) if isinstance(noise, ImageStreams) else None)

    def forward(self, x: Tensor, *, noise: Noise | None = None) -> Tensor:
        noise, keys = self._open(x, noise)
        return self._copies(x, keys, noise, 0, 1)

    def chunk_sizes(self, batch: int, n: int) -> list[int]:
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
        n_eff = n if self.stochastic else 1
        noise, keys = self._open(x, noise)
        start = 0
        for k in self.chunk_sizes(x.shape[0], n_eff):
            logits = self._copies(x, keys, noise, start, k)
            total = total + loss_fn(logits, y.repeat(k)).view(k, -1).sum(0)
            start += k
        return total / n_eff

    def loss_and_grad(self, loss_fn: LossFn, x: Tensor, y: Tensor, n: int, *,
                      noise: Noise | None = None, average: str = "loss") -> tuple[Tensor, Tensor]:
        """EOT-averaged loss per example and its gradient w.r.t. x, one backward per chunk so
        memory is bounded by the chunk, not by n.

        average "loss": the mean over the n samples of loss_fn(logits_s, y); "logits": loss_fn of
        the samples' mean logits (Hill et al.'s BPDA+EOT code, as DiffPure's BPDA evaluation runs it).
        """
        if average == "logits":
            return self._mean_logits_loss_and_grad(loss_fn, x, y, n, noise)
        if average != "loss":
            raise ValueError(f"average must be 'loss' or 'logits', not {average!r}")
        b = x.shape[0]
        return self.eot_loss_and_grad(
            lambda xr, noise: loss_fn(self.classifier(self.purifier.purify(xr, gradient=self.gradient, noise=noise)),
                                      y.repeat(xr.shape[0] // b)), x, n, noise=noise)

    def eot_loss_and_grad(self, row_loss: Callable[[Tensor, Noise | None], Tensor], x: Tensor, n: int, *,
                          noise: Noise | None = None) -> tuple[Tensor, Tensor]:
        """The mean over n EOT samples of any per-row loss of stacked copies of x and its gradient
        w.r.t. x: row_loss(x_copies, noise) gets k copies of the batch (repeat-major) and the noise bound
        to them, and returns one value per row (e.g. a loss on the purifier's intermediate states).
        One backward per chunk, so memory is bounded by the chunk, not by n."""
        x = x.detach()
        n_eff = n if self.stochastic else 1
        loss_total = x.new_zeros(x.shape[0])
        grad_total = torch.zeros_like(x)
        noise, keys = self._open(x, noise)
        start = 0
        for k in self.chunk_sizes(x.shape[0], n_eff):
            xk = x.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = row_loss(self._stacked(xk, keys, noise, start, k), noise)
                (g,) = torch.autograd.grad(loss.sum(), xk)
            loss_total += loss.detach().view(k, -1).sum(0)
            grad_total += g
            start += k
        return loss_total / n_eff, grad_total / n_eff

    def _mean_logits_loss_and_grad(self, loss_fn: LossFn, x: Tensor, y: Tensor, n: int,
                                   noise: Noise | None) -> tuple[Tensor, Tensor]:
        """L = loss_fn(mean_s z_s, y) and dL/dx = sum_s J_s^T (dL/dz_bar) / n in two passes over the
        chunks: the mean logits without graphs, then one backward per chunk with that upstream
        gradient. The second pass replays the first one's purifications: ImageStreams re-bound to
        the same rows draw the same noise, and under bpda the purified images are kept instead
        (the identity backward needs only the classifier at them)."""
        x = x.detach()
        n_eff = n if self.stochastic else 1
        noise, keys = self._open(x, noise)
        replayable = isinstance(noise, ImageStreams) or not self.stochastic
        if not replayable and self.gradient != "bpda":   # no way to redraw the same noise: one pass
            xk = x.clone().requires_grad_(True)
            with torch.enable_grad():
                logits = self._copies(xk, keys, noise, 0, n_eff)
                loss = loss_fn(logits.view(n_eff, x.shape[0], -1).mean(0), y)
                (g,) = torch.autograd.grad(loss.sum(), xk)
            return loss.detach(), g
        sizes = self.chunk_sizes(x.shape[0], n_eff)
        total, kept = self._summed_logits(x, noise, keys, sizes, keep=self.gradient == "bpda")
        z_bar = (total / n_eff).requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(z_bar, y)
            (upstream,) = torch.autograd.grad(loss.sum(), z_bar)
        upstream = upstream / n_eff
        grad, start = torch.zeros_like(x), 0
        for c, k in enumerate(sizes):
            with torch.enable_grad():
                if self.gradient == "bpda":
                    inp = kept[c].requires_grad_(True)
                    logits = self.classifier(inp)
                else:
                    inp = x.clone().requires_grad_(True)
                    logits = self._copies(inp, keys, noise, start, k)
                (g,) = torch.autograd.grad(logits, inp, grad_outputs=upstream.repeat(k, 1))
            grad += g.view(k, *x.shape).sum(0) if self.gradient == "bpda" else g
            start += k
        return loss.detach(), grad

    @torch.no_grad()
    def _sample_chunks(self, x: Tensor, noise: Noise | None, keys, sizes: list[int]):
        """(purified [k B, ...], logits [k, B, classes]) per chunk of `sizes` EOT copies, no graph."""
        start = 0
        for k in sizes:
            purified = self.purifier.purify(self._stacked(x, keys, noise, start, k), gradient="none", noise=noise)
            yield purified, self.classifier(purified).view(k, x.shape[0], -1)
            start += k

    def _summed_logits(self, x: Tensor, noise: Noise | None, keys, sizes: list[int],
                       keep: bool = False) -> tuple[Tensor, list[Tensor]]:
        """The logits summed over sum(sizes) EOT samples drawn in chunks of `sizes` copies ([B,
        classes], no graph), and with keep the purified chunks too."""
        total, kept = None, []
        for purified, logits in self._sample_chunks(x, noise, keys, sizes):
            if keep:
                kept.append(purified)
            total = logits.sum(0) if total is None else total + logits.sum(0)
        return total, kept

    @torch.no_grad()
    def mean_logits(self, x: Tensor, n: int, *, noise: Noise | None = None) -> Tensor:
        """[B, classes] logits averaged over n purifications (one for a deterministic defense),
        drawn like EOT samples, no gradient."""
        n_eff = n if self.stochastic else 1
        noise, keys = self._open(x, noise)
        return self._summed_logits(x, noise, keys, self.chunk_sizes(x.shape[0], n_eff))[0] / n_eff

    @torch.no_grad()
    def sample_logits(self, x: Tensor, n: int, *, noise: Noise | None = None) -> Tensor:
        """[n, B, classes]: the logits of n purifications of x (one for a deterministic defense),
        drawn like EOT samples in large batches, no gradient."""
        n_eff = n if self.stochastic else 1
        noise, keys = self._open(x, noise)
        return torch.cat([lg for _, lg in self._sample_chunks(x, noise, keys, self.chunk_sizes(x.shape[0], n_eff))])

    @torch.no_grad()
    def logits(self, x: Tensor, *, noise: Noise | None = None) -> Tensor:
        """Logits of one stochastic draw, no gradient machinery."""
        noise, keys = self._open(x, noise)
        if keys is not None:
            noise.bind(keys, range(1))
        return self.classifier(self.purifier.purify(x, gradient="none", noise=noise))

    def predict(self, x: Tensor, *, noise: Noise | None = None) -> Tensor:
        """Predicted labels, one stochastic draw."""
        return self.logits(x, noise=noise).argmax(1)
