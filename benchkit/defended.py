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

from typing import Callable, Iterable, Iterator, TypeVar

import torch
from torch import Tensor, nn

from benchkit.memory import Limits, in_halves
from benchkit.noise import GLOBAL_NOISE, ImageStreams, Noise

T = TypeVar("T")

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

    Out of memory (benchkit.memory): a chunk of k EOT copies that runs out of memory runs as two
    chunks of half the copies, each bound to its own copy indices, and one copy of the batch as two
    halves of its rows, each row bound to its own stream; `limits`, shared by every view of the
    model, keeps the smaller pass (max_batch) for the rest of the run. Only where the same noise can
    be drawn again (ImageStreams, or a deterministic purifier); elsewhere the error is raised, and
    the host splits the attack's images instead (benchkit.evaluate.run_attack).
    """

    def __init__(self, classifier: nn.Module, purifier: Purifier | None = None, *,
                 gradient: str = "exact", max_batch: int = 256, noise: Noise | None = None,
                 limits: Limits | None = None):
        super().__init__()
        self.classifier = classifier
        self.purifier = purifier if purifier is not None else Identity()
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode {gradient!r}; expected one of {GRADIENT_MODES}")
        if gradient not in supported_modes(self.purifier):
            raise ValueError(f"{type(self.purifier).__name__} does not support gradient mode {gradient!r} "
                             f"(supports {supported_modes(self.purifier)})")
        self.gradient = gradient
        self._max_batch = max_batch
        self.noise = noise
        self.limits = limits if limits is not None else Limits()

    @property
    def max_batch(self) -> int:
        """Rows per EOT pass: the configured bound, lowered once a pass has run out of memory."""
        return self.limits.cap("eot_rows", self._max_batch)

    @property
    def stochastic(self) -> bool:
        return bool(self.purifier.stochastic)

    def _view(self, **changes) -> "DefendedModel":
        kw = dict(classifier=self.classifier, purifier=self.purifier, gradient=self.gradient,
                  max_batch=self._max_batch, noise=self.noise, limits=self.limits) | changes
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

    def _replayable(self, noise: Noise | None) -> bool:
        """Whether a pass run again draws the same noise (what splitting a pass needs)."""
        return isinstance(noise, ImageStreams) or not self.stochastic

    def _shrink(self, rows_per_unit: int):
        """in_halves' record of a split pass, in rows."""
        return lambda tried, to: self.limits.shrink("eot_rows", tried * rows_per_unit, to * rows_per_unit)

    def _pass(self, x: Tensor, keys, noise: Noise | None, start: int, k: int, gradient: str) -> tuple[Tensor, Tensor]:
        """(purified, logits) of k stacked copies of x (repeat-major), copies start..start+k-1. One
        copy whose rows do not fit runs in parts of its rows, concatenated."""
        if k == 1 and self._replayable(noise):
            parts = [out for _, _, out in in_halves(lambda lo, hi: self._rows(x, keys, noise, start, lo, hi, gradient),
                                                    0, x.shape[0], self._shrink(1), most=lambda: self.limits.eot_rows)]
            if len(parts) == 1:
                return parts[0]
            return torch.cat([p for p, _ in parts]), torch.cat([lg for _, lg in parts])
        purified = self.purifier.purify(self._stacked(x, keys, noise, start, k), gradient=gradient, noise=noise)
        return purified, self.classifier(purified)

    def _rows(self, x: Tensor, keys, noise: Noise | None, copy: int, lo: int, hi: int,
              gradient: str) -> tuple[Tensor, Tensor]:
        """(purified, logits) of rows lo..hi-1 of EOT copy `copy` of x, each row on its own stream."""
        if isinstance(noise, ImageStreams):
            noise.bind(keys[lo:hi], range(copy, copy + 1))
        purified = self.purifier.purify(x if hi - lo == x.shape[0] else x[lo:hi], gradient=gradient, noise=noise)
        return purified, self.classifier(purified)

    def _copies(self, x: Tensor, keys, noise: Noise | None, start: int, k: int) -> Tensor:
        """Logits of k stacked copies of x (repeat-major), copies start..start+k-1 of its EOT samples."""
        return self._pass(x, keys, noise, start, k, self.gradient)[1]

    def _open(self, x: Tensor, noise: Noise | None):
        noise = noise or self.noise
        return noise, (noise.open(x) if isinstance(noise, ImageStreams) else None)

    def forward(self, x: Tensor, *, noise: Noise | None = None) -> Tensor:
        noise, keys = self._open(x, noise)
        return self._copies(x, keys, noise, 0, 1)

    def _per_pass(self, batch: int) -> int:
        """Whole copies of a batch of `batch` rows per forward pass (at least one)."""
        return max(1, self.max_batch // max(1, batch))

    def chunk_sizes(self, batch: int, n: int) -> list[int]:
        """EOT sample counts per forward pass: as many whole copies of the batch as fit max_batch."""
        per = self._per_pass(batch)
        sizes = [per] * (n // per)
        if n % per:
            sizes.append(n % per)
        return sizes

    def eot_passes(self, x: Tensor, n: int, run: Callable[[int, int], T], noise: Noise | None = None
                   ) -> Iterator[tuple[int, int, T]]:
        """(start, stop, run(start, stop)) per pass over EOT copies start..stop-1 of n copies of x,
        chunked as chunk_sizes, each pass sized as it starts (after a split: the remembered size); a
        pass that runs out of memory runs as its two halves when its noise (default: the model's) can
        be drawn again. For an attack's own EOT loop, so that it backs off as the model's does."""
        noise = noise or self.noise
        b = x.shape[0]
        return in_halves(run, 0, n, self._shrink(b), most=lambda: self._per_pass(b), split=self._replayable(noise))

    def expectation(self, loss_fn: LossFn, x: Tensor, y: Tensor, n: int, *, noise: Noise | None = None) -> Tensor:
        """Mean over n EOT samples of loss_fn(logits, y) per example ([B]); differentiable in x.

        loss_fn must return one value per row (reduction='none'). Samples run as few large batches.
        """
        total = x.new_zeros(x.shape[0])
        n_eff = n if self.stochastic else 1
        noise, keys = self._open(x, noise)

        def run(start: int, stop: int) -> Tensor:
            k = stop - start
            return loss_fn(self._copies(x, keys, noise, start, k), y.repeat(k)).view(k, -1).sum(0)

        for _, _, part in self.eot_passes(x, n_eff, run, noise):
            total = total + part
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
        return self._eot_grad(lambda xk, keys, noise, start, k: loss_fn(self._copies(xk, keys, noise, start, k),
                                                                        y.repeat(k)), x, n, noise)

    def eot_loss_and_grad(self, row_loss: Callable[[Tensor, Noise | None], Tensor], x: Tensor, n: int, *,
                          noise: Noise | None = None) -> tuple[Tensor, Tensor]:
        """The mean over n EOT samples of any per-row loss of stacked copies of x and its gradient
        w.r.t. x: row_loss(x_copies, noise) gets k copies of the batch (repeat-major) and the noise bound
        to them, and returns one value per row (e.g. a loss on the purifier's intermediate states).
        One backward per chunk, so memory is bounded by the chunk, not by n. row_loss always sees
        whole copies: one copy that runs out of memory is raised, not split into rows."""
        return self._eot_grad(lambda xk, keys, noise, start, k: row_loss(self._stacked(xk, keys, noise, start, k),
                                                                         noise), x, n, noise)

    def _eot_grad(self, loss_of, x: Tensor, n: int, noise: Noise | None) -> tuple[Tensor, Tensor]:
        """The mean over n EOT samples of loss_of(x_leaf, keys, noise, start, k) (one value per row of
        copies start..start+k-1 of x) and its gradient w.r.t. x, one backward per chunk."""
        x = x.detach()
        n_eff = n if self.stochastic else 1
        loss_total = x.new_zeros(x.shape[0])
        grad_total = torch.zeros_like(x)
        noise, keys = self._open(x, noise)

        def run(start: int, stop: int) -> tuple[Tensor, Tensor]:
            xk = x.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = loss_of(xk, keys, noise, start, stop - start)
                (g,) = torch.autograd.grad(loss.sum(), xk)
            return loss.detach().view(stop - start, -1).sum(0), g

        for _, _, (loss, g) in self.eot_passes(x, n_eff, run, noise):
            loss_total += loss
            grad_total += g
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
        bpda = self.gradient == "bpda"
        if not self._replayable(noise) and not bpda:   # no way to redraw the same noise: one pass
            xk = x.clone().requires_grad_(True)
            with torch.enable_grad():
                logits = self._copies(xk, keys, noise, 0, n_eff)
                loss = loss_fn(logits.view(n_eff, x.shape[0], -1).mean(0), y)
                (g,) = torch.autograd.grad(loss.sum(), xk)
            return loss.detach(), g
        chunks = list(self._sample_chunks(x, noise, keys, n_eff, keep=bpda))
        z_bar = (self._summed_logits(chunks) / n_eff).requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(z_bar, y)
            (upstream,) = torch.autograd.grad(loss.sum(), z_bar)
        upstream = upstream / n_eff
        b, grad = x.shape[0], torch.zeros_like(x)
        for first, last, kept, _ in chunks:
            def run(start: int, stop: int, first: int = first, kept: Tensor | None = kept) -> Tensor:
                k = stop - start
                with torch.enable_grad():
                    if bpda:   # copies start..stop-1 of the first pass's chunk first..last-1
                        inp = kept[(start - first) * b:(stop - first) * b].detach().requires_grad_(True)
                        logits = self.classifier(inp)
                    else:
                        inp = x.clone().requires_grad_(True)
                        logits = self._copies(inp, keys, noise, start, k)
                    (g,) = torch.autograd.grad(logits, inp, grad_outputs=upstream.repeat(k, 1))
                return g.view(k, *x.shape).sum(0) if bpda else g

            for _, _, g in in_halves(run, first, last, self._shrink(b)):
                grad += g
        return loss.detach(), grad

    @torch.no_grad()
    def _sample_chunks(self, x: Tensor, noise: Noise | None, keys, n: int, keep: bool = False):
        """(start, stop, purified [k B, ...] with keep else None, logits [k, B, classes]) per chunk
        of EOT copies start..stop-1 of n, no graph."""
        def run(start: int, stop: int):
            purified, logits = self._pass(x, keys, noise, start, stop - start, "none")
            return (purified if keep else None), logits.view(stop - start, x.shape[0], -1)

        for start, stop, (purified, logits) in self.eot_passes(x, n, run, noise):
            yield start, stop, purified, logits

    @staticmethod
    def _summed_logits(chunks) -> Tensor:
        """The logits of _sample_chunks' chunks summed over their EOT samples ([B, classes])."""
        total = None
        for *_, logits in chunks:
            total = logits.sum(0) if total is None else total + logits.sum(0)
        return total

    @torch.no_grad()
    def mean_logits(self, x: Tensor, n: int, *, noise: Noise | None = None) -> Tensor:
        """[B, classes] logits averaged over n purifications (one for a deterministic defense),
        drawn like EOT samples, no gradient."""
        n_eff = n if self.stochastic else 1
        noise, keys = self._open(x, noise)
        return self._summed_logits(self._sample_chunks(x, noise, keys, n_eff)) / n_eff

    @torch.no_grad()
    def sample_logits(self, x: Tensor, n: int, *, noise: Noise | None = None) -> Tensor:
        """[n, B, classes]: the logits of n purifications of x (one for a deterministic defense),
        drawn like EOT samples in large batches, no gradient."""
        n_eff = n if self.stochastic else 1
        noise, keys = self._open(x, noise)
        return torch.cat([lg for *_, lg in self._sample_chunks(x, noise, keys, n_eff)])

    @torch.no_grad()
    def logits(self, x: Tensor, *, noise: Noise | None = None) -> Tensor:
        """Logits of one stochastic draw, no gradient machinery."""
        noise, keys = self._open(x, noise)
        return self._pass(x, keys, noise, 0, 1, "none")[1]

    def predict(self, x: Tensor, *, noise: Noise | None = None) -> Tensor:
        """Predicted labels, one stochastic draw."""
        return self.logits(x, noise=noise).argmax(1)
