"""What a newcomer meets in the Dataset, Chat and Models tabs: the upload box explains every
layout and each one reads back as its kind; demo sets validate clean; chat shows model output as plain text,
streams whole characters and names its models; the Models tab lists models, not every checkpoint, with
cards titled by run name and free of paths on this computer.

Handlers are called directly, as in test_studio_tabs.py; one test drives the Chat tab in headless Chromium
to check that the page shows a message exactly as typed.
"""

import functools
import importlib
import json
import shutil
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from apertis_core.cli.main import main as apertis
from apertis_core.data import validate_dataset
from studio.app import Services
from studio.jobs import JobManager
from studio.model_cache import BatchScheduler
from studio.store import Store
from studio.tabs import chat, dataset, models

from browser import open_page, sync_api
from conftest import tiny_config

SETTINGS = ("", 0.0, 20, 0.95, 12, 1.0)  # system prompt, greedy, top-k, top-p, max new tokens, no penalty


@pytest.fixture
def services(tmp_path):
    store = Store(tmp_path / "ws")
    return Services(store=store, jobs=JobManager(store))


def test_dataset_choices_count_records_in_words(services, tmp_path):
    one = services.store.add_dataset("poem", tmp_path / "poem.txt", {"records": 1})
    many = services.store.add_dataset("stories", tmp_path / "stories.txt", {"records": 3})
    assert dict((v, k) for k, v in dataset.dataset_choices(services)) == {
        one: "poem · 1 record",
        many: "stories · 3 records",
    }


def _bundle(services, name: str) -> str:
    """A tiny untrained bundle (byte-level tokenizer) registered as an imported model."""
    from apertis_core import ApertisModel, Tokenizer
    from apertis_core.bundle import save_bundle

    tokenizer = Tokenizer.byte_level()
    folder = services.store.models_dir / name
    save_bundle(folder, ApertisModel(tiny_config("apertis-nano", vocab_size=tokenizer.vocab_size)), tokenizer, {})
    return services.store.add_model(name, folder, kind="bundle")


def _components(build, services) -> list:
    with gr.Blocks() as page:
        build(services)
    return list(page.blocks.values())


# -- Dataset: the upload box lists every layout, and each reads back as its kind -----------------------


def _write_layout(name: str, example: str, folder: Path) -> None:
    """Files in the layout `name`, using the example the upload box shows for it."""
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(folder / "cat.png")
    if name == "Plain text":
        (folder / "story.txt").write_text(example, encoding="utf-8")
        (folder / "notes.md").write_text(example, encoding="utf-8")
        (folder / "cat.png").unlink()
    elif name == "Image folder":
        (folder / "cat.txt").write_text("A cat on a mat.", encoding="utf-8")
    elif name == "Table":
        (folder / "data.csv").write_text(f"text,image\n{example}\n", encoding="utf-8")
    else:  # a .jsonl layout: the example is a real line
        (folder / "data.jsonl").write_text(example + "\n", encoding="utf-8")
        if "cat.png" not in example:
            (folder / "cat.png").unlink()


def test_every_layout_the_upload_box_lists_validates_as_its_kind(tmp_path):
    layouts = {layout.name: layout for layout in dataset.LAYOUTS}
    assert len(layouts) == 8 and {"Chat", "Image + caption", "Image + messages", "Image folder", "Table", "Zip"} <= set(
        layouts
    )
    for layout in dataset.LAYOUTS:
        assert f"**{layout.name}** ({layout.files}): `{layout.example}`" in dataset.layouts_markdown()
    kinds: set[str] = set()
    for name, layout in layouts.items():
        if name == "Zip":
            continue
        _write_layout(name, layout.example, tmp_path / "all" / name.replace(" ", "_"))
        report = validate_dataset(tmp_path / "all" / name.replace(" ", "_"))
        assert report.ok and report.problems == [], (name, report.to_text())
        assert set(report.stats["kinds"]) == {layout.kind}, name
        kinds.add(layout.kind)
    assert kinds == {"text", "chat", "image+caption", "image chat"}  # every kind a record can be
    archive = shutil.make_archive(str(tmp_path / "all"), "zip", tmp_path / "all")
    report = validate_dataset(archive, cache_dir=tmp_path / "unzipped")
    assert report.ok and set(report.stats["kinds"]) == kinds


@pytest.mark.parametrize("tab", ["dataset", "train", "metrics", "models", "chat"])
def test_every_tab_opens_with_one_short_help_line(services, tab):
    module = importlib.import_module(f"studio.tabs.{tab}")
    build = functools.partial(module.build, timer_s=5.0) if tab in ("train", "metrics") else module.build
    first_markdown = next(b for b in _components(build, services) if isinstance(b, gr.Markdown))
    assert first_markdown.value == module.HELP and "\n" not in module.HELP and len(module.HELP) < 300


