"""ApertisModel: embeddings, a stack of blocks (SLA or softmax mixer, dense FFN or AES, optional STRC), LM head.

A block is x + mixer(norm(x)), then x + ffn(norm(x)), then x + strc(norm(x)) where enabled. The same
forward serves training (parallel forms) and prompt processing (parallel forms continuing from a state);
`step` advances one token with the recurrent forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..image_tokens import expand_image_tokens, num_image_tokens, patch_grid
from ..vision.encoder import UnifiedMultimodalEncoder
from ..vision.positions import patch_places
from .attention import SoftmaxAttention
from .bitnet import use_bitlinear
from .config import ModelConfig
from .cross_attention import GatedCrossAttention, ImageMemory, image_memory
from .experts import AdaptiveExpertSystem
from .layers import GatedFFN, RMSNorm
from .looped import LoopedDepth
from .sla import SelectiveLinearAttention
from .strc import StateTrackingCell


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    aux_loss: torch.Tensor  # scalar; 0 without experts
    state: list[dict] | None = None  # per-layer state after the last token, when a state was passed in


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = SelectiveLinearAttention(cfg) if cfg.mixer_kind(layer) == "S" else SoftmaxAttention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = (
            AdaptiveExpertSystem(cfg)
            if cfg.uses_experts(layer)
            else GatedFFN(cfg.d_model, cfg.dense_hidden(), cfg.ffn_type)
        )
        self.strc_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.uses_strc(layer) else None
        self.strc = StateTrackingCell(cfg) if cfg.uses_strc(layer) else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.xattn = GatedCrossAttention(cfg) if cfg.uses_cross_attn(layer) else None  # re-reads image patches

    def init_state(self, batch_size: int, device, dtype) -> dict:
        state = {"mixer": self.mixer.init_state(batch_size, device, dtype)}
        if self.xattn is not None:
            state["xattn"] = self.xattn.init_state(batch_size, device, dtype)
        if self.strc is not None:
            state["strc"] = self.strc.init_state(batch_size, device, dtype)
        return state

    def _ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(self.ffn, AdaptiveExpertSystem):
            return self.ffn(x)
        return self.ffn(x), None

    def forward(self, x: torch.Tensor, state: dict | None = None, memory: ImageMemory | None = None):
        mixed, mixer_state = self.mixer(self.mixer_norm(x), state["mixer"] if state is not None else None)
        x = x + self.dropout(mixed)
        new_state = {"mixer": mixer_state} if state is not None else None
        if self.xattn is not None:  # after the mixer, as in a Transformer decoder: the query knows the question
            read, xattn_state = self.xattn(x, memory, state["xattn"] if state is not None else None)
            x = x if read is None else x + self.dropout(read)
            if state is not None:
                new_state["xattn"] = xattn_state
        ffn_out, aux = self._ffn(self.ffn_norm(x))
        x = x + self.dropout(ffn_out)
        if self.strc is not None:
            tracked, strc_state = self.strc(self.strc_norm(x), state["strc"] if state is not None else None)
            x = x + self.dropout(tracked)
            if state is not None:
                new_state["strc"] = strc_state
        return x, aux, new_state

    def step(self, x: torch.Tensor, state: dict):
        mixed, mixer_state = self.mixer.step(self.mixer_norm(x), state["mixer"])
        x = x + mixed
        new_state = {"mixer": mixer_state}
        if self.xattn is not None:
            read, new_state["xattn"] = self.xattn.step(x, state["xattn"])
            x = x if read is None else x + read
        normed = self.ffn_norm(x)
        x = x + (self.ffn.step(normed) if isinstance(self.ffn, AdaptiveExpertSystem) else self.ffn(normed))
        if self.strc is not None:
            tracked, new_state["strc"] = self.strc.step(self.strc_norm(x), state["strc"])
            x = x + tracked
        return x, new_state


class ApertisModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        if cfg.bitnet:  # ternary block linears; embeddings, head and norms stay full precision (bitnet.py)
            use_bitlinear(self.blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.vision = None
        if cfg.image_encoder != "none":
            self.vision = UnifiedMultimodalEncoder(cfg)
        self.loop = LoopedDepth(cfg) if cfg.max_loops > 1 else None  # repeats a group of blocks (looped.py)
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = residual_std if getattr(module, "is_residual_output", False) else std
                nn.init.normal_(module.weight, std=scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, AdaptiveExpertSystem):
                module.reset_parameters(std, residual_std)
        for module in self.modules():  # after the loop above, which also visits the place maps' Linear
            if isinstance(module, GatedCrossAttention):
                module.reset_place()

    # ---- embeddings -------------------------------------------------------------------------------
    def _embed(
        self, input_ids: torch.Tensor, images: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, ImageMemory | None]:
        """Token embeddings with the patch tokens at the image positions, and the patches for cross-attention."""
        x = self.embed(input_ids)  # (B, T, D)
        if not images:
            return x, None
        if self.vision is None:
            raise ValueError(
                "this model has no image encoder; build it with image_encoder set (e.g. 'vit') to use images"
            )
        image_tokens = torch.cat(self.vision(images))  # (sum of patches, D)
        slots = input_ids == self.config.image_token_id
        if int(slots.sum()) != image_tokens.shape[0]:
            raise ValueError(
                f"the text has {int(slots.sum())} image positions but the images give {image_tokens.shape[0]} patch "
                "tokens; expand each <image> to its patch count before calling the model"
            )
        memory = None
        if self.config.cross_attn_every:
            places = None
            if self.config.cross_attn_pos or self.config.cross_attn_relative_heads:
                grids = [patch_grid(image, self.config.image_patch_size) for image in images]
                places = torch.cat([patch_places(rows, cols, x.device) for rows, cols in grids])
            memory = image_memory(slots, image_tokens, places)
        return x.masked_scatter(slots[..., None], image_tokens.to(x.dtype)), memory

    def expand_image_tokens(self, ids: list[int], images: list[torch.Tensor]) -> list[int]:
        """A prompt's ids with each <image> widened to the positions its preprocessed image fills."""
        counts = [num_image_tokens(image, self.config.image_patch_size) for image in images]
        return expand_image_tokens(ids, self.config.image_token_id, counts)

    # ---- forward, state, step ---------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        images: list[torch.Tensor] | None = None,
        state: list[dict] | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids: (B, T). With `state`, continue from it (prompt processing) and return the new one.

        `labels` (B, T) matter only to a looped model in training: its exit and confidence losses join aux_loss."""
        x, memory = self._embed(input_ids, images)
        if self.loop is not None:
            logits, aux_loss, new_state = self.loop(self.blocks, x, state, labels, self._readout, memory=memory)
            return ModelOutput(logits, aux_loss, new_state)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        new_state = [] if state is not None else None
        for index, block in enumerate(self.blocks):
            x, aux, block_state = block(x, state[index] if state is not None else None, memory=memory)
            if aux is not None:
                aux_loss = aux_loss + aux
            if new_state is not None:
                new_state.append(block_state)
        return ModelOutput(self._readout(x), aux_loss, new_state)

    def _readout(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))

    def init_state(self, batch_size: int) -> list[dict]:
        param = self.norm.weight  # floating point even where linears and embeddings are int8 (quantize.py)
        dtype = (
            torch.get_autocast_dtype(param.device.type) if torch.is_autocast_enabled(param.device.type) else param.dtype
        )
        return [block.init_state(batch_size, param.device, dtype) for block in self.state_blocks()]

    def state_blocks(self) -> list[Block]:
        """The block each entry of a state belongs to (a looped model repeats some); batching walks it."""
        layout = self.loop.layout(len(self.blocks)) if self.loop is not None else range(len(self.blocks))
        return [self.blocks[index] for index in layout]

    def step(self, token_ids: torch.Tensor, state: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        """token_ids: (B,) -> logits (B, V) and the new state. O(1) per token for SLA and STRC layers."""
        x = self.embed(token_ids)  # (B, D)
        if self.loop is not None:
            x, new_state = self.loop.step(self.blocks, x, state)
            return self._readout(x), new_state
        new_state = []
        for block, block_state in zip(self.blocks, state, strict=True):
            x, updated = block.step(x, block_state)
            new_state.append(updated)
        return self.lm_head(self.norm(x)), new_state

    # ---- accounting -------------------------------------------------------------------------------
    def num_parameters(self, active_only: bool = False, include_embeddings: bool = True) -> int:
        """Unique parameters; `active_only` counts the experts a token actually uses (shared + top-k)."""
        total = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            total -= self.embed.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        if active_only:
            total -= _unused_expert_parameters(self)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), as used for MFU.

        Matmul weights cost 6 FLOPs per parameter per token (the input embedding is a lookup); mixers
        add their token-interaction cost: softmax attention ~T/2 keys per query (causal), SLA a chunk
        of C keys plus the Dk x Dv state read and update.
        """
        cfg = self.config
        weights = self.num_parameters(active_only=True, include_embeddings=False) + self.lm_head.weight.numel()
        # Looped depth: each extra pass runs the group, and in training each earlier pass also exits through
        # the blocks after it and the head, so every block from the group's first on works max_loops times.
        repeated_from = cfg.loop_group().start if self.loop is not None else cfg.n_layers
        tail = self.blocks[repeated_from:]
        tail_weights = sum(p.numel() for p in tail.parameters()) - _unused_expert_parameters(tail)
        weights += (cfg.max_loops - 1) * (tail_weights + self.lm_head.weight.numel())
        heads_dim = cfg.n_heads * cfg.dim_head()
        mixing = 0.0
        for layer in range(cfg.n_layers):
            repeats = cfg.max_loops if layer >= repeated_from else 1
            if cfg.mixer_kind(layer) == "A":
                keys = min(seq_len, cfg.sliding_window or seq_len) / 2
                mixing += repeats * 2 * 2 * heads_dim * keys
            else:
                chunk = min(cfg.sla_chunk_size, seq_len)
                mixing += repeats * (2 * 2 * heads_dim * (chunk / 2) + 2 * 2 * heads_dim * cfg.dim_head())
        return 6.0 * weights + 3.0 * mixing

    def expert_utilisation(self) -> dict[str, list[float]]:
        """Fraction of tokens routed to each expert in the last forward, per AES layer ('layer3': [...])."""
        return {
            f"layer{index}": block.ffn.last_utilisation.tolist()
            for index, block in enumerate(self.blocks)
            if isinstance(block.ffn, AdaptiveExpertSystem)
        }


def _unused_expert_parameters(module: nn.Module) -> int:
    """Parameters of the routed experts inside `module` that a token does not use (all but top-k per layer)."""
    unused = 0
    for layer in module.modules():
        if isinstance(layer, AdaptiveExpertSystem):
            unused += (layer.gate_up[0].numel() + layer.down[0].numel()) * (layer.n_experts - layer.top_k)
    return unused
