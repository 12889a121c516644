"""The `apertis` command line: help for every command, one-line errors with exit code 2, streaming
generation, a scripted chat session, export and data validation through the CLI."""

import io
import json
import subprocess
import sys

import pytest

from apertis_core import ApertisModel
from apertis_core.bundle import save_bundle
from apertis_core.cli import bench
from apertis_core.cli.main import main
from apertis_core.generation import GenerationConfig, generate
from apertis_core.tokenizer import Tokenizer

from conftest import HANG_GUARD_S, REPO, tiny_config, tiny_image_config


@pytest.fixture
def bundle(tmp_path):
    tokenizer = Tokenizer.byte_level()
    model = ApertisModel(tiny_config("apertis-hybrid-nano", vocab_size=tokenizer.vocab_size)).eval()
    save_bundle(tmp_path / "model", model, tokenizer)
    return tmp_path / "model", model, tokenizer


HELP_COMMANDS = [
    [],
    ["train"],
    ["generate"],
    ["chat"],
    ["export"],
    ["data"],
    ["data", "validate"],
    ["data", "demo"],
    ["data", "demo", "shapes"],
    ["data", "demo", "text"],
    ["bench"],
]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "apertis")
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: apertis" in capsys.readouterr().out


def test_a_misspelt_config_key_suggests_the_right_one_and_exits_2(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: transformer-nano\ntrain:\n  max_step: 5\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "max_step" in err and "Did you mean 'max_steps'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    config.write_text("model: transformer-nano\n")
    assert main(["train", str(config), "--set", "train.lrr=1e-3"]) == 2
    assert "Did you mean 'lr'" in capsys.readouterr().err


def test_errors_are_one_line_without_traceback_from_the_real_entry_point(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  preset: apertis-nano\n  d_modle: 64\n")
    done = subprocess.run(
        [sys.executable, "-m", "apertis_core", "train", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "Did you mean 'd_model'" in done.stderr


def test_missing_files_are_clear_errors(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "hi"]) == 2
    assert "no such model folder" in capsys.readouterr().err


class _Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


def test_generate_streams_the_models_greedy_continuation(bundle, monkeypatch):
    path, model, tokenizer = bundle
    out = _Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    code = main(["generate", "--model", str(path), "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0"])
    assert code == 0
    expected = list(
        generate(
            model,
            tokenizer.encode("To be"),
            GenerationConfig(max_new_tokens=12, temperature=0, stop_ids=[tokenizer.eot_id]),
        )
    )
    assert out.getvalue() == "To be" + tokenizer.decode(expected) + "\n"
    assert out.writes >= 3  # written piece by piece, not once at the end


def test_generate_chat_mode_uses_the_template_and_seeds_reproduce(bundle, capsys):
    path, _, _ = bundle
    argv = [
        "generate",
        "--model",
        str(path),
        "--prompt",
        "hello",
        "--chat",
        "--max-new-tokens",
        "8",
        "--seed",
        "3",
        "--temperature",
        "1",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_generate_with_an_image_on_a_text_model_is_refused(bundle, tmp_path, capsys):
    path, _, _ = bundle
    image = tmp_path / "x.png"
    image.write_bytes(b"not really a png")
    assert main(["generate", "--model", str(path), "--prompt", "what is this?", "--image", str(image)]) == 2
    assert "trained without images" in capsys.readouterr().err


def test_chat_runs_a_scripted_session(bundle, tmp_path, monkeypatch, capsys):
    path, _, _ = bundle
    script = "hello there\n/system You are terse.\nand again\n/image cat.png\n/reset\n/bogus\n\nlast one\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))  # no /quit: end of input ends the chat
    assert main(["chat", "--model", str(path), "--max-new-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "system message set" in out and "conversation cleared" in out and "unknown command /bogus" in out
    assert "trained without images" in out  # /image refused, and the chat went on
    assert out.count("\n") >= 8


def test_chat_keeps_history_between_turns(bundle, monkeypatch):
    from apertis_core.cli import chat

    path, model, tokenizer = bundle
    prompts = []
    real = chat.stream_reply
    monkeypatch.setattr(
        chat, "stream_reply", lambda m, t, ids, *a, **k: prompts.append(ids) or real(m, t, ids, *a, **k)
    )
    config = GenerationConfig(max_new_tokens=4, temperature=0)
    chat.chat_loop(model, tokenizer, config, io.StringIO("one\ntwo\n/quit\nnever read\n"), io.StringIO(), system="sys")
    assert len(prompts) == 2
    assert prompts[1][: len(prompts[0])] == prompts[0]  # the second prompt extends the first conversation
    assert prompts[0][0] == tokenizer.system_id and prompts[1][-1] == tokenizer.assistant_id


def test_export_command_and_its_refusal(bundle, tmp_path, capsys):
    path, _, _ = bundle
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "model.safetensors").is_file()
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "hf"), "--format", "hf-llama"]) == 2
    err = capsys.readouterr().err
    assert "not Llama-compatible" in err and len(err.strip().splitlines()) == 1


def test_data_validate_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello"}\n{"text": "world"}\n')
    assert main(["data", "validate", str(good)]) == 0
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "hello"}\n{"txt": oops\n')
    assert main(["data", "validate", str(mixed), "--tokenizer", str(_byte_tokenizer(tmp_path))]) == 1
    out = capsys.readouterr().out
    assert "mixed.jsonl" in out and ":2" in out  # the problem names its file and line
    assert main(["data", "validate", str(tmp_path / "missing.txt")]) == 2


def _byte_tokenizer(tmp_path):
    return Tokenizer.byte_level().save(tmp_path / "tok.json")


def test_data_demo_shapes_writes_a_dataset(tmp_path, capsys):
    assert main(["data", "demo", "shapes", "--out", str(tmp_path / "shapes"), "--n", "3", "--seed", "1"]) == 0
    assert (tmp_path / "shapes" / "train.jsonl").is_file()
    assert "scenes" in capsys.readouterr().out
    focused = ["data", "demo", "shapes", "--out", str(tmp_path / "count"), "--n", "3", "--ask", "count"]
    assert main(focused) == 0
    asked = [m["content"] for line in (tmp_path / "count" / "train.jsonl").read_text().splitlines()
             for m in json.loads(line)["messages"][::2]]  # fmt: skip
    assert asked and all("How many" in question for question in asked)
    assert main([*focused[:-1], "count,size"]) != 0
    assert "unknown question type size" in capsys.readouterr().err


def test_data_demo_text_writes_the_studio_demo_text(tmp_path, capsys):
    from apertis_core.data.demo_text import write_demo_text

    assert main(["data", "demo", "text", "--out", str(tmp_path / "demo.txt"), "--lines", "40", "--seed", "3"]) == 0
    assert "40 sentences" in capsys.readouterr().out
    text = (tmp_path / "demo.txt").read_text(encoding="utf-8")
    assert len(text.splitlines()) == 40 and text == write_demo_text(tmp_path / "same.txt", 40, 3).read_text("utf-8")


def test_bench_without_the_benchmarks_folder_is_a_clear_error():
    with pytest.raises(ValueError, match="benchmarks are not installed|lacks the 'no_such_benchmark' benchmark"):
        bench._import_benchmark("no_such_benchmark")


def test_unknown_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--checkpoint", "x", "--out", "y", "--bogus"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "apertis_core", "--help"], capture_output=True, text=True, cwd=REPO, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0 and "generate" in done.stdout


def test_first_ctrl_c_requests_a_stop_and_the_second_stops_at_once(tmp_path):
    from apertis_core.cli.train import GracefulInterrupt
    from apertis_core.training import TrainState

    interrupt = GracefulInterrupt(tmp_path / "run" / "STOP")
    state = TrainState(step=3, total_steps=10, out_dir=str(tmp_path / "run"))
    interrupt.callback().on_step_end(state)
    assert not state.stop_requested
    interrupt._handle(2, None)
    assert (tmp_path / "run" / "STOP").exists()
    interrupt.callback().on_step_end(state)
    assert state.stop_requested
    with pytest.raises(KeyboardInterrupt):
        interrupt._handle(2, None)


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT to a child process")
def test_ctrl_c_during_training_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    import signal
    import time

    data = tmp_path / "text.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 200)
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {preset: transformer-nano, d_model: 32, n_layers: 1, max_seq_len: 32}\n"
        f"data: {{path: {data.as_posix()}, seq_len: 32, vocab_size: 262}}\n"
        "train: {batch_size: 4, max_steps: 100000, log_every: 1, device: cpu, precision: fp32, threads: 1}\n"
        f"out_dir: {(tmp_path / 'run').as_posix()}\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-m", "apertis_core", "train", str(config), "--no-plan"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=HANG_GUARD_S)
    assert child.returncode == 0, err[-2000:]
    assert "Stopped after" in out and "Traceback" not in err
    assert list((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert not (tmp_path / "run" / "STOP").exists()


def test_generate_and_chat_take_an_image_when_the_model_has_an_encoder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    from PIL import Image

    tokenizer = Tokenizer.byte_level()
    config = tiny_image_config(tokenizer)
    save_bundle(tmp_path / "vlm", ApertisModel(config).eval(), tokenizer)
    Image.new("RGB", (40, 24), (200, 10, 10)).save(tmp_path / "red.png")
    common = ["--model", str(tmp_path / "vlm"), "--max-new-tokens", "4", "--temperature", "0"]
    assert main(["generate", *common, "--prompt", "colour?", "--image", str(tmp_path / "red.png"), "--chat"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {tmp_path / 'red.png'}\nwhat is it?\nand now?\n"))
    assert main(["chat", *common]) == 0
    out = capsys.readouterr().out
    assert "image attached" in out and "error" not in out


def test_bench_passes_every_argument_to_the_benchmark(monkeypatch):
    import types

    seen = []
    fake = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0)
    monkeypatch.setitem(sys.modules, "benchmarks.train", fake)
    assert main(["bench", "train", "--minutes", "1", "--help", "extra"]) == 0
    assert seen == [["--minutes", "1", "--help", "extra"]]