def test_dataset_tab_opens_with_a_help_line_and_the_layout_list(services):
    texts = [getattr(block, "value", None) for block in _components(dataset.build, services)]
    assert dataset.HELP in texts and dataset.layouts_markdown() in texts


# -- Record kinds: the studio and `apertis data validate` name image records alike --------------------


def test_image_records_show_as_their_kind_in_preview_stats_and_cli(services, tmp_path, capsys):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "cat.png")
    rows = [
        {"image": "cat.png", "text": "A red square."},
        {
            "image": "cat.png",
            "messages": [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "red"}],
        },
        {"text": "plain"},
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    report, data_id = dataset.upload_dataset(services, [str(data), str(tmp_path / "cat.png")], "mixed")
    assert "records: 3 (1 image chat, 1 image+caption, 1 text)" in report
    _, preview, _, _ = dataset.inspect_dataset(services, data_id)
    assert [kind for _, kind, _ in preview] == ["image+caption", "image chat", "text"]
    assert services.store.get_dataset(data_id)["summary"]["kinds"] == {"image+caption": 1, "image chat": 1, "text": 1}

    assert apertis(["data", "validate", str(data)]) == 0
    assert "records: 3 (1 image chat, 1 image+caption, 1 text)" in capsys.readouterr().out


# -- Demo sets validate clean ------------------------------------------------------------------------


@pytest.mark.parametrize("conversations", [False, True], ids=["questions", "conversations"])
def test_cli_shapes_demo_validates_clean(tmp_path, capsys, conversations):
    out = tmp_path / "shapes"
    assert (
        apertis(["data", "demo", "shapes", "--out", str(out), "--n", "12", *(["--conversations"] * conversations)]) == 0
    )
    assert (out / "summary.json").is_file()
    for path in (out, out / "train.jsonl", out / "test.jsonl"):
        capsys.readouterr()
        assert apertis(["data", "validate", str(path)]) == 0, capsys.readouterr().out
        assert "OK: no problems found." in capsys.readouterr().out


def test_studio_demo_sets_validate_clean(services, monkeypatch):
    monkeypatch.setattr(dataset, "DEMO_SHAPES_SCENES", 8)
    for kind in ("shapes", "text"):
        report, data_id = dataset.add_demo(services, kind)
        row = services.store.get_dataset(data_id)
        assert row["summary"]["problems"] == 0 and "OK: no problems found." in report, report
        folder = Path(row["path"]).parent  # the whole demo folder too, as `apertis data validate` would read it
        assert validate_dataset(folder).problems == []


# -- Chat: plain text, whole characters, named speed lines, plain labels --------------------------------

TRICKY = "Sure:\n    indented, not code\n# not a heading\n<b>not bold</b> &amp; a<b & $$x$$ <3\n\ttab  two  spaces"


def test_chat_pane_shows_messages_as_plain_text_and_hands_them_back_unchanged():
    bot = chat.plain_chatbot(label="Conversation")
    assert bot.get_block_name() == "chatbot"  # Gradio's own front end draws it
    config = bot.get_config()
    assert config["render_markdown"] is False and config["latex_delimiters"] == []
    assert chat.PLAIN_TEXT_CLASS in config["elem_classes"] and "pre-wrap" in chat.PLAIN_TEXT_CSS
    history = [
        {"role": "user", "content": {"path": "/tmp/x.png"}},
        {"role": "user", "content": TRICKY},
        {"role": "assistant", "content": "  two leading spaces"},
    ]
    sent = bot.postprocess(history)
    shown = sent.root[1].content[0].text
    assert shown == TRICKY.replace("&amp;", "&amp;amp;").replace("<b", "&lt;b").replace("</", "&lt;/")
    assert sent.root[2].content[0].text == "  two leading spaces"  # Gradio would have dedented a plain string
    # The copy Gradio makes of a component whose properties a handler updates (visible=...) still escapes.
    copy = type(bot)(**{**bot.constructor_args, "visible": False, "render": False})
    assert copy.postprocess(history).root[1].content[0].text == shown and copy.render_markdown is False
    back = bot.preprocess(sent)
    assert chat._parts(back[1]["content"]) == (TRICKY, [])
    assert chat._parts(back[2]["content"]) == ("  two leading spaces", [])
    assert chat._parts(back[0]["content"]) == ("", ["/tmp/x.png"])


def test_the_chat_module_leaves_no_type_stub_beside_it():
    """Gradio writes a .pyi from the source of a module that defines a component (this test module imported
    chat); in the desktop app there is no source, and the import would fail."""
    assert not Path(chat.__file__).with_suffix(".pyi").exists()


@pytest.mark.parametrize("text", [TRICKY, "&lt;&amp;x", "&#9;", "&lt", "<<>>&&", "a <b", ""])
def test_display_escaping_round_trips(text):
    assert chat.from_display(chat.to_display(text)) == text


