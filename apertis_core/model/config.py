"""ModelConfig: the architecture as data, its named presets, and the values derived from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..configio import (
    ConfigError,
    apply_overrides,
    from_dict,
    read_mapping,
    to_dict,
    unknown_name_message,
    write_mapping,
)

# cross_attn_pos: sin/cos frequencies per axis of a patch's place (vision.positions.patch_places); the lowest,
# half a period over the picture, alone tells left from right.
PLACE_FREQUENCIES = 4
# image_distance_bias: knots of each ViT head's curve over patch distance, from 0 to the picture's diagonal.
DISTANCE_KNOTS = 16


@dataclass
class ModelConfig:
    preset: str = "custom"  # the preset this config started from; recorded in bundles and model cards
    vocab_size: int = 512  # must equal the tokenizer's vocabulary size
    d_model: int = 256  # residual stream width
    n_layers: int = 4  # number of blocks
    n_heads: int = 4  # heads of the token mixer (SLA or softmax attention)
    n_kv_heads: int = 0  # softmax layers only: key/value heads for GQA; 0 means n_heads (plain MHA)
    head_dim: int = 0  # 0 means d_model // n_heads
    # Which mixer each layer uses, repeated over the depth: S = Selective Linear Attention,
    # A = softmax attention. "S" is pure Apertis, "A" a Transformer, "SSSA" a hybrid.
    layer_pattern: str = "S"
    max_seq_len: int = 512  # training context length; generation may run past it on SLA layers

    # Selective Linear Attention
    # Chunk length of the parallel form: cost O(T*C), no T x T matrix. 32: whole-model training steps of
    # apertis-nano took 0.94x / 1.00x / 0.98x the time of 64 at T 128 / 256 / 1024 on a 2-core CPU.
    sla_chunk_size: int = 32
    sla_conv_size: int = 4  # short causal depthwise conv on q/k/v (0 = off); sharpens local patterns
    # What runs SLA, its conv and STRC (docs/KERNELS.md): "auto" = fla-core's Triton kernels on CUDA when
    # installed, else PyTorch; "torch"; "fla" (an error where it cannot run). Same weights either way;
    # the environment variable APERTIS_KERNELS, when set, overrides it.
    kernels: Literal["auto", "torch", "fla"] = "auto"

    # Softmax attention
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: float = 1.0  # >1 stretches RoPE positions (linear interpolation) for longer contexts
    qk_norm: bool = False  # RMS-normalise queries and keys per head; steadies training at higher lr
    sliding_window: int = 0  # attend to at most this many most recent tokens (0 = full causal)
    nope_layers: list[int] = field(default_factory=list)  # softmax layers that use no positions (NoPE)

    # Feed-forward
    ffn_type: Literal["swiglu", "geglu"] = "swiglu"  # gated FFN variant
    ffn_hidden: int = 0  # hidden width of the dense FFN; 0 means 8/3 * d_model rounded up to 64

    # Adaptive Expert System (mixture of experts); n_experts = 0 keeps every FFN dense
    n_experts: int = 0  # routed experts per AES layer
    n_shared_experts: int = 1  # always-on experts every token passes through
    expert_hidden: int = 0  # hidden width of each expert; 0 means ffn_hidden // (moe_top_k + n_shared)
    moe_every: int = 1  # every Nth layer (counting from the last) uses AES instead of a dense FFN
    moe_routing: Literal["topk", "dynamic"] = "topk"  # fixed k, or experts until moe_threshold is reached
    moe_top_k: int = 2  # experts per token for top-k routing; the cap for dynamic routing
    moe_threshold: float = 0.7  # dynamic routing: cumulative router probability to reach
    router_noise: float = 0.0  # std of Gaussian noise on router logits in training (exploration)
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss in out.aux_loss
    moe_z_loss_coef: float = 0.001  # weight of the router z-loss (keeps router logits small)

    # State Tracking Recurrent Cell
    strc_every: int = 0  # every Nth layer (counting from the last) adds an STRC sub-block; 0 = none
    strc_hidden: int = 0  # width of the recurrent state; 0 means d_model

    # Unified Multimodal Encoder (images); "none" builds a text-only model
    image_encoder: Literal["none", "vit", "resnet18", "resnet34", "resnet50"] = "none"
    image_patch_size: int = 16  # pixels per patch side (ViT); images are padded to the patch grid
    image_max_patches: int = 64  # cap on patches per image: larger images are downscaled, aspect kept
    image_encoder_layers: int = 2  # bidirectional transformer blocks in the ViT patch encoder
    image_encoder_width: int = 0  # ViT width; 0 means d_model
    image_pretrained: bool = False  # torchvision backbones: load ImageNet weights if already cached
    image_token_id: int = -1  # the tokenizer's <image> id; image patch embeddings replace these positions
    # ViT patch positions: learned row and column tables, 2-D RoPE in the encoder's attention, or none.
    image_pos: Literal["learned2d", "rope2d", "none"] = "learned2d"
    # ViT: each head adds a learned curve over the distance between two patches to their attention score (zero
    # at the start), so every patch can gather what is near it or far from it (vision/positions.DistanceBias).
    image_distance_bias: bool = False
    # How the ViT turns pixels into patch tokens: "patch" projects each patch on its own (the classic ViT);
    # "conv" is a small batch-normalised CNN (one stride-1 and log2(patch) stride-2 3x3 convolutions) whose
    # tokens see past their patch's edges, so an object cut by a patch border is still whole in its tokens.
    image_stem: Literal["patch", "conv"] = "patch"
    # Gated cross-attention from every position to the patches of the images at or before it, in every Nth
    # layer counting from the last (0 = off): a linear-attention model re-reads the picture once it knows the
    # question instead of relying on what its fixed-size state kept.
    cross_attn_every: int = 0
    # Start of each cross-attention layer's tanh gate. 0 starts as a no-op (Flamingo, for adding it to a
    # trained model); 1 reached 91% on the two-object task in 600 steps where 0 reached 58% (docs/MULTIMODAL.md).
    cross_attn_gate_init: float = 1.0
    # Add each patch's place in its picture to the cross-attention keys and values (fixed 2-D sin/cos features of
    # its row and column, through a learned map per layer, docs/MULTIMODAL.md): answers such as "left or right"
    # read the place from the value without relying on the encoder to keep its input positions.
    cross_attn_pos: bool = False
    # Extra heads per cross-attention layer that read the picture relative to where an ordinary head looks: head
    # r adds to its scores a learned function of each patch's row and column offset from the place ordinary head
    # r attends to, so "the object closest to / farthest from the red one" is two looks in one layer
    # (model/relative_heads.py). Off: within the shapes benchmark's 30 minutes they did not teach those questions;
    # the demo model has 16, started at distance profiles, and phases that ask those questions often (docs/MULTIMODAL.md).
    cross_attn_relative_heads: int = 0
    # Where the relative heads start: 0 at zero (ordinary heads until training moves them); c > 0 at distance
    # profiles, even heads -c * offset^2 per axis ("closest"), odd heads +c * offset^2 ("farthest"), offsets in
    # fractions of the picture (model/relative_heads.py).
    cross_attn_relative_init: float = 0.0

    # Looped depth (docs/LOOPED.md): the loop_blocks group runs up to max_loops times with shared weights, and a
    # small confidence head decides per token whether another pass is needed. Off (1): it did not pay at nano scale.
    max_loops: int = 1  # passes of the looped group; 1 = off
    loop_blocks: str = ""  # the looped group as "first-last" block indices (0-based, inclusive) or one index; "" = all
    loop_halt_threshold: float = 0.5  # inference: another pass only where its predicted chance of helping is above this
    loop_halt_margin: float = 0.02  # training: a pass "helps" a token when a later exit's loss is lower by this (nats)
    loop_confidence_coef: float = 0.1  # weight of the confidence head's binary cross-entropy in out.aux_loss
    loop_exit_coef: float = 1.0  # weight of the earlier passes' LM loss in out.aux_loss, so early stops predict well

    # Embeddings, norms and init
    tie_embeddings: bool = True  # share input embedding and output head (fewer parameters)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.02  # std of weight init; residual output projections get std / sqrt(2 * n_layers)
    dropout: float = 0.0  # dropout on the residual branches during training
    # BitNet b1.58 (docs/BITNET.md): block linears train with ternary weights and 8-bit inputs, for 2-bit
    # weights on export (`apertis export --format bitnet`, 12x smaller bundles). Off: bundles saved before it
    # existed are full precision, and it is measured only at nano scale (where it matched fp32 val loss).
    bitnet: bool = False

    @classmethod
    def presets(cls) -> list[str]:
        """Names accepted by `from_preset`."""
        return list(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(unknown_name_message(name, list(PRESETS), "model", noun="preset"))
        config = from_dict(cls, {"preset": name, **PRESETS[name]})
        return apply_overrides(config, overrides) if overrides else config.validated()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """A mapping as stored in config.json/YAML; a `preset` key supplies defaults for absent fields."""
        data = dict(data)
        name = data.get("preset", "custom")
        base = dict(PRESETS.get(name, {}))
        base.update(data)
        return from_dict(cls, base).validated()

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_mapping(path))

    def save(self, path: str | Path) -> None:
        write_mapping(self.to_dict(), path)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def override(self, overrides: dict[str, Any] | list[str]) -> ModelConfig:
        return apply_overrides(self, overrides).validated()

    def __post_init__(self) -> None:
        self.validated()

    def validated(self) -> ModelConfig:
        """Raise ConfigError naming the field if the combination cannot build a model."""
        # Each condition is a function: a later one may divide by a field an earlier one found to be zero.
        checks = [
            (lambda: self.vocab_size > 0, "vocab_size must be positive"),
            (
                lambda: self.d_model > 0 and self.n_layers > 0 and self.n_heads > 0,
                "d_model, n_layers, n_heads must be positive",
            ),
            (
                lambda: self.head_dim > 0 or self.d_model % self.n_heads == 0,
                "d_model must be divisible by n_heads (or set head_dim)",
            ),
            (
                lambda: self.kv_heads() > 0 and self.n_heads % self.kv_heads() == 0,
                "n_heads must be a multiple of n_kv_heads",
            ),
            (
                lambda: bool(self.layer_pattern) and set(self.layer_pattern) <= {"S", "A"},
                "layer_pattern uses only S (SLA) and A (attention)",
            ),
            (lambda: self.sla_chunk_size > 0, "sla_chunk_size must be positive"),
            (
                lambda: self.n_experts == 0 or 1 <= self.moe_top_k <= self.n_experts,
                "moe_top_k must be between 1 and n_experts",
            ),
            (lambda: 0.0 < self.moe_threshold <= 1.0, "moe_threshold must be in (0, 1]"),
            (lambda: self.moe_every >= 1 and self.strc_every >= 0, "moe_every must be >= 1 and strc_every >= 0"),
            (lambda: self.sliding_window >= 0, "sliding_window must be >= 0"),
            (
                lambda: self.cross_attn_every == 0 or (self.cross_attn_every > 0 and self.image_encoder != "none"),
                "cross_attn_every must be >= 0, and above 0 only with an image encoder (it reads image patches)",
            ),
            (
                lambda: (
                    self.image_stem == "patch" or (self.image_encoder == "vit" and _power_of_two(self.image_patch_size))
                ),
                "image_stem conv needs image_encoder vit and an image_patch_size that is a power of two (2, 4, 8, 16...)",
            ),
            (
                lambda: (
                    self.cross_attn_relative_heads == 0
                    or (self.cross_attn_every > 0 and 0 < self.cross_attn_relative_heads <= self.n_heads)
                ),
                "cross_attn_relative_heads must be between 0 and n_heads (each follows an ordinary head of a "
                "cross-attention layer), and above 0 only with cross_attn_every > 0",
            ),
            (
                lambda: (
                    self.cross_attn_relative_init >= 0
                    and (self.cross_attn_relative_heads or not self.cross_attn_relative_init)
                ),
                "cross_attn_relative_init must be >= 0 (0 = start at zero), and above 0 only with cross_attn_relative_heads",
            ),
            (
                lambda: not self.image_distance_bias or self.image_encoder == "vit",
                "image_distance_bias biases the ViT's attention between patches; it needs image_encoder vit",
            ),
            (lambda: all(0 <= i < self.n_layers for i in self.nope_layers), "nope_layers must index existing layers"),
            (lambda: 1 <= self.max_loops <= 64, "max_loops must be between 1 (off) and 64"),
            (lambda: len(self.loop_group()) > 0, "loop_blocks must name at least one block"),  # parses it
            (lambda: 0.0 <= self.loop_halt_threshold <= 1.0, "loop_halt_threshold must be in [0, 1]"),
            (
                lambda: min(self.loop_halt_margin, self.loop_confidence_coef, self.loop_exit_coef) >= 0,
                "loop_halt_margin, loop_confidence_coef and loop_exit_coef must be >= 0",
            ),
            (
                lambda: self.max_loops == 1 or not any(self.uses_cross_attn(i) for i in self.loop_group()),
                "loop_blocks must not include a cross-attention layer (it reads images by sequence position, which a "
                "looped pass over the still-running tokens changes); loop other blocks or set cross_attn_every",
            ),
        ]
        for ok, message in checks:
            if not ok():
                raise ConfigError(f"model config: {message}")
        return self

    # Derived values are functions so they follow any override of the fields they depend on.
    def image_stem_widths(self) -> list[int]:
        """Output channels of the conv stem's 3x3 convolutions: the stride-1 one, then one per halving."""
        width = self.image_encoder_width or self.d_model
        halvings = self.image_patch_size.bit_length() - 1
        widths = [max(8, width >> (halvings - 1 - i)) for i in range(halvings)]  # ..., width / 2, width
        return [widths[0], *widths]

    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def mixer_kind(self, layer: int) -> str:
        return self.layer_pattern[layer % len(self.layer_pattern)]

    def dense_hidden(self) -> int:
        return self.ffn_hidden or _round_up(int(self.d_model * 8 / 3), 64)

    def expert_width(self) -> int:
        return self.expert_hidden or max(16, self.dense_hidden() // (self.moe_top_k + self.n_shared_experts))

    def uses_experts(self, layer: int) -> bool:
        return self.n_experts > 0 and (self.n_layers - 1 - layer) % self.moe_every == 0

    def uses_strc(self, layer: int) -> bool:
        return self.strc_every > 0 and (self.n_layers - 1 - layer) % self.strc_every == 0

    def uses_cross_attn(self, layer: int) -> bool:
        return self.cross_attn_every > 0 and (self.n_layers - 1 - layer) % self.cross_attn_every == 0

    def loop_group(self) -> range:
        """The blocks that looped depth repeats: loop_blocks parsed, every block when it is empty."""
        text = self.loop_blocks.strip()
        first, _, last = text.partition("-")
        try:
            group = range(int(first), int(last or first) + 1) if text else range(self.n_layers)
        except ValueError:
            raise ConfigError(
                f"model config: loop_blocks {self.loop_blocks!r} must be block indices 'first-last' (e.g. '1-2'), "
                "one index, or empty for every block"
            ) from None
        if not 0 <= group.start < group.stop <= self.n_layers:
            raise ConfigError(
                f"model config: loop_blocks {self.loop_blocks!r} must be 'first-last' with first <= last, "
                f"within blocks 0-{self.n_layers - 1}"
            )
        return group

    def strc_width(self) -> int:
        return self.strc_hidden or self.d_model

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


_APERTIS = dict(layer_pattern="S", n_experts=8, moe_top_k=2, n_shared_experts=1, moe_every=2, strc_every=4)
_LLAMA = dict(layer_pattern="A", n_experts=0, strc_every=0, sla_conv_size=0)

PRESETS: dict[str, dict[str, Any]] = {
    # A few million parameters: trains in minutes on a laptop CPU. It keeps the family's 8 routed experts:
    # on a CPU a step costs the same as with 4 (the extra experts are memory, not work per token).
    "apertis-nano": dict(_APERTIS, d_model=256, n_layers=4, n_heads=4, max_seq_len=256),
    "apertis-small": dict(_APERTIS, d_model=512, n_layers=8, n_heads=8, max_seq_len=1024),
    "apertis-base": dict(_APERTIS, d_model=768, n_layers=12, n_heads=12, max_seq_len=2048),
    "apertis-large": dict(_APERTIS, d_model=1024, n_layers=24, n_heads=16, max_seq_len=4096),
    # Mostly SLA, one softmax-attention layer in four for exact recall.
    "apertis-hybrid-nano": dict(
        _APERTIS, layer_pattern="SSSA", d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, n_experts=4, max_seq_len=256
    ),
    "apertis-hybrid-small": dict(
        _APERTIS, layer_pattern="SSSA", d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=1024
    ),
    # Llama-style baselines: RoPE, GQA, SwiGLU, RMSNorm.
    "transformer-nano": dict(_LLAMA, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "transformer-small": dict(_LLAMA, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=1024),
}


def _power_of_two(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0
