"""Chat tab: talk to a model (text and images), streamed token by token, optionally side by side with a second.

The handler is a generator that yields the whole conversation each time a token arrives (Gradio's
messages format), so the browser shows the reply growing and Stop simply cancels the generator.
Loaded models come from the app's ModelCache (studio/model_cache.py); prompts are built by
apertis_core.chat_prompt, as `apertis chat` builds them.
Messages are shown as the plain text they are (PlainTextChatbot): a small model's output is not Markdown.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from ..listings import model_label, model_options

LOADED_MODEL = "chat.loaded_model"  # the model last sent here by the Models tab's "Load into Chat"
SAMPLING = [  # (label, default, minimum, maximum, step)
    ("Temperature", 0.8, 0.0, 2.0, 0.05),
    ("Top-k", 50, 0, 200, 1),
    ("Top-p", 0.95, 0.05, 1.0, 0.01),
    ("Max new tokens", 128, 1, 1024, 1),
    ("Repetition penalty", 1.1, 1.0, 2.0, 0.01),
]


# Gradio's Chatbot puts a message into the page as HTML even with Markdown off, so "<b>" would turn bold
# and "a<b" would lose its tail. The characters that could start a tag or an entity go as entities that
# show as themselves; nothing else changes (a reply's own text is rarely touched, so the copy button and
# API clients mostly get it as written). The mapping is one to one, so the text comes back unchanged.
_TO_HTML = re.compile(r"&(?=[#A-Za-z0-9])|<(?=[A-Za-z/!?])")
_FROM_HTML = re.compile(r"&(amp|lt);")
_ENTITY_TEXT = {"amp": "&", "lt": "<"}
_ENTITY_OF = {"&": "&amp;", "<": "&lt;"}
PLAIN_TEXT_CLASS = "apertis-plain-text"
# Gradio shows a message without Markdown with white-space: pre-line, which drops leading and repeated
# spaces: an indented line would lose its indent. pre-wrap keeps every space, tab and line break.
PLAIN_TEXT_CSS = (
    f"<style>.{PLAIN_TEXT_CLASS} .message-markdown-disabled {{ white-space: pre-wrap !important; }}</style>"
)


def to_display(text: str) -> str:
    """`text` as the chat pane must receive it to show it exactly (nothing read as HTML)."""
    return _TO_HTML.sub(lambda match: _ENTITY_OF[match.group()], text)


def from_display(text: str) -> str:
    """The inverse of to_display: the text a message shown in the chat pane holds."""
    return _FROM_HTML.sub(lambda match: _ENTITY_TEXT[match.group(1)], text)


def _map_text(content: Any, convert) -> Any:
    """A message's content with every piece of text passed through `convert` (files are left alone)."""
    if isinstance(content, str):
        return {"type": "text", "text": convert(content)}  # a dict: Gradio would dedent a plain string
    if isinstance(content, dict) and content.get("type") == "text":
        return {**content, "text": convert(str(content.get("text", "")))}
    if isinstance(content, list):
        return [_map_text(part, convert) for part in content]
    return content


@contextlib.contextmanager
def _without_type_stub():
    """Gradio writes a .pyi type stub beside the module that defines a Component subclass, made from that
    module's source: a stray, soon stale file in the source tree, and an import error where there is no
    source (the desktop app). The stub is only for type checkers, so its writer is off while a class is made."""
    from gradio import component_meta

    write_stub = component_meta.create_or_modify_pyi
    component_meta.create_or_modify_pyi = lambda *args, **kwargs: None
    try:
        yield
    finally:
        component_meta.create_or_modify_pyi = write_stub


# A subclass rather than a wrapped instance: Gradio re-creates a component from its class when a handler
# updates its properties (visible=...), and the copy must still escape.
with _without_type_stub():

    class PlainTextChatbot(gr.Chatbot):
        """A Chatbot that shows every message as the plain text it is: no Markdown (an indented line of a
        reply is not a code block), no LaTeX, no HTML; spaces and line breaks as written (with
        plain_text_style on the page). Handlers get the text exactly as written (see to_display)."""

        is_template = True  # drawn by Gradio's own Chatbot front end

        def postprocess(self, value):
            messages = [
                {**m, "content": _map_text(m["content"], to_display)} if isinstance(m, dict) else m for m in value or []
            ]
            return super().postprocess(messages)

        def preprocess(self, payload):
            return [{**m, "content": _map_text(m["content"], from_display)} for m in super().preprocess(payload)]


def plain_chatbot(**kwargs) -> PlainTextChatbot:
    return PlainTextChatbot(render_markdown=False, latex_delimiters=[], elem_classes=[PLAIN_TEXT_CLASS], **kwargs)


def plain_text_style() -> gr.HTML:
    """An empty element that adds PLAIN_TEXT_CSS to the page's <head> (Gradio's way for a tab to bring CSS)."""
    return gr.HTML(head=PLAIN_TEXT_CSS, container=False, padding=False)


