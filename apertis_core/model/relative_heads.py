"""Relative cross-attention heads (`cross_attn_relative_heads`): a second look at the picture, around the first.

"What colour is the object closest to the red one?" takes two looks: find the red object, then what is
nearest to it. With ordinary cross-attention the second look needs the place the first one found to travel
through the residual stream into a later layer's query, and in the shapes benchmark that chain never formed
(docs/MULTIMODAL.md). A relative head makes it one step. Relative head r reads the place features
(vision.positions.patch_places: cos and sin of k * pi * u per axis) of the patches ordinary head r of the same
layer looks at, scales them feature by feature with learned weights, and appends them to its query; each
patch's key gets its own place features. The product adds, per axis, sum_k w_k cos(k * pi * offset): a learned
function of how far each patch is from the found object, such as -(row offset^2 + column offset^2) for
"closest to" and its negative for "farthest from". Everything stays a dot product, so both looks run as fused
attention. The weights start at 0, where a relative head is one more ordinary head, or, with
`cross_attn_relative_init` c > 0, at those two profiles: even heads -c * offset^2 per axis (closest), odd heads
+c * offset^2 (farthest), so a run need not find the shape of "near" and "far" before it can use them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The weights are read at this multiple: AdamW moves a parameter by about the learning rate per step whatever
# its gradient's size, and the place term must reach a few units within a few hundred steps to pick one object.
WEIGHT_SCALE = 8.0


class RelativeHeads(nn.Module):
    """The place weights of R relative heads; the heads' own q, k, v come from the cross-attention's projections."""

    def __init__(self, heads: int, frequencies: int, profile_strength: float = 0.0):
        super().__init__()
        self.frequencies, self.profile_strength = frequencies, profile_strength
        self.weights = nn.Parameter(torch.zeros(heads, 4 * frequencies))
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the start value: zero, or the closest / farthest distance profiles (module docstring)."""
        self.weights.zero_()
        if self.profile_strength:
            self.weights[0::2] = -distance_profile(self.frequencies, self.profile_strength)
            self.weights[1::2] = distance_profile(self.frequencies, self.profile_strength)

    def place_parameters(self) -> list[nn.Parameter]:
        """What a run may hold at its start value with the place maps (train.places_frozen_steps)."""
        return [self.weights]

    def extend(
        self, q: torch.Tensor, k: torch.Tensor, places: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (B, H, T, Dh) all heads' queries, the R relative ones last; k: (B, H, 1 + M, Dh) keys after the
        "attend to nothing" slot; places: (B, M, F) each patch's place features; mask: (B, 1, T, 1 + M) ->
        the relative heads' queries and keys, (B, R, T, Dh + F) and (B, R, 1 + M, Dh + F), whose plain dot
        product (no further scaling) is their attention score."""
        heads = len(self.weights)
        patch_places = F.pad(places.to(q.dtype), (0, 0, 1, 0))[:, None].expand(-1, heads, -1, -1)  # nothing: 0
        # Where ordinary heads 0..R-1 look, as the place features they read (less what the nothing slot took).
        looked_at = F.scaled_dot_product_attention(q[:, :heads], k[:, :heads], patch_places, attn_mask=mask)
        scaled = looked_at * (WEIGHT_SCALE * self.weights.to(q.dtype))[:, None]  # (B, R, T, F)
        query = torch.cat([q[:, -heads:] * q.shape[-1] ** -0.5, scaled], -1)
        return query, torch.cat([k[:, -heads:], patch_places], -1)


def distance_profile(frequencies: int, strength: float) -> torch.Tensor:
    """(4 * frequencies,) place weights whose score is strength * (row offset^2 + column offset^2), offsets in
    fractions of the picture, as far as the first `frequencies` cosines carry it: on [-1, 1],
    offset^2 = 1/3 + sum_k 4 (-1)^k / (k pi)^2 cos(k pi offset), and a query's cos * key's cos plus sin * sin
    is the cosine of the offset (patch_places' layout: per axis cos_1..K then sin_1..K, rows then columns)."""
    k = torch.arange(1, frequencies + 1, dtype=torch.float64)
    series = strength * 4 * (-1.0) ** k / (k * math.pi) ** 2 / WEIGHT_SCALE
    return series.repeat(4).float()
