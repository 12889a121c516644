"""2-D rotary positions for the ViT patch encoder (`image_pos: rope2d`): attention between patches
depends on their offset in rows and columns.

The first half of each head's query and key is rotated by the patch's row, the second half by its column
(axial 2-D RoPE, as in RoFormer-2D / EVA-02). The other choices, learned row and column tables ("learned2d")
and no positions ("none"), live in the encoder itself. `DistanceBias` (`image_distance_bias`) adds to any of
them a learned per-head preference for patches at some distance from the querying patch.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model.config import DISTANCE_KNOTS, PLACE_FREQUENCIES
from ..model.layers import Rotary


class Rope2D:
    """Axial 2-D rotary positions for (B, H, N, Dh) queries and keys of patches on a row-major grid."""

    def __init__(self, head_dim: int, theta: float = 100.0):
        # A grid is at most a few dozen patches a side, so a low base spreads the frequencies over it.
        self.half = head_dim // 2
        self.rotary = Rotary(self.half, theta)

    def cos_sin(self, grids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """grids: (B, N, 2) long (row, col) of each patch -> cos and sin for rows and columns, (B, 1, N, Dh/2)."""
        flat = grids.reshape(-1, 2)
        parts = [self.rotary.cos_sin(flat[:, axis], dtype) for axis in (0, 1)]
        return tuple(t.reshape(*grids.shape[:2], 1, self.half).transpose(1, 2) for pair in parts for t in pair)

    def apply(self, x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
        row_cos, row_sin, col_cos, col_sin = tables
        first, second = x.split(self.half, dim=-1)
        return torch.cat([Rotary.apply(first, row_cos, row_sin), Rotary.apply(second, col_cos, col_sin)], dim=-1)


def grid_positions(rows: int, cols: int, device) -> torch.Tensor:
    """(rows * cols, 2) long: the (row, col) of each patch in row-major order."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return torch.stack([r, c], dim=-1)


def patch_places(rows: int, cols: int, device) -> torch.Tensor:
    """(rows * cols, 4 * PLACE_FREQUENCIES) float: cos and sin of k * pi * u for k = 1..PLACE_FREQUENCIES, where u
    is the patch centre's fraction of the picture's height, then of its width, in row-major order.

    Fractions rather than indices, so a place means the same on every grid; cos(pi * u) is positive on the top
    (left) half and negative on the other, so the halves are one linear read apart."""
    grid = grid_positions(rows, cols, device).float()
    fraction = (grid + 0.5) / torch.tensor([rows, cols], device=device)  # (N, 2)
    angles = fraction[..., None] * torch.pi * torch.arange(1, PLACE_FREQUENCIES + 1, device=device)  # (N, 2, K)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).flatten(1)


class DistanceBias(nn.Module):
    """A learned per-head attention bias that depends only on how far apart two patches are in the picture.

    Each head has a piecewise-linear curve over the distance between patch centres, measured in fractions of
    the picture's height and width (so a curve means the same on every grid) and linearly interpolated between
    DISTANCE_KNOTS knots. A head whose curve falls with distance gathers what is next to each patch, one whose
    curve rises what is far from it: what "the object closest to / farthest from the red one" asks, computed for
    every patch before any question is read (T5 / Swin relative-position biases, by distance instead of offset).
    The curves start flat at 0, where the encoder attends as if they were not there.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.curves = nn.Parameter(torch.zeros(n_heads, DISTANCE_KNOTS))

    def place_parameters(self) -> list[nn.Parameter]:
        """What a run may hold at its start value with the cross-attention place maps (train.places_frozen_steps)."""
        return [self.curves]

    def forward(self, grids: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
        """grids: (B, N, 2) long (row, col) of each patch; shapes: (B, 2) each image's (rows, cols) ->
        (B, H, N, N) float bias of query patch i on key patch j."""
        fraction = (grids.float() + 0.5) / shapes[:, None].float()  # (B, N, 2)
        distance = torch.cdist(fraction, fraction) / 2**0.5  # (B, N, N), 1 = the diagonal
        knot = distance.clamp(0, 1) * (DISTANCE_KNOTS - 1)
        low = knot.floor().long().clamp(max=DISTANCE_KNOTS - 2)
        left, right = self.curves[:, low], self.curves[:, low + 1]  # (H, B, N, N)
        return (left + (right - left) * (knot - low)).transpose(0, 1)
