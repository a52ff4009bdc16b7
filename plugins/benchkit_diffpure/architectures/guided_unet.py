"""guided-diffusion's ``UNetModel`` (Dhariwal & Nichol, 2021), DiffPure's ImageNet 256x256 score model.

Module names and registration order follow openai/guided-diffusion, so the official
``256x256_diffusion_uncond.pt`` loads with ``strict=True`` and no key renaming. Only the
options that checkpoint uses are implemented (scale-shift norm, resblock up/down sampling,
legacy attention layout, unconditional); anything else raises ``ValueError``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from benchkit_diffpure.architectures.layers import resample, timestep_embedding

# guided-diffusion's script_util picks these when channel_mult is the empty string.
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# Subset of guided-diffusion's model_and_diffusion_defaults() that shapes the network;
# missing config keys fall back to these, as upstream's argparse merge does.
_MODEL_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
}


class GroupNorm32(nn.GroupNorm):
    """32-group GroupNorm (eps 1e-5) that normalises in float32 even under half precision."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class ResBlock(nn.Module):
    """Residual block with scale-shift time conditioning and optional 2x resampling inside."""

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int, dropout: float,
        up: bool = False, down: bool = False,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot both upsample and downsample")
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # Resampling sits between the activation and the conv of in_layers, and is applied
        # to the skip path too, so the two branches meet at the new resolution.
        h = self.in_layers[:-1](x)
        h = self.in_layers[-1](resample(h, self.up, self.down))
        x = resample(x, self.up, self.down)
        scale, shift = self.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        h = self.out_layers[1:](h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, legacy qkv channel layout."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        ch = c // self.num_heads
        # Legacy order: the 3C qkv channels are grouped by head first, then q|k|v within a head.
        q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, -1).split(ch, dim=1)
        # Scaling q and k separately by ch^-1/4 (instead of the logits by ch^-1/2) is upstream's
        # choice for fp16 headroom; kept so rounding matches.
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
        return (x + self.proj_out(a)).reshape(b, c, *spatial)


class _EmbSequential(nn.Sequential):
    """Sequential that hands the time embedding to the residual blocks only."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class GuidedUNet(nn.Module):
    """guided-diffusion ``UNetModel`` restricted to DiffPure's ImageNet configuration.

    ``attention_resolutions`` are downsampling factors (e.g. (8, 16, 32) for image size 256),
    as in upstream's constructor; ``from_config`` converts them from pixel resolutions.
    ``forward(x, timesteps)`` takes x in [-1, 1] and integer timesteps; with ``out_channels=6``
    (learned sigma) channels 0-2 are the epsilon prediction.
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int = 3,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        use_new_attention_order: bool = False,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not use_scale_shift_norm:
            raise ValueError("GuidedUNet only implements use_scale_shift_norm=True")
        if not resblock_updown:
            raise ValueError("GuidedUNet only implements resblock_updown=True")
        if use_new_attention_order:
            raise ValueError("GuidedUNet only implements the legacy attention order")
        if num_classes is not None:
            raise ValueError("GuidedUNet is unconditional; class conditioning is not implemented")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.channel_mult = tuple(channel_mult)
        self.attention_resolutions = tuple(attention_resolutions)
        attention_ds = set(attention_resolutions)

        def heads(ch: int, n_heads: int) -> int:
            # A fixed head width, when given, overrides the head count.
            if num_head_channels == -1:
                return n_heads
            if ch % num_head_channels:
                raise ValueError(f"{ch} channels are not a multiple of num_head_channels={num_head_channels}")
            return ch // num_head_channels

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([_EmbSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out_ch = int(mult * model_channels)
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, out_ch, dropout)]
                ch = out_ch
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, heads(ch, num_heads)))
                self.input_blocks.append(_EmbSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_EmbSequential(ResBlock(ch, emb_dim, ch, dropout, down=True)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = _EmbSequential(
            ResBlock(ch, emb_dim, ch, dropout),
            AttentionBlock(ch, heads(ch, num_heads)),
            ResBlock(ch, emb_dim, ch, dropout),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = int(mult * model_channels)
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, out_ch, dropout)]
                ch = out_ch
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, heads(ch, num_heads_upsample)))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb_dim, ch, dropout, up=True))
                    ds //= 2
                self.output_blocks.append(_EmbSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, guided=True))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "GuidedUNet":
        """Build from guided-diffusion's model-and-diffusion keyword dict (as DiffPure's
        ``configs/imagenet.yml`` merged onto ``model_and_diffusion_defaults()``).

        Diffusion-only keys are ignored. ``use_fp16`` is accepted and ignored: it does not
        change keys or shapes, and casting is the caller's business.
        """
        cfg = {**_MODEL_DEFAULTS, **config}
        if cfg["class_cond"]:
            raise ValueError("class_cond=True is not supported (unconditional model only)")
        if cfg["use_checkpoint"]:
            raise ValueError("use_checkpoint=True (gradient checkpointing) is not supported")
        image_size = int(cfg["image_size"])
        channel_mult = _parse_channel_mult(cfg["channel_mult"], image_size)
        attention_ds = tuple(image_size // int(r) for r in _split_ints(cfg["attention_resolutions"]))
        return cls(
            image_size=image_size,
            in_channels=3,
            model_channels=int(cfg["num_channels"]),
            out_channels=6 if cfg["learn_sigma"] else 3,
            num_res_blocks=int(cfg["num_res_blocks"]),
            attention_resolutions=attention_ds,
            dropout=float(cfg["dropout"]),
            channel_mult=channel_mult,
            num_heads=int(cfg["num_heads"]),
            num_head_channels=int(cfg["num_head_channels"]),
            num_heads_upsample=int(cfg["num_heads_upsample"]),
            use_scale_shift_norm=bool(cfg["use_scale_shift_norm"]),
            resblock_updown=bool(cfg["resblock_updown"]),
            use_new_attention_order=bool(cfg["use_new_attention_order"]),
        )


def _split_ints(value: str | Sequence[int]) -> list[int]:
    # Upstream passes comma-separated strings ("32,16,8", DiffPure's YAML even has spaces).
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    return [int(v) for v in value]


def _parse_channel_mult(value: str | Sequence[float], image_size: int) -> tuple[float, ...]:
    if isinstance(value, str) and not value.strip():
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size {image_size}; give it explicitly")
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(","))
    return tuple(value)
