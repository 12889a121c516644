"""The PyInstaller app end to end: build build.spec into a temporary folder, start the executable, check
the page and its assets are served, then train a tiny run (in the bundle's own worker) and chat with it
and with the shipped image demo model through gradio_client, and run the executable as the `apertis`
command line on the trained model.

Slow: about 7 minutes on two cores, 6 of them the build, whose 4 GB are deleted afterwards.
APERTIS_TEST_BUNDLE=DIR tests an already built dist/ApertisStudio folder instead of building one.
"""

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
from collections.abc import Iterator
from pathlib import Path

import pytest

from studio.store import Store
from studio.tabs import train

pytestmark = pytest.mark.slow
pytest.importorskip("PyInstaller", reason="PyInstaller is not installed: pip install -r requirements.txt")
REPO = Path(__file__).resolve().parents[1]
NAME = "ApertisStudio"
EXE = NAME + (".exe" if os.name == "nt" else "")
TINY = "model.d_model=32\nmodel.n_layers=2\nmodel.n_heads=2\nmodel.max_seq_len=32\ntrain.threads=1\ntrain.device=cpu"
TINY_RUN = dict(max_steps=6, batch_size=2, seq_len=32, vocab_size=262, log_every=1, save_every=3, eval_every=10)
TINY_RUN.update(sample_every=0, warmup_steps=1, extra=TINY)
BUILD_TIMEOUT_S = 40 * 60


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Iterator[Path]:
    prebuilt = os.environ.get("APERTIS_TEST_BUNDLE")
    if prebuilt:
        yield Path(prebuilt)
        return
    tmp = tmp_path_factory.mktemp("pyinstaller")
    started = time.monotonic()
    command = [sys.executable, "-m", "PyInstaller", "build.spec", "--noconfirm"]
    command += ["--distpath", str(tmp / "dist"), "--workpath", str(tmp / "build")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert result.returncode == 0, f"`{' '.join(command)}` failed; its log ends:\n{result.stderr[-4000:]}"
    folder = tmp / "dist" / NAME
    print(f"\nbuilt {folder} in {time.monotonic() - started:.0f} s: {folder_size(folder) / 2**20:.0f} MiB")
    yield folder
    shutil.rmtree(tmp, ignore_errors=True)  # pytest keeps its last temp folders: 4 GB each


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(bundle: Path, workspace: Path) -> tuple[subprocess.Popen, str, float, list[str]]:
    """Start the executable; returns once the page is served, with the app's output still being collected
    (read on, so a chatty app never blocks on a full pipe, and kept for the failure messages)."""
    port = _port()
    started = time.monotonic()
    command = [str(bundle / EXE), "--no-browser", "--port", str(port), "--workspace", str(workspace)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    for line in proc.stdout:
        log.append(line)
        if "is running at" in line:
            threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
            return proc, f"http://127.0.0.1:{port}/", time.monotonic() - started, log
    raise AssertionError(f"the frozen app exited with {proc.wait()} before serving the page:\n{''.join(log[-40:])}")


def tail(log: list[str]) -> str:
    return "the app's output ends:\n" + "".join(log[-40:])


def stop_app(proc: subprocess.Popen) -> None:
    if os.name == "nt":
        proc.terminate()  # no SIGINT for a process outside our console group
    else:
        proc.send_signal(signal.SIGINT)  # the studio's own Ctrl+C path: closes the job watcher and the server
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def fetch(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.headers.get("content-type", ""), response.read()


def wait_status(client, run_id: str, statuses: list[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    status = {"status": "unknown"}
    while time.monotonic() < deadline:
        status = client.predict(run_id, api_name="/run_status")[0]
        if status["status"] in statuses:
            return status
        time.sleep(1)
    raise AssertionError(f"run {run_id} stayed {status['status']} for {timeout} s: {status}")


@pytest.mark.timeout(BUILD_TIMEOUT_S + 15 * 60)
def test_frozen_app_serves_trains_chats_and_runs_the_cli(bundle, tmp_path):
    assert (bundle / EXE).is_file(), f"{bundle} holds no {EXE}; did the build put it elsewhere?"
    workspace = tmp_path / "ws"
    proc, url, startup_s, log = start_app(bundle, workspace)
    try:
        print(f"frozen app served its page {startup_s:.1f} s after the process started")
        status, kind, page = fetch(url)
        assert status == 200 and "text/html" in kind, f"GET / answered {status} {kind}"
        assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', page.decode("utf-8", "replace"))
        assert assets, f"the page references no JS/CSS asset; it starts:\n{page[:1500]!r}"
        asset_url = assets[0] if assets[0].startswith("http") else url + assets[0].lstrip("./")
        status, kind, body = fetch(asset_url)
        assert status == 200 and body and ("javascript" in kind or "css" in kind), (
            f"{asset_url} answered {status} {kind} with {len(body)} bytes: the frontend's data files are missing"
        )

        from gradio_client import Client

        client = Client(url, verbose=False)
        _, dataset_id = client.predict("text", api_name="/add_demo_data")
        assert dataset_id, f"the frozen app could not add the demo text data; {tail(log)}"
        values = dict(train.BASIC_DEFAULTS, **train.ADVANCED_DEFAULTS)
        values.update(TINY_RUN)
        message, run_id = client.predict(
            "frozen", dataset_id, "apertis-nano", *[values[f] for f in train.FIELDS], api_name="/start_run"
        )
        assert run_id, message
        finished = wait_status(client, run_id, ["finished", "failed", "interrupted"])
        assert finished["status"] == "finished", f"the bundle's worker did not finish the run: {finished}; {tail(log)}"

        store = Store(workspace)
        model = next(m for m in store.list_models() if m["kind"] == "bundle")
        outputs = list(
            client.submit({"text": "The", "files": []}, [], model["id"], "", 0.8, 20, 0.95, 8, 1.1, api_name="/chat")
        )
        assert outputs and outputs[-1][0][-1]["role"] == "assistant", f"chat gave {outputs[-1:]}; {tail(log)}"

        # The shipped demo model reads the uploaded picture (Pillow, the ViT) after it passes through Gradio's
        # temp folder in the workspace: both must work inside the bundle.
        from gradio_client import handle_file
        from PIL import Image, ImageDraw

        picture = tmp_path / "scene.png"
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill="red")
        image.save(picture)
        demo = next(m for m in store.list_models() if m["kind"] == "demo")
        message = {"text": "What shape is the red object?", "files": [handle_file(str(picture))]}
        outputs = list(client.submit(message, [], demo["id"], "", 0.0, 0, 1.0, 8, 1.0, api_name="/chat"))
        assert outputs, (
            f"the image demo model gave no reply (do image loading and the ViT work in the bundle?); {tail(log)}"
        )
        history, speed = outputs[-1]
        assert history[-1]["role"] == "assistant" and "tokens/s" in speed, f"the demo model said {speed}; {tail(log)}"
    finally:
        stop_app(proc)

    generate = ["generate", "--model", model["path"], "--prompt", "The", "--max-new-tokens", "5", "--seed", "0"]
    cli = subprocess.run([str(bundle / EXE), *generate], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, f"`{EXE} generate` failed ({cli.returncode}):\n{cli.stdout}\n{cli.stderr}"