def model_choices(services) -> list[tuple[str, str]]:
    """The models as the Models tab lists them (checkpoints folded away), plus the one last loaded from the
    Models tab when the list lacks it (a checkpoint), so a refresh never drops the model being talked to."""
    choices = model_options(services)
    loaded = services.store.get_setting(LOADED_MODEL)
    row = services.store.get_model(loaded) if loaded and loaded not in {model_id for _, model_id in choices} else None
    return choices + [(model_label(row), row["id"])] if row else choices


def select_model(services, model_id: str | None):
    """Models tab -> Chat: pick the model (a checkpoint too) and switch to the Chat tab."""
    if model_id:
        services.store.set_setting(LOADED_MODEL, model_id)
    return gr.Dropdown(choices=model_choices(services), value=model_id), gr.Tabs(selected="chat")


def show_second_model(enabled: bool) -> tuple[Any, Any, Any]:
    """The second model's picker, conversation and speed line are shown only while side by side is on."""
    return gr.Dropdown(visible=enabled), gr.Chatbot(visible=enabled), gr.Markdown(visible=enabled)


def _parts(content: Any) -> tuple[str, list[str]]:
    """(text, image paths) of one message's content in any shape Gradio or an API client sends."""
    if isinstance(content, str):
        return content, []
    if isinstance(content, dict):
        if "path" in content or "file" in content:
            return "", [str((content.get("file") or content)["path"])]
        return str(content.get("text", "")), [
            str(f if isinstance(f, str) else f["path"]) for f in content.get("files", [])
        ]
    text, files = [], []
    for part in content or []:
        part_text, part_files = _parts(part)
        text.append(part_text)
        files += part_files
    return "".join(text), files


def build_prompt(
    tokenizer, model, system: str, history: list[dict], max_new_tokens: int
) -> tuple[list[int], list[Any]]:
    """Token ids (ending with the assistant prompt) and preprocessed images for the conversation, its oldest
    turns dropped when it does not fit the model's context with room for `max_new_tokens`."""
    from apertis_core.chat_prompt import chat_prompt, with_images

    messages: list[dict[str, str]] = []
    images: list[list[Any]] = []  # per message, as chat_prompt takes them
    for message in history:
        text, files = _parts(message.get("content"))
        if files and model.config.image_encoder == "none":
            raise ValueError(
                "this model cannot see images (it has no image encoder); send text only or pick an image model"
            )
        if files:
            from apertis_core.vision import preprocess_image

            pictures = [
                preprocess_image(f, model.config.image_patch_size, model.config.image_max_patches) for f in files
            ]
            text = with_images(text, len(files))
        else:
            pictures = []
        if messages and messages[-1]["role"] == message["role"]:
            messages[-1]["content"] += text  # an image and its question arrive as two Gradio messages
            images[-1] += pictures
        else:
            messages.append({"role": message["role"], "content": text})
            images.append(pictures)
    return chat_prompt(model, tokenizer, messages, images, system, max_new_tokens)


def _user_turn(message: Any) -> list[dict[str, Any]]:
    text, files = _parts(message)
    turns = [{"role": "user", "content": {"path": f}} for f in files]
    return turns + ([{"role": "user", "content": text}] if text or not files else [])


def chat(
    services, message, history, model_id, system, temperature, top_k, top_p, max_new, penalty, weights="fp32"
) -> Iterator[tuple]:
    """API `chat`: yields (conversation so far, speed line) as the reply streams in. `weights` "int8" runs the
    model with int8 weights (apertis_core.quantize). Concurrent chats with one model share its decode steps
    (studio/model_cache.py)."""
    history = [*(history or []), *_user_turn(message)]
    row = services.store.get_model(model_id) if model_id else None
    if row is None:
        yield history, "Pick a model first (train one, or import a bundle in the Models tab)."
        return
    from apertis_core.generation import GenerationConfig
    from apertis_core.tokenizer import StreamDecoder

    try:
        loaded = services.model_cache.load(row["path"], weights or "fp32")
        model, tokenizer = loaded.model, loaded.tokenizer
    except (OSError, ValueError, RuntimeError, ImportError) as exc:  # a refused bundle; a broken torch install too
        yield history, f"Cannot load {row['name']}: {exc}"
        return
    try:
        ids, images = build_prompt(tokenizer, model, system or "", history, int(max_new))
    except (OSError, ValueError, RuntimeError) as exc:
        yield history, f"Cannot answer: {exc}"
        return
    config = GenerationConfig(
        max_new_tokens=int(max_new),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        repetition_penalty=float(penalty),
        stop_ids=[tokenizer.eot_id],
    )
    decoder, reply, count = StreamDecoder(tokenizer), {"role": "assistant", "content": ""}, 0
    history.append(reply)
    name = row["name"] + (" (int8)" if weights == "int8" else "")
    start, first = time.perf_counter(), None
    for token in loaded.scheduler.generate(ids, config, images=images or None):
        count += 1
        first = first or time.perf_counter() - start
        # The decoder holds back the bytes of a character split across tokens: no "�" mid-stream.
        reply["content"] += decoder.push(token)
        yield history, speed_line(name, count, first, time.perf_counter() - start)
    reply["content"] += decoder.flush()
    yield history, speed_line(name, count, first, time.perf_counter() - start)


