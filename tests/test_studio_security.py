"""The studio's web server as an attacker on loopback sees it: the file route serves uploads and the copies of
returned files (exports, previews) and nothing else in the workspace, the registry least of all, whatever the
path spelling; wrong passwords are throttled per client; and a studio killed with kill -9 comes back on its
own port."""

import http.client
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest

from studio.security import LoginThrottle, file_allowed

from conftest import HANG_GUARD_S, REPO

READY = re.compile(r"^Apertis Studio is running at http://127\.0\.0\.1:(\d+)/ ")
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy
SQLITE_MAGIC = b"SQLite format 3"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_studio(workspace: Path, log: Path, port: int, *extra: str) -> tuple[subprocess.Popen, int]:
    """(process, the port its ready line names) of `python -m studio`, once that port serves `/`."""
    command = [
        sys.executable,
        "-m",
        "studio",
        "--no-browser",
        "--port",
        str(port),
        "--workspace",
        str(workspace),
        *extra,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + HANG_GUARD_S
    while proc.poll() is None and time.monotonic() < deadline:
        ready = next(filter(None, map(READY.match, log.read_text().splitlines())), None)
        if ready is not None:
            try:
                with DIRECT.open(f"http://127.0.0.1:{ready[1]}/", timeout=2) as response:
                    if response.status == 200:
                        return proc, int(ready[1])
            except OSError:  # not listening yet
                pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the studio did not become ready (exit {proc.poll()}):\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    from benchmarks.studio import stop_studio

    stop_studio(proc)


def fetch(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with DIRECT.open(request, timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


# -- the file route ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """(url, workspace) of a studio over a workspace holding a file in every folder a probe might aim at."""
    tmp = tmp_path_factory.mktemp("security")
    workspace = tmp / "ws"
    planted = {
        "runs/r1/config.yaml": "secret: run",
        "models/m1/config.json": "{}",
        "datasets/d1/train.txt": "my data",
        "tmp/exports/old.csv": "step,loss",
        "tmp/unzipped/z/a.txt": "unzipped data",
    }
    for name, text in planted.items():
        (workspace / name).parent.mkdir(parents=True, exist_ok=True)
        (workspace / name).write_text(text)
    proc, port = start_studio(workspace, tmp / "studio.log", _free_port())
    try:
        yield f"http://127.0.0.1:{port}/", workspace
    finally:
        stop(proc)


def _file_url(url: str, path: str) -> str:
    return url + "gradio_api/file=" + urllib.parse.quote(path, safe="/")


def test_registry_and_workspace_files_are_not_served(studio):
    url, ws = studio
    registry = [ws / "studio.db", ws / "studio.db-wal", ws / "studio.db-shm"]
    assert all(path.is_file() for path in registry)  # WAL mode: all three exist while the studio runs
    upload_dir = ws / "tmp" / "gradio"
    probes = [str(p) for p in registry] + [
        str(ws / "runs/r1/config.yaml"),
        str(ws / "models/m1/config.json"),
        str(ws / "datasets/d1/train.txt"),
        str(ws / "tmp/exports/old.csv"),
        str(ws / "tmp/unzipped/z/a.txt"),
        f"{upload_dir}/../../studio.db",  # traversal out of the served folder
        f"{upload_dir}/../../runs/r1/config.yaml",
        "/etc/passwd",
        "README.md",
        "../README.md",  # elsewhere on the machine; relative to the studio's folder
    ]
    for path in probes:
        status, body, _ = fetch(_file_url(url, path))
        assert status in (403, 404) and SQLITE_MAGIC not in body, (path, status)
    encoded = url + "gradio_api/file=" + str(upload_dir).replace("/", "%2F") + "%2F%2E%2E%2F%2E%2E%2Fstudio.db"
    deprecated = url + "gradio_api/file/" + urllib.parse.quote(str(ws / "studio.db"), safe="/")
    proxy = url + "gradio_api/proxy=http://127.0.0.1:1/"
    for probe in (encoded, deprecated, proxy):
        status, body, _ = fetch(probe)
        assert status in (403, 404) and SQLITE_MAGIC not in body, (probe, status)


def _upload(url: str, name: str, content: bytes) -> str:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, reply, _ = fetch(
        url + "gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert status == 200, reply
    return json.loads(reply)[0]


def test_uploads_and_exports_are_served(studio, tmp_path):
    url, ws = studio
    uploaded = _upload(url, "picture.png", b"\x89PNG not really")
    status, body, _ = fetch(_file_url(url, uploaded))
    assert status == 200 and body == b"\x89PNG not really"
    # An export goes through the file route as the page fetches it: Gradio's copy in its upload folder.
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=str(tmp_path))
    demo = next(
        row for row in __import__("studio.store", fromlist=["Store"]).Store(ws).list_models() if row["kind"] == "demo"
    )
    downloaded = client.predict(demo["id"], api_name="/export_model")
    assert "model.safetensors" in zipfile.ZipFile(downloaded).namelist()


def test_dataset_previews_are_served(studio, tmp_path):
    """The Dataset tab's gallery, as the page asks for it: its images come through the file route."""
    import io

    import httpx
    from gradio_client import Client, handle_file
    from PIL import Image

    url, _ = studio
    archive = tmp_path / "pictures.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        png = io.BytesIO()
        Image.new("RGB", (32, 32), (255, 0, 0)).save(png, "PNG")
        for i in range(3):
            zf.writestr(f"img{i}.png", png.getvalue())
        zf.writestr(
            "data.jsonl", "".join(json.dumps({"image": f"img{i}.png", "caption": "red"}) + "\n" for i in range(3))
        )
    _, dataset_id = Client(url, verbose=False).predict(
        [handle_file(str(archive))], "pictures", api_name="/upload_dataset"
    )
    with httpx.Client(timeout=120, trust_env=False) as http:
        config = http.get(url + "config").json()
        kinds = {component["id"]: component.get("type") for component in config["components"]}
        inspect = next(
            d
            for d in config["dependencies"]
            if "gallery" in {kinds.get(o) for o in d["outputs"]} and [kinds.get(i) for i in d["inputs"]] == ["dropdown"]
        )
        join = {
            "data": [dataset_id],
            "fn_index": inspect["id"],
            "session_hash": "previews",
            "event_data": None,
            "trigger_id": None,
        }
        http.post(url + "gradio_api/queue/join", json=join).raise_for_status()
        with http.stream("GET", url + "gradio_api/queue/data?session_hash=previews") as events:
            done = next(
                m
                for m in (json.loads(line[5:]) for line in events.iter_lines() if line.startswith("data:"))
                if m.get("msg") == "process_completed"
            )
        gallery = next(o for o in done["output"]["data"] if isinstance(o, list) and o and "image" in o[0])
        assert len(gallery) == 3
        for item in gallery:
            response = http.get(item["image"]["url"])
            assert response.status_code == 200 and response.content == png.getvalue()


def test_file_policy_follows_links_and_refuses_the_registry(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "ok.png").write_bytes(b"x")
    (served / "studio.db").write_bytes(b"x")  # a registry's name is refused even where files are served
    (tmp_path / "secret.txt").write_text("s")
    (served / "link.txt").symlink_to(tmp_path / "secret.txt")
    assert file_allowed(str(served / "ok.png"), [served])
    assert not file_allowed(str(served / "studio.db"), [served])
    assert not file_allowed(str(served / "link.txt"), [served])  # a link out of the folder is judged by its target
    assert not file_allowed(f"{served}/../secret.txt", [served])
    assert not file_allowed("https://example.com/x.png", [served])
    assert not file_allowed(str(served / "ok.png") + "\x00.txt", [served])


# -- sign-in throttle -------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_login_throttle_backs_off_per_client_and_forgets():
    clock = Clock()
    throttle = LoginThrottle(free_attempts=3, base_delay_s=1.0, max_delay_s=8.0, forget_after_s=60.0, clock=clock)
    assert [throttle.attempt("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # typos are checked at once
    assert throttle.attempt("a") == pytest.approx(1.0)  # refused, and not counted
    assert throttle.attempt("b") == 0.0  # another address is not held up
    clock.now += 1.0
    assert throttle.attempt("a") == 0.0  # waited: checked (4th failure)
    assert throttle.retry_after("a") == pytest.approx(2.0)  # then twice as long
    waits = []
    for _ in range(6):
        clock.now += throttle.retry_after("a")
        assert throttle.attempt("a") == 0.0
        waits.append(throttle.retry_after("a"))
    assert waits == [4.0, 8.0, 8.0, 8.0, 8.0, 8.0]  # doubling, capped
    throttle.succeeded("a")
    assert throttle.attempt("a") == 0.0  # the right password clears the count
    for _ in range(5):
        throttle.attempt("c")
    clock.now += 61.0
    assert throttle.retry_after("c") == 0.0  # a quiet spell starts afresh


def test_login_throttle_bounds_its_memory():
    clock = Clock()
    throttle = LoginThrottle(clock=clock, max_clients=100)
    for i in range(1000):
        clock.now += 0.001
        throttle.attempt(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle._failures) <= 100


def _login(url: str, password: str) -> tuple[int, dict]:
    form = urllib.parse.urlencode({"username": "me", "password": password}).encode()
    status, _, headers = fetch(url + "login", form, {"Content-Type": "application/x-www-form-urlencoded"})
    return status, headers


def test_wrong_passwords_are_throttled_per_client(tmp_path):
    proc, port = start_studio(tmp_path / "ws", tmp_path / "studio.log", _free_port(), "--auth", "me:right-one")
    url = f"http://127.0.0.1:{port}/"
    try:
        statuses = [_login(url, f"guess{i}") for i in range(30)]
        checked = [status for status, _ in statuses if status == 400]  # 400: the password was checked, and wrong
        refused = [headers for status, headers in statuses if status == 429]
        assert len(checked) == LoginThrottle().free_attempts and len(refused) == 30 - len(checked)
        assert all(int(headers["retry-after"]) >= 1 for headers in refused)
        assert _login(url, "right-one")[0] == 429  # even the right password waits its turn now
        status, body, _ = fetch(_file_url(url, str(tmp_path / "ws" / "studio.db")))
        assert status in (401, 403, 404) and SQLITE_MAGIC not in body
    finally:
        stop(proc)


# -- restart after kill -9 --------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kill -9 and TCP states as Linux has them")
def test_studio_killed_with_kill_9_restarts_on_its_port(tmp_path):
    port = _free_port()
    proc, got = start_studio(tmp_path / "ws", tmp_path / "first.log", port)
    assert got == port
    browser = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # a page left open: a kept-alive connection
    browser.request("GET", "/")
    browser.getresponse().read()
    proc.kill()  # SIGKILL: no shutdown, the port is left as the kernel has it
    proc.wait()
    try:
        again, got = start_studio(tmp_path / "ws", tmp_path / "second.log", port)
        try:
            lines = (tmp_path / "second.log").read_text().splitlines()
            assert got == port and READY.match(lines[0]), lines  # the same port, and no "port in use" notice
        finally:
            stop(again)
    finally:
        browser.close()
