"""The ImageNet classifiers of DiffPure's Table 3, with their published weights read from disk.

DiffPure (utils.get_image_classifier) uses torchvision's ``resnet50(pretrained=True)`` and
``wide_resnet50_2(pretrained=True)`` (the IMAGENET1K_V1 weights) and DeiT-S from
``torch.hub.load('facebookresearch/deit:main', 'deit_small_patch16_224', pretrained=True)``, all
behind a wrapper that normalises [0, 1] inputs with the ImageNet mean and std. Here the same files
are read from BENCHKIT_HOME/imagenet/ (never downloaded), loaded with ``weights_only`` into the
architecture built by torchvision / timm (the robustbench extra), and normalised inside.

Checkpoint layouts: torchvision's files are bare state dicts of the torchvision module; DeiT's
release file is a dict whose 'model' entry is the state dict of a timm VisionTransformer (the DeiT
repo builds deit_small_patch16_224 from timm's VisionTransformer with patch 16, width 384, depth
12, 6 heads), which timm's ``deit_small_patch16_224`` reproduces key for key. A bare state dict
(e.g. converted from timm's Hugging Face copy) is accepted too.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from benchkit.assets import Asset, load_state_dict
from benchkit.errors import BadInput
from benchkit.params import Params
from benchkit_baselines.weights import Normalized, load_into

INSTALL_HINT = "pip install -e '.[robustbench]'"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's IMAGENET1K_V1 weights; the hex in the file name is the start of the file's sha256.
TORCHVISION_WEIGHTS = {
    "resnet50": ("https://download.pytorch.org/models/resnet50-0676ba61.pth", "ResNet50_Weights.IMAGENET1K_V1"),
    "wide_resnet50_2": ("https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
                        "Wide_ResNet50_2_Weights.IMAGENET1K_V1"),
}
DEIT_S_URL = "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth"


def _asset(url: str, what: str) -> Asset:
    name = Path(url).name
    # torchvision's weights (weights.get_state_dict(check_hash=True)) and DeiT's models.py
    # (load_state_dict_from_url(check_hash=True)) hold the file to the hex in its name (torch.hub's
    # HASH_REGEX): the start of its sha256, the only digest these publishers give.
    prefix = re.search(r"-([a-f0-9]+)\.", name)
    return Asset(f"imagenet/{name}", f"{url} ({what}; the hex in the name is the start of its sha256)", url=url,
                 sha256_prefix=prefix[1] if prefix else None)


def _require(module: str, who: str):
    if importlib.util.find_spec(module) is None:
        raise BadInput(f"classifier '{who}' needs {module} (the robustbench extra): {INSTALL_HINT}")


# ---------------------------------------------------------------- torchvision ResNet-50 / WRN-50-2

class TorchvisionParams(Params):
    arch: Literal["resnet50", "wide_resnet50_2"] = Field("resnet50", description="torchvision architecture")
    path: str | None = Field(None, description="weights file (default BENCHKIT_HOME/imagenet/<published file name>)")


def torchvision_asset(arch: str) -> Asset:
    url, weights = TORCHVISION_WEIGHTS[arch]
    return _asset(url, f"torchvision {weights}, as DiffPure's {arch}(pretrained=True)")


def torchvision_assets(p: TorchvisionParams) -> list:
    return [(torchvision_asset(p.arch), p.path)]


def torchvision_classifier(p: TorchvisionParams) -> nn.Module:
    path = torchvision_asset(p.arch).require(p.path)
    _require("torchvision", "imagenet-torchvision")
    import torchvision

    net = getattr(torchvision.models, p.arch)(weights=None)
    load_into(net, load_state_dict(path), path, f"torchvision's {p.arch} weights")
    return Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval()


# ---------------------------------------------------------------- DeiT-S

class DeiTParams(Params):
    path: str | None = Field(None, description="weights file (default BENCHKIT_HOME/imagenet/deit_small_patch16_224-cd65a155.pth)")


DEIT_S_ASSET = _asset(DEIT_S_URL, "DeiT-S of https://github.com/facebookresearch/deit, the file DiffPure loads "
                                  "through torch.hub 'facebookresearch/deit:main' deit_small_patch16_224")


def deit_assets(p: DeiTParams) -> list:
    return [(DEIT_S_ASSET, p.path)]


def deit_s_architecture() -> nn.Module:
    _require("timm", "deit-s")
    import timm

    return timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=1000)


def deit_s_classifier(p: DeiTParams) -> nn.Module:
    path = DEIT_S_ASSET.require(p.path)
    net = deit_s_architecture()
    # Training checkpoints of the DeiT repo also hold the argparse Namespace of the run; allow only that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = load_state_dict(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    load_into(net, state, path, "DeiT-S weights (timm deit_small_patch16_224)")
    return Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval()
