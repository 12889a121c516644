"""Starting and stopping `python -m studio` as a launcher does: the port notice, one ready line, and a clean
shutdown on SIGTERM or Ctrl+C (exit 0, one line saying so, workers left running for the next start)."""

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from studio.__main__ import free_port, port_notice
from studio.app import shutdown_line
from studio.store import Store

from conftest import REPO

READY = re.compile(r"^Apertis Studio is running at (http://127\.0\.0\.1:(\d+)/) ")
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy


def test_port_notice_says_which_port_and_why():
    assert port_notice(7860, 7860) is None
    assert port_notice(7860, 7861) == (
        "studio: port 7860 is in use (another program, or a studio that did not shut down); serving on 7861 instead"
    )
    assert "ports 7860-7862 are in use" in port_notice(7860, 7863)
    assert "http" not in port_notice(7860, 7861)  # the launcher opens the first URL printed: the ready line's


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP states as Linux keeps them")
def test_port_of_a_crashed_server_is_taken_again():
    """A server that died with a browser connected leaves its port in FIN_WAIT / TIME_WAIT, not listening:
    the restarted studio must take the same port, as the server binding it (SO_REUSEADDR) can."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    browser = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    listener.close()
    accepted.close()  # the server side ends first, as when the studio dies; the browser keeps its end open
    try:
        assert free_port("127.0.0.1", port) == port
    finally:
        browser.close()


def test_shutdown_line_says_what_goes_on():
    assert shutdown_line("SIGTERM", [], 0) == "Apertis Studio shut down (SIGTERM)."
    one = shutdown_line("Ctrl+C", ["tiny"], 2)
    assert "1 run is still training in the background (tiny)" in one and "2 queued runs wait" in one
    assert "2 runs are still training in the background (a, b)" in shutdown_line("SIGTERM", ["a", "b"], 0)


def _wait_ready(proc, log_path, timeout=120.0):
    """The port of the ready line, once the page it names answers; fails with the log if the studio exits."""
    deadline = time.monotonic() + timeout
    ready = None
    while time.monotonic() < deadline and proc.poll() is None:
        if ready is None:
            ready = next(filter(None, map(READY.match, log_path.read_text().splitlines())), None)
        if ready is not None:
            try:
                with DIRECT.open(ready[1], timeout=2) as response:
                    if response.status == 200:
                        return int(ready[2])
            except OSError:  # not listening yet
                pass
        time.sleep(0.1)
    raise AssertionError(f"the studio did not become ready (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl+C"])
def test_studio_on_a_taken_port_then_shut_down(tmp_path, signum):
    workspace = tmp_path / "ws"
    store = Store(workspace)
    run_id = store.create_run("long run", "{}")["id"]
    # A worker from an earlier session, still training: its run id is on its command line, as a real one's.
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", run_id])
    store.transition_run(run_id, "running", pid=worker.pid)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    asked = taken.getsockname()[1]
    log_path = tmp_path / "studio.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "studio", "--no-browser", "--port", str(asked), "--workspace", str(workspace)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        got = _wait_ready(proc, log_path)
        proc.send_signal(signum)
        code = proc.wait(60)
        lines = log_path.read_text().splitlines()
        assert code == 0, lines
        assert lines[0] == port_notice(asked, got) and got != asked
        assert [line for line in lines if "http://" in line] == [lines[1]]  # one ready line, one URL
        reason = "SIGTERM" if signum == signal.SIGTERM else "Ctrl+C"
        assert lines[2:] == [
            f"Apertis Studio shut down ({reason}). 1 run is still training in the background "
            "(long run); start the studio again to follow or stop it."
        ]
        assert worker.poll() is None and Store(workspace).get_run(run_id)["status"] == "running"
    finally:
        if proc.poll() is None:
            proc.kill()
        worker.kill()
        taken.close()
