"""The launcher bootstrap's pieces: argument pass-through, torch choice, stamp, preflight, install, URL, studio run."""

import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from unittest.mock import Mock

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bootstrap", REPO / "launchers" / "bootstrap.py")
bootstrap = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bootstrap)

REQUIREMENTS = "# pins\ntorch===2.13.0\ntorchvision==0.28.0\ntorch-geometric==2.0\ngradio==6.31.0\n"
PLENTY = 100 * bootstrap.GB


def must_not_run(*args):
    raise AssertionError("this must not be called here")


def test_arguments_pass_through_in_order_without_torch():
    args = bootstrap.parse_args(["--workspace", "my ws", "--torch", "cpu", "--port=7999", "--host", "localhost"])
    assert args.torch == "cpu"
    assert args.studio_args == ["--workspace", "my ws", "--port=7999", "--host", "localhost"]
    assert args.target == ("http://localhost:7999/", "localhost", 7999) and args.open_browser


@pytest.mark.parametrize("argv, target, browser", [
    (["--torch=cuda", "--no-browser"], ("http://127.0.0.1:7860/", "127.0.0.1", 7860), False),
    (["--port", "7001", "--host", "0.0.0.0", "--port=7002"], ("http://127.0.0.1:7002/", "127.0.0.1", 7002), True),
])
def test_default_target_last_port_wins_and_a_wildcard_host_is_polled_on_loopback(argv, target, browser):
    args = bootstrap.parse_args(argv)
    assert (args.target, args.open_browser) == (target, browser) and "--torch=cuda" not in args.studio_args


@pytest.mark.parametrize("argv, message", [(["--port", "abc"], "must be a number"), (["--torch"], "needs a value")])
def test_bad_arguments_say_what_to_do(argv, message):
    with pytest.raises(bootstrap.BootstrapError, match=message):
        bootstrap.parse_args(argv)


def test_studio_command_adds_no_browser_and_isolates_the_environment():
    command, env = bootstrap.studio_command("py", ["--port", "1"], {"PYTHONPATH": "x", "PYTHONHOME": "y", "A": "1"})
    assert command == ["py", "-m", "studio", "--no-browser", "--port", "1"]
    assert "PYTHONPATH" not in env and "PYTHONHOME" not in env and env["A"] == "1"
    assert env["PYTHONNOUSERSITE"] == "1" and env["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize("system, gpu, variant", [
    ("Linux", True, "cuda"), ("Linux", False, "default"), ("Windows", True, "cuda"), ("Windows", False, "default"),
])
def test_torch_follows_the_gpu_on_linux_and_windows(system, gpu, variant):
    assert bootstrap.choose_torch(system, None, lambda: gpu)[0] == variant


def test_macos_and_overrides_decide_without_probing():
    assert bootstrap.choose_torch("Darwin", None, must_not_run) == ("default", "macOS")
    assert bootstrap.choose_torch("Linux", " CPU ", must_not_run)[0] == "cpu"
    assert bootstrap.choose_torch("Windows", "default", must_not_run)[0] == "default"


def test_bad_override_and_cuda_on_macos_are_errors():
    with pytest.raises(bootstrap.BootstrapError, match="cpu, cuda or default"):
        bootstrap.choose_torch("Linux", "rocm", must_not_run)
    with pytest.raises(bootstrap.BootstrapError, match="no CUDA build for macOS"):
        bootstrap.choose_torch("Darwin", "cuda", must_not_run)


def test_gpu_probe_needs_a_working_nvidia_smi():
    def ran(code, out):
        return lambda *a, **k: subprocess.CompletedProcess(a, code, out, "")

    found = lambda name: "/usr/bin/nvidia-smi"  # noqa: E731
    assert bootstrap.nvidia_gpu_present(ran(0, "GPU 0: NVIDIA H100 (UUID: x)\n"), found)
    assert not bootstrap.nvidia_gpu_present(ran(0, "GPU 0: x"), lambda name: None)
    assert not bootstrap.nvidia_gpu_present(ran(9, "NVIDIA-SMI has failed"), found)
    assert not bootstrap.nvidia_gpu_present(ran(0, "No devices were found"), found)
    assert not bootstrap.nvidia_gpu_present(Mock(side_effect=subprocess.TimeoutExpired("nvidia-smi", 20)), found)


@pytest.mark.parametrize("system, variant", [("Linux", "default"), ("Linux", "cuda"), ("Darwin", "cpu"),
                                             ("Windows", "cpu"), ("Windows", "default")])
def test_standard_build_installs_requirements_as_they_are(system, variant):
    assert bootstrap.install_plan(system, variant, REQUIREMENTS) == ([], REQUIREMENTS)


