"""The launcher bootstrap's pieces: argument pass-through, torch choice, stamp, preflight, install, URL, studio run."""

import http.server
import importlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path
from unittest.mock import Mock

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "launchers") not in sys.path:  # bootstrap.py imports torch_choice beside it, as when run as a script
    sys.path.insert(0, str(REPO / "launchers"))
bootstrap = importlib.import_module("bootstrap")
torch_choice = importlib.import_module("torch_choice")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

REQUIREMENTS = "# pins\ntorch===2.13.0\ntorchvision==0.28.0\ntorch-geometric==2.0\ngradio==6.31.0\n"
PLENTY = 100 * bootstrap.GB


def must_not_run(*args):
    raise AssertionError("this must not be called here")


def test_arguments_pass_through_in_order_without_torch():
    args = bootstrap.parse_args(["--workspace", "my ws", "--torch", "cpu", "--port=7999", "--host", "localhost"])
    assert args.torch == "cpu"
    assert args.studio_args == ["--workspace", "my ws", "--port=7999", "--host", "localhost"]
    assert args.target == ("http://localhost:7999/", "localhost", 7999) and args.open_browser


@pytest.mark.parametrize(
    "argv, target, browser",
    [
        (["--torch=cuda", "--no-browser"], ("http://127.0.0.1:7860/", "127.0.0.1", 7860), False),
        (["--port", "7001", "--host", "0.0.0.0", "--port=7002"], ("http://127.0.0.1:7002/", "127.0.0.1", 7002), True),
    ],
)
def test_default_target_last_port_wins_and_a_wildcard_host_is_polled_on_loopback(argv, target, browser):
    args = bootstrap.parse_args(argv)
    assert (args.target, args.open_browser) == (target, browser) and "--torch=cuda" not in args.studio_args


@pytest.mark.parametrize("argv, message", [(["--port", "abc"], "must be a number"), (["--torch"], "needs a value")])
def test_bad_arguments_say_what_to_do(argv, message):
    with pytest.raises(bootstrap.BootstrapError, match=message):
        bootstrap.parse_args(argv)


def test_studio_command_adds_no_browser_once_and_isolates_the_environment():
    command, env = bootstrap.studio_command("py", ["--port", "1"], {"PYTHONPATH": "x", "PYTHONHOME": "y", "A": "1"})
    assert command == ["py", "-m", "studio", "--no-browser", "--port", "1"]
    assert bootstrap.studio_command("py", ["--no-browser"], {})[0] == ["py", "-m", "studio", "--no-browser"]
    assert "PYTHONPATH" not in env and "PYTHONHOME" not in env and env["A"] == "1"
    assert env["PYTHONNOUSERSITE"] == "1" and env["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize(
    "system, gpu, variant, why",
    [
        ("Linux", True, "cuda", "NVIDIA GPU was found"),
        ("Windows", True, "cuda", "NVIDIA GPU was found"),
        ("Linux", False, "cpu", "~3 GB smaller"),
        ("Windows", False, "cpu", "Windows build is the CPU-only one"),
    ],
)
def test_torch_follows_the_gpu_on_linux_and_windows(system, gpu, variant, why):
    chosen, reason = torch_choice.choose_torch(system, None, lambda: gpu)
    assert chosen == variant and why in reason


def test_macos_and_overrides_decide_without_probing():
    assert torch_choice.choose_torch("Darwin", None, must_not_run)[0] == "default"
    assert torch_choice.choose_torch("Linux", " CPU ", must_not_run) == ("cpu", "as asked")
    assert torch_choice.choose_torch("Linux", "default", must_not_run)[0] == "default"
    assert torch_choice.choose_torch("Windows", "cuda", must_not_run)[0] == "cuda"


def test_bad_override_and_cuda_on_macos_are_errors():
    with pytest.raises(bootstrap.BootstrapError, match="cpu, cuda or default"):
        torch_choice.choose_torch("Linux", "rocm", must_not_run)
    with pytest.raises(bootstrap.BootstrapError, match="no CUDA build for macOS"):
        torch_choice.choose_torch("Darwin", "cuda", must_not_run)


