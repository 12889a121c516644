"""Tab handlers called directly (no browser): datasets, run forms, metrics, models and chat.

Handlers are plain functions of (services, inputs) -> outputs, so each test builds a workspace in a
temporary folder, calls the handler and checks what the user would see.
"""

import sys
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from studio import jobs, run_config
from studio.__main__ import free_port, resolve_auth
from studio.app import Services
from studio.jobs import JobManager
from studio.store import Store
from studio.tabs import chat, dataset, metrics, models, train

FORM = dict(train.BASIC_DEFAULTS, **train.ADVANCED_DEFAULTS)


@pytest.fixture
def services(tmp_path):
    store = Store(tmp_path / "ws")
    return Services(store=store, jobs=JobManager(store))


@pytest.fixture
def bundle(services):
    """A tiny trained-from-nothing bundle registered in the workspace."""
    from apertis_core import ApertisModel
    from apertis_core.bundle import save_bundle
    from apertis_core.tokenizer import Tokenizer

    from conftest import tiny_config

    tokenizer = Tokenizer.byte_level()
    model = ApertisModel(tiny_config("apertis-nano", vocab_size=tokenizer.vocab_size))
    folder = services.store.models_dir / "tiny"
    save_bundle(folder, model, tokenizer, {"steps": 0})
    return services.store.add_model("tiny", folder, kind="bundle")


def _form_values(**changes):
    values = dict(FORM, **changes)
    return [values[name] for name in train.FIELDS]


# -- Dataset ----------------------------------------------------------------------------------------


def test_upload_reports_every_problem_with_file_and_line(services, tmp_path):
    good, bad = tmp_path / "a.txt", tmp_path / "b.jsonl"
    good.write_text("hello world\n" * 20)
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\nnot json\n')
    report, new_id = dataset.upload_dataset(services, [str(good), str(bad)], "mine")
    assert "b.jsonl:2" in report and "b.jsonl:3" in report
    assert new_id == services.store.list_datasets()[0]["id"]
    assert services.store.get_dataset(new_id)["summary"]["problems"] == 2


def test_upload_without_files_or_with_zip_and_files_says_what_to_do(services, tmp_path):
    assert "Choose files" in dataset.upload_dataset(services, [], "")[0]
    (tmp_path / "a.zip").write_bytes(b"PK")
    (tmp_path / "b.txt").write_text("x")
    message = dataset.upload_dataset(services, [str(tmp_path / "a.zip"), str(tmp_path / "b.txt")], "")[0]
    assert "on its own" in message and services.store.list_datasets() == []


def test_demo_text_preview_stats_and_tokenizer(services):
    report, data_id = dataset.add_demo(services, "text")
    assert "records: 1" in report
    text, preview, gallery, histogram = dataset.inspect_dataset(services, data_id)
    assert preview and preview[0][1] == "text" and gallery == [] and histogram.data
    message = dataset.train_tokenizer(services, data_id, 300)
    assert "Tokenizer with" in message
    assert Path(services.store.get_dataset(data_id)["summary"]["tokenizer"]).exists()


def test_demo_shapes_has_image_gallery(services, monkeypatch):
    monkeypatch.setattr(dataset, "DEMO_SHAPES_SCENES", 6)
    _, data_id = dataset.add_demo(services, "shapes")
    _, _, gallery, _ = dataset.inspect_dataset(services, data_id)
    assert gallery and Path(gallery[0][0]).suffix == ".png" and gallery[0][1]


# -- Train ------------------------------------------------------------------------------------------


def test_run_mapping_uses_dataset_and_tokenizer_and_validates(services):
    _, data_id = dataset.add_demo(services, "text")
    services.store.update_dataset_summary(data_id, tokenizer="/x/tokenizer.json")
    mapping = run_config.run_mapping(
        services, data_id, "apertis-nano", dict(zip(train.FIELDS, _form_values(), strict=True))
    )
    assert mapping["data"]["path"].endswith("sample.txt") and mapping["data"]["tokenizer"] == "/x/tokenizer.json"
    assert mapping["train"]["max_steps"] == FORM["max_steps"] and "out_dir" not in mapping
    command, text = train.show_command(services, data_id, "apertis-nano", *_form_values(extra="train.lrr=1"))
    assert "Cannot build the config" in command and "lr" in command and text == ""


def test_start_without_dataset_explains(services):
    message, run_id = train.start_run(services, "", None, "apertis-nano", *_form_values())
    assert message.startswith("Not started") and "Dataset tab" in message and run_id == ""


def test_start_status_stop_through_handlers(services, monkeypatch):
    script = "import time; time.sleep(30)"
    monkeypatch.setattr(jobs, "worker_command", lambda ws, run_id: [sys.executable, "-c", script, run_id])
    _, data_id = dataset.add_demo(services, "text")
    message, run_id = train.start_run(services, "r1", data_id, "apertis-nano", *_form_values())
    assert "is running" in message
    status, progress, _, queue = train.run_status(services, run_id)
    assert status["status"] == "running" and "0/0 steps" in progress and queue[0][2] == "running"
    assert "stopping" in train.stop_run(services, run_id)
    message = train.resume_run(services, run_id)
    assert "only a stopped" in message  # still stopping: Resume explains instead of failing
    import os
    import signal

    os.kill(services.store.get_run(run_id)["pid"], signal.SIGKILL)