def speed_line(name: str, count: int, first: float | None, elapsed: float) -> str:
    """One line under a conversation, naming its model (side by side there are two)."""
    if not count:
        return f"{name}: ended its reply at once (no tokens)."
    tokens = "1 token" if count == 1 else f"{count} tokens"
    return f"{name}: {tokens} · {count / max(elapsed, 1e-9):.1f} tokens/s · first token after {first:.2f} s"


def chat_compare(services, enabled, message, history, model_id, *settings) -> Iterator[tuple]:
    if not enabled:
        yield gr.skip(), gr.skip()
        return
    yield from chat(services, message, history, model_id, *settings)


def save_conversation(services, history, system) -> str:
    folder = services.store.tmp_dir / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"conversation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"system": system or "", "messages": history or []}, indent=2), encoding="utf-8")
    return str(path)


def load_conversation(path: str | None) -> tuple[Any, Any, str]:
    """(conversation, system prompt, note) from a file written by Save."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        messages = [
            {"role": m["role"], "content": m["content"]} for m in data["messages"] if m["role"] in ("user", "assistant")
        ]
        return messages, str(data.get("system", "")), f"Loaded {len(messages)} messages."
    except (OSError, TypeError, ValueError, KeyError) as exc:
        return gr.skip(), gr.skip(), f"Not a saved conversation ({exc}); choose a .json file saved from this tab."


HELP = (
    "Talk to a model: pick it, type, press Enter. Attach a picture with the clip to ask about it (image "
    "models only). Tick Side by side to ask two models the same thing. Weights int8 runs a smaller copy of the "
    "model that is faster on a CPU."
)


def build(services) -> dict[str, Any]:
    gr.Markdown(HELP)
    choices = model_choices(services)
    ids = [model_id for _, model_id in choices]
    with gr.Row():
        model = gr.Dropdown(
            label="Model", choices=choices, value=ids[0] if ids else None, scale=3, allow_custom_value=True
        )
        compare = gr.Checkbox(label="Side by side", value=False, info="answer with a second model too")
        # A different model by default: comparing a model with itself is rarely what was meant.
        model_b = gr.Dropdown(
            label="Second model",
            choices=choices,
            value=ids[1] if len(ids) > 1 else None,
            scale=3,
            allow_custom_value=True,
            visible=False,
        )
    with gr.Row():
        system = gr.Textbox(label="System prompt", placeholder="optional, e.g. You answer in one word.", scale=4)
        weights = gr.Radio(
            ["fp32", "int8"],
            value="fp32",
            label="Weights",
            info="int8: smaller and faster on a CPU, a little less exact",
            scale=1,
        )
    with gr.Row():
        chatbot = plain_chatbot(label="Conversation", height=420)
        chatbot_b = plain_chatbot(label="Second model's conversation", height=420, visible=False)
    box = gr.MultimodalTextbox(
        label="Your message",
        placeholder="Ask something; attach an image with the clip",
        file_types=["image"],
        stop_btn=True,
    )
    with gr.Row():
        speed, speed_b = gr.Markdown(), gr.Markdown(visible=False)
    with gr.Accordion("Sampling", open=False), gr.Row():
        sampling = [gr.Slider(lo, hi, value=v, step=s, label=label) for label, v, lo, hi, s in SAMPLING]
    with gr.Row():
        clear, save = gr.Button("Clear"), gr.Button("Save conversation")
        saved, load = (
            gr.File(label="Saved", interactive=False),
            gr.File(label="Load a conversation", file_types=[".json"]),
        )
    note = gr.Markdown()
    plain_text_style()  # last: the empty element it needs then leaves no gap between the parts above
    first = box.submit(
        partial(chat, services), [box, chatbot, model, system, *sampling, weights], [chatbot, speed], api_name="chat"
    )
    second = box.submit(
        partial(chat_compare, services),
        [compare, box, chatbot_b, model_b, system, *sampling, weights],
        [chatbot_b, speed_b],
        api_visibility="private",
    )
    box.submit(lambda: gr.MultimodalTextbox(value=None), None, box, api_visibility="private", queue=False)
    box.stop(None, None, None, cancels=[first, second])
    compare.change(show_second_model, compare, [model_b, chatbot_b, speed_b], api_visibility="private", queue=False)
    clear.click(lambda: ([], [], "", ""), None, [chatbot, chatbot_b, speed, speed_b], api_visibility="private")
    save.click(partial(save_conversation, services), [chatbot, system], saved, api_visibility="private")
    load.upload(load_conversation, load, [chatbot, system, note], api_visibility="private")

    def refresh():  # keeps both picks
        options = model_choices(services)
        return gr.Dropdown(choices=options), gr.Dropdown(choices=options)

    return {"model": model, "refresh": refresh, "refresh_outputs": [model, model_b]}