def test_gpu_probe_needs_a_working_nvidia_smi():
    def ran(code, out):
        return lambda *a, **k: subprocess.CompletedProcess(a, code, out, "")

    found = lambda name: "/usr/bin/nvidia-smi"  # noqa: E731
    assert torch_choice.nvidia_gpu_present(ran(0, "GPU 0: NVIDIA H100 (UUID: x)\n"), found)
    assert not torch_choice.nvidia_gpu_present(ran(0, "GPU 0: x"), lambda name: None)
    assert not torch_choice.nvidia_gpu_present(ran(9, "NVIDIA-SMI has failed"), found)
    assert not torch_choice.nvidia_gpu_present(ran(0, "No devices were found"), found)
    assert not torch_choice.nvidia_gpu_present(Mock(side_effect=subprocess.TimeoutExpired("nvidia-smi", 20)), found)


@pytest.mark.parametrize(
    "system, variant",
    [
        ("Linux", "default"),
        ("Darwin", "default"),
        ("Darwin", "cpu"),
        ("Windows", "cpu"),
        ("Windows", "default"),
    ],
)
def test_pypi_builds_pin_torch_and_torchvision_exactly_so_a_cpu_build_gets_replaced(system, variant):
    assert torch_choice.install_plan(system, variant, REQUIREMENTS) == (
        [],
        "# pins\ntorch===2.13.0\ntorchvision===0.28.0\ntorch-geometric==2.0\ngradio==6.31.0\n",
    )
    exact = "torch===2.13.0\ntorchvision===0.28.0 ; sys_platform != 'emscripten'\ntorchvision-x==1\n"
    assert torch_choice.install_plan(system, variant, exact) == ([], exact)


@pytest.mark.parametrize(
    "system, variant, index, label", [("Linux", "cpu", "/whl/cpu", "+cpu"), ("Windows", "cuda", "/whl/cu130", "+cu130")]
)
def test_pytorch_index_builds_take_torch_out_of_the_requirements(system, variant, index, label):
    first, rest = torch_choice.install_plan(system, variant, REQUIREMENTS)
    assert len(first) == 1 and first[0][1].endswith(index)
    # The local label makes pip replace a standard 2.13.0 already installed (a plain ==2.13.0 would keep it).
    assert first[0][0] == "--index-url" and first[0][2:] == [f"torch==2.13.0{label}", f"torchvision==0.28.0{label}"]
    assert rest.splitlines() == ["# pins", "torch-geometric==2.0", "gradio==6.31.0"]


def test_a_cuda_build_on_linux_also_gets_the_fla_kernels():
    first, rest = torch_choice.install_plan("Linux", "cuda", REQUIREMENTS)
    assert first == [] and rest.splitlines() == [
        "# pins",
        "torch===2.13.0",
        "torchvision===0.28.0",
        "torch-geometric==2.0",
        "gradio==6.31.0",
        *torch_choice.LINUX_CUDA_KERNELS,
    ]
    assert [pin.split("==")[0] for pin in torch_choice.LINUX_CUDA_KERNELS] == ["fla-core", "einops"]
    for system, variant in [("Linux", "cpu"), ("Linux", "default"), ("Windows", "cuda"), ("Darwin", "default")]:
        assert "fla-core" not in torch_choice.install_plan(system, variant, REQUIREMENTS)[1]


def test_an_index_build_with_nothing_of_torch_to_install_skips_the_index():
    assert torch_choice.install_plan("Linux", "cpu", "gradio==6.31.0\n") == ([], "gradio==6.31.0\n")


def test_real_requirements_pin_torch_and_torchvision():
    first, rest = torch_choice.install_plan("Linux", "cpu", (REPO / "requirements.txt").read_text())
    assert [pin.split("==")[0] for pin in first[0][2:]] == ["torch", "torchvision"]
    assert all(pin.endswith("+cpu") for pin in first[0][2:]) and "gradio" in rest


