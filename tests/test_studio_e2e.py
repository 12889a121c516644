"""End to end: launch `python -m studio` on a free port in a temporary workspace and drive it with
gradio_client through its public api_names, the way a script would.

add demo data -> start a short run -> metrics appear while it runs -> stop -> resume -> it finishes ->
chat streams a reply; SIGKILL a worker -> failed, resumable; restart -> runs and metrics remain.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio.store import Store
from studio.tabs import train

from conftest import HANG_GUARD_S

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = "model.d_model=32\nmodel.n_layers=2\nmodel.n_heads=2\nmodel.max_seq_len=32\ntrain.threads=1\ntrain.device=cpu"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(workspace: Path):
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "studio", "--no-browser", "--port", str(port), "--workspace", str(workspace)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started = time.monotonic()
    for line in proc.stdout:
        if "is running at" in line:
            from gradio_client import Client

            return proc, Client(f"http://127.0.0.1:{port}/", verbose=False), time.monotonic() - started
    raise AssertionError(f"the studio exited with {proc.wait()} before serving the page")


def wait_for(predicate, timeout=HANG_GUARD_S) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def wait_status(client, run_id, statuses, timeout=HANG_GUARD_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(run_id, api_name="/run_status")[0]
        if status["status"] in statuses:
            return status
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} stayed {status['status']}")


def start(client, dataset_id, steps):
    values = dict(train.BASIC_DEFAULTS, **train.ADVANCED_DEFAULTS)
    values.update(
        max_steps=steps,
        batch_size=2,
        seq_len=32,
        vocab_size=262,
        log_every=1,
        save_every=2,
        eval_every=10,
        sample_every=0,
        warmup_steps=1,
        extra=TINY,
    )
    message, run_id = client.predict(
        "e2e", dataset_id, "apertis-nano", *[values[f] for f in train.FIELDS], api_name="/start_run"
    )
    assert run_id, message
    return run_id


def test_studio_end_to_end(tmp_path):
    workspace = tmp_path / "ws"
    proc, client, startup_s = launch(workspace)
    try:
        assert startup_s < 30
        _, dataset_id = client.predict("text", api_name="/add_demo_data")
        run_id = start(client, dataset_id, steps=40)
        store = Store(workspace)
        assert wait_for(lambda: store.metric_count(run_id) > 0), "no metrics reached the registry"
        assert wait_status(client, run_id, ["running", "stopping"])  # metrics arrived while it runs
        client.predict(run_id, api_name="/stop_run")
        assert "stopped on request" in wait_status(client, run_id, ["stopped", "failed"])["exit_reason"]
        client.predict(run_id, api_name="/resume_run")
        assert wait_status(client, run_id, ["finished", "failed"])["status"] == "finished"

        model_id = next(m["id"] for m in store.list_models() if m["kind"] == "bundle")
        job = client.submit(
            {"text": "The cat", "files": []}, [], model_id, "", 0.8, 20, 0.95, 16, 1.1, api_name="/chat"
        )
        outputs = list(job)
        assert len(outputs) > 1 and outputs[-1][0][-1]["role"] == "assistant" and "tokens/s" in outputs[-1][1]

        killed = start(client, dataset_id, steps=400)
        assert wait_for(lambda: store.get_run(killed)["step"] >= 1), store.get_run(killed)
        os.kill(store.get_run(killed)["pid"], signal.SIGKILL)
        dead = wait_status(client, killed, ["interrupted", "failed"])
        assert dead["status"] == "failed" and "signal 9" in dead["exit_reason"]
        assert "queued to" in client.predict(killed, api_name="/resume_run")
        wait_status(client, killed, ["running"])
        client.predict(killed, api_name="/stop_run")
        wait_status(client, killed, ["stopped"])
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    proc, client, _ = launch(workspace)  # a restarted studio still knows everything
    try:
        assert client.predict(run_id, api_name="/run_status")[0]["status"] == "finished"
        assert Store(workspace).series(run_id, "train/loss")[0][-1] == 40
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
