"""The training image transform, split between the DataLoader workers and the device.

open_clip's train transform ends with ToTensor + Normalize, which turn each uint8 image into
float32: four times the bytes to pass from the workers to the trainer, to pin and to copy to the
GPU, and CPU time the workers need for decoding. vlp's workers stop at uint8 (`PILToTensor`) and
the trainer normalises whole batches on the device with the same operations in the same order
(x.float() / 255, then - mean, then / std), so the values are bitwise those of the full
transform.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from open_clip.transform import MaybeToTensor
from torch import Tensor
from torchvision import transforms as T

_TO_TENSOR = (T.ToTensor, MaybeToTensor)


@dataclass(frozen=True)
class DeviceNormalize:
    """uint8 images [B, 3, H, W] -> float32, as ToTensor then Normalize would give them."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Tensor) -> Tensor:
        x = images.to(torch.get_default_dtype()).div(255)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x.sub_(mean).div_(std)


def as_is(images: Tensor) -> Tensor:
    return images


def split_for_device(transform: Callable) -> tuple[Callable, Callable[[Tensor], Tensor]]:
    """(worker part: PIL image -> uint8 [3, H, W], device part: batch -> model input).

    A transform that does not end in ToTensor + Normalize is left whole in the workers and the
    device part passes batches through unchanged.
    """
    steps = getattr(transform, "transforms", None)
    if (
        not steps
        or len(steps) < 2
        or type(steps[-2]) not in _TO_TENSOR
        or not isinstance(steps[-1], T.Normalize)
    ):
        return transform, as_is
    normalize = steps[-1]
    worker = T.Compose([*steps[:-2], T.PILToTensor()])
    return worker, DeviceNormalize(tuple(normalize.mean), tuple(normalize.std))
