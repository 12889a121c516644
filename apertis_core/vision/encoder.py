"""UME, the Unified Multimodal Encoder: images -> patch features (ViT or ResNet) -> tokens of width d_model."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configio import ConfigError
from ..image_tokens import patch_grid
from ..model.config import ModelConfig
from ..model.layers import GatedFFN, RMSNorm
from .positions import DistanceBias, Rope2D, grid_positions

# ResNet stage whose output stride equals the patch size: the final feature map of the (truncated)
# backbone is then exactly the patch grid, so num_image_tokens() holds for every encoder.
_RESNET_STAGE_FOR_STRIDE = {4: 1, 8: 2, 16: 3, 32: 4}


class UnifiedMultimodalEncoder(nn.Module):
    """forward(images: list of (3, H, W)) -> list of (rows * cols, d_model), one per image, row-major."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_size = cfg.image_patch_size
        self.max_patches = cfg.image_max_patches
        if cfg.image_encoder == "vit":
            self.backbone: nn.Module = ViTPatchEncoder(cfg)
        elif cfg.image_encoder in ("resnet18", "resnet34", "resnet50"):
            self.backbone = ResNetPatchEncoder(cfg.image_encoder, cfg.image_patch_size)
        else:
            raise ConfigError(
                f"model config: image_encoder {cfg.image_encoder!r} builds no encoder; use vit or resnet18/34/50"
            )
        self.projector = nn.Sequential(
            nn.Linear(self.backbone.out_width, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model)
        )
        # Marks tokens as image tokens for the language model, wherever in the text they stand.
        self.modality = nn.Parameter(torch.randn(cfg.d_model) * cfg.init_std)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        if not images:
            return []
        for i, image in enumerate(images):
            self._check(i, image)
        features = self.backbone(images)  # list of (n_i, width)
        lengths = [f.shape[0] for f in features]
        tokens = self.projector(torch.cat(features)) + self.modality  # (sum n_i, d_model): one matmul for all
        return list(tokens.split(lengths))

    def _check(self, index: int, image: torch.Tensor) -> None:
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image {index}: expected a (3, H, W) tensor from preprocess_image, got {shape}")
        rows, cols = patch_grid(image, self.patch_size)
        if rows * cols > self.max_patches:
            raise ValueError(
                f"image {index}: a {rows}x{cols} patch grid exceeds image_max_patches={self.max_patches}; "
                "preprocess it with preprocess_image(image, patch_size, max_patches) from the model config"
            )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def load_pretrained_backbone(self) -> bool:
        """Load torchvision's ImageNet weights into a ResNet backbone if they are already in the torch hub
        cache; never downloads. Returns whether weights were loaded, warning when they could not be.

        A separate step, not the constructor, so that building a model (or loading a bundle, whose
        weights replace these anyway) does no file I/O. Call it once on a freshly built model when
        cfg.image_pretrained is set.
        """
        if not isinstance(self.backbone, ResNetPatchEncoder):
            warnings.warn("image_pretrained applies to the torchvision backbones (resnet18/34/50) only", stacklevel=2)
            return False
        return self.backbone.load_cached_weights()


