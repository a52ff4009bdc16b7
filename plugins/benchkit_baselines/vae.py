"""VAE purification (the 'VAE' row of DiffPure's Table 5a): x' = decode(encode(x)).

The autoencoder projects the input onto what it learned the data looks like, so small
perturbations off the data manifold are discarded. The model is the generative model
`digits-vae` (1x8x8 digits), which benchkit_zoo ships and registers through this plugin's
register_generative_models hook.
"""
from __future__ import annotations

from pydantic import Field, model_validator
from torch import Tensor, nn

from benchkit import registry
from benchkit.defended import Purifier
from benchkit.errors import BadInput
from benchkit.noise import Noise
from benchkit.params import Params


def require_generative(*ids: str) -> None:
    """Raise ValueError (a params error at validation) when a generative model is not registered:
    its plugin (the zoo) may be disabled, and then the suite should fail before it runs."""
    for id in ids:
        try:
            registry.get("generative-models").get(id)
        except BadInput as exc:
            raise ValueError(exc.problems[0]) from None


def generative_model(id: str) -> nn.Module:
    return registry.get("generative-models").get(id).build({})


class VAEParams(Params):
    sample: bool = Field(False, description="decode a posterior sample z ~ q(z|x) drawn through the noise "
                                            "object (a stochastic defense) instead of the posterior mean")

    @model_validator(mode="after")
    def _model_registered(self):
        require_generative("digits-vae")
        return self


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
    return VAEPurifier(generative_model("digits-vae"), sample=params.sample)
