"""Launcher bootstrap: installs what changed into the app's venv, starts the studio, opens the browser.

Standard library only (it runs before anything is installed): start.sh/.command/.bat run it with the venv's Python.
1. `--torch cpu|cuda|default` (or APERTIS_TORCH) is ours; the other arguments go to the studio as they are.
2. Torch (torch_choice.py): "cuda" with an NVIDIA GPU, "cpu" without one on Linux/Windows (on Linux from PyTorch's
   CPU index, ~3 GB smaller; PyPI's build when that index does not answer), "default" (PyPI's build) on macOS.
3. A stamp in the venv (hash of requirements.txt, pyproject.toml, app folder, torch build installed, Python
   version): only when it changed, preflight (Python, disk space, path), pip install of the requirements and of
   the app itself (editable, for the `apertis` command in the venv), new stamp; else "requirements up to date".
4. `python -m studio --no-browser ARGS` runs as a child, echoed; the browser opens once the first http://host:port
   URL it prints answers (not with --no-browser or on Linux without a display); Ctrl-C and exit code pass through.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import webbrowser
from collections import deque, namedtuple
from pathlib import Path

import torch_choice
from torch_choice import BootstrapError

GB = 1000**3
INSTALL_BYTES = 8 * GB  # measured on Linux: a 5.1 GB venv (torch + CUDA libraries), plus pip's cache of the wheels
STAMP_NAME = "apertis-requirements.stamp"
LaunchArgs = namedtuple("LaunchArgs", "torch studio_args target open_browser")  # target: (url, host, port)


def parse_args(argv: list[str]) -> LaunchArgs:
    """Take out --torch; read (without taking out) the studio's --host, --port and --no-browser."""
    torch, rest = _option(argv, "--torch")
    host, port = _option(rest, "--host")[0] or "127.0.0.1", _option(rest, "--port")[0] or "7860"
    if not port.isdigit():
        raise BootstrapError(f"--port must be a number, got {port!r}: start again with e.g. --port 7860.")
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    return LaunchArgs(torch, rest, find_url(url), "--no-browser" not in rest)


