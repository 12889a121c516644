"""2-D rotary positions for the ViT patch encoder (`image_pos: rope2d`): attention between patches
depends on their offset in rows and columns.

The first half of each head's query and key is rotated by the patch's row, the second half by its column
(axial 2-D RoPE, as in RoFormer-2D / EVA-02). The other choices, learned row and column tables ("learned2d")
and no positions ("none"), live in the encoder itself.
"""

from __future__ import annotations

import torch

from ..model.config import PLACE_FREQUENCIES
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
