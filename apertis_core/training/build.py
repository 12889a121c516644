"""How a run builds its model config, starting model and image cache: shared by the trainer's session, the
step measurement and the plan, so what is measured and planned is what the trainer will run."""

from __future__ import annotations

from pathlib import Path

from ..configio import ConfigError
from ..model.config import ModelConfig
from ..tokenizer import Tokenizer
from .config import RunConfig, planned_vocab_size


def start_bundle(run: RunConfig) -> str:
    """The bundle the run starts from (`finetune.base`, or `init_from`: a full fine-tune); "" for a new model."""
    return run.finetune.base or run.init_from


def uses_lora(run: RunConfig) -> bool:
    return bool(run.finetune.base) and run.finetune.method == "lora"


def planned_model_config(run: RunConfig) -> ModelConfig:
    """The architecture the run will train: its start bundle's, else `run.model` at the planned vocabulary."""
    if start_bundle(run):
        from ..bundle import read_model_config

        return read_model_config(Path(start_bundle(run)) / "config.json")
    return run.model.replace(vocab_size=planned_vocab_size(run))


def start_model(run: RunConfig, resume: Path | None = None):
    """(model in training mode, tokenizer) of the start bundle, checked and sized as any bundle is, with
    LoRA adapters added for `finetune.method: lora` (from `resume`, a LoRA checkpoint, when resuming).
    None for a new model, and for a full run that resumes: all its weights are in its checkpoint."""
    bundle = start_bundle(run)
    if not bundle or (resume is not None and not uses_lora(run)):
        return None
    from ..bundle import apply_adapter, bundle_quantization, load_bundle
    from ..finetune import add_lora, is_adapter_dir

    if not is_adapter_dir(bundle) and bundle_quantization(Path(bundle)) != "none":
        raise ConfigError(
            f"{bundle} holds int8 weights for inference, which cannot be trained; start from the "
            "floating-point bundle it was exported from"
        )
    if uses_lora(run) and is_adapter_dir(bundle):
        raise ConfigError(
            f"finetune.base {bundle} is a LoRA adapter; LoRA needs a plain base: export it with "
            "`apertis export --merge` and fine-tune that, or use finetune.method=full"
        )
    model, tokenizer = load_bundle(bundle)
    if uses_lora(run) and resume is not None:
        apply_adapter(model, resume, trainable=True)
    elif uses_lora(run):
        import torch

        tune = run.finetune
        with torch.random.fork_rng(devices=[]):  # the adapters' initial weights depend on the seed alone
            torch.manual_seed(run.train.seed)
            add_lora(model, bundle, tune.rank, tune.alpha, tune.dropout, tune.target_modules)
    return model.train(), tokenizer


def fresh_model_config(model: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    return model.replace(vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_id).validated()


def image_cache(model_config: ModelConfig, augment: bool):
    if model_config.image_encoder == "none":
        return None
    from ..vision import Augment, ImageCache  # torchvision loads only for image models

    return ImageCache(model_config.image_patch_size, model_config.image_max_patches, Augment() if augment else None)
