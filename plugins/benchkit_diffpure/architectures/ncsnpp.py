"""NCSN++ (Song et al., 2021, score_sde) in the "DDPM++ deep, continuous, VP" CIFAR-10 configuration.

This is an independent re-implementation of the score network DiffPure uses for CIFAR-10
(`checkpoint_8.pth`). Module names and registration order reproduce the upstream state dict
exactly (`sigmas`, then `all_modules.N.*`), so the official checkpoint loads without renaming.

Only the options of that configuration are implemented: BigGAN residual blocks without FIR
resampling, no progressive growing, DDPM-style attention, positional time embedding, GroupNorm
and swish. Anything else raises ValueError from `NCSNpp.from_config`.

Conventions: x is [B, C, H, W] in [-1, 1] (centred data); labels are the continuous time t * 999
as floats (not rounded); the output is a noise (epsilon) prediction, score = -output / std(t).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchkit_diffpure.architectures.layers import resample, timestep_embedding

__all__ = ["NCSNpp", "load_score_sde_checkpoint"]

def _skip_sum(x: Tensor, h: Tensor, rescale: bool) -> Tensor:
    # Upstream divides by sqrt(2) (not multiplies by its inverse); keep the division for bitwise
    # closeness to the reference.
    return (x + h) / math.sqrt(2.0) if rescale else x + h


def _ddpm_init_(weight: Tensor, scale: float = 1.0) -> None:
    """DDPM's variance-scaling init (fan_avg, uniform); scale 0 means 'almost zero' as upstream."""
    scale = 1e-10 if scale == 0 else scale
    if weight.dim() < 2:
        raise ValueError("DDPM init expects a weight with at least two dimensions")
    receptive = math.prod(weight.shape[2:])
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2.0
    bound = math.sqrt(3.0 * scale / fan_avg)
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def _conv(in_ch: int, out_ch: int, kernel_size: int, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
    _ddpm_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    _ddpm_init_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


class NIN(nn.Module):
    """Per-pixel dense layer ("network in network"). W is stored [in, out], the transpose of an
    nn.Linear weight, because the checkpoint was converted from the JAX original."""

    def __init__(self, in_ch: int, out_ch: int, init_scale: float = 0.1) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_ch, out_ch))
        self.b = nn.Parameter(torch.zeros(out_ch))
        _ddpm_init_(self.W, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bchw,co->bohw", x, self.W) + self.b[None, :, None, None]


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (score_sde's AttnBlockpp)."""

    def __init__(self, channels: int, skip_rescale: bool, init_scale: float) -> None:
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.GroupNorm_0(x)
        q = self.NIN_0(h).reshape(b, c, hgt * wid)
        k = self.NIN_1(h).reshape(b, c, hgt * wid)
        v = self.NIN_2(h).reshape(b, c, hgt * wid)
        # logits[b, query, key]; softmax over the key positions.
        logits = torch.einsum("bcq,bck->bqk", q, k) * (int(c) ** -0.5)
        attn = torch.softmax(logits, dim=-1)
        out = torch.einsum("bqk,bck->bcq", attn, v).reshape(b, c, hgt, wid)
        return _skip_sum(x, self.NIN_3(out), self.skip_rescale)


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block with optional nearest 2x up- or 2x2-average downsampling
    (score_sde's ResnetBlockBigGANpp with fir=False)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        *,
        temb_dim: int,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.1,
        skip_rescale: bool = True,
        init_scale: float = 0.0,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a residual block cannot both upsample and downsample")
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv(in_ch, out_ch, 3)
        self.Dense_0 = _linear(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, 3, init_scale=init_scale)
        self.has_shortcut = in_ch != out_ch or up or down
        if self.has_shortcut:
            self.Conv_2 = _conv(in_ch, out_ch, 1)
        self.up = up
        self.down = down
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor, temb: Tensor | None) -> Tensor:
        h = resample(F.silu(self.GroupNorm_0(x)), self.up, self.down)
        x = resample(x, self.up, self.down)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        if self.has_shortcut:
            x = self.Conv_2(x)
        return _skip_sum(x, h, self.skip_rescale)


def _sigma_schedule(sigma_min: float, sigma_max: float, num_scales: int) -> Tensor:
    # Computed in numpy float64 as upstream does; torch.tensor (not from_numpy) so that a
    # `with torch.device(...)` context places the buffer with the rest of the model.
    values = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))
    return torch.tensor(values, dtype=torch.float64)


# Options of DiffPure's cifar10.yml that this implementation supports, with their only value.
_REQUIRED_OPTIONS: dict[str, Any] = {
    "name": "ncsnpp",
    "normalization": "GroupNorm",
    "nonlinearity": "swish",
    "resblock_type": "biggan",
    "fir": False,
    "progressive": "none",
    "progressive_input": "none",
    "progressive_combine": "sum",
    "attention_type": "ddpm",
    "embedding_type": "positional",
    "conditional": True,
    "conv_size": 3,
}


