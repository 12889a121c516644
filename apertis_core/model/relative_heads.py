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

A "closest" profile peaks on the found object itself, which the answer must skip. With
`cross_attn_relative_exclude` g > 0 each relative head also subtracts gamma times its ordinary head's own score
on each patch (one more block of the same dot product: query -gamma * q_r, key k_r), gamma learned per head and
starting at g on the closest heads and 0 on the farthest: the patches that made the first look are pushed down
in the second.

Where the first look is made depends on the question's words: in "... closest to the red object?" the red
object is looked up at "red", a few tokens before the answer, and at the answer itself only once relational
questions have been trained a long while (docs/MULTIMODAL.md). With `cross_attn_relative_window` W > 1 a
relative head measures from the sharpest look of its ordinary head (the largest share on one patch) among the
last W positions, and takes that position's query for the exclusion term too. For step-by-step decoding the
last W - 1 positions' looks ride in the generation state (`LOOK_KEYS`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The weights are read at this multiple: AdamW moves a parameter by about the learning rate per step whatever
# its gradient's size, and the place term must reach a few units within a few hundred steps to pick one object.
WEIGHT_SCALE = 8.0
# The state entries that carry the last window - 1 positions' looks: sharpness (B, R, W - 1), the place features
# read (B, R, W - 1, F) and the ordinary heads' queries (B, R, W - 1, Dh).
LOOK_KEYS = ("look_sharpness", "look_places", "look_queries")


class RelativeHeads(nn.Module):
    """The place weights of R relative heads; the heads' own q, k, v come from the cross-attention's projections."""

    def __init__(
        self, heads: int, frequencies: int, profile_strength: float = 0.0, exclude: float = 0.0, window: int = 1
    ):
        super().__init__()
        self.frequencies, self.profile_strength, self.window = frequencies, profile_strength, window
        self.weights = nn.Parameter(torch.zeros(heads, 4 * frequencies))
        self.reset()
        self.exclusion = None
        if exclude:
            self.exclusion = nn.Parameter(torch.zeros(heads))
            with torch.no_grad():
                self.exclusion[0::2] = exclude

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

    def empty_looks(self, batch_size: int, head_dim: int, device, dtype) -> dict:
        """The look history before any position (`LOOK_KEYS`; none with a window of 1): sharpness -1 loses to
        any real look."""
        if self.window == 1:
            return {}
        shape = (batch_size, len(self.weights), self.window - 1)
        return {
            "look_sharpness": torch.full(shape, -1.0, device=device, dtype=dtype),
            "look_places": torch.zeros(*shape, 4 * self.frequencies, device=device, dtype=dtype),
            "look_queries": torch.zeros(*shape, head_dim, device=device, dtype=dtype),
        }

    def extend(
        self, q: torch.Tensor, k: torch.Tensor, places: torch.Tensor, mask: torch.Tensor, looks: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """q: (B, H, T, Dh) all heads' queries, the R relative ones last; k: (B, H, 1 + M, Dh) keys after the
        "attend to nothing" slot; places: (B, M, F) each patch's place features; mask: (B, 1, T, 1 + M); looks:
        the look history from the generation state (`empty_looks` when None) -> the relative heads' queries and
        keys, (B, R, T, Dh + F) and (B, R, 1 + M, Dh + F) (2 * Dh + F with the exclusion term), whose plain dot
        product (no further scaling) is their attention score, and the look history after these positions."""
        heads = len(self.weights)
        patch_places = F.pad(places.to(q.dtype), (0, 0, 1, 0))[:, None].expand(-1, heads, -1, -1)  # nothing: 0
        followed, followed_keys = q[:, :heads], k[:, :heads]
        if self.window == 1:
            # Where ordinary heads 0..R-1 look, as the place features they read (less what the nothing slot took).
            looked_at = F.scaled_dot_product_attention(followed, followed_keys, patch_places, attn_mask=mask)
            later = {}
        else:
            if looks is None:
                looks = self.empty_looks(q.shape[0], q.shape[-1], q.device, q.dtype)
            looked_at, followed, later = self._sharpest_looks(followed, followed_keys, patch_places, mask, looks)
        scaled = looked_at * (WEIGHT_SCALE * self.weights.to(q.dtype))[:, None]  # (B, R, T, F)
        scale = q.shape[-1] ** -0.5
        query, key = [q[:, -heads:] * scale, scaled], [k[:, -heads:], patch_places]
        if self.exclusion is not None:  # minus gamma times what ordinary head r scores each patch
            query.append(followed * (-scale * self.exclusion.to(q.dtype))[:, None, None])
            key.append(followed_keys)
        return torch.cat(query, -1), torch.cat(key, -1), later

    def _sharpest_looks(
        self, q: torch.Tensor, k: torch.Tensor, patch_places: torch.Tensor, mask: torch.Tensor, looks: dict
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Per position, the place features and query of the followed head's sharpest look among the last
        `window` positions (the latest of equals), and the look history after these positions."""
        weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf")).softmax(-1)
        now = {
            "look_sharpness": weights[..., 1:].amax(-1),  # (B, R, T): the largest share on one patch
            "look_places": weights @ patch_places,  # (B, R, T, F)
            "look_queries": q,
        }
        seen = {name: torch.cat([looks[name].to(q.dtype), now[name]], 2) for name in LOOK_KEYS}  # W - 1 + T
        windows = seen["look_sharpness"].unfold(2, self.window, 1)  # (B, R, T, W), oldest first
        best = self.window - 1 - windows.flip(-1).argmax(-1)  # flipped: argmax's first of equals is the latest
        index = (best + torch.arange(q.shape[2], device=q.device))[..., None]  # (B, R, T, 1) into `seen`

        def pick(name: str) -> torch.Tensor:
            return seen[name].gather(2, index.expand(-1, -1, -1, seen[name].shape[-1]))

        later = {name: seen[name][:, :, -(self.window - 1) :] for name in LOOK_KEYS}
        return pick("look_places"), pick("look_queries"), later


def distance_profile(frequencies: int, strength: float) -> torch.Tensor:
    """(4 * frequencies,) place weights whose score is strength * (row offset^2 + column offset^2), offsets in
    fractions of the picture, as far as the first `frequencies` cosines carry it: on [-1, 1],
    offset^2 = 1/3 + sum_k 4 (-1)^k / (k pi)^2 cos(k pi offset), and a query's cos * key's cos plus sin * sin
    is the cosine of the offset (patch_places' layout: per axis cos_1..K then sin_1..K, rows then columns)."""
    k = torch.arange(1, frequencies + 1, dtype=torch.float64)
    series = strength * 4 * (-1.0) ** k / (k * math.pi) ** 2 / WEIGHT_SCALE
    return series.repeat(4).float()
