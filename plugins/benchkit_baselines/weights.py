"""What every classifier loader here shares: normalisation inside the model (inputs stay in [0, 1])
and loading a published state dict with a one-line error when it is not the expected file."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from benchkit.errors import MissingAsset


class Normalized(nn.Module):
    """[0, 1] images -> (x - mean) / std -> net."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def load_into(net: nn.Module, state: dict, path: Path, what: str) -> None:
    """net.load_state_dict(state), strict; MissingAsset naming the file when it does not fit."""
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = " ".join(str(exc).strip().split())[:300]
        raise MissingAsset(f"{path}: not {what} ({type(exc).__name__}: {first}); is it the published file?") from None
