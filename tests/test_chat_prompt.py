"""One chat prompt builder (apertis_core.chat_prompt) for the studio's Chat tab and `apertis chat`: the oldest
turns are dropped to leave room for the reply, the system prompt and the latest turn never are, and the same
conversation gives the same ids (and images) through either."""

import pytest

from apertis_core import ApertisModel, Tokenizer
from apertis_core.chat_prompt import chat_prompt, prompt_budget, with_images
from apertis_core.cli.chat import Conversation
from apertis_core.vision import preprocess_image
from studio.tabs import chat as chat_tab

from conftest import tiny_config

PATCH, MAX_PATCHES, CONTEXT = 8, 16, 128


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def model(tokenizer):
    config = tiny_config(
        "apertis-nano",
        vocab_size=tokenizer.vocab_size,
        max_seq_len=CONTEXT,
        image_encoder="vit",
        image_patch_size=PATCH,
        image_max_patches=MAX_PATCHES,
        image_token_id=tokenizer.image_id,
    )
    return ApertisModel(config).eval()


def _turns(count: int) -> list[dict[str, str]]:
    return [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}: some words"} for i in range(count)]


def test_trimming_keeps_the_system_prompt_and_the_latest_turn(model, tokenizer):
    messages = _turns(21)
    ids, _ = chat_prompt(model, tokenizer, messages, system="Be brief.", max_new_tokens=48)
    text = tokenizer.decode(ids, skip_special=False)
    assert len(ids) <= prompt_budget(CONTEXT, 48) < len(chat_prompt(model, tokenizer, messages)[0])
    assert text.startswith("<|system|>Be brief.<|eot|><|user|>")  # what follows the system prompt is a question
    assert text.endswith("turn 20: some words<|eot|><|assistant|>") and "turn 0:" not in text
    # Only whole turns go, and no more than needed: one more earlier exchange would not fit.
    first = next(i for i, m in enumerate(messages) if m["content"] in text)
    longer, _ = tokenizer.encode_chat([{"role": "system", "content": "Be brief."}, *messages[first - 2 :]], True)
    assert len(longer) > prompt_budget(CONTEXT, 48)
    # A latest turn longer than the budget is kept anyway (with the system prompt), everything before it dropped.
    ids, _ = chat_prompt(model, tokenizer, [*messages, {"role": "user", "content": "x" * 200}], system="S")
    assert tokenizer.decode(ids, skip_special=False) == f"<|system|>S<|eot|><|user|>{'x' * 200}<|eot|><|assistant|>"


@pytest.mark.parametrize("max_new_tokens", [8, 64])  # the whole conversation fits; old turns (and the picture) go
def test_studio_and_cli_build_the_same_prompt(model, tokenizer, picture, max_new_tokens):
    image = preprocess_image(picture, PATCH, MAX_PATCHES)
    cli = Conversation(system="You answer in one word.")
    cli.add("user", with_images("What is it?", 1), [image])
    cli.add("assistant", "A square.")
    cli.add("user", "And its colour?")
    studio_history = [  # as Gradio's Chatbot holds it: the picture and its question are two messages
        {"role": "user", "content": {"path": str(picture)}},
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "And its colour?"},
    ]
    cli_ids, cli_images = cli.prompt(model, tokenizer, max_new_tokens)
    studio_ids, studio_images = chat_tab.build_prompt(tokenizer, model, cli.system, studio_history, max_new_tokens)
    assert cli_ids == studio_ids
    assert len(cli_images) == len(studio_images) and all(
        a.equal(b) for a, b in zip(cli_images, studio_images, strict=True)
    )
    assert (tokenizer.image_id in cli_ids) == (max_new_tokens == 8) == bool(cli_images)
