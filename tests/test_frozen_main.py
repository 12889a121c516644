"""The frozen app's entry script (launchers/frozen_main.py) without building anything: which part of the
app each command line reaches, the streams and environment it fixes first, and the contract with the
job manager's worker command."""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG_GUARD_S, REPO

ENTRY = REPO / "launchers" / "frozen_main.py"
SPEC = importlib.util.spec_from_file_location("frozen_main", ENTRY)
frozen_main = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(frozen_main)


@pytest.mark.parametrize(
    ("argv", "part"),
    [
        ([], "studio"),
        (["--no-browser", "--port", "7999", "--workspace", "ws"], "studio"),
        (["--help"], "studio"),
        (["worker", "--workspace", "ws", "--run-id", "r1"], "worker"),
        (["train", "assets/configs/apertis-nano.yaml", "--set", "train.max_steps=5"], "cli"),
        (["generate", "--model", "m", "--prompt", "hi"], "cli"),
        (["chat", "--model", "m"], "cli"),
        (["export", "--checkpoint", "c", "--out", "o"], "cli"),
        (["data", "validate", "x.txt"], "cli"),
        (["bench", "model"], "cli"),
        (["--workspace", "train"], "studio"),  # a folder called "train" is still a studio flag's value
    ],
)
def test_command_line_chooses_the_right_part(argv, part):
    assert frozen_main.choose(argv) == part, f"{argv} should start the {part}; fix choose() in {ENTRY.name}"


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Replace the three real entry points with recorders (each returns a distinct exit code)."""
    import apertis_core.cli.main
    import studio.__main__
    import studio.worker

    seen = []

    def recorder(name, code):
        def fake(argv):
            seen.append((name, list(argv), os.environ.get("GRADIO_TEMP_DIR")))
            return code

        return fake

    monkeypatch.setattr(studio.__main__, "main", recorder("studio", 3))
    monkeypatch.setattr(studio.worker, "main", recorder("worker", 4))
    monkeypatch.setattr(apertis_core.cli.main, "main", recorder("cli", 5))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    return seen


def test_worker_gets_its_own_arguments(calls):
    assert frozen_main.main(["worker", "--workspace", "ws", "--run-id", "r1"]) == 4
    assert calls == [("worker", ["--workspace", "ws", "--run-id", "r1"], None)]


def test_cli_commands_go_to_the_apertis_command_line_unchanged(calls):
    assert frozen_main.main(["train", "cfg.yaml", "--set", "train.max_steps=5"]) == 5
    assert calls == [("cli", ["train", "cfg.yaml", "--set", "train.max_steps=5"], None)]


def test_studio_flags_start_the_studio_with_gradio_temp_inside_the_workspace(calls, tmp_path):
    workspace = tmp_path / "my ws"
    argv = ["--no-browser", "--port", "7999", "--workspace", str(workspace)]
    assert frozen_main.main(argv) == 3
    ((name, passed, temp),) = calls
    assert (name, passed) == ("studio", argv)
    assert temp is not None, "GRADIO_TEMP_DIR must be set before the studio (and so gradio) is imported"
    assert Path(temp).is_dir() and Path(temp).resolve().is_relative_to(workspace.resolve()), temp


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_LIBRARY_PATH is Linux's")
def test_frozen_linux_studio_gives_children_the_users_library_path(calls, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/bundle/_internal")
    monkeypatch.setenv("LD_LIBRARY_PATH_ORIG", "/usr/local/lib")
    frozen_main.main(["--no-browser", "--workspace", str(tmp_path)])
    assert os.environ["LD_LIBRARY_PATH"] == "/usr/local/lib", "the browser would load the bundle's libraries"


def test_library_path_is_removed_when_the_user_had_none():
    environ = {"LD_LIBRARY_PATH": "/bundle/_internal", "PATH": "/usr/bin"}
    frozen_main.restore_library_path(environ)
    assert environ == {"PATH": "/usr/bin"}


def test_missing_console_streams_become_the_null_device(monkeypatch):
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(sys, "stderr", None)
    frozen_main.ensure_streams()
    print("a windowed build must not crash on this", file=sys.stdout)
    print("nor on this", file=sys.stderr)
    assert sys.stdout.name == os.devnull and sys.stderr.name == os.devnull


def test_job_manager_worker_command_reaches_the_worker_in_a_frozen_app(monkeypatch, tmp_path):
    from studio.jobs import worker_command

    monkeypatch.setattr(sys, "frozen", True, raising=False)
    command = worker_command(tmp_path, "run-1")
    assert command[0] == sys.executable
    assert frozen_main.choose(command[1:]) == "worker", f"{command} would not start a worker in the bundle"


def test_freeze_support_runs_before_anything_else():
    tree = ast.parse(ENTRY.read_text(encoding="utf-8"))
    guard = next(node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
    first = ast.unparse(guard.body[0])
    assert first == "multiprocessing.freeze_support()", f"the first statement under __main__ is {first!r}"


def test_script_answers_help_for_each_part_without_importing_gradio():
    # runpy runs the file as the bundle would; the check after it sees what the run imported.
    probe = (
        "import runpy, sys\n"
        "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as exit_:\n    code = exit_.code\n"
        "print('gradio imported' if 'gradio' in sys.modules else 'gradio not imported', code)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))  # the bundle has the packages on its path; a checkout needs this
    for argv, expected in (
        (["--help"], "--workspace"),
        (["data", "--help"], "validate"),
        (["worker", "--help"], "--run-id"),
    ):
        command = [sys.executable, "-c", probe, str(ENTRY), *argv]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=HANG_GUARD_S)
        assert result.returncode == 0 and expected in result.stdout, f"{argv}: {result.stdout}{result.stderr}"
        assert result.stdout.rstrip().endswith("gradio not imported 0"), f"{argv}: {result.stdout}{result.stderr}"
