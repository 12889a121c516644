"""Chat tab: talk to a model (text and images), streamed token by token, optionally side by side with a second.

The handler is a generator that yields the whole conversation each time a token arrives (Gradio's
messages format), so the browser shows the reply growing and Stop simply cancels the generator.
Loaded models are kept in a small per-app cache so a conversation does not reload weights every turn.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

SAMPLING = [  # (label, default, minimum, maximum, step)
    ("Temperature", 0.8, 0.0, 2.0, 0.05), ("Top-k", 50, 0, 200, 1), ("Top-p", 0.95, 0.05, 1.0, 0.01),
    ("Max new tokens", 128, 1, 1024, 1), ("Repetition penalty", 1.1, 1.0, 2.0, 0.01),
]


class ModelCache:
    """The most recently used models (two, for side-by-side), reloaded when their weights file changes."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, float], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, folder: str):
        from apertis_core.bundle import load_bundle

        weights = Path(folder) / "model.safetensors"
        key = (str(folder), weights.stat().st_mtime if weights.exists() else 0.0)
        with self._lock:
            if key not in self._items:
                self._items[key] = load_bundle(folder)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            self._items.move_to_end(key)
            return self._items[key]


def model_choices(services) -> list[tuple[str, str]]:
    return [(f"{m['name']} · {m['kind']}", m["id"]) for m in services.store.list_models()]


def select_model(services, model_id: str | None):
    """Models tab -> Chat: pick the model and switch to the Chat tab."""
    return gr.Dropdown(choices=model_choices(services), value=model_id), gr.Tabs(selected="chat")


def _parts(content: Any) -> tuple[str, list[str]]:
    """(text, image paths) of one message's content in any shape Gradio or an API client sends."""
    if isinstance(content, str):
        return content, []
    if isinstance(content, dict):
        if "path" in content or "file" in content:
            return "", [str((content.get("file") or content)["path"])]
        return str(content.get("text", "")), [str(f if isinstance(f, str) else f["path"]) for f in content.get("files", [])]
    text, files = [], []
    for part in content or []:
        part_text, part_files = _parts(part)
        text.append(part_text)
        files += part_files
    return "".join(text), files


def build_prompt(tokenizer, model, system: str, history: list[dict]) -> tuple[list[int], list[Any]]:
    """Token ids (ending with the assistant prompt) and preprocessed images for the conversation."""
    messages, images = ([{"role": "system", "content": system}] if system.strip() else []), []
    for message in history:
        text, files = _parts(message.get("content"))
        if files and model.config.image_encoder == "none":
            raise ValueError("this model cannot see images (it has no image encoder); send text only or pick an image model")
        if files:
            from apertis_core.vision import preprocess_image

            images += [preprocess_image(f, model.config.image_patch_size, model.config.image_max_patches) for f in files]
            text = "<image>\n" * len(files) + text  # as the data formats place them
        if messages and messages[-1]["role"] == message["role"]:
            messages[-1]["content"] += text  # an image and its question arrive as two Gradio messages
        else:
            messages.append({"role": message["role"], "content": text})
    ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
    return model.expand_image_tokens(ids, images), images


def _user_turn(message: Any) -> list[dict[str, Any]]:
    text, files = _parts(message)
    turns = [{"role": "user", "content": {"path": f}} for f in files]
    return turns + ([{"role": "user", "content": text}] if text or not files else [])