def test_streamed_reply_holds_back_split_characters(services, monkeypatch):
    from apertis_core import Tokenizer

    model_id = _bundle(services, "bytes")
    reply = "héllo 🎉 naïve"
    tokens = Tokenizer.byte_level().encode(reply)
    assert len(tokens) > len(reply)  # multi-byte characters arrive one byte per token
    monkeypatch.setattr(BatchScheduler, "generate", lambda self, ids, config, images=None: iter(tokens))
    steps = list(chat.chat(services, {"text": "Hi", "files": []}, [], model_id, *SETTINGS))
    shown = [history[-1]["content"] for history, _ in steps]
    assert all("\ufffd" not in text for text in shown) and shown[-1] == reply
    assert all(reply.startswith(text) for text in shown)  # every step is whole characters of the reply


def test_speed_lines_name_their_model_and_count_tokens_in_words(services, monkeypatch):
    first, second = _bundle(services, "alpha"), _bundle(services, "beta")
    monkeypatch.setattr(BatchScheduler, "generate", lambda self, ids, config, images=None: iter([ord("A")]))
    *_, (_, speed) = chat.chat(services, {"text": "Hi", "files": []}, [], first, *SETTINGS)
    assert speed.startswith("alpha: 1 token · ") and "tokens/s" in speed
    *_, (_, speed_b) = chat.chat_compare(services, True, {"text": "Hi", "files": []}, [], second, *SETTINGS)
    assert speed_b.startswith("beta: 1 token · ")
    assert chat.speed_line("alpha", 3, 0.1, 1.0).startswith("alpha: 3 tokens · 3.0 tokens/s")
    assert list(chat.chat_compare(services, False, {"text": "Hi", "files": []}, [], second, *SETTINGS)) == [
        (gr.skip(), gr.skip())
    ]


def test_chat_tab_labels_and_hidden_second_model(services):
    _bundle(services, "alpha"), _bundle(services, "beta")
    blocks = _components(chat.build, services)
    box = next(b for b in blocks if isinstance(b, gr.MultimodalTextbox))
    assert box.label == "Your message"
    second = [b for b in blocks if getattr(b, "label", "") in ("Second model", "Second model's conversation")]
    assert len(second) == 2 and not any(b.visible for b in second)
    picks = [b for b in blocks if isinstance(b, gr.Dropdown)]
    assert picks[0].value != picks[1].value  # side by side starts with two different models
    assert [update.constructor_args["visible"] for update in chat.show_second_model(True)] == [True] * 3
    assert [update.constructor_args["visible"] for update in chat.show_second_model(False)] == [False] * 3


# -- Models: finals listed, checkpoints folded under their run, cards by name -------------------------


@pytest.fixture
def trained(services, tmp_path):
    """A run trained for 4 steps by the real trainer (checkpoints at 2 and 4, a final bundle), registered
    as the worker does, on a dataset the user named "bedtime stories"."""
    from apertis_core.training import RunConfig, train

    stories = tmp_path / "Users" / "someone" / "stories.txt"
    stories.parent.mkdir(parents=True)
    stories.write_text("Once upon a time there was a small robot. " * 40, encoding="utf-8")
    _, data_id = dataset.upload_dataset(services, [str(stories)], "bedtime stories")
    run = services.store.create_run("first try", "{}", data_id)
    model = tiny_config("apertis-nano").to_dict() | {"preset": "apertis-nano"}
    config = RunConfig.from_dict({
        "model": model, "data": {"path": services.store.get_dataset(data_id)["path"], "seq_len": 32, "vocab_size": 262},
        "train": {"batch_size": 2, "max_steps": 4, "save_every": 2, "warmup_steps": 1, "eval_every": 0,
                  "eval_batches": 1, "device": "cpu", "precision": "fp32", "threads": 1},
        "out_dir": run["out_dir"]})  # fmt: skip
    result = train(config)
    services.store.add_model(run["name"], result.bundle_dir, kind="bundle", run_id=run["id"])
    return run


