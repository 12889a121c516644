"""`apertis generate`: one completion from a model bundle, streamed to stdout."""

from __future__ import annotations

import argparse
import sys

from ..chat_prompt import with_images
from .common import (
    add_sampling_args,
    generation_config,
    load_model,
    load_prompt_image,
    stream_reply,
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate",
        help="one completion, streamed to stdout",
        description="Continue a prompt with a trained model (or answer it as a chat turn with --chat).",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="a model bundle (or checkpoint) folder")
    parser.add_argument(
        "--prompt", required=True, metavar="TEXT", help="the text to continue (or the user message with --chat)"
    )
    parser.add_argument(
        "--image", metavar="FILE", help="an image shown before the prompt (models trained with images only)"
    )
    parser.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the chat template and stop at the end of the reply"
    )
    parser.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    add_sampling_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model, args.device)
    images = [load_prompt_image(model, args.image)] if args.image else []
    text = with_images(args.prompt, len(images))
    if args.chat:
        ids, _ = tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        # Plain continuation; documents are separated by end-of-text in training, so it also starts one.
        ids = tokenizer.encode(text) or [tokenizer.eot_id]
    if images:
        ids = model.expand_image_tokens(ids, images)
    config = generation_config(args, stop_ids=[tokenizer.eot_id])
    out = sys.stdout
    if not args.chat:
        out.write(args.prompt)
    stream_reply(model, tokenizer, ids, config, out, images=[i.to(args.device) for i in images])
    out.write("\n")
    out.flush()
    return 0
