"""Where stochastic defenses get their Gaussian noise.

The host re-evaluates adversarial examples with per-image generators seeded from
(suite seed, cell, image index, repeat), so a verdict does not depend on which shard or batch the
image landed in. Attacks run with the global torch RNG (seeded per shard by the host).
"""
from __future__ import annotations

import hashlib

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
        rows, rest = shape[0], tuple(shape[1:])
        n = len(self.generators)
        out = torch.stack([fn(rest, generator=self.generators[r % n], dtype=dtype) for r in range(rows)])
        return out.to(device)

    def randn(self, shape, *, device, dtype):
        return self._draw(torch.randn, shape, device, dtype)

    def rand(self, shape, *, device, dtype):
        return self._draw(torch.rand, shape, device, dtype)


GLOBAL_NOISE = Noise()
