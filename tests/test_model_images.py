"""Images enter ApertisModel at <image> positions through the Unified Multimodal Encoder."""

import pytest
import torch

from apertis_core import ApertisModel
from apertis_core.vision import num_image_tokens

from conftest import tiny_config

IMAGE_ID = 5


def image_model(encoder="vit"):
    cfg = tiny_config(
        "apertis-hybrid-nano", image_encoder=encoder, image_patch_size=8, image_max_patches=16, image_token_id=IMAGE_ID
    )
    return ApertisModel(cfg).eval()


def prompt_with_image(n_patches, text_after=(10, 11, 12)):
    return torch.tensor([[1, 2] + [IMAGE_ID] * n_patches + list(text_after)])


@pytest.mark.parametrize("encoder", ["vit", "resnet18"])
def test_same_text_with_different_images_gives_different_logits(encoder):
    model = image_model(encoder)
    first, second = torch.rand(3, 16, 24), torch.rand(3, 16, 24)
    ids = prompt_with_image(num_image_tokens(first, 8))
    with torch.no_grad():
        a = model(ids, images=[first]).logits
        b = model(ids, images=[second]).logits
    assert (a[0, -3:] - b[0, -3:]).abs().max() > 1e-4
    assert torch.equal(a[0, :2], b[0, :2])  # tokens before the image cannot see it


def test_image_prefix_then_step_matches_parallel_forward():
    model = image_model()
    image = torch.rand(3, 8, 32)
    ids = prompt_with_image(num_image_tokens(image, 8), text_after=(10, 11, 12, 13, 14))
    with torch.no_grad():
        full = model(ids, images=[image]).logits
        prefix = model(ids[:, :-2], images=[image], state=model.init_state(1))
        logits, state = model.step(ids[:, -2], prefix.state)
        logits2, _ = model.step(ids[:, -1], state)
    assert (full[0, -2] - logits[0]).abs().max() <= 1e-4 and (full[0, -1] - logits2[0]).abs().max() <= 1e-4


def test_mismatched_image_positions_are_a_clear_error():
    model = image_model()
    with pytest.raises(ValueError, match="image positions"):
        model(prompt_with_image(3), images=[torch.rand(3, 16, 16)])


def test_text_model_refuses_images():
    model = ApertisModel(tiny_config("apertis-nano"))
    with pytest.raises(ValueError, match="no image encoder"):
        model(torch.tensor([[1, 2]]), images=[torch.rand(3, 8, 8)])
