"""Helpers the generate and chat commands share: sampling flags, image prompts, streaming to a stream."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # the CLI imports torch only once a command runs, so `--help` stays fast
    import torch

    from ..generation import GenerationConfig
    from ..model import ApertisModel
    from ..tokenizer import Tokenizer


NO_IMAGES = "this model was trained without images (image_encoder is 'none'); use a model trained on image data"


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Flags that map onto GenerationConfig fields; an absent flag keeps the dataclass default."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, metavar="N", help="stop after N new tokens (default 128)")
    group.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default 0.8)")
    group.add_argument(
        "--top-k", type=int, metavar="K", help="sample among the K most likely tokens, 0 = off (default 50)"
    )
    group.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, 1.0 = off (default 0.95)")
    group.add_argument(
        "--repetition-penalty", type=float, metavar="R", help=">1 discourages repeats, 1.0 = off (default 1.1)"
    )
    group.add_argument("--seed", type=int, metavar="S", help="fix the sampling for reproducible output")


def generation_config(args: argparse.Namespace, stop_ids: list[int]) -> GenerationConfig:
    from ..generation import GenerationConfig

    config = GenerationConfig(stop_ids=list(stop_ids))
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    if config.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {config.max_new_tokens}")
    if not 0.0 < config.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {config.top_p}")
    if config.top_k < 0 or config.temperature < 0 or config.repetition_penalty <= 0:
        raise ValueError("--top-k and --temperature must be >= 0 and --repetition-penalty > 0")
    return config


def load_model(path: str, device: str = "cpu") -> tuple[ApertisModel, Tokenizer]:
    from ..bundle import load_bundle

    return load_bundle(path, device=device)


def load_prompt_image(model: ApertisModel, path: str) -> torch.Tensor:
    """A preprocessed (3, H, W) image for this model, or a clear error if it takes no images."""
    config = model.config
    if config.image_encoder == "none" or getattr(model, "vision", None) is None:
        raise ValueError(NO_IMAGES)
    from ..vision import preprocess_image

    return preprocess_image(path, config.image_patch_size, config.image_max_patches)


def stream_reply(
    model: ApertisModel,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    config: GenerationConfig,
    out: TextIO,
    images: list[torch.Tensor] | None = None,
) -> str:
    """Generate from `prompt_ids`, writing text to `out` as it arrives; returns the whole reply."""
    from ..generation import generate
    from ..tokenizer import StreamDecoder

    decoder = StreamDecoder(tokenizer)
    pieces: list[str] = []
    for token in generate(model, prompt_ids, config, images=images or None):
        text = decoder.push(token)
        if text:
            pieces.append(text)
            out.write(text)
            out.flush()
    tail = decoder.flush()
    if tail:
        pieces.append(tail)
        out.write(tail)
        out.flush()
    return "".join(pieces)
