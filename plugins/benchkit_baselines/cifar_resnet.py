"""The CIFAR-style ResNets (3x3 stem, no max-pool, 4x4 average pool) used across the adversarial
robustness literature; module names follow the common layout (conv1/bn1/layerN.i/shortcut/linear)
so published state dicts load without renaming (pyautoattack's shipped ResNet-18 among them)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _bn_conv(cin: int, cout: int, k: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)


class _Block(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 with 4x expansion) residual block."""

    def __init__(self, cin: int, planes: int, stride: int, bottleneck: bool):
        super().__init__()
        self.expansion = 4 if bottleneck else 1
        cout = planes * self.expansion
        if bottleneck:
            self.conv1, self.bn1 = _bn_conv(cin, planes, 1)
            self.conv2, self.bn2 = _bn_conv(planes, planes, 3, stride)
            self.conv3, self.bn3 = _bn_conv(planes, cout, 1)
        else:
            self.conv1, self.bn1 = _bn_conv(cin, planes, 3, stride)
            self.conv2, self.bn2 = _bn_conv(planes, planes, 3)
        self.bottleneck = bottleneck
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(*_bn_conv(cin, cout, 1, stride))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
        else:
            out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The network as checkpoints hold it; a checkpoint trained on normalised inputs is wrapped in
    benchkit_baselines.weights.Normalized."""

    def __init__(self, blocks: tuple[int, int, int, int], bottleneck: bool, num_classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = _bn_conv(3, 64, 3)
        layers, cin = [], 64
        for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stage = []
            for j in range(n):
                stage.append(_Block(cin, planes, 2 if (i > 0 and j == 0) else 1, bottleneck))
                cin = planes * (4 if bottleneck else 1)
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))  # the 4x4 map of a 32x32 input


def resnet18(**kw) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), bottleneck=False, **kw)


def resnet50(**kw) -> CifarResNet:
    return CifarResNet((3, 4, 6, 3), bottleneck=True, **kw)


def pyautoattack_resnet18() -> CifarResNet:
    """The CIFAR-10 ResNet-18 that ships inside the pyautoattack package (examples/model_test.pt;
    inputs in [0, 1], no normalisation; a standard, not adversarially trained, model)."""
    from importlib.resources import files

    from benchkit.assets import load_state_dict

    path = files("pyautoattack") / "examples" / "model_test.pt"
    model = resnet18()
    model.load_state_dict(load_state_dict(str(path)))
    return model
