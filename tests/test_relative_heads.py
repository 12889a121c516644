"""Relative cross-attention heads: the second look goes where its weights say, measured from the first look.

Relative head r reads the picture around where ordinary head r looks. These tests steer ordinary head 0 onto
one patch and check that the relative head's attention follows it, to the farthest patch or to the same place
as its weights say; that with weights at zero it is an ordinary head; and that what it reads trains where
head 0 looks (the first look learns from relational answers).
"""

import torch

from apertis_core.model.config import PLACE_FREQUENCIES
from apertis_core.model.cross_attention import GatedCrossAttention, ImageMemory
from apertis_core.model.relative_heads import WEIGHT_SCALE, RelativeHeads
from apertis_core.vision.positions import patch_places

from conftest import tiny_config

GRID = 4  # a 4 x 4 patch grid: patch index = row * 4 + col
LOWEST = [0, PLACE_FREQUENCIES, 2 * PLACE_FREQUENCIES, 3 * PLACE_FREQUENCIES]  # cos and sin of pi * u, both axes


def relative_layer() -> GatedCrossAttention:
    cfg = tiny_config(
        "apertis-nano", image_encoder="vit", image_patch_size=8, image_token_id=5, cross_attn_every=1,
        cross_attn_relative_heads=1,
    )  # fmt: skip
    return GatedCrossAttention(cfg).eval()


def steered_layer(lowest_weight: float) -> GatedCrossAttention:
    """Ordinary head 0 looks at whichever patch is large in the first coordinate, the other ordinary heads and
    the relative head have no query (the relative head reads by place only, with `lowest_weight` on the lowest
    frequency's features: above 0 prefers the place head 0 looks at, below 0 the place farthest from it)."""
    layer = relative_layer()
    with torch.no_grad():
        layer.q.weight.zero_()
        layer.q.weight[0] = 10.0 / layer.q.in_features  # head 0's query is (10, 0, ...) for a text of ones
        layer.kv.weight.zero_()
        layer.kv.weight[0, 0] = 1.0  # head 0's key: the patch's first coordinate
        layer.relative.weights[0, LOWEST] = lowest_weight
    return layer


def look_at(patch: int, width: int = 32) -> ImageMemory:
    tokens = torch.zeros(1, GRID * GRID, width)
    tokens[..., 1] = 1.0  # every patch alike but for the one head 0 is steered to
    tokens[0, patch, 0] = 5.0
    return ImageMemory(tokens, torch.arange(1, GRID * GRID + 1)[None], patch_places(GRID, GRID, "cpu")[None])


def where_heads_look(layer: GatedCrossAttention, memory: ImageMemory) -> tuple[int, int]:
    """(the patch ordinary head 0 looks at most, the patch the relative head looks at most) after the picture."""
    with torch.no_grad():
        weights = layer.attention_weights(torch.ones(1, GRID * GRID + 2, 32), memory)[0, :, -1, 1:]  # (H, M)
    return int(weights[0].argmax()), int(weights[-1].argmax())


def test_the_second_look_follows_the_first_to_the_far_side_or_the_same_place():
    far = steered_layer(-1.0)
    assert where_heads_look(far, look_at(0)) == (0, 15)  # top left found: the bottom right corner is farthest
    assert where_heads_look(far, look_at(15)) == (15, 0)  # and the other way round
    assert where_heads_look(far, look_at(3)) == (3, 12)
    same = steered_layer(1.0)
    assert where_heads_look(same, look_at(6)) == (6, 6)
    assert where_heads_look(same, look_at(9)) == (9, 9)


def test_with_its_weights_at_zero_a_relative_head_is_an_ordinary_head():
    torch.manual_seed(0)
    layer = relative_layer()
    patches, text = torch.randn(1, GRID * GRID, 32), torch.randn(1, 5, 32)
    memory = ImageMemory(patches, torch.arange(GRID * GRID)[None], patch_places(GRID, GRID, "cpu")[None])
    with torch.no_grad():
        weights = layer.attention_weights(text, memory)  # (1, H + 1, 5, 1 + M)
        plain = GatedCrossAttention(tiny_config(
            "apertis-nano", image_encoder="vit", image_patch_size=8, image_token_id=5, cross_attn_every=1,
            n_heads=layer.heads, head_dim=layer.head_dim,
        ))  # fmt: skip
        plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "relative" not in k})
        assert torch.allclose(layer(text, memory)[0], plain(text, memory)[0], atol=1e-6)
        assert torch.allclose(weights, plain.attention_weights(text, memory), atol=1e-6)


def test_relational_answers_train_the_first_look():
    torch.manual_seed(0)
    layer = relative_layer()
    torch.nn.init.normal_(layer.relative.weights, std=1.0)
    ordinary = layer.heads - 1
    with torch.no_grad():
        layer.out.weight[:, : ordinary * layer.head_dim] = 0  # only the relative head's read reaches the output
    memory = ImageMemory(torch.randn(1, 16, 32), torch.arange(16)[None], patch_places(GRID, GRID, "cpu")[None])
    read, _ = layer(torch.randn(1, 20, 32), memory)
    read.square().sum().backward()
    per_head = layer.q.weight.grad.unflatten(0, (layer.heads, layer.head_dim)).abs().sum((1, 2))
    assert per_head[0] > 0  # head 0's query: where the second look is measured from
    assert torch.equal(per_head[1:ordinary], torch.zeros(ordinary - 1))  # no path from the other ordinary heads
    assert per_head[-1] > 0
    assert layer.relative.weights.grad.abs().sum() > 0


def test_distance_profiles_score_the_squared_offset_from_the_first_look():
    strength = 20.0
    places = patch_places(8, 8, "cpu")  # offsets in eighths of the picture: up to 7/8 along each axis
    closest, farthest = RelativeHeads(2, PLACE_FREQUENCIES, strength).weights * WEIGHT_SCALE
    grid = torch.cartesian_prod(torch.arange(8.0), torch.arange(8.0)) / 8
    for found in (0, 27, 63):  # a corner, the middle, the other corner
        squared = (grid - grid[found]).square().sum(-1)
        score = (places[found] * places * farthest).sum(-1)
        # Four cosines carry offset^2 to within a tenth of the strength; the profiles are each other's negative.
        assert (score - score[found] - strength * squared).abs().max() < 0.1 * strength
        assert torch.allclose((places[found] * places * closest).sum(-1), -score)


def test_profile_started_heads_look_at_the_found_place_and_farthest_from_it():
    cfg = tiny_config(
        "apertis-nano", image_encoder="vit", image_patch_size=8, image_token_id=5, cross_attn_every=1,
        cross_attn_relative_heads=2, cross_attn_relative_init=20.0,
    )  # fmt: skip
    layer = GatedCrossAttention(cfg).eval()
    with torch.no_grad():
        layer.q.weight.zero_()
        layer.kv.weight.zero_()
        for head in (0, 1):  # both followed heads look at whichever patch is large in the first coordinate
            layer.q.weight[head * layer.head_dim] = 10.0 / layer.q.in_features
            layer.kv.weight[head * layer.head_dim, 0] = 1.0
        weights = layer.attention_weights(torch.ones(1, GRID * GRID + 2, 32), look_at(5))[0, :, -1, 1:]
    assert [int(w.argmax()) for w in weights[-2:]] == [5, 15]  # closest: the place itself; farthest: a corner
    start = layer.relative.weights.detach().clone()
    with torch.no_grad():
        layer.relative.weights.add_(1.0)
    layer.reset_place()
    assert torch.equal(layer.relative.weights, start)  # the start value is the profile, not zero