def test_models_lists_final_models_and_folds_checkpoints_under_their_run(services, trained):
    stopped = services.store.create_run("stopped early", "{}")
    shutil.copytree(Path(trained["out_dir"]) / "checkpoints", Path(stopped["out_dir"]) / "checkpoints")

    # Newest first; a run with no final model yet (stopped) is listed by its newest checkpoint.
    models.sync_checkpoints(services)  # the table reads the registry; syncing it with the disk is a separate step
    table = models.models_table(services)
    assert [(name, kind) for name, kind, _, _ in table] == [
        ("stopped early · step 4", "checkpoint"),
        ("first try", "trained"),
    ]
    shown, dropdown = models.toggle_checkpoints(services, True, None)
    assert [name for name, *_ in shown] == [
        "stopped early · step 4",
        "↳ stopped early · step 2",
        "first try",
        "↳ first try · step 4",
        "↳ first try · step 2",
    ]
    assert [label for label, _ in dropdown.constructor_args["choices"]][3] == "↳ first try · step 4 · checkpoint"
    assert len(models.models_table(services)) == 5  # the toggle is remembered, and shown so on entering the tab
    assert models.refresh(services)[2].constructor_args["value"] is True
    checkpoint = shown[3][3]
    _, dropdown = models.toggle_checkpoints(services, False, checkpoint)
    assert dropdown.constructor_args["value"] == table[0][3]  # a hidden pick moves to a listed model
    assert [label for label, _ in chat.model_choices(services)] == [
        "stopped early · step 4 · checkpoint",
        "first try · trained",
    ]

    # A checkpoint is still exportable: a clean bundle whose card says which run and step it is.
    archive = models.export_zip(services, checkpoint)
    with zipfile.ZipFile(archive) as zf:
        names, card = zf.namelist(), zf.read("README.md").decode()
    assert "trainer_state.pt" not in names and "model.safetensors" in names
    assert card.startswith("# first try · step 4\n") and "| dataset | bedtime stories |" in card
    assert "Users" not in card and str(services.store.root) not in card
    # ... and loading it into Chat keeps it in Chat's list.
    picked, _ = chat.select_model(services, checkpoint)
    assert picked.constructor_args["value"] == checkpoint
    assert checkpoint in [model_id for _, model_id in chat.model_choices(services)]


def test_model_card_is_titled_by_run_and_names_its_dataset_without_paths(services, trained):
    final_id = next(row[3] for row in models.models_table(services) if row[1] == "trained")
    on_disk = (Path(trained["out_dir"]) / "final" / "README.md").read_text(encoding="utf-8")
    assert on_disk.startswith(f"# {Path(trained['out_dir']).name}\n")  # the run folder's name, not "final"
    assert str(services.store.root) not in on_disk and "Users" not in on_disk

    card = models.show_card(services, final_id)
    assert card.startswith("# first try\n") and "| dataset | bedtime stories |" in card and "| steps | 4 |" in card
    assert str(services.store.root) not in card and models.hide_paths(card) == card  # no absolute path at all
    assert models.model_folder(services, final_id) == f"Folder: `{Path(trained['out_dir']) / 'final'}`"
    with zipfile.ZipFile(models.export_zip(services, final_id)) as zf:
        assert zf.read("README.md").decode() == card  # the exported bundle carries the card the tab shows


def test_card_pane_follows_the_selection(services, trained):
    models.sync_checkpoints(services)
    blocks = _components(models.build, services)
    pick = next(b for b in blocks if isinstance(b, gr.Dropdown) and b.label == "Model")
    cards = [b.value for b in blocks if isinstance(b, gr.Markdown) and str(b.value).startswith("# ")]
    assert pick.value == models.models_table(services)[0][3] and cards == [
        models.show_card(services, pick.value).strip()
    ]
    message, _, _, dropdown = models.delete_model(services, pick.value)
    assert message.startswith("Deleted") and dropdown.constructor_args["value"] == models.models_table(services)[0][3]


def test_hide_paths_keeps_relative_paths_and_urls():
    text = "| data | path: /home/me/ws/datasets/x.jsonl, C:\\Users\\me\\d.txt (see https://example.org/a/b, data/shapes/t.jsonl) |"
    assert (
        models.hide_paths(text) == "| data | path: x.jsonl, d.txt (see https://example.org/a/b, data/shapes/t.jsonl) |"
    )


# -- In the browser: a message shows exactly as typed -------------------------------------------------


def test_chat_page_shows_a_message_as_typed(studio_url, tmp_path):
    expect = sync_api().expect
    typed = "Sure:\n    indented, not code\n# not a heading\n<b>not bold</b> &amp; a<b  c"
    with open_page(tmp_path / "chromium-profile", height=900) as (page, errors):
        page.goto(studio_url, wait_until="load")
        page.get_by_role("tab", name="Chat").click()
        expect(page.get_by_label("Second model", exact=True)).to_be_hidden()
        page.get_by_placeholder("Ask something; attach an image with the clip").fill(typed)
        page.keyboard.press("Enter")
        bubble = page.locator('[data-testid="user"]').first
        expect(bubble).to_be_visible(timeout=30_000)
        assert bubble.locator("b").count() == 0 and bubble.locator("h1, pre, code").count() == 0
        assert bubble.inner_text().strip() == typed  # every space and line break as typed
        page.get_by_label("Side by side").check()
        expect(page.get_by_label("Second model", exact=True)).to_be_visible()
    assert not errors, "JavaScript errors in the studio page:\n" + "\n".join(errors)