def _option(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """(the value of the last `name V` or `name=V`, as argparse reads it; args without those)."""
    value, rest, args = None, [], iter(args)
    for arg in args:
        if arg == name:
            value = next(args, None)
            if value is None:
                raise BootstrapError(f"{name} needs a value after it.")
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return value, rest


def studio_command(python: str, studio_args: list[str], environ: dict[str, str]) -> tuple[list[str], dict]:
    """(command, env) for the studio: isolated as by the launchers, unbuffered UTF-8, no browser (we open it)."""
    env = {key: value for key, value in environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    no_browser = [] if "--no-browser" in studio_args else ["--no-browser"]
    return [python, "-m", "studio", *no_browser, *studio_args], env


def requirements_stamp(requirements: str, project: str, app_dir: str, variant: str, python_version: str) -> str:
    """Hash of what the venv's install depends on; app_dir because the editable install points into it."""
    return hashlib.sha256("\0".join((requirements, project, app_dir, variant, python_version)).encode()).hexdigest()


def preflight(python_version: str, app_dir: str, system: str, free_bytes: int) -> list[str]:
    """Warnings before an install; raises BootstrapError for an old Python or a too-full disk."""
    if tuple(int(part) for part in python_version.split(".")[:2]) < (3, 10):
        raise BootstrapError(
            f"Python {python_version} is too old; Apertis Studio needs 3.10 or newer. Install 3.12 "
            "from https://www.python.org/downloads/, delete the .venv folder and start again."
        )
    if free_bytes < INSTALL_BYTES:
        raise BootstrapError(
            f"not enough free disk space: {free_bytes / GB:.1f} GB free on the drive of "
            f"{app_dir}; installing PyTorch and the rest needs about {INSTALL_BYTES / GB:.0f} GB. "
            "Free some space (or move the app folder to a drive with more room) and start again."
        )
    if system == "Windows" and not app_dir.isascii():
        return [
            f"the app folder path {app_dir} has non-ASCII characters, from which some native libraries fail "
            "to load on Windows. If start-up fails, move the folder to e.g. C:\\ApertisStudio."
        ]
    return []


PIP_DIAGNOSES = (  # (phrases in pip's errors, what to tell the user); the first match wins
    (
        (
            "NewConnectionError",
            "name resolution",
            "getaddrinfo failed",
            "Network is unreachable",
            "ProxyError",
            "ConnectTimeout",
            "Read timed out",
            "SSLError",
        ),
        "pip could not reach the package index: check the internet connection (and any proxy), then start again.",
    ),
    (("No space left on device",), "the disk filled up: free some space and start again."),
    (
        ("Permission denied", "Access is denied"),
        "a file could not be written: close other programs using the app folder (antivirus too) and start again.",
    ),
    (
        ("No matching distribution", "Could not find a version that satisfies"),
        "a pinned package has no build for Python {python} here: install Python 3.12, delete .venv, start again.",
    ),
)


def diagnose_pip_failure(output: str, code: int, python_version: str, what: str = "the requirements") -> str:
    for phrases, advice in PIP_DIAGNOSES:
        if any(phrase in output for phrase in phrases):
            return f"installing {what} failed: {advice.format(python=python_version)}"
    return (
        f"installing {what} failed (pip exit code {code}); its messages are above. Fix what they "
        "say and start again; deleting the .venv folder forces a clean install."
    )


def run_pip(python: str, pip_args: list[str], what: str = "the requirements") -> None:
    """pip install; its progress bars go straight to the terminal, its errors are echoed and kept to diagnose."""
    command = [python, "-m", "pip", "install", "--disable-pip-version-check", *pip_args]
    tail: deque[str] = deque(maxlen=300)
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace") as pip:
        for line in pip.stderr:
            sys.stderr.write(line)
            tail.append(line)
    if pip.returncode != 0:
        output, version = "".join(tail), platform.python_version()
        raise BootstrapError(diagnose_pip_failure(output, pip.returncode, version, what))


def ensure_requirements(
    venv_dir: Path,
    app_dir: Path,
    variant: str,
    system: str,
    *,
    asked: bool = False,
    pip=run_pip,
    probe=torch_choice.index_problem,
    python: str = sys.executable,
    python_version: str = platform.python_version(),
    disk_free=lambda path: shutil.disk_usage(path).free,
) -> bool:
    """Install the requirements, then the app itself, when the stamp differs; True when it installed.

    PyTorch's index is tried first where the build comes from there; when it fails, a build not `asked` for falls
    back to PyPI's. The stamp names the build actually installed and is written last, so a failed install is
    retried and a fallback tries PyTorch's index again at the next start."""
    requirements, project = (_app_file(app_dir / name) for name in ("requirements.txt", "pyproject.toml"))

    def stamp_of(build: str) -> str:
        return requirements_stamp(requirements, project, str(app_dir), build, python_version)

    if _stamped(venv_dir, stamp_of(variant)):
        return _up_to_date(variant, python_version)
    index = torch_choice.torch_index(system, variant)
    unreachable = index and probe(index)
    if unreachable:
        kept = _stamped(venv_dir, stamp_of("default"))  # fell back at an earlier start too
        variant = torch_choice.fall_back(variant, f"could not be reached ({unreachable})", asked, kept)
        if kept:
            return _up_to_date(variant, python_version)
    for warning in preflight(python_version, str(app_dir), system, disk_free(venv_dir)):
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"Installing the requirements (torch build: {variant}); the first time takes several minutes.", flush=True)
    first, rest = torch_choice.install_plan(system, variant, requirements)
    try:
        for pip_args in first:
            pip(python, pip_args, "PyTorch")
    except BootstrapError:  # e.g. the connection dropped, or the index has no build of that version for this machine
        if asked:  # no fallback for a build asked for by name: pip's diagnosis says what to do
            raise
        variant = torch_choice.fall_back(variant, "could not provide PyTorch (pip's messages are above)", asked)
        first, rest = torch_choice.install_plan(system, variant, requirements)
    requirements_path = app_dir / "requirements.txt"
    if rest != requirements:
        requirements_path = venv_dir / "apertis-requirements.txt"
        requirements_path.write_text(rest, encoding="utf-8")
    pip(python, ["-r", str(requirements_path)])
    # Editable: `apertis` then runs the app folder's code, as the studio does, and an updated folder needs no
    # reinstall. --no-deps: the requirements above are the pinned dependencies.
    pip(python, ["--no-deps", "--editable", str(app_dir)], "the apertis command line")
    (venv_dir / STAMP_NAME).write_text(stamp_of(variant) + "\n", encoding="utf-8")
    return True


def _app_file(path: Path) -> str:
    if not path.is_file():
        raise BootstrapError(f"{path} is missing: the app folder is incomplete; download the app again.")
    return path.read_text(encoding="utf-8")


def _stamped(venv_dir: Path, stamp: str) -> bool:
    stamp_file = venv_dir / STAMP_NAME
    return stamp_file.is_file() and stamp_file.read_text(encoding="utf-8").strip() == stamp


def _up_to_date(variant: str, python_version: str) -> bool:
    print(f"Requirements up to date (torch build: {variant}, Python {python_version}); nothing to install.")
    return False


def command_line_note(venv_dir: Path, system: str) -> str | None:
    """Where the `apertis` command is and how to reach it; None when it is not installed."""
    if system == "Windows":
        if (venv_dir / "Scripts" / "apertis.exe").is_file():
            return (
                "The `apertis` command line is in .venv\\Scripts: in the app folder run .venv\\Scripts\\activate "
                "(PowerShell: .venv\\Scripts\\Activate.ps1), then `apertis --help`."
            )
    elif (venv_dir / "bin" / "apertis").is_file():
        return (
            "The `apertis` command line is in .venv/bin: in the app folder run `source .venv/bin/activate`, then "
            "`apertis --help`."
        )
    return None


def find_url(text: str) -> tuple[str, str, int] | None:
    """(url, host, port) of the first http(s)://host:port URL in text; a wildcard host becomes 127.0.0.1."""
    found = re.search(r"https?://(\[[0-9A-Fa-f:.]+\]|[\w.-]+):(\d{1,5})(/[^\s\"'<>]*)?", text)
    if not found:
        return None
    host, port = found[1].strip("[]"), int(found[2])
    if host in ("0.0.0.0", "::"):  # listening everywhere: this machine reaches it on loopback
        return f"http://127.0.0.1:{port}/", "127.0.0.1", port
    return found[0].rstrip(".,;)"), host, port


def browser_available(system: str, environ: dict[str, str]) -> bool:
    # Without a display, Python's webbrowser falls back to a text browser that would take over the terminal.
    return system != "Linux" or bool(environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"))


def port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(child, first_wait: float = 3) -> int:
    """After Ctrl-C: the terminal sent it to the studio too, so wait a little, then pass it on, then force."""
    print("\nStopping Apertis Studio...", flush=True)
    try:
        child.wait(timeout=first_wait)
    except subprocess.TimeoutExpired:
        # On Windows a Ctrl-C can't be aimed at one process; send_signal(SIGTERM) terminates it there.
        child.send_signal(signal.SIGTERM if os.name == "nt" else signal.SIGINT)
        try:
            child.wait(timeout=15)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            child.kill()
    return child.wait()


def run_studio(
    command: list[str],
    env: dict,
    cwd: Path,
    expected,
    open_browser: bool,
    opener=webbrowser.open,
    start_timeout: float = 600,
) -> int:
    """Run the studio until it exits; returns its exit code (128+N when it died of signal N)."""
    port_taken_before = port_answers(expected[1], expected[2])
    child = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    if os.name != "nt":  # `kill` reaches only us; Ctrl-C and a closed terminal reach the studio themselves
        signal.signal(signal.SIGTERM, lambda _signum, _frame: child.terminate())
    printed: dict = {}

    def echo() -> None:
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            target = "target" not in printed and find_url(line)
            if target:
                printed["target"] = target

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        deadline, target = time.monotonic() + start_timeout, None
        while child.poll() is None and time.monotonic() < deadline and not target:
            time.sleep(0.25)
            # When something already listened on the expected port, only the URL the studio prints is trusted.
            candidate = printed.get("target") or (None if port_taken_before else expected)
            target = candidate if candidate and port_answers(candidate[1], candidate[2]) else None
        if target and open_browser and opener(target[0]):  # the studio's own line already said it is ready
            print(f"Opened {target[0]} in your browser.", flush=True)
        elif child.poll() is None:
            print(f"\nNo answer from the studio after {start_timeout:.0f} s; once it is up, open the address above.")
        while child.poll() is None:  # a timed wait: Windows delivers Ctrl-C only between waits
            time.sleep(0.2)
        code = child.returncode
    except KeyboardInterrupt:
        code = _stop(child)
    finally:
        if child.poll() is None:  # an unexpected error here must not leave the studio running unseen
            child.kill()
    reader.join(timeout=5)
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a cp1252 console must not crash on the studio's output
        stream.reconfigure(errors="replace", line_buffering=True)
    app_dir, system = Path(__file__).resolve().parent.parent, platform.system()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if sys.prefix == sys.base_prefix:
            raise BootstrapError(
                "bootstrap.py runs in the app's virtual environment: start with launchers/start.sh "
                "(Windows: launchers\\start.bat, macOS: launchers/start.command)."
            )
        requested = args.torch or os.environ.get("APERTIS_TORCH")
        variant, why = torch_choice.choose_torch(system, requested, torch_choice.nvidia_gpu_present)
        print(f"PyTorch build: {variant} ({why}).")
        ensure_requirements(Path(sys.prefix), app_dir, variant, system, asked=bool(requested))
        note = command_line_note(Path(sys.prefix), system)
        if note:
            print(note)
    except BootstrapError as err:
        print(f"\nERROR: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInstall interrupted. Start again to finish it; what is already installed is kept.", file=sys.stderr)
        return 130
    command, env = studio_command(sys.executable, args.studio_args, dict(os.environ))
    code = run_studio(command, env, app_dir, args.target, args.open_browser and browser_available(system, os.environ))
    if code > 128 and code != 130:
        print(
            f"\nThe studio was ended by signal {code - 128} from outside (the system, or another program, "
            "stopped it). Start it again; runs that were training are kept.",
            file=sys.stderr,
        )
    elif code not in (0, 130):
        print(f"\nThe studio stopped with exit code {code}; its messages above say why.", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
