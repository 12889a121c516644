"""`apertis generate`: completions from a model bundle; one prompt streams, several share decode steps."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..chat_prompt import with_images
from .common import add_sampling_args, generation_config, load_model, load_prompt_image, stream_reply

if TYPE_CHECKING:
    from ..model import ApertisModel
    from ..tokenizer import Tokenizer


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate",
        help="completions, streamed to stdout",
        description=(
            "Continue a prompt with a trained model (or answer it as a chat turn with --chat). Give --prompt "
            "several times for several completions, generated together in batched steps and printed in order."
        ),
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="a model bundle (or checkpoint) folder")
    parser.add_argument(
        "--prompt",
        required=True,
        action="append",
        metavar="TEXT",
        help="the text to continue (or the user message with --chat); repeat it for several prompts",
    )
    parser.add_argument(
        "--image", metavar="FILE", help="an image shown before each prompt (models trained with images only)"
    )
    parser.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the chat template and stop at the end of the reply"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="at most N prompts share a step (default 16)"
    )
    add_inference_args(parser)
    add_sampling_args(parser)
    parser.set_defaults(run=run)


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """--device, --quantize and --dtype, shared with `apertis chat`."""
    parser.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=("none", "int8"),
        help="int8: linear weights in int8 with per-channel scales, CPU int8 kernels (see docs/INFERENCE.md); "
        "an int8 bundle (apertis export --quantize int8) runs in int8 without it",
    )
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="weights and activations (default fp32; auto: bf16 on a GPU that has it, else fp16 there, fp32 on "
        "a CPU; fp16 on a GPU only)",
    )


def load_for_inference(args: argparse.Namespace) -> tuple[ApertisModel, Tokenizer]:
    from ..quantize import prepare_for_inference

    model, tokenizer = load_model(args.model, args.device)
    return prepare_for_inference(model, args.quantize, args.dtype, args.device), tokenizer


def prompt_image(model: ApertisModel, path: str, device: str):
    """An image for this model's encoder, on its device and in its dtype."""
    return load_prompt_image(model, path).to(device, model.norm.weight.dtype)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, tokenizer = load_for_inference(args)
    images = [prompt_image(model, args.image, args.device)] if args.image else []
    prompts = [_prompt_ids(model, tokenizer, text, images, args.chat) for text in args.prompt]
    config = generation_config(args, stop_ids=[tokenizer.eot_id])
    out = sys.stdout
    if len(prompts) == 1:
        if not args.chat:
            out.write(args.prompt[0])
        stream_reply(model, tokenizer, prompts[0], config, out, images=images)
        out.write("\n")
    else:
        from ..generation import generate_many

        replies: list[list[int]] = [[] for _ in prompts]
        for index, token in generate_many(model, prompts, config, [images] * len(prompts), args.batch_size):
            replies[index].append(token)
        for text, reply in zip(args.prompt, replies, strict=True):
            out.write(("" if args.chat else text) + tokenizer.decode(reply) + "\n\n")
    out.flush()
    return 0


def _prompt_ids(model, tokenizer, text: str, images: list, chat: bool) -> list[int]:
    text = with_images(text, len(images))
    if chat:
        ids, _ = tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        # Plain continuation; documents are separated by end-of-text in training, so it also starts one.
        ids = tokenizer.encode(text) or [tokenizer.eot_id]
    return model.expand_image_tokens(ids, images) if images else ids
