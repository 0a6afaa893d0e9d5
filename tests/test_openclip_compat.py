"""The open_clip internals vlp reads exist in the installed open_clip; a missing one is named."""

from __future__ import annotations

import pytest
import torch

from vlp.model import new_clip, register_model_configs
from vlp.openclip_compat import can_trim_text, clip_text, missing_internals


@pytest.fixture(scope="module", autouse=True)
def _configs():
    register_model_configs()


@pytest.mark.parametrize("name", ["vlp-tiny-clip", "vlp-tiny-coca", "vlp-demo-clip"])
def test_the_installed_open_clip_has_every_internal_vlp_reads(name):
    assert missing_internals(new_clip(name)) == []


def test_a_missing_internal_is_named_by_its_owner():
    coca = new_clip("vlp-tiny-coca")
    del coca.text_decoder.attn_mask
    assert missing_internals(coca) == ["MultimodalTransformer.attn_mask"]


def test_the_cut_text_tower_equals_open_clip_on_full_rows():
    torch.manual_seed(0)
    clip = new_clip("vlp-tiny-clip").eval()
    assert can_trim_text(clip)
    tokens = torch.zeros(3, clip.context_length, dtype=torch.long)
    for row, length in enumerate((3, 7, 5)):
        tokens[row, :length] = torch.randint(1, 1000, (length,))
        tokens[row, length - 1] = 49407  # end of text: the highest id, where argmax pools
    with torch.no_grad():
        full = clip.encode_text(tokens, normalize=False)
        cut = clip_text(clip, tokens[:, :7])
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)