def test_page_builds_without_importing_torch(tmp_path):
    """torch costs about 2 s of start-up and the page needs none of it (it is imported once the page is up);
    the page does use apertis_core's config modules (presets, file names), which import without torch."""
    import subprocess

    code = (
        "import sys; from studio.app import build_app, make_services; build_app(make_services(sys.argv[1])); "
        "print(sorted(m for m in ('torch', 'torchvision', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# -- Metrics ----------------------------------------------------------------------------------------


def test_metrics_view_draws_then_skips_when_unchanged(services):
    run = services.store.create_run("a", "train: {lr: 0.001}\n")
    other = services.store.create_run("b", "train: {lr: 0.002}\n")
    services.store.add_metrics(
        run["id"], [(1, "train/loss", 3.0), (1, "sample/prompt", "The"), (1, "sample/text", "cat")]
    )
    *figures, samples, signature = metrics.metrics_view(services, [run["id"], other["id"]])
    assert figures[0].data and samples == [[1, "The", "cat"]]
    again = metrics.metrics_view(services, [run["id"], other["id"]], signature)
    assert all(item is gr.skip() or isinstance(item, dict) and item.get("__type__") == "update" for item in again[:-1])
    assert metrics.config_diff(services, run["id"], other["id"]) == [["train.lr", "0.001", "0.002"]]


def test_metrics_csv_download(services):
    run = services.store.create_run("a", "{}")
    services.store.add_metrics(run["id"], [(1, "train/loss", 3.0)])
    path = metrics.metrics_csv(services, run["id"])
    assert Path(path).read_text().splitlines() == ["step,train/loss", "1,3.0"]


# -- Models -----------------------------------------------------------------------------------------


def test_export_import_and_delete_bundle(services, bundle, tmp_path):
    assert "steps" in models.show_card(services, bundle)
    archive = models.export_zip(services, bundle)
    assert "model.safetensors" in zipfile.ZipFile(archive).namelist()
    message, table, _ = models.import_bundle(services, archive)
    assert message.startswith("Imported") and len(table) == 2
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("notes.txt", "no model here")
    assert "Import failed" in models.import_bundle(services, str(bad))[0]
    prompt, confirm = models.ask_delete(services, bundle)
    assert "for good" in prompt and confirm.visible
    folder = Path(services.store.get_model(bundle)["path"])
    models.delete_model(services, bundle)
    assert not folder.exists() and services.store.get_model(bundle) is None


# -- Chat -------------------------------------------------------------------------------------------

SETTINGS = ("", 0.8, 20, 0.95, 12, 1.1)


def test_chat_streams_cumulative_reply(services, bundle):
    services_with_cache = services
    steps = list(chat.chat(services_with_cache, {"text": "Hi", "files": []}, [], bundle, *SETTINGS))
    lengths = [len(history[-1]["content"]) for history, _ in steps]
    assert len(steps) > 1 and lengths == sorted(lengths)
    history, speed = steps[-1]
    assert [m["role"] for m in history] == ["user", "assistant"] and "tokens/s" in speed


def test_chat_without_model_or_with_image_on_text_model(services, bundle, tmp_path):
    ((history, message),) = chat.chat(services, "Hi", [], None, *SETTINGS)
    assert "Pick a model" in message
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    *_, (history, message) = chat.chat(services, {"text": "what?", "files": [str(image)]}, [], bundle, *SETTINGS)
    assert "cannot see images" in message


def test_chat_reads_gradio_message_parts():
    content = [{"type": "text", "text": "a"}, {"type": "file", "file": {"path": "/p.png"}}]
    assert chat._parts(content) == ("a", ["/p.png"])


def test_conversation_save_and_load(services):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = chat.save_conversation(services, history, "be brief")
    assert chat.load_conversation(path) == (history, "be brief", "Loaded 2 messages.")
    assert "Not a saved conversation" in chat.load_conversation(__file__)[2]


# -- Launch -----------------------------------------------------------------------------------------


def test_network_host_needs_credentials():
    with pytest.raises(SystemExit, match="--auth"):
        resolve_auth("0.0.0.0", None, {})
    assert resolve_auth("127.0.0.1", None, {}) is None
    assert resolve_auth("0.0.0.0", None, {"APERTIS_AUTH": "me:secret"}) == ("me", "secret")
    with pytest.raises(SystemExit, match="USER:PASSWORD"):
        resolve_auth("0.0.0.0", "nopassword", {})


def test_free_port_skips_a_taken_port():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert free_port("127.0.0.1", port) != port
