"""The CelebA-HQ attribute classifiers DiffPure attacks (Table 5a / 12), built from our own code.

The checkpoints are Chai et al. 2021's ("Ensembling with Deep Generative Views", gan-ensembling):
one file per CelebA attribute, ``<attribute>/net_best.pth``, in pretrained_classifiers.zip. Layout,
as established from gan-ensembling's training script and DiffPure's loader
(classifiers/attribute_classifier.py, attribute_net.py):

* the file is ``{'state_dict': ..., 'optimizer': ..., 'epoch': int, 'valacc': float}``; the state
  dict is that of a StyleGAN / progressive-GAN style discriminator ``D(3, resolution=256,
  fixed_size=True, use_mbstd=False)`` with one output: equalised-learning-rate layers (a conv or
  linear without bias, multiplied by gain / sqrt(fan_in), plus a bias parameter ``wscale.b``);
* keys: ``lod_in`` (float64 scalar buffer), ``fromrgb_lod0.conv.{conv.weight, wscale.b}``, for each
  resolution 256 ... 8 a block ``<r>x<r>.conv0`` / ``conv1`` (3x3, then 2x2 average pooling), and
  ``4x4.conv`` (3x3), ``4x4.dense0`` (512*4*4 -> 512), ``4x4.dense1`` (512 -> 1, gain 1); channels
  ``min(8192 / 2**stage, 512)``: 64 at 256x256, 128, 256, then 512;
* the single output is a logit with *negative* values meaning the attribute is present (training
  used BCE on ``1 - label``); DiffPure's wrapper classifies ``cat([logit, -logit])`` of
  ``(x - 0.5) / 0.5`` images, so class 1 (attribute present) has logit ``-logit``. Inputs larger
  than 256 are box-downsampled to 256 first, as both repositories do.

What could not be checked here: the published zip itself (7.0 GB, no checksum published) and so
the exact folder names inside it; the loader accepts the checkpoint dict or a bare state dict.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator
from torch import nn

from benchkit import registry
from benchkit.assets import Asset, load_state_dict
from benchkit.errors import BadInput, MissingAsset
from benchkit.params import Params

LEAK = 0.2


def _nf(stage: int, fmap_base: int = 8192, fmap_max: int = 512) -> int:
    return min(int(fmap_base / (2.0 ** stage)), fmap_max)


class WScale(nn.Module):
    """Equalised learning rate: x * gain / sqrt(fan_in) + b (b broadcast over channels)."""

    def __init__(self, channels: int, fan_in: int, gain: float = math.sqrt(2)):
        super().__init__()
        self.scale = float(gain / math.sqrt(fan_in))
        self.b = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
        return x * self.scale + self.b.view(shape)


class WConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, padding: int = 0, gain: float = math.sqrt(2)):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.wscale = WScale(cout, cin * k * k, gain)

    def forward(self, x):
        return self.wscale(self.conv(x))


class WLinear(nn.Module):
    def __init__(self, cin: int, cout: int, gain: float = math.sqrt(2)):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.wscale = WScale(cout, cin, gain)

    def forward(self, x):
        return self.wscale(self.linear(x))


class FromRGB(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = WConv(cin, cout, 1)

    def forward(self, x):
        return F.leaky_relu(self.conv(x), LEAK)


class DownBlock(nn.Module):
    """conv0 -> act -> conv1 (with bias) -> 2x2 average pool -> act."""

    def __init__(self, cin: int, cmid: int, cout: int):
        super().__init__()
        self.conv0 = WConv(cin, cmid, 3, padding=1)
        self.conv1 = WConv(cmid, cout, 3, padding=1)

    def forward(self, x):
        x = F.leaky_relu(self.conv0(x), LEAK)
        return F.leaky_relu(F.avg_pool2d(self.conv1(x), 2), LEAK)


class Head(nn.Module):
    """4x4: conv -> act -> flatten -> dense0 -> act -> dense1 (gain 1)."""

    def __init__(self, cin: int, c0: int, c1: int, out: int = 1, pool: int = 4):
        super().__init__()
        self.conv = WConv(cin, c0, 3, padding=1)
        self.dense0 = WLinear(c0 * pool * pool, c1)
        self.dense1 = WLinear(c1, out, gain=1.0)

    def forward(self, x):
        x = F.leaky_relu(self.conv(x), LEAK).flatten(1)
        return self.dense1(F.leaky_relu(self.dense0(x), LEAK))


class AttributeNet(nn.Module):
    """The discriminator-shaped attribute classifier at a fixed resolution: [-1, 1] images -> [N, 1]."""

    def __init__(self, resolution: int = 256):
        super().__init__()
        log2 = int(round(math.log2(resolution)))
        if 2 ** log2 != resolution or resolution < 8:
            raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
        self.resolution = resolution
        self.register_buffer("lod_in", torch.tensor(0.0, dtype=torch.float64))
        self.fromrgb_lod0 = FromRGB(3, _nf(log2 - 1))
        self.blocks = []
        for res in range(log2, 2, -1):
            name = f"{2 ** res}x{2 ** res}"
            self.add_module(name, DownBlock(_nf(res - 1), _nf(res - 1), _nf(res - 2)))
            self.blocks.append(name)
        self.add_module("4x4", Head(_nf(1), _nf(1), _nf(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fromrgb_lod0(x)
        for name in self.blocks:
            x = getattr(self, name)(x)
        return getattr(self, "4x4")(x)


def resolution_of(state: dict) -> int:
    """The input resolution a state dict was built for: its largest '<r>x<r>.conv0' block."""
    res = [2 ** i for i in range(3, 12) if f"{2 ** i}x{2 ** i}.conv0.conv.weight" in state]
    if not res:
        raise KeyError("no '<r>x<r>.conv0.conv.weight' key")
    return max(res)


class AttributeClassifier(nn.Module):
    """[0, 1] images -> 2-class logits [present-not, present] as DiffPure's ClassifierWrapper:
    normalise to [-1, 1], box-downsample to the net's resolution, logits cat([l, -l])."""

    def __init__(self, net: AttributeNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.5
        size = self.net.resolution
        if x.shape[-1] > size:
            f = x.shape[-1] // size
            if f * size != x.shape[-1] or x.shape[-2] != x.shape[-1]:
                raise ValueError(f"attribute classifier: input {tuple(x.shape[-2:])} is not a square multiple of {size}")
            x = F.avg_pool2d(x, f)
        elif x.shape[-1] != size or x.shape[-2] != size:
            raise ValueError(f"attribute classifier expects {size}x{size} inputs, got {tuple(x.shape[-2:])}")
        logit = self.net(x)
        return torch.cat([logit, -logit], dim=1)


# ---------------------------------------------------------------- the registered classifier

ZIP_URL = "http://latent-composition.csail.mit.edu/other_projects/gan_ensembling/zips/pretrained_classifiers.zip"


class AttributeParams(Params):
    attribute: str = Field("Eyeglasses", description="CelebA attribute (Eyeglasses, Smiling, ...): one classifier each")
    path: str | None = Field(None, description="checkpoint (default BENCHKIT_HOME/celebahq/classifiers/<attribute>/net_best.pth)")

    @field_validator("attribute")
    @classmethod
    def _known(cls, v: str) -> str:
        # The 40 CelebA attributes are the celebahq dataset's to know: ask its params model
        # through the registry (the data plugin is not imported), and report its own message.
        try:
            registry.get("datasets").get("celebahq").params.model_validate({"attribute": v})
        except BadInput as exc:
            raise ValueError(exc.problems[0]) from None
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(str(err.get("ctx", {}).get("error", err["msg"]))) from None
        return v


def attribute_asset(attribute: str) -> Asset:
    return Asset(f"celebahq/classifiers/{attribute}/net_best.pth",
                 f"{ZIP_URL} (Chai et al. 2021, gan-ensembling: 40 CelebA-HQ attribute classifiers, 7.0 GB; "
                 f"take {attribute}/net_best.pth from its celebahq folder, which DiffPure reads as "
                 f"pretrained/celebahq/{attribute}/net_best.pth)",
                 # gan-ensembling's download script unzips it at the repository root, whose code then reads
                 # results/pretrained_classifiers/celebahq/<attribute>/net_best.pth: a '/'-suffix finds it.
                 archive=ZIP_URL, member=f"celebahq/{attribute}/net_best.pth")


def attribute_assets(p: AttributeParams) -> list:
    return [(attribute_asset(p.attribute), p.path)]


def attribute_classifier(p: AttributeParams) -> AttributeClassifier:
    path = attribute_asset(p.attribute).require(p.path)
    ckpt = load_state_dict(path)
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) else ckpt
    try:
        net = AttributeNet(resolution_of(state))
        net.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        first = " ".join(str(exc).strip().split())[:300]
        raise MissingAsset(f"{path}: not a gan-ensembling attribute classifier ({type(exc).__name__}: {first}); "
                           "is it the published net_best.pth?") from None
    return AttributeClassifier(net).eval()
