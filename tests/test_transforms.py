"""The train transform split between workers (uint8) and the device (normalise) is exact."""

from __future__ import annotations

import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision import transforms as T

from vlp.data.transforms import DeviceNormalize, as_is, split_for_device
from vlp.model import register_model_configs


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (48 + 7 * i, 40 + 5 * i, 3), dtype=np.uint8))
        for i in range(count)
    ]


def test_worker_then_device_parts_equal_the_whole_transform_bitwise():
    register_model_configs()
    _, train_transform, _ = open_clip.create_model_and_transforms("vlp-tiny-clip")
    worker, device = split_for_device(train_transform)
    assert isinstance(device, DeviceNormalize)
    images = _images(5)
    torch.manual_seed(3)
    whole = torch.stack([train_transform(image) for image in images])
    torch.manual_seed(3)  # same random crops
    parts = torch.stack([worker(image) for image in images])
    assert parts.dtype == torch.uint8 and parts.shape == whole.shape
    assert torch.equal(device(parts), whole)


def test_a_transform_without_a_final_normalize_stays_whole_in_the_workers():
    transform = T.Compose([T.Resize(8), T.ToTensor()])
    worker, device = split_for_device(transform)
    assert worker is transform and device is as_is
    assert split_for_device(T.ToTensor())[1] is as_is