def test_stamp_changes_with_requirements_project_folder_variant_or_python():
    parts = (REQUIREMENTS, "[project]\n", "/home/me/Apertis", "default", "3.11.7")
    stamp = bootstrap.requirements_stamp(*parts)
    assert stamp == bootstrap.requirements_stamp(*parts)
    for i, changed in enumerate((REQUIREMENTS + "tqdm\n", "[project]\nx\n", "/home/me/moved", "cpu", "3.11.8")):
        assert stamp != bootstrap.requirements_stamp(*parts[:i], changed, *parts[i + 1 :])


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
    offline = (
        "WARNING: Retrying ... NewConnectionError: Failed to establish a new connection: [Errno -3] "
        "Temporary failure in name resolution\nERROR: No matching distribution found for torch===2.13.0\n"
    )
    assert "internet connection" in bootstrap.diagnose_pip_failure(offline, 1, "3.11.7")
    assert "Python 3.14.0" in bootstrap.diagnose_pip_failure("ERROR: No matching distribution", 1, "3.14.0")
    assert "exit code 2" in bootstrap.diagnose_pip_failure("something new", 2, "3.11.7")


class FakePip:
    """Records pip's argument lists; fails those that `fail` says yes to."""

    def __init__(self, fail=lambda args: False):
        self.calls, self.whats, self.fail = [], [], fail

    def __call__(self, python, args, what="the requirements"):
        self.calls.append(args)
        self.whats.append(what)
        if self.fail(args):
            raise bootstrap.BootstrapError(f"installing {what} failed")


def reachable(index):
    return None


def unreachable(index):
    return "[Errno -3] Temporary failure in name resolution"


def install(
    app, pip, system="Linux", variant="default", python_version="3.11.7", free=PLENTY, probe=must_not_run, asked=False
):
    return bootstrap.ensure_requirements(
        app / "venv",
        app / "app",
        variant,
        system,
        asked=asked,
        pip=pip,
        probe=probe,
        python="py",
        python_version=python_version,
        disk_free=lambda path: free,
    )


@pytest.fixture
def app(tmp_path):
    (tmp_path / "venv").mkdir()
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "requirements.txt").write_text(REQUIREMENTS)
    (tmp_path / "app" / "pyproject.toml").write_text("[project]\nname = 'apertis-studio'\n")
    return tmp_path


def stamped(app, variant, python_version="3.11.7"):
    """Whether the venv's stamp says `variant` is installed for the app as it is."""
    files = [(app / "app" / name).read_text() for name in ("requirements.txt", "pyproject.toml")]
    expected = bootstrap.requirements_stamp(*files, str(app / "app"), variant, python_version)
    return (app / "venv" / bootstrap.STAMP_NAME).read_text().strip() == expected


def is_index(args):
    return args[0] == "--index-url"


def test_install_runs_only_when_something_changed(app, capsys):
    pip = FakePip()
    assert install(app, pip) and len(pip.calls) == 2 and stamped(app, "default")
    assert not install(app, pip) and len(pip.calls) == 2
    assert "Requirements up to date" in capsys.readouterr().out
    assert install(app, pip, python_version="3.11.8") and len(pip.calls) == 4
    (app / "app" / "requirements.txt").write_text(REQUIREMENTS + "tqdm==4.70.1\n")
    assert install(app, pip, python_version="3.11.8") and len(pip.calls) == 6
    (app / "app" / "pyproject.toml").write_text("[project]\nname = 'apertis-studio'\nversion = '0.2'\n")
    assert install(app, pip, python_version="3.11.8") and len(pip.calls) == 8


def test_requirements_then_the_app_itself_for_the_apertis_command(app):
    pip = FakePip()
    install(app, pip)
    (requirements_args, project_args) = pip.calls
    assert requirements_args[0] == "-r" and "torchvision===0.28.0" in Path(requirements_args[1]).read_text()
    assert project_args == ["--no-deps", "--editable", str(app / "app")]
    assert pip.whats[1] == "the apertis command line"


def test_low_disk_or_a_failed_install_leaves_no_stamp_so_the_next_start_retries(app):
    pip = FakePip()
    with pytest.raises(bootstrap.BootstrapError, match="not enough free disk space"):
        install(app, pip, free=bootstrap.GB)
    assert pip.calls == []  # refused before pip ran
    with pytest.raises(bootstrap.BootstrapError):
        install(app, FakePip(fail=lambda args: True))
    with pytest.raises(bootstrap.BootstrapError, match="installing the apertis command line failed"):
        install(app, FakePip(fail=lambda args: "--editable" in args))
    assert not (app / "venv" / bootstrap.STAMP_NAME).exists()
    assert install(app, pip) and len(pip.calls) == 2


