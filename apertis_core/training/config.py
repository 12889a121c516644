"""Training settings: TrainConfig (the optimisation recipe) and RunConfig (model + data + train + out_dir).

A run is described by one YAML file plus `--set key=value` overrides; `run.yaml` in the run directory is
the resolved RunConfig, so any run can be repeated or resumed from its folder alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..configio import ConfigError, from_dict, parse_set_args, read_mapping, to_dict, write_mapping
from ..data import DataConfig
from ..model import ModelConfig
from ..tokenizer import SPECIAL_TOKENS, Tokenizer


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch on each process
    grad_accum: int = 1  # micro-batches summed per optimizer step (a larger batch without the memory)
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    # The image encoder and projector train at lr times this (a from-scratch encoder may want its own pace).
    encoder_lr_scale: float = 1.0
    # The image encoder and projector stay as initialised for this many steps while the language model learns
    # to read their tokens; trained from the start, a from-scratch encoder collapsed to features that say
    # which shapes a picture holds but not where (docs/MULTIMODAL.md).
    encoder_frozen_steps: int = 0
    # The cross-attention place maps (model.cross_attn_pos) stay at zero for this many steps. With places from
    # the start the model answered "where" through a blurred look at the picture and never learned "what"
    # (docs/MULTIMODAL.md); held back, the lookup by appearance forms first and the places then join it.
    # The ViT's distance curves (model.image_distance_bias) and the relative heads' place weights
    # (model.cross_attn_relative_heads) are held with them.
    places_frozen_steps: int = 0
    weight_decay: float = 0.1  # AdamW decay, applied to weight matrices only
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moments; 0.95 reacts faster than 0.999 on small data
    warmup_steps: int = 100  # linear ramp from ~0 to lr; avoids early instability of Adam's estimates
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd = warmup, stable at peak, then a linear decay
    decay_fraction: float = 0.2  # wsd only: share of the steps spent decaying
    max_steps: int = 1000  # optimizer steps in the run (ignored when max_minutes > 0)
    max_minutes: float = 0.0  # time budget: > 0 plans the steps from a measured warm-up to end on time
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on GPU, fp32 on most CPUs
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    eval_every: int = 200  # steps between validation passes (0 = only at the end)
    eval_batches: int = 20  # validation batches per pass: bounds the cost of an evaluation
    log_every: int = 10  # steps between train/* records
    save_every: int = 500  # steps between checkpoints (0 = only at the end and on stop)
    keep_last: int = 3  # checkpoints kept besides the best one
    seed: int = 1337  # model init, data order and dropout
    compile: bool = False  # torch.compile the model: faster steps on GPU after a slow first step
    # How torchrun's processes share the work: ddp keeps the whole model, its gradients and Adam moments on
    # every device; fsdp splits all three over the processes (FSDP2), for models that do not fit one device.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    gpus: Literal["one", "all"] = "one"  # studio runs: "all" trains on every GPU here, one torchrun process each
    threads: int = 0  # CPU threads for PyTorch (0 = PyTorch's default)
    sample_every: int = 0  # steps between sample generations from sample_prompts (0 = off)
    sample_prompts: list[str] = field(default_factory=list)  # fixed probe prompts: a timeline of outputs
    sample_tokens: int = 48  # tokens generated per sample prompt
    rewarm_fraction: float = 0.5  # "train N more": the extension re-warms to this fraction of lr
    # Context-length curriculum: start on windows this many tokens long (halved from data.seq_len down to
    # it), doubling on a schedule; 0 trains at data.seq_len throughout. Tokens per step stay the same.
    seq_len_start: int = 0
    seq_len_warmup: float = 0.3  # share of the steps spent below the full length when seq_len_start > 0
    tensorboard: bool = False  # also write TensorBoard event files to <out_dir>/tensorboard (pip install tensorboard)

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be at least 1"),
            (self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr must be positive and min_lr_ratio in [0, 1]"),
            (self.max_steps >= 1 or self.max_minutes > 0, "max_steps must be at least 1 (or set max_minutes)"),
            (self.warmup_steps >= 0 and 0 < self.decay_fraction <= 1, "warmup_steps >= 0 and decay_fraction in (0, 1]"),
            (
                min(self.eval_every, self.save_every, self.sample_every) >= 0 and self.log_every >= 1,
                "*_every must be >= 0 (log_every >= 1)",
            ),
            (self.keep_last >= 1, "keep_last must be at least 1 (resume needs the latest checkpoint)"),
            (0 < self.rewarm_fraction <= 1, "rewarm_fraction must be in (0, 1]"),
            (self.gpus == "one" or self.device in ("auto", "cuda"), "gpus=all needs device auto or cuda"),
            (self.encoder_lr_scale > 0, "encoder_lr_scale must be positive"),
            (self.encoder_frozen_steps >= 0, "encoder_frozen_steps must be >= 0"),
            (self.places_frozen_steps >= 0, "places_frozen_steps must be >= 0"),
            (
                self.seq_len_start >= 0 and 0 < self.seq_len_warmup < 1,
                "seq_len_start must be >= 0 and seq_len_warmup in (0, 1)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"train: {message}")

    def tokens_per_step(self, seq_len: int, world_size: int = 1) -> int:
        return self.batch_size * self.grad_accum * seq_len * world_size


MAX_LORA_RANK = 4096  # far above any useful rank; a typo like 80000 is refused before adapters are built


@dataclass
class FinetuneConfig:
    """Fine-tuning an existing bundle (docs/FINETUNE.md); inactive while `base` is empty."""

    base: str = ""  # bundle to start from (trained, imported or the demo): its architecture, tokenizer, weights
    method: Literal["lora", "full"] = "lora"  # lora: train small adapters (peft), the base frozen; full: every weight
    rank: int = 8  # LoRA rank r: the adapters' width; higher learns more and costs more
    alpha: float = 16.0  # LoRA scale: an adapter's update is multiplied by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input (regularises small data sets)
    # Linear layers that get adapters, by name or dotted suffix (in_proj, qkv, out_proj, gate_up, down, router,
    # mixer.in_proj...). Empty: every mixer and FFN projection of the language model.
    target_modules: list[str] = field(default_factory=list)
    merge_on_export: bool = True  # final/ also holds the plain model with the adapters folded in (loads anywhere)

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.rank <= MAX_LORA_RANK, f"rank must be in [1, {MAX_LORA_RANK}]"),
            (self.alpha > 0, "alpha must be positive"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (all(isinstance(n, str) and n.strip(".") for n in self.target_modules), "target_modules must be names"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"finetune: {message}")


def _default_model() -> ModelConfig:
    return ModelConfig.from_preset("apertis-nano")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=_default_model)  # architecture; vocab_size is set from the tokenizer
    data: DataConfig = field(default_factory=DataConfig)  # where the data is and how it is cut into samples
    train: TrainConfig = field(default_factory=TrainConfig)  # the optimisation recipe
    out_dir: str = "runs/run"  # run directory: run.yaml, metrics.jsonl, checkpoints/, final/
    name: str = ""  # what a person calls the run: titles its model card (empty: the run folder's name)
    # A model bundle whose architecture, tokenizer and weights this run starts from (fine-tuning, e.g. an
    # imported Llama); `model` and the tokenizer settings are then not used. Empty: a new model from `model`.
    init_from: str = ""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # fine-tune a bundle, with LoRA or fully

    def __post_init__(self) -> None:
        if self.init_from and self.finetune.base:
            raise ConfigError(
                "init_from and finetune.base both name a starting bundle; keep finetune.base "
                "(init_from is the same as finetune.base with finetune.method=full)"
            )
        if self.train.parallel == "fsdp" and self.finetune.base and self.finetune.method == "lora":
            raise ConfigError(
                "train.parallel=fsdp shards full training; LoRA adapters and their optimizer state are small "
                "enough for every process to keep, so use train.parallel=ddp (or finetune.method=full)"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """From a mapping; `model` may name a preset (`{preset: apertis-nano, d_model: 128}`) or be a preset name."""
        data = dict(data)
        model = data.get("model", {"preset": "apertis-nano"})
        if isinstance(model, str):
            model = {"preset": model}
        if not isinstance(model, dict):
            raise ConfigError("model: expected a preset name or a mapping of model settings")
        data["model"] = ModelConfig.from_dict(model)  # presets fill in the fields the mapping leaves out
        return from_dict(cls, data, where="run")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
        """Read YAML/JSON and apply `--set` overrides like `train.lr=1e-3` or `model.preset=transformer-nano`."""
        return cls.from_dict(merge_overrides(read_mapping(path), list(overrides)))

    def override(self, overrides: list[str]) -> RunConfig:
        """A copy with `key=value` overrides applied (same rules as `load`)."""
        return RunConfig.from_dict(merge_overrides(self.to_dict(), overrides))

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping; the model part lists its preset and only the fields that differ from it."""
        return {**to_dict(self), "model": model_mapping(self.model)}

    def save(self, path: str | Path) -> None:
        write_mapping(self.to_dict(), path)


