"""The pre-activation WideResNet of the adversarial-robustness literature (Zagoruyko & Komodakis,
in the layout TRADES published and RobustBench's 'Standard' WRN-28-10 and DiffPure's own
WideResNet_70_16_dropout reuse), so that their state dicts load without renaming:

    conv1 -> block{1,2,3}.layer.<i>.{bn1, conv1, bn2, conv2, convShortcut} -> bn1 -> fc

Each block is BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus a shortcut. Where a block changes the
width, the first BN-ReLU is shared by both branches and the shortcut is a 1x1 convolution of the
activated input; elsewhere the shortcut is the raw input.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        # Present only where the width changes, as in the published checkpoints.
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class _Stage(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout)
                                     for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen on (already normalised) images. `dropout` only acts in training mode
    (DiffPure's WRN-70-16 was trained with 0.3)."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _Stage(n, widths[0], widths[1], 1, dropout)
        self.block2 = _Stage(n, widths[1], widths[2], 2, dropout)
        self.block3 = _Stage(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