class NCSNpp(nn.Module):
    """The score_sde NCSN++ U-Net (DDPM++ variant used by DiffPure for CIFAR-10).

    Module indices in `all_modules` follow the upstream construction order:
    0-1 time-embedding MLP, 2 input conv, down path (res blocks, attention, down blocks),
    middle (res, attention, res), up path (res blocks over concatenated skips, attention,
    up blocks), final GroupNorm and output conv.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        num_channels: int = 3,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 8,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        skip_rescale: bool = True,
        init_scale: float = 0.0,
        centered: bool = True,
        scale_by_sigma: bool = False,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        num_scales: int = 1000,
    ) -> None:
        super().__init__()
        if nf % 2 or nf < 4:
            raise ValueError(f"nf must be an even number >= 4, got {nf}")
        if image_size % (2 ** (len(ch_mult) - 1)):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(ch_mult) - 1}")
        # A registered buffer, first in the state dict as upstream. Only used when
        # scale_by_sigma is True; the official checkpoint carries it, so it must exist.
        self.register_buffer("sigmas", _sigma_schedule(sigma_min, sigma_max, num_scales))

        self.nf = nf
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.centered = centered
        self.scale_by_sigma = scale_by_sigma
        resolutions = [image_size // (2**i) for i in range(self.num_resolutions)]
        temb_dim = 4 * nf

        def res_block(in_ch: int, out_ch: int | None = None, **kw: bool) -> ResnetBlockBigGAN:
            return ResnetBlockBigGAN(
                in_ch, out_ch, temb_dim=temb_dim, dropout=dropout,
                skip_rescale=skip_rescale, init_scale=init_scale, **kw,
            )

        def attn_block(ch: int) -> AttnBlock:
            return AttnBlock(ch, skip_rescale=skip_rescale, init_scale=init_scale)

        modules: list[nn.Module] = [_linear(nf, temb_dim), _linear(temb_dim, temb_dim)]
        modules.append(_conv(num_channels, nf, 3))

        # forward() replays this plan, so module order and data flow cannot drift apart.
        # "push" stores a skip activation; every other step consumes the next module.
        plan: list[str] = []
        skip_channels = [nf]
        in_ch = nf
        for level in range(self.num_resolutions):
            out_ch = nf * ch_mult[level]
            for _ in range(num_res_blocks):
                modules.append(res_block(in_ch, out_ch))
                plan.append("res")
                in_ch = out_ch
                if resolutions[level] in attn_resolutions:
                    modules.append(attn_block(in_ch))
                    plan.append("attn")
                plan.append("push")
                skip_channels.append(in_ch)
            if level != self.num_resolutions - 1:
                modules.append(res_block(in_ch, down=True))
                plan.extend(["down", "push"])
                skip_channels.append(in_ch)

        modules.extend([res_block(in_ch), attn_block(in_ch), res_block(in_ch)])
        plan.extend(["mid_res", "attn", "mid_res"])

        for level in reversed(range(self.num_resolutions)):
            out_ch = nf * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                modules.append(res_block(in_ch + skip_channels.pop(), out_ch))
                plan.append("up_res")
                in_ch = out_ch
            if resolutions[level] in attn_resolutions:
                modules.append(attn_block(in_ch))
                plan.append("attn")
            if level != 0:
                modules.append(res_block(in_ch, up=True))
                plan.append("up")
        assert not skip_channels

        modules.append(_group_norm(in_ch))
        modules.append(_conv(in_ch, num_channels, 3, init_scale=init_scale))
        self.all_modules = nn.ModuleList(modules)
        self._plan = plan

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NCSNpp":
        """Build from DiffPure's YAML layout: a mapping with `data` and `model` sections."""
        try:
            data, model = config["data"], config["model"]
        except (KeyError, TypeError) as exc:
            raise ValueError("config must be a mapping with 'data' and 'model' sections") from exc
        for key, expected in _REQUIRED_OPTIONS.items():
            if key not in model:
                continue
            value = model[key]
            if isinstance(expected, str) and isinstance(value, str):
                ok = value.lower() == expected.lower()
            else:
                ok = value == expected
            if not ok:
                raise ValueError(
                    f"NCSNpp: model.{key}={value!r} is not supported (only {expected!r} is implemented)"
                )
        return cls(
            image_size=int(data["image_size"]),
            num_channels=int(data.get("num_channels", 3)),
            nf=int(model["nf"]),
            ch_mult=tuple(int(m) for m in model["ch_mult"]),
            num_res_blocks=int(model["num_res_blocks"]),
            attn_resolutions=tuple(int(r) for r in model["attn_resolutions"]),
            dropout=float(model.get("dropout", 0.1)),
            skip_rescale=bool(model.get("skip_rescale", True)),
            init_scale=float(model.get("init_scale", 0.0)),
            centered=bool(data.get("centered", True)),
            scale_by_sigma=bool(model.get("scale_by_sigma", False)),
            sigma_min=float(model.get("sigma_min", 0.01)),
            sigma_max=float(model.get("sigma_max", 50.0)),
            num_scales=int(model.get("num_scales", 1000)),
        )

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """Noise prediction for x ([B,C,H,W], [-1,1]) at continuous labels t*999 ([B], float)."""
        modules = iter(self.all_modules)
        temb = timestep_embedding(labels, self.nf)
        temb = next(modules)(temb)
        temb = next(modules)(F.silu(temb))

        if not self.centered:
            x = 2.0 * x - 1.0

        h = next(modules)(x)
        skips = [h]
        for step in self._plan:
            if step == "push":
                skips.append(h)
            elif step == "attn":
                h = next(modules)(h)
            elif step == "up_res":
                h = next(modules)(torch.cat([h, skips.pop()], dim=1), temb)
            else:  # res, down, mid_res, up: residual blocks on the running activation
                h = next(modules)(h, temb)
        assert not skips

        h = next(modules)(h)
        h = next(modules)(F.silu(h))
        if self.scale_by_sigma:
            used_sigmas = self.sigmas[labels.int()].to(h.dtype)
            h = h / used_sigmas.view(-1, *([1] * (h.dim() - 1)))
        return h