def test_no_gpu_on_linux_installs_the_cpu_build_from_pytorchs_index_then_the_rest(app, capsys):
    pip = FakePip()
    probed = []
    assert install(app, pip, variant="cpu", probe=lambda index: probed.append(index))
    assert probed == [CPU_INDEX]
    (index_args, rest_args, project_args) = pip.calls
    assert index_args == ["--index-url", CPU_INDEX, "torch==2.13.0+cpu", "torchvision==0.28.0+cpu"]
    rest_file = Path(rest_args[1])
    assert rest_file.parent == app / "venv" and "torch" not in rest_file.read_text().replace("torch-geometric", "")
    assert "--editable" in project_args and stamped(app, "cpu")
    assert "could not be reached" not in capsys.readouterr().out
    assert not install(app, pip, variant="cpu", probe=must_not_run)  # up to date: no probe, no pip


def test_unreachable_cpu_index_installs_the_standard_build_says_so_and_stamps_what_it_installed(app, capsys):
    pip = FakePip()
    assert install(app, pip, variant="cpu", probe=unreachable)
    out = capsys.readouterr().out
    assert (
        "PyTorch's CPU index could not be reached ([Errno -3] Temporary failure in name resolution); installing "
        "the standard build instead, which is larger but runs the same."
    ) in out
    assert not any(is_index(args) for args in pip.calls)
    assert "torch===2.13.0" in Path(pip.calls[0][1]).read_text() and "--editable" in pip.calls[1]
    assert stamped(app, "default") and not stamped(app, "cpu")
    # Next start: still unreachable, so nothing to do; once it answers, the CPU build replaces the standard one.
    assert not install(app, pip, variant="cpu", probe=unreachable) and len(pip.calls) == 2
    out = capsys.readouterr().out
    assert "could not be reached" in out and "keeping the standard build instead" in out and "up to date" in out
    assert install(app, pip, variant="cpu", probe=reachable) and is_index(pip.calls[2]) and stamped(app, "cpu")


def test_a_failed_install_from_the_cpu_index_falls_back_too(app, capsys):
    pip = FakePip(fail=is_index)
    assert install(app, pip, variant="cpu", probe=reachable)
    assert "PyTorch's CPU index could not provide PyTorch" in capsys.readouterr().out
    assert is_index(pip.calls[0]) and "torch===2.13.0" in Path(pip.calls[1][1]).read_text()
    assert stamped(app, "default")


def test_a_cpu_build_asked_for_by_name_does_not_fall_back(app):
    with pytest.raises(bootstrap.BootstrapError, match="could not be reached .*--torch default"):
        install(app, FakePip(), variant="cpu", probe=unreachable, asked=True)
    with pytest.raises(bootstrap.BootstrapError, match="installing PyTorch failed"):
        install(app, FakePip(fail=is_index), variant="cpu", probe=reachable, asked=True)
    assert not (app / "venv" / bootstrap.STAMP_NAME).exists()


@pytest.mark.parametrize("system, variant", [("Linux", "cuda"), ("Darwin", "default"), ("Windows", "cpu")])
def test_builds_from_pypi_do_not_probe_pytorchs_index(app, system, variant):
    pip = FakePip()
    assert install(app, pip, system=system, variant=variant, probe=must_not_run)
    assert not any(is_index(args) for args in pip.calls) and stamped(app, variant)


def test_unreachable_cuda_index_on_windows_falls_back_to_the_cpu_only_standard_build(app, capsys):
    pip = FakePip()
    assert install(app, pip, system="Windows", variant="cuda", probe=unreachable) and stamped(app, "default")
    assert "PyTorch's CUDA index could not be reached" in capsys.readouterr().out


class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/whl/cpu/torch/" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def index_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_index_probe_asks_for_the_torch_page(index_server):
    assert torch_choice.index_problem(f"{index_server}/whl/cpu", timeout=5) is None
    assert torch_choice.index_problem(f"{index_server}/whl/nothing", timeout=5) == "HTTP 404"


