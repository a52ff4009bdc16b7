"""Where stochastic defenses get their Gaussian noise.

Every draw is per image: the host re-evaluates adversarial examples with generators seeded from
(suite seed, cell, image index, repeat), and while an attack runs, the defense draws from
`ImageStreams`, one stream per image and evaluation. So no number depends on which shard or
batch an image landed in.
"""
from __future__ import annotations

import hashlib
import math
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

    def randn_steps(self, steps: int, shape: tuple[int, ...], *, device: torch.device | str,
                    dtype: torch.dtype) -> Tensor:
        """[steps, *shape]: the values of `steps` successive randn(shape) calls, drawn at once where that
        gives the same numbers (a solver's increments, drawn up front)."""
        # Only the global CPU generator itself: a subclass that redefines randn (a test's fixed noise)
        # gets its own draws, and a CUDA generator's offsets differ between one draw and many.
        if type(self).randn is Noise.randn and torch.device(device).type == "cpu" and one_call_ok(math.prod(shape)):
            return torch.randn((steps, *shape), device=device, dtype=dtype)
        return _stacked(lambda: self.randn(shape, device=device, dtype=dtype), steps, shape, device, dtype)


def one_call_ok(numel: int) -> bool:
    """Whether one CPU randn of k * numel values equals k successive randn(numel) from the same generator:
    ATen's CPU normal fill draws all its uniforms first, then transforms them in blocks of 16 and
    redraws the last 16 when the size is not a multiple of 16, so draws of whole blocks concatenate."""
    return numel % 16 == 0 and numel > 0


def _stacked(draw, steps: int, shape: tuple[int, ...], device, dtype) -> Tensor:
    if steps == 0:
        return torch.empty((0, *shape), device=device, dtype=dtype)
    return torch.stack([draw() for _ in range(steps)])


def _per_row(fn, generators: Sequence[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Row r from generators[r % len(generators)], drawn on the CPU: the generators are CPU generators,
    and the numbers must not depend on the device (named explicitly so that a default device set with
    torch.set_default_device cannot move the draw away from its generator)."""
    rest, n = tuple(shape[1:]), len(generators)
    return torch.stack([fn(rest, generator=generators[r % n], dtype=dtype, device="cpu") for r in range(shape[0])])


def _per_row_steps(generators: Sequence[torch.Generator], steps: int, shape: tuple[int, ...],
                   dtype: torch.dtype) -> Tensor:
    """[steps, *shape] on the CPU, equal to `steps` successive _per_row(torch.randn, ...) draws, with one
    randn call per generator where one_call_ok: a generator serving several rows (EOT copies laid out
    repeat-major) draws them in row order within each step, as the step-by-step draws do."""
    rows, rest, n = shape[0], tuple(shape[1:]), len(generators)
    if rows == 0 or steps == 0:
        return torch.empty((steps, *shape), dtype=dtype)
    if not one_call_ok(math.prod(rest)):
        return _stacked(lambda: _per_row(torch.randn, generators, shape, dtype), steps, shape, "cpu", dtype)
    groups: dict[int, list[int]] = {}
    for r in range(rows):
        groups.setdefault(id(generators[r % n]), []).append(r)
    drawn = torch.cat([torch.randn((steps, len(m), *rest), generator=generators[m[0] % n], dtype=dtype, device="cpu")
                       for m in groups.values()], dim=1)
    order = [r for m in groups.values() for r in m]
    if order == list(range(rows)):
        return drawn
    return torch.empty_like(drawn).index_copy_(1, torch.tensor(order), drawn)


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

    def randn(self, shape, *, device, dtype):
        return _per_row(torch.randn, self.generators, shape, dtype).to(device)

    def rand(self, shape, *, device, dtype):
        return _per_row(torch.rand, self.generators, shape, dtype).to(device)

    def randn_steps(self, steps, shape, *, device, dtype):
        return _per_row_steps(self.generators, steps, shape, dtype).to(device)


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

    def _bound(self) -> list[torch.Generator]:
        if not self.rows:
            raise RuntimeError("ImageStreams: draw before any rows were bound (use it through DefendedModel)")
        return self.rows

    def randn(self, shape, *, device, dtype):
        return _per_row(torch.randn, self._bound(), shape, dtype).to(device)

    def rand(self, shape, *, device, dtype):
        return _per_row(torch.rand, self._bound(), shape, dtype).to(device)

    def randn_steps(self, steps, shape, *, device, dtype):
        return _per_row_steps(self._bound(), steps, shape, dtype).to(device)


GLOBAL_NOISE = Noise()
