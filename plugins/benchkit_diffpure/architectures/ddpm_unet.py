"""The DDPM U-Net of SDEdit (``models/diffusion.py`` ``Model``), DiffPure's CelebA-HQ score model.

Module names and registration order follow ermongroup/SDEdit, so the official
``celeba_hq.ckpt`` loads with ``strict=True`` and no key renaming. Only the ``simple`` model
with convolutional resampling is implemented; anything else raises ``ValueError``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchkit_diffpure.architectures.layers import timestep_embedding


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block; the time embedding is added after the first conv."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions with 1x1-conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # [b, query, c]
        k = self.k(h).reshape(b, c, hh * ww)  # [b, c, key]
        v = self.v(h).reshape(b, c, hh * ww)  # [b, c, key]
        attn = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=2)  # normalised over keys
        out = torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, hh, ww)  # [b, c, query]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Upstream pads right and bottom only, so the stride-2 grid starts at the top-left pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Holder that reproduces upstream's ``down.N`` / ``up.N`` key layout."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class DDPMUNet(nn.Module):
    """SDEdit's DDPM ``Model`` (type ``simple``): ``forward(x, timesteps)`` takes x in [-1, 1]
    and 0-based integer step indices and returns the epsilon prediction."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        in_channels: int = 3,
        resolution: int,
        resamp_with_conv: bool = True,
    ) -> None:
        super().__init__()
        if not resamp_with_conv:
            raise ValueError("DDPMUNet only implements resamp_with_conv=True")
        self.ch = ch
        self.resolution = resolution
        self.num_res_blocks = num_res_blocks
        ch_mult = tuple(ch_mult)
        in_ch_mult = (1,) + ch_mult
        temb_ch = 4 * ch

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        res = resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level()
            block_in = ch * in_ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * mult, temb_ch, dropout))
                block_in = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_ch, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_ch, dropout)

        # Built deepest-first like upstream, stored shallowest-first (upstream inserts at 0).
        up_levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            level = _Level()
            block_out = ch * ch_mult[i]
            for j in range(num_res_blocks + 1):
                # The last block of a level takes the skip from the previous level's output.
                skip_in = ch * (in_ch_mult[i] if j == num_res_blocks else ch_mult[i])
                level.block.append(ResnetBlock(block_in + skip_in, block_out, temb_ch, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            up_levels.append(level)
        self.up = nn.ModuleList(reversed(up_levels))

        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        if x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(f"expected {self.resolution}x{self.resolution} input, got {tuple(x.shape[2:])}")
        temb = timestep_embedding(timesteps, self.ch)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if i != len(self.down) - 1:
                hs.append(level.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DDPMUNet":
        """Build from the SDEdit/DiffPure YAML layout (``data``/``model``/``diffusion`` sections,
        as plain nested dicts). Only ``model.type == 'simple'`` is supported: the ``bayesian``
        variant adds a learned log-variance parameter that no DiffPure checkpoint has."""
        data, model = config["data"], config["model"]
        model_type = model.get("type", "simple")
        if model_type != "simple":
            raise ValueError(f"model.type {model_type!r} is not supported (only 'simple')")
        return cls(
            ch=int(model["ch"]),
            out_ch=int(model["out_ch"]),
            ch_mult=tuple(int(m) for m in model["ch_mult"]),
            num_res_blocks=int(model["num_res_blocks"]),
            attn_resolutions=tuple(int(r) for r in model["attn_resolutions"]),
            dropout=float(model.get("dropout", 0.0)),
            in_channels=int(model["in_channels"]),
            resolution=int(data["image_size"]),
            resamp_with_conv=bool(model.get("resamp_with_conv", True)),
        )