@pytest.mark.parametrize("system, variant, index", [("Linux", "cpu", "/whl/cpu"), ("Windows", "cuda", "/whl/cu1")])
def test_pytorch_index_builds_take_torch_out_of_the_requirements(system, variant, index):
    first, rest = bootstrap.install_plan(system, variant, REQUIREMENTS)
    assert len(first) == 1 and index in first[0][1]
    assert first[0][0] == "--index-url" and first[0][2:] == ["torch==2.13.0", "torchvision==0.28.0"]
    assert rest.splitlines() == ["# pins", "torch-geometric==2.0", "gradio==6.31.0"]


def test_real_requirements_pin_torch_and_torchvision():
    first, rest = bootstrap.install_plan("Linux", "cpu", (REPO / "requirements.txt").read_text())
    assert [pin.split("==")[0] for pin in first[0][2:]] == ["torch", "torchvision"]
    assert "gradio" in rest


def test_stamp_changes_only_with_requirements_variant_or_python():
    stamp = bootstrap.requirements_stamp(REQUIREMENTS, "default", "3.11.7")
    assert stamp == bootstrap.requirements_stamp(REQUIREMENTS, "default", "3.11.7")
    assert stamp != bootstrap.requirements_stamp(REQUIREMENTS + "tqdm\n", "default", "3.11.7")
    assert stamp != bootstrap.requirements_stamp(REQUIREMENTS, "cpu", "3.11.7")
    assert stamp != bootstrap.requirements_stamp(REQUIREMENTS, "default", "3.11.8")


def test_low_disk_and_old_python_are_errors_with_the_numbers():
    with pytest.raises(bootstrap.BootstrapError) as err:
        bootstrap.preflight("3.11.7", "/home/me/Apertis Studio", "Linux", int(2.5 * bootstrap.GB))
    assert "2.5 GB free" in str(err.value) and "about 8 GB" in str(err.value) and "Free some space" in str(err.value)
    with pytest.raises(bootstrap.BootstrapError, match="3.9.6 is too old"):
        bootstrap.preflight("3.9.6", "/app", "Darwin", PLENTY)


def test_paths_with_spaces_pass_and_non_ascii_warns_on_windows_only():
    assert bootstrap.preflight("3.12.1", "C:\\Users\\me\\Apertis Studio", "Windows", PLENTY) == []
    assert bootstrap.preflight("3.12.1", "/home/zoë/Apertis", "Linux", PLENTY) == []
    [warning] = bootstrap.preflight("3.12.1", "C:\\Users\\Zoë\\Apertis", "Windows", PLENTY)
    assert "non-ASCII" in warning and "C:\\ApertisStudio" in warning


def test_pip_failures_are_explained():
    offline = "WARNING: Retrying ... NewConnectionError: Failed to establish a new connection: [Errno -3] " \
              "Temporary failure in name resolution\nERROR: No matching distribution found for torch===2.13.0\n"
    assert "internet connection" in bootstrap.diagnose_pip_failure(offline, 1, "3.11.7")
    assert "Python 3.14.0" in bootstrap.diagnose_pip_failure("ERROR: No matching distribution", 1, "3.14.0")
    assert "exit code 2" in bootstrap.diagnose_pip_failure("something new", 2, "3.11.7")


class FakePip:
    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def __call__(self, python, args):
        self.calls.append(args)
        if self.fail:
            raise bootstrap.BootstrapError("installing the requirements failed")


def install(tmp_path, pip, system="Linux", variant="default", python_version="3.11.7", free=PLENTY):
    return bootstrap.ensure_requirements(tmp_path / "venv", tmp_path / "app" / "requirements.txt", variant, system,
                                         pip=pip, python="py", python_version=python_version,
                                         disk_free=lambda path: free)


@pytest.fixture
def app(tmp_path):
    (tmp_path / "venv").mkdir()
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "requirements.txt").write_text(REQUIREMENTS)
    return tmp_path


def test_install_runs_only_when_something_changed(app, capsys):
    pip = FakePip()
    assert install(app, pip) and pip.calls == [["-r", str(app / "app" / "requirements.txt")]]
    assert not install(app, pip) and len(pip.calls) == 1
    assert "Requirements up to date" in capsys.readouterr().out
    assert install(app, pip, python_version="3.11.8") and len(pip.calls) == 2
    (app / "app" / "requirements.txt").write_text(REQUIREMENTS + "tqdm==4.70.1\n")
    assert install(app, pip, python_version="3.11.8") and len(pip.calls) == 3


