"""One interface for every score network: noise prediction eps(x, t) and score = -eps / std(t).

x is in [-1, 1]; t is the forward diffusion time in [0, 1], one value per image ([B] tensor).
Each wrapper converts t to what its network was trained on. Samplers on the discrete 1000-step
chain (ddpm, ddim; and the VP samplers on discrete-time networks) call `eps_index` with the exact
integer step instead, so that no step index ever comes from rounding a float time.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch
from torch import Tensor, nn

from benchkit_diffpure import sde

Precision = Literal["fp32", "fp16", "bf16"]
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class ScoreModel(nn.Module):
    """Base class: subclasses implement `eps`. `discrete_time` says whether the network was trained
    on the discrete 1000-step DDPM schedule: it takes integer steps (`eps_index`), and DiffPure
    diffuses its input with the discrete alpha-bar."""

    discrete_time: bool = False

    def eps(self, x: Tensor, t: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def eps_index(self, x: Tensor, index: Tensor) -> Tensor:
        """eps at step `index` ([B] long, 0-based) of the 1000-step chain, where x ~ abar[index].
        A continuous-time model is evaluated at t = (index + 1)/1000, the time of that level (its
        alpha(t) is within 1e-3 of abar[index]; index/999 or index/1000 are 1.5e-3 and 2.3e-3 off, and
        make std(0) = 0 at index 0)."""
        return self.eps(x, (index + 1).to(x.dtype) / sde.DISCRETE_STEPS)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        std = sde.marginal_std(t).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return sde.score_of_eps(self.eps(x, t), std)


def _autocast(x: Tensor, precision: Precision):
    """Mixed precision for the network call: torch.autocast runs convolutions and matmuls in the lower
    precision and keeps normalisations and softmax in float32, as guided-diffusion's fp16 mode (the
    authors' ImageNet setting) does by hand."""
    dtype = _DTYPES[precision]
    return nullcontext() if dtype is None else torch.autocast(x.device.type, dtype=dtype)


def _compile(net: nn.Module) -> None:
    """torch.compile (inductor) of the network's forward, in place: Module.compile keeps the state dict's
    keys. dynamic=None: the first batch size gets a static graph, the next one a dynamic-shape graph that
    then serves every size, so EOT groups and last shards of other sizes do not recompile each time
    (grad mode and autocast are guarded too: a few graphs per model in all)."""
    net.compile(dynamic=None)


class _Wrapped(ScoreModel):
    def __init__(self, net: nn.Module, precision: Precision, compile: bool = False):
        super().__init__()
        if precision not in _DTYPES:
            raise ValueError(f"unknown precision {precision!r}; expected one of {tuple(_DTYPES)}")
        # Frozen and in eval mode from the start: dropout off, no parameter gradients ever.
        self.net, self.precision, self.compiled = net.eval().requires_grad_(False), precision, compile
        if compile:
            _compile(self.net)

    def _call(self, x: Tensor, label: Tensor) -> Tensor:
        with _autocast(x, self.precision):
            out = self.net(x, label)
        return out.to(x.dtype)  # eps always in the solver's dtype


class ContinuousTimeScore(_Wrapped):
    """Networks trained on continuous t that take the label t * 999 (score_sde DDPM++, digits-unet)."""

    def __init__(self, net: nn.Module, label_scale: float = 999.0, precision: Precision = "fp32",
                 compile: bool = False):
        super().__init__(net, precision, compile)
        self.label_scale = label_scale

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        # float32 labels, not rounded: the network was trained on fractional labels.
        return self._call(x, (t * self.label_scale).to(x.dtype))


class DiscreteTimeScore(_Wrapped):
    """Networks trained on the discrete 1000-step DDPM schedule (guided-diffusion ADM, SDEdit DDPM):
    they take an integer step (as DiffPure calls them, bypassing guided-diffusion's timestep
    rescaling) and their first `eps_channels` outputs are the noise prediction (ADM also predicts
    variances). The input is diffused with the discrete alpha-bar."""

    discrete_time = True

    def __init__(self, net: nn.Module, eps_channels: int = 3, steps: int = sde.DISCRETE_STEPS,
                 precision: Precision = "fp32", compile: bool = False):
        super().__init__(net, precision, compile)
        self.eps_channels, self.steps = eps_channels, steps

    def eps_index(self, x: Tensor, index: Tensor) -> Tensor:
        return self._call(x, index.long())[:, : self.eps_channels]

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """At a float time: step floor(t * 1000) in float32, as DiffPure's RevVPSDE._scale_timesteps
        (the solver never relies on this rounding: it hands eps_index exact integers)."""
        return self.eps_index(x, torch.floor(t.float() * self.steps).long().clamp(0, self.steps - 1))
