"""Where stochastic defenses get their Gaussian noise.

Every draw is per image: the host re-evaluates adversarial examples with generators seeded from
(suite seed, cell, image index, repeat), and while an attack runs, the defense draws from
`ImageStreams`, one stream per image and evaluation. So no number depends on which shard or
batch an image landed in.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import Tensor


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (not Python's salted hash)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Noise:
    """Global-RNG noise: torch.randn with the ambient generator."""

    def randn(self, shape: tuple[int, ...], *, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        return torch.randn(shape, device=device, dtype=dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(tuple(x.shape), device=x.device, dtype=x.dtype)

    def rand(self, shape: tuple[int, ...], *, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        return torch.rand(shape, device=device, dtype=dtype)


class PerExampleNoise(Noise):
    """Row r of every draw comes from generator r % len(seeds).

    Batches replicated for EOT are laid out repeat-major ([x; x; ...]), so row r belongs to image
    r % B: each image's noise stream depends only on its own seed.
    """

    def __init__(self, seeds: list[int]):
        self.generators = []
        for s in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(int(s))
            self.generators.append(g)

    def _draw(self, fn, shape: tuple[int, ...], device, dtype) -> Tensor:
        # Drawn on the CPU whatever the run's device (the generators are CPU generators, and the
        # numbers must not depend on the device), named explicitly so a default device set with
        # torch.set_default_device cannot move the draw away from its generator.
        rows, rest = shape[0], tuple(shape[1:])
        n = len(self.generators)
        out = torch.stack([fn(rest, generator=self.generators[r % n], dtype=dtype, device="cpu") for r in range(rows)])
        return out.to(device)

    def randn(self, shape, *, device, dtype):
        return self._draw(torch.randn, shape, device, dtype)

    def rand(self, shape, *, device, dtype):
        return self._draw(torch.rand, shape, device, dtype)


class ImageStreams(Noise):
    """The defense's randomness while an attack runs, drawn per image.

    The attack may evaluate any rows: the batch it was given, EOT copies of it, or a subset
    (pyautoattack drops the images it has already broken). Each evaluation of an image opens a new
    stream keyed by (image seed, how many times this image was evaluated before, which copy), so an
    image's noise does not depend on the other rows of the call, on how EOT copies are chunked into
    passes, or on the batch size.

    Rows are matched to images by layout when the call holds whole copies of the batch (what the
    host and benchkit's attacks do), else each row is the image nearest to it (L2).
    """

    def __init__(self, images: Tensor, seeds: Sequence[int]):
        if images.shape[0] != len(seeds):
            raise ValueError(f"{images.shape[0]} images but {len(seeds)} seeds")
        self.images = images.detach().flatten(1)
        self.seeds = [int(s) for s in seeds]
        self.calls = [0] * len(self.seeds)
        self.rows: list[torch.Generator] = []

    def identify(self, x: Tensor) -> list[int]:
        """The image each row of x belongs to."""
        b = len(self.seeds)
        if x.shape[0] % b == 0 and x[0].numel() == self.images.shape[1]:
            return [r % b for r in range(x.shape[0])]
        with torch.no_grad():
            d = torch.cdist(x.detach().flatten(1).to(self.images), self.images)
        return d.argmin(1).tolist()

    def open(self, x: Tensor) -> list[tuple[int, int, int, int]]:
        """One evaluation of the rows of x: (image, its evaluation count, the row's occurrence among
        that image's rows, how many rows that image has) per row."""
        ids = self.identify(x)
        count: dict[int, int] = {}
        occ = []
        for i in ids:
            occ.append(count.get(i, 0))
            count[i] = occ[-1] + 1
        for i in count:
            self.calls[i] += 1
        return [(i, self.calls[i], o, count[i]) for i, o in zip(ids, occ)]

    def bind(self, keys: list[tuple[int, int, int, int]], copies: range) -> None:
        """The rows of the next draws: the opened rows repeated for each copy in `copies`
        (repeat-major, as DefendedModel lays out EOT samples)."""
        self.rows = []
        for c in copies:
            for i, call, occ, mult in keys:
                g = torch.Generator(device="cpu")
                g.manual_seed(derive_seed(self.seeds[i], call, c * mult + occ))
                self.rows.append(g)

    def _draw(self, fn, shape: tuple[int, ...], device, dtype) -> Tensor:
        rows, rest = shape[0], tuple(shape[1:])
        if not self.rows:
            raise RuntimeError("ImageStreams: draw before any rows were bound (use it through DefendedModel)")
        # CPU generators, CPU draws (see PerExampleNoise._draw), then onto the run's device.
        out = torch.stack([fn(rest, generator=self.rows[r % len(self.rows)], dtype=dtype, device="cpu")
                           for r in range(rows)])
        return out.to(device)

    def randn(self, shape, *, device, dtype):
        return self._draw(torch.randn, shape, device, dtype)

    def rand(self, shape, *, device, dtype):
        return self._draw(torch.rand, shape, device, dtype)


GLOBAL_NOISE = Noise()