def test_index_probe_says_why_it_failed_and_never_waits_much_longer_than_its_timeout():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    assert "refused" in torch_choice.index_problem(f"http://127.0.0.1:{closed}/whl/cpu", timeout=5).lower()

    def dns_failure(url, timeout):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    assert "name resolution" in torch_choice.index_problem(CPU_INDEX, opener=dns_failure)
    release = threading.Event()
    try:  # a name lookup that hangs, which urlopen's own timeout does not cover

        def hangs(url, timeout):
            release.wait(30)
            raise OSError("too late")

        assert torch_choice.index_problem(CPU_INDEX, timeout=0.1, opener=hangs) == "no answer within 0.1 s"
    finally:
        release.set()


def test_the_apertis_command_line_note_says_where_it_is(tmp_path):
    assert bootstrap.command_line_note(tmp_path, "Linux") is None
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "apertis").write_text("#!/bin/sh\n")
    assert "source .venv/bin/activate" in bootstrap.command_line_note(tmp_path, "Linux")
    assert bootstrap.command_line_note(tmp_path, "Windows") is None
    (tmp_path / "Scripts").mkdir()
    (tmp_path / "Scripts" / "apertis.exe").write_bytes(b"MZ")
    assert ".venv\\Scripts\\activate" in bootstrap.command_line_note(tmp_path, "Windows")


@pytest.mark.parametrize("argv, asked", [(["--no-browser"], False), (["--torch", "cpu", "--no-browser"], True)])
def test_main_prints_the_build_and_why_then_where_the_apertis_command_is(tmp_path, monkeypatch, capsys, argv, asked):
    installs = []

    def ensure(venv_dir, app_dir, variant, system, asked):
        installs.append((variant, asked))
        (venv_dir / "bin").mkdir()
        (venv_dir / "bin" / "apertis").write_text("#!/bin/sh\n")

    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(bootstrap.platform, "system", lambda: "Linux")
    monkeypatch.setattr(torch_choice, "nvidia_gpu_present", lambda: False)
    monkeypatch.setattr(bootstrap, "ensure_requirements", ensure)
    monkeypatch.setattr(bootstrap, "run_studio", lambda *args: 0)
    monkeypatch.delenv("APERTIS_TORCH", raising=False)
    assert bootstrap.main(argv) == 0
    out = capsys.readouterr().out
    assert installs == [("cpu", asked)] and "PyTorch build: cpu (" in out
    assert "The `apertis` command line is in .venv/bin" in out


@pytest.mark.parametrize(
    "code, says",
    [
        (143, "ended by signal 15 from outside"),  # killed by something else: nothing above explains it
        (2, "exit code 2; its messages above say why"),
        (0, None),
    ],
)
def test_main_explains_how_the_studio_ended(tmp_path, monkeypatch, capsys, code, says):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(bootstrap, "ensure_requirements", lambda *args, **kwargs: None)
    monkeypatch.setattr(bootstrap, "run_studio", lambda *args: code)
    assert bootstrap.main(["--no-browser", "--torch", "default"]) == code
    err = capsys.readouterr().err
    assert (says in err) if says else err == ""


@pytest.mark.parametrize(
    "line, expected",
    [
        ("* Running on local URL:  http://127.0.0.1:7861", ("http://127.0.0.1:7861", "127.0.0.1", 7861)),
        ("Running on http://localhost:7862/ now.", ("http://localhost:7862/", "localhost", 7862)),
        ("listening on http://0.0.0.0:7863", ("http://127.0.0.1:7863/", "127.0.0.1", 7863)),
        ("at https://[::1]:8443/studio", ("https://[::1]:8443/studio", "::1", 8443)),
        ("see https://www.gradio.app/guides for help", None),
        ("nothing here", None),
    ],
)
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
    code = bootstrap.run_studio([sys.executable, "-c", FAKE_STUDIO], dict(os.environ), tmp_path, expected, True, opener)
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
        bootstrap.run_studio(
            [sys.executable, "-c", FAKE_STUDIO], dict(os.environ), tmp_path, expected, True, must_not_run
        )
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
