"""Generative models of 1x8x8 digits in [0, 1] for the VAE / GAN purification baselines.

Sizes follow the data, not the papers' CelebA-HQ models: 8x8 digits need a 16-32 dim latent and
50-130k weights. Decoders and the generator end in a sigmoid, so every output is
a valid [0, 1] image without clipping (clipping would zero the gradients of saturated pixels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _encoder_trunk(ch: int) -> nn.Sequential:
    # 8x8 -> 4x4 -> 2x2: two stride-2 convs suffice for images this small.
    return nn.Sequential(
        nn.Conv2d(1, ch, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Flatten(),
    )


class _Decoder(nn.Module):
    """z -> 2x2 features -> 4x4 -> 8x8 image in [0, 1]: DCGAN's layout, with nearest upsampling +
    3x3 convs instead of transposed convs, whose uneven overlap left checkerboards on 8x8 outputs.

    No batch norm: its train/eval difference would make the shipped generator's eval-mode samples
    differ from those its discriminator saw, and inversion needs one fixed function of z.
    """

    def __init__(self, latent_dim: int, ch: int) -> None:
        super().__init__()
        self.fc = nn.Linear(latent_dim, 4 * ch * 2 * 2)
        self.ch = ch
        self.net = nn.Sequential(
            nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2.0, mode="nearest"),
            nn.Conv2d(4 * ch, 2 * ch, 3, padding=1), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2.0, mode="nearest"),
            nn.Conv2d(2 * ch, ch, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, 1, 3, padding=1),
        )

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.net(self.fc(z).view(-1, 4 * self.ch, 2, 2)))


class DigitsVAE(nn.Module):
    """Convolutional VAE (Kingma & Welling 2014) with a Bernoulli-style (BCE) likelihood."""

    def __init__(self, latent_dim: int = 16, ch: int = 32) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.enc = _encoder_trunk(ch)
        self.mu = nn.Linear(2 * ch * 2 * 2, latent_dim)
        self.logvar = nn.Linear(2 * ch * 2 * 2, latent_dim)
        self.dec = _Decoder(latent_dim, ch)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance of q(z | x) for x in [0, 1]."""
        h = self.enc(2 * x - 1)
        return self.mu(h), self.logvar(h)

    def decode(self, z: Tensor) -> Tensor:
        return self.dec(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x)[0])


class DigitsGenerator(nn.Module):
    """DCGAN-style generator z ~ N(0, I) -> 1x8x8 image in [0, 1]."""

    def __init__(self, latent_dim: int = 32, ch: int = 32) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.dec = _Decoder(latent_dim, ch)

    def forward(self, z: Tensor) -> Tensor:
        return self.dec(z)


class DigitsDiscriminator(nn.Module):
    """Spectrally normalised (Miyato et al. 2018) conv discriminator: 1x8x8 image in [0, 1] -> one
    logit. SN keeps D Lipschitz, which here made the GAN converge where an R1-penalised D gave
    noisy, fragmented strokes."""

    def __init__(self, ch: int = 32) -> None:
        super().__init__()
        sn = nn.utils.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(1, ch, 3, 1, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(ch, 2 * ch, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * ch, 4 * ch, 4, 2, 1)), nn.LeakyReLU(0.2), nn.Flatten(),
            sn(nn.Linear(4 * ch * 2 * 2, 1)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(2 * x - 1).squeeze(1)


class DigitsGANEncoder(nn.Module):
    """E: image in [0, 1] -> latent of DigitsGenerator, trained to invert it (G(E(x)) ~ x)."""

    def __init__(self, latent_dim: int = 32, ch: int = 32) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = nn.Sequential(_encoder_trunk(ch), nn.Linear(2 * ch * 2 * 2, 128), nn.LeakyReLU(0.2),
                                 nn.Linear(128, latent_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(2 * x - 1)


def vae_loss(vae: DigitsVAE, x: Tensor, eps: Tensor, beta: float = 1.0) -> Tensor:
    """beta-weighted negative ELBO, summed over pixels and latents, averaged over images; eps is the
    reparameterisation noise (passed in so the recipe draws it from its own generator)."""
    mu, logvar = vae.encode(x)
    z = mu + (0.5 * logvar).exp() * eps
    rec = F.binary_cross_entropy(vae.decode(z), x, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
    return (rec + beta * kl).mean()
