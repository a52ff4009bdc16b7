"""Architectures of the digits models: a classifier and a time-conditioned noise-prediction net.

Both take 1x8x8 images (scikit-learn digits). DigitsCNN reads [0, 1]; DigitsUNet reads the
diffusion's centred [-1, 1] convention and a continuous time label t*999 (score_sde's DDPM++ VP
convention), so the score at forward time t is -DigitsUNet(x, 999 t) / std(t).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DigitsCNN(nn.Module):
    """conv32-conv64-maxpool-fc128-fc10 on [B,1,8,8] images in [0,1]; returns 10 logits."""

    def __init__(self, dropout: float = 0.25) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        # Normalisation lives inside the model so attacks see the [0,1] threat-model space.
        h = (x - 0.5) / 0.5
        h = F.relu(self.conv1(h))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = self.dropout(F.relu(self.fc1(h.flatten(1))))
        return self.fc2(h)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DDPM's sinusoidal embedding [sin | cos](t * max_period^(-i / (half - 1))) of t: [B], for even dim.

    The shipped weights were trained on exactly these float32 ops; keep them, or retrain.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(max_period) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat((torch.sin(args), torch.cos(args)), dim=1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch // 4), ch)


class ResBlock(nn.Module):
    """DDPM++-style residual block: GN-SiLU-conv, + time projection, GN-SiLU-dropout-conv."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Zero-init the last conv so each block starts as the identity (DDPM++ init_scale=0).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    """Noise prediction eps(x, t_label) for [B,1,8,8] x in [-1,1], t_label = 999 t in [0, 999].

    Two resolutions (8x8 and 4x4) are plenty for 8x8 digits; a skip connection at 8x8 keeps the
    fine detail that matters at small t, where DiffPure works (t* = 0.1).
    """

    TIME_SCALE = 999.0  # what the network was trained on: t_label = TIME_SCALE * t

    def __init__(self, ch: int = 32, ch_low: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.ch = ch
        temb_dim = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.down_block = ResBlock(ch, ch, temb_dim, dropout)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.low1 = ResBlock(ch, ch_low, temb_dim, dropout)
        self.low2 = ResBlock(ch_low, ch_low, temb_dim, dropout)
        self.up = nn.Conv2d(ch_low, ch, 3, padding=1)
        self.up_block = ResBlock(2 * ch, ch, temb_dim, dropout)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t_label: Tensor) -> Tensor:
        if t_label.dim() == 0:
            t_label = t_label.expand(x.shape[0])
        temb = self.temb(timestep_embedding(t_label, self.ch))
        h0 = self.conv_in(x)
        h1 = self.down_block(h0, temb)
        h = self.low2(self.low1(self.down(h1), temb), temb)
        h = self.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up_block(torch.cat([h, h1], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))
