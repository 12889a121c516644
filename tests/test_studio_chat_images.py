"""Chat tab with an image attached: an image model (ViT encoder) answers about it; a text-only model says
it cannot see images instead of failing.

Real bundles (tiny, randomly initialised, saved with save_bundle and loaded by the tab's model cache); a
spy around `generate` checks that the picture itself reached the model, not just that some text came back.
"""

import pytest

from apertis_core import ApertisModel, Tokenizer, save_bundle
from apertis_core import generation as generation_module
from apertis_core.vision import num_image_tokens, preprocess_image
from studio.app import Services
from studio.jobs import JobManager
from studio.store import Store
from studio.tabs import chat

from conftest import tiny_config

SETTINGS = ("", 0.0, 20, 0.95, 8, 1.1)  # system prompt, greedy, top-k, top-p, max new tokens, penalty
PATCH, MAX_PATCHES = 8, 16


@pytest.fixture
def services(tmp_path):
    store = Store(tmp_path / "ws")
    return Services(store=store, jobs=JobManager(store))


def _bundle(services, name: str, **image_settings) -> str:
    tokenizer = Tokenizer.byte_level()
    config = tiny_config("apertis-nano", vocab_size=tokenizer.vocab_size, max_seq_len=128, **image_settings)
    folder = services.store.models_dir / name
    save_bundle(folder, ApertisModel(config), tokenizer, {"steps": 0})
    return services.store.add_model(name, folder, kind="bundle")


@pytest.fixture
def generate_calls(monkeypatch):
    """Every (prompt ids, images) the chat handler hands to apertis_core's decoding: DecodeBatch.add, where a
    prompt enters alone (generate) or beside other chats' (the studio's batching scheduler)."""
    calls, real = [], generation_module.DecodeBatch.add

    def spy(self, ids, config=None, images=None):
        calls.append((list(ids), images))
        return real(self, ids, config, images)

    monkeypatch.setattr(generation_module.DecodeBatch, "add", spy)
    return calls


def test_image_model_answers_a_message_with_an_image(services, picture, generate_calls):
    model_id = _bundle(
        services,
        "seeing",
        image_encoder="vit",
        image_patch_size=PATCH,
        image_max_patches=MAX_PATCHES,
        image_token_id=Tokenizer.byte_level().image_id,
    )
    message = {"text": "What is in the picture?", "files": [{"path": str(picture)}]}  # as the browser sends it
    *_, (history, speed) = chat.chat(services, message, [], model_id, *SETTINGS)

    assert "Cannot answer" not in speed and "tokens/s" in speed, speed
    assert [m["role"] for m in history] == ["user", "user", "assistant"]  # the image, the question, the reply
    assert history[0]["content"] == {"path": str(picture)}  # the reply text itself is noise: random weights
    ((ids, images),) = generate_calls
    patches = num_image_tokens(preprocess_image(picture, PATCH, MAX_PATCHES), PATCH)
    assert len(images) == 1 and ids.count(Tokenizer.byte_level().image_id) == patches > 1

    # A text follow-up in the same conversation still shows the model the earlier picture.
    *_, (history, speed) = chat.chat(services, {"text": "And its colour?", "files": []}, history, model_id, *SETTINGS)
    assert "tokens/s" in speed and len(generate_calls) == 2 and len(generate_calls[1][1]) == 1


def test_text_model_says_it_cannot_see_images(services, picture, generate_calls):
    model_id = _bundle(services, "text-only")
    message = {"text": "What is in the picture?", "files": [{"path": str(picture)}]}
    outputs = list(chat.chat(services, message, [], model_id, *SETTINGS))

    ((history, note),) = outputs
    assert note.startswith("Cannot answer") and "cannot see images" in note
    assert [m["role"] for m in history] == ["user", "user"] and generate_calls == []  # no reply attempted
    *_, (_, speed) = chat.chat(services, {"text": "Hello", "files": []}, [], model_id, *SETTINGS)
    assert "tokens/s" in speed  # the same model still answers text
