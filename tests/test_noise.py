"""benchkit.noise: per-image streams. An image's noise depends on its seed and on how many times it
was evaluated, never on the other rows of a call, on EOT chunking or on the batch size."""
from __future__ import annotations

import torch

from benchkit.defended import DefendedModel, Purifier
from benchkit.noise import ImageStreams, derive_seed


class AddNoise(Purifier):
    stochastic = True
    gradient_modes = ("exact", "bpda", "none")

    def _purify(self, x, *, gradient, noise):
        return x + noise.randn_like(x)


class Rows(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)


def images(n, seed=0):
    return torch.rand(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_derive_seed_is_stable():
    assert derive_seed("a", 1, "b") == derive_seed("a", 1, "b") != derive_seed("a", 1, "c")
    assert 0 <= derive_seed(0) < 2 ** 63


def test_eot_noise_does_not_depend_on_chunking_or_batch():
    x = images(6)
    seeds = [derive_seed("img", i) for i in range(6)]
    model = DefendedModel(Rows(), AddNoise())

    def noisy_rows(batch, max_batch, keep):
        m = model._view(max_batch=max_batch).for_images(x[keep], [seeds[i] for i in keep])
        out = []
        m.expectation(lambda logits, y: (out.append(logits.detach()), logits.sum(1))[1], x[keep], torch.zeros(len(keep)), 4)
        return torch.cat(out).view(4, len(keep), -1)   # [copy, image, pixels]

    full = noisy_rows(6, 256, list(range(6)))          # all 4 copies in one pass
    chunked = noisy_rows(6, 6, list(range(6)))         # one copy per pass
    alone = noisy_rows(1, 256, [4])                    # image 4 on its own
    assert torch.equal(full, chunked)
    assert torch.equal(full[:, 4], alone[:, 0])
    assert not torch.equal(full[0, 4], full[1, 4])     # copies differ


def test_subset_calls_find_their_images_and_open_new_streams():
    x = images(5)
    streams = ImageStreams(x, [derive_seed("s", i) for i in range(5)])
    assert streams.identify(x[[3, 1]] + 0.01) == [3, 1]       # rows of a subset, perturbed
    model = DefendedModel(Rows(), AddNoise(), noise=streams)
    a = model(x[[3, 1]])
    b = DefendedModel(Rows(), AddNoise(), noise=ImageStreams(x, streams.seeds))(x[[1, 3]])
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])   # same image, same first evaluation
    again = model(x[[3, 1]])
    assert not torch.equal(a, again)                              # a second evaluation: fresh noise
