"""DiffPure's own standard-trained CIFAR-10 classifiers (Nie et al. 2022, Tables 1, 2 and 4), which
are not RobustBench entries.

What NVlabs/DiffPure's ``utils.get_image_classifier`` loads, and from where:

* ``cifar10-wrn-70-16-dropout`` (the WideResNet-70-16 of Tables 1 and 2): the TRADES-layout
  WideResNet, depth 70, widen 16, dropout 0.3, CIFAR-10 mean/std normalisation inside;
  ``pretrained/cifar10/wrn-70-16-dropout/weights.pt``.
* ``cifar10-resnet-50`` (Table 4): the CIFAR ResNet-50 (3x3 stem, bottlenecks [3, 4, 6, 3]) with
  the same normalisation inside; ``pretrained/cifar10/resnet-50/weights.pt``.

Both files are bare state dicts saved from ``nn.DataParallel`` (keys prefixed ``module.``) and are
published as Google Drive folders linked from the NVlabs/DiffPure README. Here they live at
BENCHKIT_HOME/diffpure/cifar10/<arch>/weights.pt (or a `path` param) and are loaded with
``weights_only``; the prefix is stripped only where every key carries it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

from pydantic import Field
from torch import nn

from benchkit.assets import Asset, load_state_dict
from benchkit.errors import MissingAsset
from benchkit.params import Params
from benchkit_baselines.cifar_resnet import resnet50
from benchkit_baselines.cifar_wideresnet import WideResNet
from benchkit_baselines.weights import Normalized, load_into

# The per-channel statistics DiffPure's cifar10_resnet.py normalises with.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

# The networks as their checkpoints hold them (normalisation is added around them when loaded).
ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "wrn-70-16-dropout": lambda: WideResNet(70, 16, dropout=0.3),
    "resnet-50": resnet50,
}
DRIVE_FOLDERS = {
    "wrn-70-16-dropout": "https://drive.google.com/drive/folders/1istqcnPNXJ-TQFdxRqNJuInzOtlYOG1b",
    "resnet-50": "https://drive.google.com/drive/folders/1SEGilIEAnx9OC1JVhmOynreCF3oog7Fi",
}


class DiffPureCifarParams(Params):
    arch: Literal["wrn-70-16-dropout", "resnet-50"] = Field(
        description="DiffPure's classifier name without the 'cifar10-' prefix")
    path: str | None = Field(None, description="weights file (default BENCHKIT_HOME/diffpure/cifar10/<arch>/weights.pt)")


def diffpure_cifar_asset(arch: str) -> Asset:
    return Asset(f"diffpure/cifar10/{arch}/weights.pt",
                 f"{DRIVE_FOLDERS[arch]} (NVlabs/DiffPure README, '{arch}' on CIFAR-10; "
                 f"the file DiffPure reads as pretrained/cifar10/{arch}/weights.pt)",
                 url=DRIVE_FOLDERS[arch])   # a Drive folder: gdown fetches its weights.pt, else a manual step


def diffpure_cifar_assets(p: DiffPureCifarParams) -> list[tuple[Asset, str | None]]:
    return [(diffpure_cifar_asset(p.arch), p.path)]


def strip_data_parallel(state: dict) -> dict:
    """Drop nn.DataParallel's 'module.' prefix when every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def diffpure_cifar_classifier(p: DiffPureCifarParams) -> nn.Module:
    path: Path = diffpure_cifar_asset(p.arch).require(p.path)
    state = load_state_dict(path)
    if not isinstance(state, dict):
        raise MissingAsset(f"{path}: holds a {type(state).__name__}, not a state dict; is it the published file?")
    net = ARCHITECTURES[p.arch]()
    load_into(net, strip_data_parallel(state), path, f"DiffPure's cifar10-{p.arch} weights")
    return Normalized(net, CIFAR10_MEAN, CIFAR10_STD).eval()
