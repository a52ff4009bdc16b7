"""The dataset interface plugins implement: indexed access to [0, 1] NCHW images and labels."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class Dataset:
    """Subclasses set `name`, `num_classes` and implement `__len__` and `get`."""

    name: str = "dataset"
    num_classes: int = 10

    def __len__(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def get(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """Images (float32 in [0, 1], NCHW) and int64 labels for the given positions."""
        raise NotImplementedError


class TensorDataset(Dataset):
    """A dataset held in memory (small embedded sets and test stand-ins)."""

    def __init__(self, x: Tensor, y: Tensor, name: str, num_classes: int = 10):
        if x.dim() != 4 or x.shape[0] != y.shape[0]:
            raise ValueError(f"expected x [N,C,H,W] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
        self.x, self.y, self.name, self.num_classes = x.float(), y.long(), name, num_classes

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def get(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        # On the images' own device, named: an index tensor on the ambient default device would not
        # be (torch.set_default_device), and indexing across devices fails.
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.x.device)
        return self.x[idx], self.y[idx]
