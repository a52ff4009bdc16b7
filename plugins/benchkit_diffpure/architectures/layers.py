"""Pieces the score networks share: the sinusoidal time embedding (in its two published layouts)
and the parameter-free up/down resampling of residual blocks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, *, max_period: float = 10000.0, guided: bool = False) -> Tensor:
    """[sin | cos] with frequencies exp(-ln(max_period) i / (half - 1)) (DDPM, NCSN++, SDEdit);
    guided=True: guided-diffusion's [cos | sin] with denominator half. t: [B] (integer or float)."""
    if t.dim() != 1:
        raise ValueError(f"time input must be a 1-D tensor [B], got shape {tuple(t.shape)}")
    half = dim // 2
    idx = torch.arange(half, dtype=torch.float32, device=t.device)
    if guided:
        freqs = torch.exp(-math.log(max_period) * idx / half)
    else:
        freqs = torch.exp(idx * -(math.log(max_period) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    parts = (torch.cos(args), torch.sin(args)) if guided else (torch.sin(args), torch.cos(args))
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def resample(x: Tensor, up: bool, down: bool) -> Tensor:
    """Nearest-neighbour 2x upsampling or 2x2 average pooling (upstream's use_conv=False / fir=False)."""
    if up:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if down:
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    return x