def model_mapping(model: ModelConfig) -> dict[str, Any]:
    """`{preset: NAME, <fields changed from that preset>}`: short, readable, and a later
    `model.preset=...` override then brings that preset's defaults instead of the old ones."""
    full = model.to_dict()
    base = ModelConfig.from_dict({"preset": model.preset}).to_dict()
    return {"preset": model.preset, **{key: value for key, value in full.items() if value != base.get(key)}}


def merge_overrides(mapping: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Put dotted `key=value` overrides into a nested mapping before it is parsed.

    Overriding the raw mapping (rather than the built config) lets `model.preset=...` bring that preset's
    defaults, and leaves all type checks and unknown-key suggestions to the one parser.
    """
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in mapping.items()}
    settings = parse_set_args(overrides)
    for key, value in settings.items():
        head, _, rest = key.partition(".")
        if not rest:
            merged[head] = value
            continue
        section = merged.setdefault(head, {})
        if isinstance(section, str) and head == "model":
            section = merged[head] = {"preset": section}
        if not isinstance(section, dict):
            raise ConfigError(f"--set {key}: {head} has no sub-keys; use {head}=VALUE")
        if "." in rest:
            raise ConfigError(f"--set {key}: settings are at most two levels deep (section.key)")
        section[rest] = value
    finetune = merged.get("finetune")
    bundle = merged.get("init_from") or (finetune.get("base") if isinstance(finetune, dict) else "")
    model_keys = [key for key in settings if key.partition(".")[0] == "model"]
    if bundle and model_keys:
        # Otherwise the setting would be dropped without a word: the run builds the bundle's architecture.
        raise ConfigError(
            f"--set {model_keys[0]}: this run starts from the bundle {bundle} and trains its architecture, so "
            "model settings have no effect; drop them, or leave out init_from / finetune.base for a new model"
        )
    return merged


def planned_vocab_size(run_config: RunConfig) -> int:
    """The vocabulary the run will have: a given tokenizer's, else the size it will be trained to."""
    if run_config.data.tokenizer:
        return Tokenizer.load(run_config.data.tokenizer).vocab_size
    return max(run_config.data.vocab_size, 256 + len(SPECIAL_TOKENS))  # below that it is byte-level
