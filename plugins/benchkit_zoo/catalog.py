"""The zoo's shipped models: architecture, weights file, its sha256, and the recipe that made it.

`load_zoo_model(name)` verifies the file's sha256 before anything is deserialised, so a changed,
truncated or stale weights file fails loudly instead of quietly benchmarking another model.
`benchkit zoo train NAME` (-> `train_zoo_model`) rebuilds a file from its recipe.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors.torch import load as st_load
from torch import nn

from benchkit.assets import Asset, load_into
from benchkit.errors import MissingAsset

from benchkit_zoo import recipes, recipes_baselines
from benchkit_zoo.generative import DigitsGANEncoder, DigitsGenerator, DigitsVAE
from benchkit_zoo.nets import DigitsCNN, DigitsUNet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class ZooIntegrityError(MissingAsset):
    """A weights file's sha256 differs from the catalog's (bad input: reported in one line)."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    builder: Callable[[], nn.Module]
    filename: str
    sha256: str
    recipe: Callable[..., nn.Module]
    description: str


CATALOG: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            name="digits-cnn",
            builder=DigitsCNN,
            filename="digits_cnn.safetensors",
            sha256="11c09d4c4d9ae2ba8452d9a67fe5a61523b41be6e251a06fbe1b2d12f1545121",
            recipe=recipes.train_digits_cnn,
            description="DigitsCNN classifier (151k params), standard training on the digits train split; "
            "input [0,1] 1x8x8, 10 logits.",
        ),
        ZooEntry(
            name="digits-unet",
            builder=DigitsUNet,
            filename="digits_unet.safetensors",
            sha256="8b31039b6b1f2f789795bbf5a7187fd8338767cb3b3c917f95187654c63de99f",
            recipe=recipes.train_digits_unet,
            description="DigitsUNet noise predictor eps(x, 999 t) (254k params, EMA weights), continuous "
            "VP-SDE denoising score matching on the digits train split; input [-1,1] 1x8x8.",
        ),
        ZooEntry(
            name="digits-cnn-at",
            builder=DigitsCNN,
            filename="digits_cnn_at.safetensors",
            sha256="309be16d7e6b2998f013faa109be323a495a8a6b2d8ef64d5b9fdb2f6bea9ff1",
            recipe=recipes_baselines.train_digits_cnn_at,
            description="DigitsCNN adversarially trained (Madry PGD-10, Linf 0.2) on the digits train split; "
            "input [0,1] 1x8x8, 10 logits.",
        ),
        ZooEntry(
            name="digits-vae",
            builder=DigitsVAE,
            filename="digits_vae.safetensors",
            sha256="dfc4a33fba519c871b426e8c3569e1ad11e1ec39e7299932a56d642d65da7258",
            recipe=recipes_baselines.train_digits_vae,
            description="DigitsVAE (128k params, 16-dim latent, beta 0.5) on the digits train split; "
            "[0,1] 1x8x8 in and out.",
        ),
        ZooEntry(
            name="digits-gan",
            builder=DigitsGenerator,
            filename="digits_gan.safetensors",
            sha256="9968d32c628e6df697c947229e5ef4271c9a8029a3f102ef8b28b019294a0f12",
            recipe=recipes_baselines.train_digits_gan,
            description="DigitsGenerator (109k params, EMA weights) of a hinge-loss SN-GAN on the digits train "
            "split; z ~ N(0, I_32) -> [0,1] 1x8x8.",
        ),
        ZooEntry(
            name="digits-gan-encoder",
            builder=DigitsGANEncoder,
            filename="digits_gan_encoder.safetensors",
            sha256="9db4097c40a58f7a5d3f3653c78633de6045a27759349716ba385ff9d1c21fc8",
            recipe=recipes_baselines.train_digits_gan_encoder,
            description="DigitsGANEncoder (56k params) inverting the shipped digits-gan generator: [0,1] 1x8x8 "
            "-> 32-dim latent.",
        ),
    )
}


def _entry(name: str) -> ZooEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {sorted(CATALOG)}") from None


def weights_path(name: str, weights_dir: str | Path | None = None) -> Path:
    return Path(weights_dir or WEIGHTS_DIR) / _entry(name).filename


def asset(name: str) -> tuple[Asset, str]:
    """The shipped weights file as a component declares it (registry `assets=`): listed by
    `benchkit assets`, its sha256 in the key of every cell that uses the model."""
    entry = _entry(name)
    return (Asset(f"benchkit_zoo/{entry.filename}", f"shipped with benchkit_zoo (`benchkit zoo train {name}` "
                  "rebuilds it)", sha256=entry.sha256), str(weights_path(name)))


def load_zoo_model(name: str, weights_dir: str | Path | None = None) -> nn.Module:
    """Build `name`'s architecture and load its verified weights; eval mode, no gradients.

    weights_dir defaults to the package's weights/ folder. Every failure is one line naming the file:
    FileNotFoundError when it is absent, else a MissingAsset (empty, sha256 mismatch, not a
    safetensors file, tensors that do not fit the architecture).
    """
    entry = _entry(name)
    path = weights_path(name, weights_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights of zoo model {name!r} not found at {path}; make them with `benchkit zoo train {name}`"
        )
    # Hash and deserialise the same bytes, so the file cannot change between check and load.
    blob = path.read_bytes()
    if not blob:
        raise MissingAsset(f"{path}: empty (0 bytes); restore the shipped file or retrain with "
                           f"`benchkit zoo train {name}`")
    actual = hashlib.sha256(blob).hexdigest()
    if actual != entry.sha256:
        raise ZooIntegrityError(
            f"sha256 mismatch for zoo model {name!r} weights {path}: expected {entry.sha256}, got {actual}; "
            f"restore the shipped file or retrain with `benchkit zoo train {name}`"
        )
    try:
        state = st_load(blob)
    except Exception as exc:  # noqa: BLE001 - SafetensorError: the file, not the code
        raise MissingAsset(f"{path}: not a safetensors file ({type(exc).__name__}: {exc})") from None
    model = entry.builder()
    load_into(model, state, path, f"the {type(model).__name__} architecture of zoo model {name!r}")
    return model.eval().requires_grad_(False)


def train_zoo_model(name: str, weights_dir: str | Path | None = None, seed: int = 0) -> tuple[Path, str]:
    """Run `name`'s recipe and write its weights file; returns (path, sha256).

    With seed 0 on the reference setup the sha256 equals the catalog's (the recipes are
    deterministic); a different hash means different weights, and loading will refuse them.
    """
    entry = _entry(name)
    path = weights_path(name, weights_dir)
    return path, recipes.save_weights(entry.recipe(seed=seed), path)