def group_by_size(images: list[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """Same-size images stacked together: (their indices, (G, 3, H, W)), so a batch needs no padding."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(i)
    return [(idx, torch.stack([images[i] for i in idx])) for idx in groups.values()]


class ViTPatchEncoder(nn.Module):
    """Conv patchify + 2-D positions + bidirectional pre-norm transformer blocks over each image's patches.

    `image_pos` "learned2d" (the default) adds learned absolute row and column embeddings (factorised, as
    in NaViT/Pix2Struct; two tables of max_patches entries serve every grid shape): answers such as "left
    or right" depend on where a patch is in the image, which absolute embeddings state directly. "rope2d"
    rotates queries and keys by row and column instead (vision/positions.py), "none" gives no positions.
    With `image_distance_bias` each head also adds a learned curve over the patches' distance to its
    attention scores (positions.DistanceBias).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.image_encoder_width or cfg.d_model
        if width % cfg.n_heads:
            raise ConfigError(
                f"model config: image_encoder_width ({width}) must be divisible by n_heads ({cfg.n_heads})"
            )
        if cfg.image_pos == "rope2d" and (width // cfg.n_heads) % 4:
            raise ConfigError(
                f"model config: image_pos rope2d needs a ViT head width (image_encoder_width or d_model, {width}, "
                f"over n_heads, {cfg.n_heads}) divisible by 4; use learned2d or change the widths"
            )
        self.out_width = width
        if cfg.image_stem == "conv":
            self.patchify: nn.Module = conv_stem(cfg.image_stem_widths(), width)
        else:
            self.patchify = nn.Conv2d(3, width, kernel_size=cfg.image_patch_size, stride=cfg.image_patch_size)
        self.row_embed = self.col_embed = None
        if cfg.image_pos == "learned2d":  # kept as direct attributes: bundles store them under these names
            self.row_embed = nn.Embedding(cfg.image_max_patches, width)
            self.col_embed = nn.Embedding(cfg.image_max_patches, width)
            nn.init.normal_(self.row_embed.weight, std=cfg.init_std)
            nn.init.normal_(self.col_embed.weight, std=cfg.init_std)
        self.rope = Rope2D(width // cfg.n_heads) if cfg.image_pos == "rope2d" else None
        self.distance_bias = DistanceBias(cfg.n_heads) if cfg.image_distance_bias else None
        hidden = -(-int(width * 8 / 3) // 64) * 64  # the usual SwiGLU width, rounded up to 64
        self.blocks = nn.ModuleList(
            EncoderBlock(width, cfg.n_heads, hidden, cfg.ffn_type, cfg.norm_eps, self.rope)
            for _ in range(cfg.image_encoder_layers)
        )
        self.norm = RMSNorm(width, cfg.norm_eps)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        tokens: list[torch.Tensor] = [torch.empty(0)] * len(images)
        grids: list[torch.Tensor] = [torch.empty(0)] * len(images)
        shapes: list[tuple[int, int]] = [(0, 0)] * len(images)
        for idx, batch in group_by_size(images):
            x = self.patchify(batch)  # (G, W, rows, cols)
            rows, cols = x.shape[-2:]
            x = x.flatten(2).transpose(1, 2)  # (G, rows * cols, W), row-major
            if self.row_embed is not None:
                pos = self.row_embed.weight[:rows, None] + self.col_embed.weight[None, :cols]  # (rows, cols, W)
                x = x + pos.reshape(rows * cols, -1)
            for j, i in enumerate(idx):
                tokens[i], grids[i], shapes[i] = x[j], grid_positions(rows, cols, x.device), (rows, cols)
        x, keep = pad_sequences(tokens)  # (B, N, W), (B, N) with True on real patches
        grid = pad_sequences(grids)[0]  # (B, N, 2)
        mask = None if bool(keep.all()) else keep[:, None, None, :]  # (B, 1, 1, N): padding is never a key
        if self.distance_bias is not None:
            bias = self.distance_bias(grid, torch.tensor(shapes, device=x.device)).to(x.dtype)  # (B, H, N, N)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        rope = None if self.rope is None else self.rope.cos_sin(grid, x.dtype)
        for block in self.blocks:
            x = block(x, mask, rope)
        x = self.norm(x)
        return [x[i, : t.shape[0]] for i, t in enumerate(tokens)]


def conv_stem(widths: list[int], width: int) -> nn.Sequential:
    """(G, 3, H, W) -> (G, width, H / patch, W / patch) through 3x3 convolutions of `widths` channels (the
    first at stride 1, each later one at stride 2), each batch-normalised and rectified, then a 1x1 to `width`.

    Each token's receptive field reaches about a patch beyond its own, so an object that a patch border
    cuts is still seen whole; with the conv's padding, any H and W divisible by the patch keep their grid.
    """
    layers: list[nn.Module] = []
    for index, (in_ch, out_ch) in enumerate(zip([3, *widths[:-1]], widths, strict=True)):
        stride = 1 if index == 0 else 2
        layers += [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]
    layers.append(nn.Conv2d(widths[-1], width, 1))
    return nn.Sequential(*layers)


def pad_sequences(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (n_i, W) sequences to (B, N, W), with a (B, N) mask that is True on real entries."""
    longest = max(s.shape[0] for s in seqs)
    x = seqs[0].new_zeros(len(seqs), longest, seqs[0].shape[1])
    keep = torch.zeros(len(seqs), longest, dtype=torch.bool, device=x.device)
    for i, s in enumerate(seqs):
        x[i, : s.shape[0]] = s
        keep[i, : s.shape[0]] = True
    return x, keep


class EncoderBlock(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)); attention is bidirectional over the patches."""

    def __init__(self, width: int, n_heads: int, hidden: int, ffn_type: str, eps: float, rope: Rope2D | None = None):
        super().__init__()
        self.n_heads = n_heads
        self.rope = rope
        self.attn_norm = RMSNorm(width, eps)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.ffn_norm = RMSNorm(width, eps)
        self.ffn = GatedFFN(width, hidden, ffn_type)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: tuple | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.n_heads, width // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        if rope is not None:  # rope: Rope2D.cos_sin of the patches' (row, col)
            q, k = self.rope.apply(q, rope), self.rope.apply(k, rope)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, Dh)
        x = x + self.out(y.transpose(1, 2).reshape(batch, length, width))  # (B, N, W)
        return x + self.ffn(self.ffn_norm(x))


class ResNetPatchEncoder(nn.Module):
    """A torchvision ResNet cut after the stage whose stride equals the patch size; its feature map is the grid.

    Keeps torchvision's module names (conv1, bn1, layer1, ...) so its ImageNet weights load by name.
    """

    def __init__(self, name: str, patch_size: int):
        super().__init__()
        import torchvision  # heavy; only image models with a ResNet backbone need it

        if patch_size not in _RESNET_STAGE_FOR_STRIDE:
            raise ConfigError(
                f"model config: image_patch_size must be one of {sorted(_RESNET_STAGE_FOR_STRIDE)} for {name} "
                f"(the ResNet stage strides), got {patch_size}"
            )
        self.name = name
        net = getattr(torchvision.models, name)(weights=None)
        stages = _RESNET_STAGE_FOR_STRIDE[patch_size]
        names = ["conv1", "bn1", "relu", "maxpool"] + [f"layer{k}" for k in range(1, stages + 1)]
        self.body = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
        self.out_width = 64 * 2 ** (stages - 1) * type(net.layer1[0]).expansion

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        tokens: list[torch.Tensor] = [torch.empty(0)] * len(images)
        for idx, batch in group_by_size(images):
            x = self.body(batch)  # (G, C, rows, cols)
            x = x.flatten(2).transpose(1, 2)  # (G, rows * cols, C), row-major like the ViT
            for j, i in enumerate(idx):
                tokens[i] = x[j]
        return tokens

    def load_cached_weights(self) -> bool:
        import torchvision

        weights = torchvision.models.get_model_weights(self.name).DEFAULT
        # Where torch.hub.load_state_dict_from_url would have saved a download; we only read it.
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not path.is_file():
            warnings.warn(
                f"image_pretrained: no cached ImageNet weights for {self.name} at {path}; training the backbone "
                "from scratch. Place the torchvision file there to use them.",
                stacklevel=3,
            )
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no arbitrary pickle
        own = {k: v for k, v in state.items() if k.split(".")[0] in self.body._modules}
        self.body.load_state_dict(own, strict=True)
        return True
