"""GAN-inversion purification (the 'GAN+opt / GAN+enc / GAN+enc+opt' rows of DiffPure's Table 5a,
evaluated there after Chai et al. 2021): replace x by G(z*) for a latent z* that reconstructs x.

  enc      z* = E(x), one pass of the encoder trained to invert G;
  opt      z* = argmin_z MSE(G(z), x) by Adam from `restarts` random latents (drawn through the
           noise object, so the defense is stochastic), keeping each image's best restart;
  enc+opt  the same optimisation started from E(x) (deterministic; `restarts` does not apply).

Chai et al. minimise a perceptual distance (LPIPS + pixel) for 500 steps on 256x256 faces; LPIPS
needs downloaded VGG/AlexNet weights, which are not available offline here, and on 8x8 digits a
pixel MSE with 100 Adam steps already converges, so that is what this module uses.

Gradient modes: `enc` is differentiable (exact, bpda, none). The optimising modes support only
bpda and none: their output is an argmin, and the optimisation runs detached from the input.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from benchkit.defended import Purifier
from benchkit.noise import Noise
from benchkit.params import Params

from benchkit_baselines.vae import generative_model, require_generative

# Generative models by id (benchkit_zoo registers both through register_generative_models).
GENERATOR, ENCODER = "digits-gan", "digits-gan-encoder"

Mode = Literal["opt", "enc", "enc+opt"]


class GANInversionParams(Params):
    mode: Mode = Field("enc", description="opt: optimise from random latents; enc: G(E(x)); "
                                          "enc+opt: optimise starting from E(x)")
    iterations: int = Field(100, ge=1, description="Adam steps of the latent optimisation (opt, enc+opt)")
    lr: float = Field(0.05, gt=0, description="Adam learning rate of the latent optimisation")
    restarts: int = Field(4, ge=1, description="random initial latents per image in mode opt; the best "
                                               "reconstruction is kept")

    @model_validator(mode="after")
    def _models_registered(self):
        require_generative(GENERATOR, ENCODER)
        return self


class GANInversion(Purifier):
    def __init__(self, generator: nn.Module, encoder: nn.Module, mode: Mode = "enc", iterations: int = 100,
                 lr: float = 0.05, restarts: int = 4) -> None:
        super().__init__()
        self.generator, self.encoder = generator, encoder
        self.mode, self.iterations, self.lr, self.restarts = mode, iterations, lr, restarts
        self.stochastic = mode == "opt"
        self.gradient_modes = ("exact", "bpda", "none") if mode == "enc" else ("bpda", "none")

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:
        if self.mode == "enc":
            return self.generator(self.encoder(x))
        # The host classifies under torch.inference_mode, where enable_grad alone cannot build a
        # graph: leave inference mode here, and clone x so it is an ordinary tensor.
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone()
            if self.mode == "opt":
                d = self.generator.latent_dim
                # One (B, d) draw per restart: with per-image noise, row r is image r's own stream.
                z0 = torch.cat([noise.randn((x.shape[0], d), device=x.device, dtype=x.dtype)
                                for _ in range(self.restarts)])
            else:
                with torch.no_grad():
                    z0 = self.encoder(x)
            k = z0.shape[0] // x.shape[0]
            z = self.invert(z0, x.repeat(k, 1, 1, 1))
            with torch.no_grad():
                out = self.generator(z)
                err = (out - x.repeat(k, 1, 1, 1)).pow(2).flatten(1).mean(1)
                best = err.view(k, -1).argmin(0)  # restart-major rows: [restart, image]
                return out.view(k, *x.shape)[best, torch.arange(x.shape[0], device=x.device)]

    def invert(self, z0: Tensor, target: Tensor) -> Tensor:
        """Adam on the latents minimising MSE(G(z), target) per image; callers in no_grad mode too."""
        z = z0.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.iterations):
                # Summed, not averaged, over images: Adam is per-coordinate, so each image's
                # latent then follows its own loss whatever else is in the batch.
                loss = (self.generator(z) - target).pow(2).flatten(1).mean(1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return z.detach()


def make_gan_inversion(params: GANInversionParams) -> GANInversion:
    return GANInversion(generative_model(GENERATOR), generative_model(ENCODER), mode=params.mode,
                        iterations=params.iterations, lr=params.lr, restarts=params.restarts)
