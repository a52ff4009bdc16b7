"""The hook the baselines plugin owns: generative networks for its VAE and GAN-inversion purifiers.

The plugin declares the kind "generative-models" with the host's ``register_component_kinds`` hook.
A plugin shipping such networks (benchkit_zoo: digits-vae, digits-gan, digits-gan-encoder)
implements the hook with ``@benchkit.hookspecs.hookimpl(optionalhook=True)``, so it still loads
when this plugin is disabled.
"""
from __future__ import annotations

from benchkit.hookspecs import hookspec


@hookspec
def register_generative_models(register):
    """Register generative networks: ``register(id, factory, params=Model, description=...)``.

    ``factory(params)`` returns an ``nn.Module`` in eval mode on [0, 1] images: a VAE (``encode(x)
    -> (mu, logvar)``, ``decode(z)``), a GAN generator (``latent_dim``, ``z -> x``) or an encoder
    inverting one (``x -> z``). The VAE and GAN-inversion purifiers look them up by id.
    """
