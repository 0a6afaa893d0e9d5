"""The demo's CNN tower runs on channels-last inputs; its numbers stay those of open_clip's."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from vlp.config import ModelConfig
from vlp.model import build_model


def test_channels_last_cnn_embeddings_match_open_clip_within_1e5():
    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(ModelConfig(name="vlp-demo-clip")))[0].eval()
    assert model.channels_last
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ours = model._encode_image(images)[0]
        reference = model.clip.encode_image(images.contiguous(), normalize=False)
    # oneDNN sums the convolutions in another order for channels-last tensors
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    weights = model.clip.state_dict()
    assert all(t.is_contiguous() for t in weights.values()), "safetensors needs contiguous"


def test_a_vit_tower_keeps_its_input_layout():
    model = build_model(OmegaConf.structured(ModelConfig(name="vlp-tiny-clip")))[0]
    assert not model.channels_last