def _describe(source: object) -> str:
    return str(source) if isinstance(source, (str, Path)) else "the given state"


def load_score_sde_checkpoint(
    model: nn.Module, path_or_state: str | Path | Mapping[str, Any], *, use_ema: bool = True,
    source: str | Path | None = None, what: str = "the NCSN++ architecture",
) -> nn.Module:
    """Load score_sde weights into `model` and return it.

    Accepts a path (.pth/.pt via torch.load(weights_only=True), or .safetensors; benchkit.assets'
    load_state_dict, which never runs pickled code) or an already-loaded mapping (`source` then names
    the file it came from in messages). Two layouts are understood:

    * score_sde's training checkpoint {'model': {'module.<key>': ...}, 'ema': {'shadow_params':
      [...]}, 'step': ...}. As in DiffPure, the effective weights are the EMA shadow parameters,
      copied into model.parameters() by position; the 'model' entry (raw, non-EMA weights,
      saved under a DataParallel 'module.' prefix) is only checked for matching keys and shapes.
      Buffers (the `sigmas` schedule) keep the values built from the configuration, and may be
      absent from the 'model' entry.
      With use_ema=False the raw 'model' weights are loaded instead.
    * a plain state dict with exactly the model's keys, loaded with strict=True.

    Any count, key or shape mismatch raises benchkit.assets.DoesNotFit (a ValueError) in one line:
    `SOURCE: does not fit WHAT: ...; is it the published file?`.
    """
    from benchkit.assets import DoesNotFit, does_not_fit, load_into, load_state_dict, state_mismatch

    where = str(source) if source is not None else _describe(path_or_state)
    if isinstance(path_or_state, (str, Path)):
        path = Path(path_or_state)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        state = load_state_dict(path)
    else:
        state = path_or_state

    def unfit(problem: str) -> DoesNotFit:
        return does_not_fit(where, what, problem)

    if not isinstance(state, Mapping):
        raise unfit(f"it holds a {type(state).__name__}, not a state dict")

    if "ema" in state or "model" in state:
        raw = state.get("model")
        if raw is not None:
            if not isinstance(raw, Mapping):
                raise unfit(f"its 'model' entry is a {type(raw).__name__}, not a state dict")
            raw = {str(k).removeprefix("module."): v for k, v in raw.items()}
            # Older score_sde code kept `sigmas` as a plain attribute, so a checkpoint may lack
            # it; DiffPure never reads buffers from the file, so rebuild them from the config.
            for name, buf in model.named_buffers():
                raw.setdefault(name, buf)
            if (problem := state_mismatch(model, raw)) is not None:
                raise unfit(f"its 'model' entry: {problem}")
        if use_ema:
            ema = state.get("ema")
            if not isinstance(ema, Mapping) or not isinstance(ema.get("shadow_params"), Sequence):
                raise unfit("no 'ema' entry with 'shadow_params' to load")
            _copy_shadow_params(model, ema["shadow_params"], unfit)
        else:
            if raw is None:
                raise unfit("no 'model' entry to load with use_ema=False")
            load_into(model, raw, where, what)
        return model

    load_into(model, state, where, what)
    return model


def _copy_shadow_params(model: nn.Module, shadow: Sequence[Tensor], unfit) -> None:
    params = list(model.parameters())
    if len(shadow) != len(params):
        raise unfit(f"EMA has {len(shadow)} shadow params but the model has {len(params)} parameters")
    names = [n for n, _ in model.named_parameters()]
    for i, (name, p, s) in enumerate(zip(names, params, shadow)):
        if not isinstance(s, Tensor) or tuple(s.shape) != tuple(p.shape):
            got = list(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise unfit(f"EMA shadow param {i} ({name!r}) is {got} but the model has {list(p.shape)}")
    with torch.no_grad():
        for p, s in zip(params, shadow):
            p.copy_(s)
