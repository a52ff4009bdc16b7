"""What every classifier loader here shares: normalisation inside the model (inputs stay in [0, 1])
and loading a published state dict with a one-line error when it is not the expected file."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from benchkit.assets import DoesNotFit, unfit


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
    """net.load_state_dict(state), strict; MissingAsset naming the file when it does not fit, with
    benchkit.assets' diagnosis (`not WHAT (3 missing keys (e.g. 'x'), ...); is it the published file?`)."""
    if (problem := unfit(net, state)) is not None:
        raise DoesNotFit(f"{path}: not {what} ({problem}); is it the published file?")


def generative_assets(*ids: str):
    """assets= for a purifier built on registered generative models (the VAE, GAN inversion): the
    files those models declare, so `benchkit assets` lists them and their sha256 keys the cells."""
    def assets(params) -> list:
        from benchkit import registry

        out: list = []
        for id in ids:
            entry = registry.get("generative-models").get(id)
            if entry.assets is not None:
                out += entry.assets(entry.validate({}, f"generative model '{id}'"))
        return out
    return assets
