"""Registers the small models we train and ship, and the `benchkit zoo` command.

The classifiers go to the host's registry; the score model and the generative models go through
hooks that DiffPure and the baselines own, implemented as optional hooks: with either plugin
disabled the zoo still loads, and those models are simply not listed.
"""
from __future__ import annotations

import argparse
import sys
from typing import Literal

from pydantic import Field

from benchkit.errors import BadInput
from benchkit.hookspecs import hookimpl
from benchkit.params import Params


def _load(name: str):
    from benchkit_zoo.catalog import load_zoo_model

    return load_zoo_model(name)


def _shipped(name: str):
    """assets=: the model's shipped weights file, so its sha256 keys the cells that use it."""
    def assets(params) -> list:
        from benchkit_zoo.catalog import asset

        return [asset(name)]
    return assets


@hookimpl
def register_classifiers(register):
    register("digits-cnn", lambda params: _load("digits-cnn"), assets=_shipped("digits-cnn"),
             description="Small CNN trained on the digits train split (benchkit_zoo recipe, shipped weights)")
    register("digits-cnn-at", lambda params: _load("digits-cnn-at"), assets=_shipped("digits-cnn-at"),
             description="The digits CNN adversarially trained with PGD at Linf 0.2 (Madry et al. 2018; "
                         "benchkit_zoo recipe, shipped weights)")


class ScoreNetParams(Params):
    """The options DiffPure's wrapper applies to a plain noise predictor (benchkit_diffpure.score)."""
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="network arithmetic (torch.autocast)")
    compile: bool = Field(False, description="torch.compile the network (inductor; the first call compiles)")


@hookimpl(optionalhook=True)
def register_score_models(register):
    # A plain noise predictor with TIME_SCALE: DiffPure wraps it (see benchkit_diffpure.hookspecs).
    register("digits-unet", lambda params: _load("digits-unet"), params=ScoreNetParams, assets=_shipped("digits-unet"),
             description="small score U-Net trained on the digits train split (benchkit_zoo recipe, shipped)")


@hookimpl(optionalhook=True)
def register_generative_models(register):
    register("digits-vae", lambda params: _load("digits-vae"), assets=_shipped("digits-vae"),
             description="VAE of the digits, 16-dim latent (benchkit_zoo recipe, shipped)")
    register("digits-gan", lambda params: _load("digits-gan"), assets=_shipped("digits-gan"),
             description="SN-GAN generator of the digits, 32-dim latent (benchkit_zoo recipe, shipped)")
    register("digits-gan-encoder", lambda params: _load("digits-gan-encoder"), assets=_shipped("digits-gan-encoder"),
             description="encoder inverting the digits-gan generator (benchkit_zoo recipe, shipped)")


def _zoo(args: argparse.Namespace) -> int:
    from benchkit_zoo import catalog

    if args.zoo_action == "list":
        from tabulate import tabulate

        rows = [[name, e.filename, e.sha256[:16], e.description] for name, e in catalog.CATALOG.items()]
        print(tabulate(rows, headers=["model", "file", "sha256 (first 16)", "description"], disable_numparse=True))
        return 0
    if args.name and args.name not in catalog.CATALOG:
        raise BadInput(f"zoo {args.zoo_action}: unknown model '{args.name}' (known: {', '.join(catalog.CATALOG)})")
    names = [args.name] if args.name else list(catalog.CATALOG)
    if args.zoo_action == "train":
        for name in names:
            path, digest = catalog.train_zoo_model(name, weights_dir=args.out)
            print(f"{name}: wrote {path} sha256 {digest}")
        return 0
    return _verify(names)


def _verify(names: list[str]) -> int:
    """Every model checked, one line each: ok with its digest, or what is wrong with its file. A bad
    weights file is a finding, not a usage error: exit 1 when any model is bad."""
    from benchkit_zoo import catalog

    bad = 0
    for name in names:
        try:
            catalog.load_zoo_model(name)
            print(f"{name}: ok ({catalog.CATALOG[name].sha256[:16]})")
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with one model, the others are checked
            bad += 1
            text = " ".join(str(exc).split()) or type(exc).__name__
            print(f"{name}: BAD: {text}")
    if bad:
        print(f"benchkit: zoo verify: {bad} of {len(names)} model(s) bad; restore the shipped files or retrain "
              "them with `benchkit zoo train NAME`", file=sys.stderr)
    return 1 if bad else 0


@hookimpl
def register_commands(cli):
    p = cli.add_parser("zoo", help="the small shipped models: list, train, verify")
    p.add_argument("zoo_action", choices=["list", "train", "verify"])
    p.add_argument("name", nargs="?", help="model name (default: all)")
    p.add_argument("--out", help="train: write the weights into this folder instead of the package's")
    p.set_defaults(func=_zoo)
