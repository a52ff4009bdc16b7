"""DefendedModel: gradient modes, batched EOT equals the sequential mean, per-image noise."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from benchkit.defended import DefendedModel, Identity, Purifier
from benchkit.noise import PerExampleNoise, derive_seed


class AddNoise(Purifier):
    """x + sigma z: a stochastic purifier simple enough to compute by hand."""
    stochastic = True
    gradient_modes = ("exact", "bpda", "none")

    def __init__(self, sigma=0.3):
        super().__init__()
        self.sigma = sigma

    def _purify(self, x, *, gradient, noise):
        return x + self.sigma * noise.randn_like(x)


class Square(Purifier):
    gradient_modes = ("exact", "bpda", "none")

    def _purify(self, x, *, gradient, noise):
        return x**2


def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def ce(logits, y):
    return nn.functional.cross_entropy(logits, y, reduction="none")


def test_expectation_batches_equal_sequential_mean():
    clf, x, y = linear(), torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    model = DefendedModel(clf, AddNoise(), max_batch=10)  # 2 EOT copies per pass, n=7 -> 4 passes
    assert model.chunk_sizes(5, 7) == [2, 2, 2, 1]
    seeds = [derive_seed("t", i) for i in range(5)]
    batched = model.expectation(ce, x, y, 7, noise=PerExampleNoise(seeds))
    noise = PerExampleNoise(seeds)
    sequential = torch.stack([ce(model(x, noise=noise), y) for _ in range(7)]).mean(0)
    assert torch.allclose(batched, sequential, atol=1e-6)


def test_loss_and_grad_matches_autograd_of_expectation():
    clf, x, y = linear(), torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])
    model = DefendedModel(clf, AddNoise(), max_batch=6)
    seeds = [1, 2, 3]
    loss, grad = model.loss_and_grad(ce, x, y, 5, noise=PerExampleNoise(seeds))
    xr = x.clone().requires_grad_(True)
    ref = model.expectation(ce, xr, y, 5, noise=PerExampleNoise(seeds))
    (g_ref,) = torch.autograd.grad(ref.sum(), xr)
    assert torch.allclose(loss, ref.detach(), atol=1e-6) and torch.allclose(grad, g_ref, atol=1e-6)


def test_gradient_modes():
    clf, x, y = linear(), torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    exact = DefendedModel(clf, Square(), gradient="exact")
    bpda = exact.with_gradient("bpda")
    _, g_exact = exact.loss_and_grad(ce, x, y, 1)
    _, g_bpda = bpda.loss_and_grad(ce, x, y, 1)
    # d/dx of clf(x^2) is 2x * (clf grad at x^2); BPDA drops the 2x factor.
    assert torch.allclose(g_exact, 2 * x * g_bpda, atol=1e-6)
    assert torch.allclose(bpda(x), exact(x))
    none = exact.with_gradient("none")
    xr = x.clone().requires_grad_(True)
    assert not none(xr).requires_grad or torch.autograd.grad(none(xr).sum(), xr, allow_unused=True)[0] is None
    with pytest.raises(ValueError, match="does not support gradient mode 'adjoint'"):
        DefendedModel(clf, Square(), gradient="adjoint")


def test_per_example_noise_independent_of_batch_composition():
    x = torch.rand(4, 1, 4, 4)
    p = AddNoise()
    full = p.purify(x, noise=PerExampleNoise([10, 11, 12, 13]))
    part = p.purify(x[2:], noise=PerExampleNoise([12, 13]))
    assert torch.equal(full[2:], part)


def test_deterministic_purifier_needs_one_sample():
    clf, x, y = linear(), torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    model = DefendedModel(clf, Identity())
    assert torch.allclose(model.expectation(ce, x, y, 50), ce(clf(x), y))


def test_image_streams_do_not_depend_on_eot_chunking_batch_or_subset():
    # While an attack runs the defense draws from one stream per image (DefendedModel.for_images),
    # keyed by the image's seed, how often it was evaluated and which EOT copy: the same numbers
    # however the copies are chunked into passes and whichever other images share the call.
    clf, x, y = linear(), torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    seeds = [derive_seed("img", i) for i in range(5)]
    wide = DefendedModel(clf, AddNoise(), max_batch=10).for_images(x, seeds)    # 2 copies per pass
    narrow = DefendedModel(clf, AddNoise(), max_batch=5).for_images(x, seeds)   # 1 copy per pass
    assert wide.chunk_sizes(5, 4) == [2, 2] and narrow.chunk_sizes(5, 4) == [1, 1, 1, 1]
    first = wide.expectation(ce, x, y, 4)
    assert torch.allclose(first, narrow.expectation(ce, x, y, 4), atol=1e-6)
    # a second evaluation of the same images draws fresh noise (the attack is not fed one draw forever)
    assert not torch.allclose(wide.expectation(ce, x, y, 4), first)
    # images 1 and 3 alone, or called as a subset of the bound batch: the same logits as in the full call
    full = DefendedModel(clf, AddNoise()).for_images(x, seeds)(x)
    alone = DefendedModel(clf, AddNoise()).for_images(x[[1, 3]], [seeds[1], seeds[3]])(x[[1, 3]])
    subset = DefendedModel(clf, AddNoise()).for_images(x, seeds)(x[[3, 1]])
    assert torch.allclose(full[[1, 3]], alone, atol=1e-6) and torch.allclose(full[[3, 1]], subset, atol=1e-6)
    assert not torch.allclose(full, clf(x), atol=1e-3)      # noise was drawn
    # deterministic defense: no noise drawn, the bare classifier's logits
    plain = DefendedModel(clf, Identity()).for_images(x, seeds)
    assert torch.equal(plain(x), clf(x))


class SquareNoise(Purifier):
    """x^2 + sigma z: stochastic with a non-trivial exact gradient, to tell exact from bpda."""
    stochastic = True
    gradient_modes = ("exact", "bpda", "none")

    def _purify(self, x, *, gradient, noise):
        return x**2 + 0.3 * noise.randn_like(x)


@pytest.mark.parametrize("gradient", ["exact", "bpda"])
def test_mean_logits_eot_in_chunks_equals_autograd_in_one_pass(gradient):
    """average='logits' (two passes over max_batch-sized chunks, the second replaying the first's
    noise) gives the loss of the samples' mean logits and exactly its autograd gradient."""
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 1])
    seeds = [derive_seed("logits", i) for i in range(4)]
    chunked = DefendedModel(linear(), SquareNoise(), gradient=gradient, max_batch=8).for_images(x, seeds)
    loss, grad = chunked.loss_and_grad(ce, x, y, 6, average="logits")     # 3 chunks of 2 copies

    whole = DefendedModel(linear(), SquareNoise(), gradient=gradient, max_batch=10**6).for_images(x, seeds)
    xr = x.clone().requires_grad_(True)
    noise, keys = whole._open(xr, None)
    logits = whole._copies(xr, keys, noise, 0, 6)
    want = ce(logits.view(6, 4, 3).mean(0), y)
    (want_grad,) = torch.autograd.grad(want.sum(), xr)
    assert torch.allclose(loss, want.detach(), atol=1e-6)
    assert torch.allclose(grad, want_grad, atol=1e-6)
    # Not the mean of the losses: the two averages really differ here.
    mean_loss, _ = whole.loss_and_grad(ce, x, y, 6)
    assert not torch.allclose(mean_loss, loss, atol=1e-3)