def chat(services, message, history, model_id, system, temperature, top_k, top_p, max_new, penalty) -> Iterator[tuple]:
    """API `chat`: yields (conversation so far, speed line) as the reply streams in."""
    history = [*(history or []), *_user_turn(message)]
    row = services.store.get_model(model_id) if model_id else None
    if row is None:
        yield history, "Pick a model first (train one, or import a bundle in the Models tab)."
        return
    from apertis_core.generation import GenerationConfig, generate
    from apertis_core.tokenizer import StreamDecoder

    try:
        model, tokenizer = services.models.get(row["path"])
        ids, images = build_prompt(tokenizer, model, system or "", history)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:  # a broken torch install too
        yield history, f"Cannot answer: {exc}"
        return
    config = GenerationConfig(max_new_tokens=int(max_new), temperature=float(temperature), top_k=int(top_k),
                              top_p=float(top_p), repetition_penalty=float(penalty), stop_ids=[tokenizer.eot_id])
    decoder, reply, count = StreamDecoder(tokenizer), {"role": "assistant", "content": ""}, 0
    history.append(reply)
    start, first = time.perf_counter(), None
    for token in generate(model, ids, config, images=images or None):
        count += 1
        first = first or time.perf_counter() - start
        reply["content"] += decoder.push(token)
        yield history, _speed(count, first, time.perf_counter() - start)
    reply["content"] += decoder.flush()
    yield history, _speed(count, first, time.perf_counter() - start)


def _speed(count: int, first: float | None, elapsed: float) -> str:
    if not count:
        return "The model ended its reply at once (no tokens)."
    return f"{count} tokens · {count / max(elapsed, 1e-9):.1f} tokens/s · first token after {first:.2f} s"


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
        messages = [{"role": m["role"], "content": m["content"]} for m in data["messages"] if m["role"] in ("user", "assistant")]
        return messages, str(data.get("system", "")), f"Loaded {len(messages)} messages."
    except (OSError, TypeError, ValueError, KeyError) as exc:
        return gr.skip(), gr.skip(), f"Not a saved conversation ({exc}); choose a .json file saved from this tab."


def build(services) -> dict[str, Any]:
    choices = model_choices(services)
    with gr.Row():
        model = gr.Dropdown(label="Model", choices=choices, value=choices[0][1] if choices else None, scale=3,
                            allow_custom_value=True)
        compare = gr.Checkbox(label="Side by side", value=False)
        model_b = gr.Dropdown(label="Second model", choices=choices, scale=3)
    system = gr.Textbox(label="System prompt", placeholder="optional, e.g. You answer in one word.")
    with gr.Row():
        chatbot = gr.Chatbot(label="Chat", height=420)
        chatbot_b = gr.Chatbot(label="Second model", height=420)
    box = gr.MultimodalTextbox(placeholder="Ask something; attach an image with the clip", file_types=["image"], stop_btn=True)
    speed, speed_b = gr.Markdown(), gr.Markdown()
    with gr.Accordion("Sampling", open=False), gr.Row():
        sampling = [gr.Slider(lo, hi, value=v, step=s, label=label) for label, v, lo, hi, s in SAMPLING]
    with gr.Row():
        clear, save = gr.Button("Clear"), gr.Button("Save conversation")
        saved, load = gr.File(label="Saved", interactive=False), gr.File(label="Load a conversation", file_types=[".json"])
    note = gr.Markdown()
    first = box.submit(partial(chat, services), [box, chatbot, model, system, *sampling], [chatbot, speed], api_name="chat")
    second = box.submit(partial(chat_compare, services), [compare, box, chatbot_b, model_b, system, *sampling],
                        [chatbot_b, speed_b], api_visibility="private")
    box.submit(lambda: gr.MultimodalTextbox(value=None), None, box, api_visibility="private", queue=False)
    box.stop(None, None, None, cancels=[first, second])
    clear.click(lambda: ([], [], "", ""), None, [chatbot, chatbot_b, speed, speed_b], api_visibility="private")
    save.click(partial(save_conversation, services), [chatbot, system], saved, api_visibility="private")
    load.upload(load_conversation, load, [chatbot, system, note], api_visibility="private")

    def refresh():
        options = model_choices(services)
        return gr.Dropdown(choices=options), gr.Dropdown(choices=options)

    return {"model": model, "refresh": refresh, "refresh_outputs": [model, model_b]}
