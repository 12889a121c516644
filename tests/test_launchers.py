"""The launcher scripts: shellcheck, start.bat's structure, and start.sh run for real in a folder with a space."""

import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
if str(LAUNCHERS) not in sys.path:  # bootstrap.py imports torch_choice beside it, as when run as a script
    sys.path.insert(0, str(LAUNCHERS))
bootstrap = importlib.import_module("bootstrap")

FAKE_STUDIO = '''"""Stands in for the studio: records how it was started and serves one page on the asked port."""
import http.server, json, os, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "prefix": sys.prefix, "path": os.environ.get("PYTHONPATH"),
          "nousersite": os.environ.get("PYTHONNOUSERSITE")}
with open("studio-started.json", "w") as out:
    json.dump(record, out)
class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"fake studio")
server = http.server.HTTPServer(("127.0.0.1", port), Page)
print(f"Apertis Studio is running at http://127.0.0.1:{port}/ (fake). Press Ctrl+C to quit.", flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    print("studio closed", flush=True)
'''

# The app's pyproject.toml, for `pip install --editable`: a build backend in the app folder itself, so the install
# needs no download (setuptools would), and a fake `apertis` command.
FAKE_PROJECT = """[build-system]
requires = []
build-backend = "fake_backend"
backend-path = ["."]

[project]
name = "fake-app"
version = "0"
"""
FAKE_BACKEND = r""""A PEP 517/660 backend: a wheel that puts the app folder on sys.path and has an `apertis` script."
import base64, hashlib, os, zipfile
INFO = "fake_app-0.dist-info/"
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {"fake_app.pth": os.path.abspath(".") + "\n",
             INFO + "METADATA": "Metadata-Version: 2.1\nName: fake-app\nVersion: 0\n",
             INFO + "WHEEL": "Wheel-Version: 1.0\nGenerator: fake\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             INFO + "entry_points.txt": "[console_scripts]\napertis = fake_cli:main\n"}
    name = "fake_app-0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        record = [INFO + "RECORD,,"]
        for path, text in files.items():
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(text.encode())}")
            wheel.writestr(path, text)
        wheel.writestr(INFO + "RECORD", "\n".join(record) + "\n")
    return name
build_editable = build_wheel
def build_sdist(sdist_directory, config_settings=None):
    raise NotImplementedError
"""
FAKE_CLI = """import sys
def main():
    print("fake apertis", *sys.argv[1:])
    return 0
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def page_status(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return response.status
    except OSError:
        return None


def start(app: Path, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """start.sh in its own process group, so a Ctrl-C can be sent to it and its studio as a terminal would."""
    env = {**os.environ, "PYTHONPATH": "/nowhere/leaking", **(env or {})}
    return subprocess.Popen(
        ["bash", str(app / "launchers" / "start.sh"), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def serve_then_ctrl_c(proc: subprocess.Popen, port: int, timeout: float) -> tuple[int | None, int, str]:
    """Wait until / is served and the bootstrap says so, then Ctrl-C: (HTTP status, exit code, all it printed)."""
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline, status = time.monotonic() + timeout, None
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        status = page_status(port)
        if status == 200 and any("Apertis Studio is running at" in line for line in lines):
            break
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    return status, proc.returncode, "".join(lines)


def copy_launchers(app: Path) -> None:
    (app / "launchers").mkdir(parents=True)
    for name in ("start.sh", "start.command", "bootstrap.py", "torch_choice.py"):
        shutil.copy2(LAUNCHERS / name, app / "launchers" / name)


@pytest.mark.parametrize("script", ["start.sh", "start.command"])
def test_shell_launchers_pass_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install shellcheck)")
    done = subprocess.run(["shellcheck", str(LAUNCHERS / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_start_bat_is_crlf_and_every_jump_has_its_label():
    raw = (LAUNCHERS / "start.bat").read_bytes()
    # cmd.exe misreads labels in a batch file with bare LF line ends.
    assert raw.count(b"\n") == raw.count(b"\r\n") > 20
    text = raw.decode("ascii")
    labels = set(re.findall(r"^:(\w+)", text, re.MULTILINE))
    jumps = set(re.findall(r"\b(?:goto|call) :(\w+)", text, re.IGNORECASE))
    assert jumps and jumps <= labels, f"missing labels: {jumps - labels}"
    # Every failure message keeps the double-clicked window open with `pause` before it exits.
    failures = [
        block
        for block in re.split(r"^:", text, flags=re.MULTILINE)
        if re.search(r"^echo (ERROR|.* with an error)", block, re.MULTILINE)
    ]
    assert len(failures) >= 4
    for block in failures:
        assert re.search(r"^pause\r\nexit /b", block, re.MULTILINE), block


def test_missing_python_is_explained_and_a_broken_venv_is_cleared(tmp_path):
    app = tmp_path / "my app"
    copy_launchers(app)
    (app / ".venv").mkdir()
    env = {**os.environ, "APERTIS_PYTHON": str(tmp_path / "no python here")}
    done = subprocess.run(
        ["bash", str(app / "launchers" / "start.command")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "does not work any more" in done.stdout and not (app / ".venv").exists()
    assert "needs Python 3.10 or newer" in done.stderr and "Install Python 3.12" in done.stderr
    assert "Press Enter to close this window" in done.stdout  # start.command keeps the window open


def test_start_sh_creates_the_venv_once_and_hands_arguments_to_the_studio(tmp_path):
    if shutil.disk_usage(tmp_path).free < bootstrap.INSTALL_BYTES:
        pytest.skip("too little free disk: the bootstrap's preflight would refuse even this empty install")
    app = tmp_path / "folder with space" / "Apertis Studio"
    copy_launchers(app)
    (app / "requirements.txt").write_text("# nothing to install: this test checks the launch path only\n")
    (app / "pyproject.toml").write_text(FAKE_PROJECT)
    (app / "fake_backend.py").write_text(FAKE_BACKEND)
    (app / "fake_cli.py").write_text(FAKE_CLI)
    (app / "studio").mkdir()
    (app / "studio" / "__main__.py").write_text(FAKE_STUDIO)
    port = free_port()
    args = ["--no-browser", "--port", str(port), "--workspace", "a b", "--torch", "default"]
    status, code, out = serve_then_ctrl_c(start(app, args, {"APERTIS_PYTHON": sys.executable}), port, 120)
    assert status == 200 and code == 0, out
    assert "Creating the virtual environment" in out and "Installing the requirements" in out
    assert out.count(f"http://127.0.0.1:{port}") == 1 and "studio closed" in out  # one ready line, the studio's
    started = json.loads((app / "studio-started.json").read_text())
    assert started["argv"] == ["--no-browser", "--port", str(port), "--workspace", "a b"]
    assert Path(started["cwd"]) == app and Path(started["prefix"]) == app / ".venv"
    assert started["path"] is None and started["nousersite"] == "1"
    assert "The `apertis` command line is in .venv/bin" in out
    apertis = [str(app / ".venv" / "bin" / "apertis"), "--help"]
    done = subprocess.run(apertis, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "fake apertis --help\n", done.stdout + done.stderr

    status, code, out = serve_then_ctrl_c(start(app, args), port, 60)
    assert status == 200 and code == 0, out
    assert "Creating the virtual environment" not in out and "Requirements up to date" in out
    assert "The `apertis` command line is in .venv/bin" in out


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fresh_copy_installs_serves_the_studio_and_restarts_without_reinstalling(tmp_path):
    """The real thing: the working tree copied into a path with a space, full install, the real studio."""
    if shutil.disk_usage(tmp_path).free < bootstrap.INSTALL_BYTES:
        pytest.skip("too little free disk for the install")
    app = tmp_path / "apertis app"
    junk = shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "out", "build", "dist", "*.egg-info"
    )
    shutil.copytree(REPO, app, ignore=junk)
    port, workspace = free_port(), str(tmp_path / "work space")
    args = ["--no-browser", "--port", str(port), "--workspace", workspace]
    status, code, out = serve_then_ctrl_c(start(app, args), port, 3000)
    assert status == 200, out[-5000:]
    assert "Installing the requirements" in out and code in (0, 130), out[-5000:]
    if "PyTorch's CPU index could not be reached" in out:  # offline from PyTorch's index, as on the dev machine
        assert "installing the standard build instead" in out and "torch build: default" in out, out[-5000:]
    assert "The `apertis` command line is in .venv/bin" in out, out[-5000:]
    done = subprocess.run(
        [str(app / ".venv" / "bin" / "apertis"), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": "/nowhere/leaking"},
        timeout=300,
    )
    assert done.returncode == 0 and "train" in done.stdout and "generate" in done.stdout, done.stdout + done.stderr

    status, code, out = serve_then_ctrl_c(start(app, args), port, 300)
    assert status == 200 and "Requirements up to date" in out, out[-5000:]
    assert "Installing the requirements" not in out and code in (0, 130), out[-5000:]
