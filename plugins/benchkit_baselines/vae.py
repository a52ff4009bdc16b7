"""VAE purification (the 'VAE' row of DiffPure's Table 5a): x' = decode(encode(x)).

The autoencoder projects the input onto what it learned the data looks like, so small
perturbations off the data manifold are discarded. The shipped model is benchkit_zoo's
`digits-vae` (1x8x8 digits).
"""
from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from benchkit.defended import Purifier
from benchkit.noise import Noise
from benchkit.params import Params


class VAEParams(Params):
    sample: bool = Field(False, description="decode a posterior sample z ~ q(z|x) drawn through the noise "
                                            "object (a stochastic defense) instead of the posterior mean")


class VAEPurifier(Purifier):
    """decode(mean of q(z|x)), or decode(z ~ q(z|x)) with `sample`. Differentiable end to end, so
    `exact` is the true gradient of the defense."""

    gradient_modes = ("exact", "bpda", "none")

    def __init__(self, vae: nn.Module, sample: bool = False) -> None:
        super().__init__()
        self.vae = vae
        self.sample = sample
        self.stochastic = sample

    def _purify(self, x: Tensor, *, gradient: str, noise: Noise) -> Tensor:
        mu, logvar = self.vae.encode(x)
        if self.sample:
            mu = mu + (0.5 * logvar).exp() * noise.randn(tuple(mu.shape), device=mu.device, dtype=mu.dtype)
        return self.vae.decode(mu)


def make_vae(params: VAEParams) -> VAEPurifier:
    from benchkit_zoo.catalog import load_zoo_model

    return VAEPurifier(load_zoo_model("digits-vae"), sample=params.sample)