def test_low_disk_or_a_failed_install_leaves_no_stamp_so_the_next_start_retries(app):
    pip = FakePip()
    with pytest.raises(bootstrap.BootstrapError, match="not enough free disk space"):
        install(app, pip, free=bootstrap.GB)
    assert pip.calls == []  # refused before pip ran
    with pytest.raises(bootstrap.BootstrapError):
        install(app, FakePip(fail=True))
    assert not (app / "venv" / bootstrap.STAMP_NAME).exists()
    assert install(app, pip) and len(pip.calls) == 1


def test_cpu_build_on_linux_installs_torch_from_the_index_then_the_rest(app):
    pip = FakePip()
    install(app, pip, variant="cpu")
    (index_args, rest_args) = pip.calls
    assert index_args[:2] == ["--index-url", "https://download.pytorch.org/whl/cpu"]
    rest_file = Path(rest_args[1])
    assert rest_file.parent == app / "venv" and "torch=" not in rest_file.read_text()


@pytest.mark.parametrize("line, expected", [
    ("* Running on local URL:  http://127.0.0.1:7861", ("http://127.0.0.1:7861", "127.0.0.1", 7861)),
    ("Running on http://localhost:7862/ now.", ("http://localhost:7862/", "localhost", 7862)),
    ("listening on http://0.0.0.0:7863", ("http://127.0.0.1:7863/", "127.0.0.1", 7863)),
    ("at https://[::1]:8443/studio", ("https://[::1]:8443/studio", "::1", 8443)),
    ("see https://www.gradio.app/guides for help", None),
    ("nothing here", None),
])
def test_find_url(line, expected):
    assert bootstrap.find_url(line) == expected


def test_browser_needs_a_display_on_linux_only():
    assert not bootstrap.browser_available("Linux", {})
    assert bootstrap.browser_available("Linux", {"WAYLAND_DISPLAY": "wayland-0"})
    assert bootstrap.browser_available("Windows", {}) and bootstrap.browser_available("Darwin", {})


FAKE_STUDIO = textwrap.dedent("""
    import http.server, sys
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.server.served = True
    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    server.served = False
    print("starting", flush=True)
    print(f"* Running on local URL:  http://127.0.0.1:{server.server_port}", flush=True)
    while not server.served:  # the bootstrap's port polls connect without asking for a page
        server.handle_request()
    sys.exit(7)
""")


@pytest.fixture
def busy_port():
    """A port something else already listens on, as when the studio had to move to another one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def signals(monkeypatch):
    """Keep run_studio's termination handler out of the pytest process."""
    installed = []
    monkeypatch.setattr(bootstrap.signal, "signal", lambda sig, handler: installed.append(sig))
    return installed


def test_browser_opens_the_printed_url_once_served_and_exit_code_returns(tmp_path, busy_port, signals):
    opened = []

    def opener(url):
        with urllib.request.urlopen(url, timeout=10) as response:  # the page must already be served
            opened.append((url, response.status))
        return True

    expected = (f"http://127.0.0.1:{busy_port}/", "127.0.0.1", busy_port)
    code = bootstrap.run_studio([sys.executable, "-c", FAKE_STUDIO], dict(os.environ), tmp_path, expected, True,
                                opener)
    assert code == 7
    [(url, status)] = opened
    assert status == 200 and url.startswith("http://127.0.0.1:") and url != expected[0]


def test_studio_that_dies_early_returns_its_code_without_a_browser(tmp_path, busy_port, signals):
    expected = (f"http://127.0.0.1:{busy_port}/", "127.0.0.1", busy_port)
    command = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    assert bootstrap.run_studio(command, dict(os.environ), tmp_path, expected, True, opener=must_not_run) == 3


def test_an_unexpected_error_does_not_leave_the_studio_running(tmp_path, busy_port, signals, monkeypatch):
    real_popen, started = subprocess.Popen, []

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    expected = (f"http://127.0.0.1:{busy_port}/", "127.0.0.1", busy_port)
    with pytest.raises(AssertionError, match="must not be called"):  # the browser opener failing, say
        bootstrap.run_studio([sys.executable, "-c", FAKE_STUDIO], dict(os.environ), tmp_path, expected, True,
                             must_not_run)
    assert started[0].wait(timeout=10) == -9  # killed, not left serving


def test_stop_passes_ctrl_c_on_to_a_studio_that_did_not_get_it():
    waits_for_ctrl_c = textwrap.dedent("""
        import time
        print("ready", flush=True)
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            raise SystemExit(5)
    """)
    child = subprocess.Popen([sys.executable, "-c", waits_for_ctrl_c], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"  # its Ctrl-C handler is in place
        assert bootstrap._stop(child, first_wait=0.5) == 5
    finally:
        child.kill()
