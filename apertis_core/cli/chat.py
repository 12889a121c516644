"""`apertis chat`: an interactive multi-turn chat in the terminal, replies streamed as they are generated."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from ..chat_prompt import chat_prompt, with_images
from .common import add_sampling_args, generation_config, stream_reply
from .generate import add_inference_args, load_for_inference, prompt_image

if TYPE_CHECKING:
    import torch

HELP = "commands: /reset (forget the conversation), /system TEXT, /image PATH (attach to your next message), /quit"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "chat",
        help="interactive chat in the terminal",
        description=(
            f"Chat with a trained model using its chat template. {HELP}. End of input (Ctrl-D) also quits; "
            "Ctrl-C cuts a reply short."
        ),
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="a model bundle (or checkpoint) folder")
    parser.add_argument("--system", metavar="TEXT", default="", help="a system message that opens the conversation")
    add_inference_args(parser)
    add_sampling_args(parser)
    parser.set_defaults(run=run)


@dataclass
class Conversation:
    """Messages so far and the images they refer to (in order of their <image> markers)."""

    system: str = ""
    messages: list[dict] = field(default_factory=list)
    images: list[list[torch.Tensor]] = field(default_factory=list)  # per message

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()

    def add(self, role: str, content: str, images: list[torch.Tensor] | None = None) -> None:
        self.messages.append({"role": role, "content": content})
        self.images.append(list(images or []))

    def drop_last(self) -> None:
        self.messages.pop()
        self.images.pop()

    def prompt(self, model, tokenizer, max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        """Prompt ids and images, old turns trimmed to fit the context (see apertis_core.chat_prompt)."""
        return chat_prompt(model, tokenizer, self.messages, self.images, self.system, max_new_tokens)


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_for_inference(args)
    config = generation_config(args, stop_ids=[tokenizer.eot_id])
    return chat_loop(model, tokenizer, config, sys.stdin, sys.stdout, system=args.system, device=args.device)


def chat_loop(model, tokenizer, config, stdin: TextIO, out: TextIO, system: str = "", device: str = "cpu") -> int:
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input(), where available)
        except ImportError:
            pass
    from ..quantize import quantization_of

    weights = f"{model.num_parameters():,} parameters, " + (
        "int8 weights" if quantization_of(model) == "int8" else str(model.norm.weight.dtype).removeprefix("torch.")
    )
    print(f"Chatting with {model.config.preset} ({weights}). {HELP}", file=out)
    conversation = Conversation(system=system)
    pending: list[torch.Tensor] = []  # images attached to the next user message
    while True:
        try:
            line = _read_line(stdin, "you> " if interactive else "")
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves the chat
            line = None
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            rest = rest.strip()
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                conversation.reset()
                pending.clear()
                print("(conversation cleared)", file=out)
            elif command == "/system":
                conversation.system = rest
                print("(system message set)" if rest else "(system message removed)", file=out)
            elif command == "/image":
                try:
                    if not rest:
                        raise ValueError("/image needs a file path: /image photo.png")
                    pending.append(prompt_image(model, rest, device))
                    print(f"(image attached to your next message: {rest})", file=out)
                except (ValueError, OSError) as error:
                    print(f"error: {error}", file=out)
            else:
                print(f"unknown command {command}; {HELP}", file=out)
            continue
        conversation.add("user", with_images(line, len(pending)), pending)
        pending = []
        try:
            reply = _answer(model, tokenizer, config, conversation, out)
        except ValueError as error:
            conversation.drop_last()
            print(f"\nerror: {error}", file=out)
            continue
        except KeyboardInterrupt:  # Ctrl-C during a reply cuts it short; the chat goes on
            conversation.drop_last()
            print("\n(reply interrupted)", file=out)
            continue
        conversation.add("assistant", reply)
    print(file=out)
    return 0


def _answer(model, tokenizer, config, conversation: Conversation, out: TextIO) -> str:
    """Stream the assistant's reply to the conversation so far, trimming old turns that do not fit."""
    ids, images = conversation.prompt(model, tokenizer, config.max_new_tokens)
    prefix = "assistant> " if out.isatty() else ""
    out.write(prefix)
    reply = stream_reply(model, tokenizer, ids, config, out, images=images)
    out.write("\n")
    out.flush()
    return reply


def _read_line(stdin: TextIO, prompt: str) -> str | None:
    """The next line of input, or None at end of input."""
    if prompt and stdin is sys.stdin:
        try:
            return input(prompt)
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line
