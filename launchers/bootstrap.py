"""Launcher bootstrap: installs what changed into the app's venv, starts the studio, opens the browser.

Standard library only (it runs before anything is installed): start.sh/.command/.bat run it with the venv's Python.
1. `--torch cpu|cuda|default` (or APERTIS_TORCH) is ours; the other arguments go to the studio as they are.
2. Torch: "cuda" on Linux/Windows when nvidia-smi lists a GPU, else "default": the build requirements.txt pins,
   which runs on the CPU too (on Linux it just carries CUDA libraries along), so a GPU added later just works.
   `cpu` saves ~3 GB on Linux (PyTorch's CPU index); `cuda` on Windows needs PyTorch's CUDA index.
3. A stamp in the venv (hash of requirements.txt, torch variant, Python version): only when it changed,
   preflight (Python, disk space, path), pip install, new stamp; else "requirements up to date".
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

GB = 1000**3
INSTALL_BYTES = 8 * GB  # measured on Linux: a 5.1 GB venv (torch + CUDA libraries), plus pip's cache of the wheels
STAMP_NAME = "apertis-requirements.stamp"
# Only these combinations need PyTorch's own index; everywhere else PyPI's build is the one wanted.
TORCH_INDEX = {("Linux", "cpu"): "https://download.pytorch.org/whl/cpu",
               ("Windows", "cuda"): "https://download.pytorch.org/whl/cu130"}
LaunchArgs = namedtuple("LaunchArgs", "torch studio_args target open_browser")  # target: (url, host, port)


class BootstrapError(Exception):
    """A failure the user can act on; the message says what went wrong and what to do."""


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
    return [python, "-m", "studio", "--no-browser", *studio_args], env


def nvidia_gpu_present(run=subprocess.run, which=shutil.which) -> bool:
    """True when nvidia-smi exists and lists a GPU (with a broken driver it fails or lists none)."""
    try:
        done = which("nvidia-smi") and run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(done) and done.returncode == 0 and "GPU" in done.stdout


def choose_torch(system: str, requested: str | None, gpu_present) -> tuple[str, str]:
    """(variant, why): the requested one if any, else cuda with an NVIDIA GPU on Linux/Windows, else default."""
    if requested:
        variant = requested.strip().lower()
        if variant not in ("cpu", "cuda", "default"):
            raise BootstrapError(f"--torch / APERTIS_TORCH must be cpu, cuda or default, not {requested!r}.")
        if variant == "cuda" and system == "Darwin":
            raise BootstrapError("PyTorch has no CUDA build for macOS: use --torch default (it uses Apple's GPU).")
        return variant, "as asked"
    if system != "Darwin" and gpu_present():
        return "cuda", "an NVIDIA GPU was found"
    return "default", "macOS" if system == "Darwin" else "no NVIDIA GPU found; the standard build runs on the CPU"


def install_plan(system: str, variant: str, requirements: str) -> tuple[list[list[str]], str]:
    """(pip install argument lists to run first, requirements text to install after them). From PyTorch's index,
    torch and torchvision come at their pinned versions (`==` matches `+cpu`/`+cu130`), left out of the rest."""
    index = TORCH_INDEX.get((system, variant))
    if index is None:
        return [], requirements
    lines = [(line, re.match(r"\s*(torch|torchvision)(?![\w.-])\s*(?:={2,3}\s*([\w.]+))?", line))
             for line in requirements.splitlines()]
    pins = [f"{found[1]}=={found[2]}" if found[2] else found[1] for _, found in lines if found]
    rest = [line for line, found in lines if not found]
    return [["--index-url", index, *pins]], "\n".join(rest) + "\n"


def requirements_stamp(requirements: str, variant: str, python_version: str) -> str:
    payload = "\n".join((hashlib.sha256(requirements.encode("utf-8")).hexdigest(), variant, python_version))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def preflight(python_version: str, app_dir: str, system: str, free_bytes: int) -> list[str]:
    """Warnings before an install; raises BootstrapError for an old Python or a too-full disk."""
    if tuple(int(part) for part in python_version.split(".")[:2]) < (3, 10):
        raise BootstrapError(f"Python {python_version} is too old; Apertis Studio needs 3.10 or newer. Install 3.12 "
                             "from https://www.python.org/downloads/, delete the .venv folder and start again.")
    if free_bytes < INSTALL_BYTES:
        raise BootstrapError(f"not enough free disk space: {free_bytes / GB:.1f} GB free on the drive of "
                             f"{app_dir}; installing PyTorch and the rest needs about {INSTALL_BYTES / GB:.0f} GB. "
                             "Free some space (or move the app folder to a drive with more room) and start again.")
    if system == "Windows" and not app_dir.isascii():
        return [f"the app folder path {app_dir} has non-ASCII characters, from which some native libraries fail "
                "to load on Windows. If start-up fails, move the folder to e.g. C:\\ApertisStudio."]
    return []


PIP_DIAGNOSES = (  # (phrases in pip's errors, what to tell the user); the first match wins
    (("NewConnectionError", "name resolution", "getaddrinfo failed", "Network is unreachable", "ProxyError",
      "ConnectTimeout", "Read timed out", "SSLError"),
     "pip could not reach the package index: check the internet connection (and any proxy), then start again."),
    (("No space left on device",), "the disk filled up: free some space and start again."),
    (("Permission denied", "Access is denied"),
     "a file could not be written: close other programs using the app folder (antivirus too) and start again."),
    (("No matching distribution", "Could not find a version that satisfies"),
     "a pinned package has no build for Python {python} here: install Python 3.12, delete .venv, start again."),
)


def diagnose_pip_failure(output: str, code: int, python_version: str) -> str:
    for phrases, advice in PIP_DIAGNOSES:
        if any(phrase in output for phrase in phrases):
            return f"installing the requirements failed: {advice.format(python=python_version)}"
    return (f"installing the requirements failed (pip exit code {code}); its messages are above. Fix what they "
            "say and start again; deleting the .venv folder forces a clean install.")


def run_pip(python: str, pip_args: list[str]) -> None:
    """pip install; its progress bars go straight to the terminal, its errors are echoed and kept to diagnose."""
    command = [python, "-m", "pip", "install", "--disable-pip-version-check", *pip_args]
    tail: deque[str] = deque(maxlen=300)
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace") as pip:
        for line in pip.stderr:
            sys.stderr.write(line)
            tail.append(line)
    if pip.returncode != 0:
        raise BootstrapError(diagnose_pip_failure("".join(tail), pip.returncode, platform.python_version()))


def ensure_requirements(venv_dir: Path, requirements_path: Path, variant: str, system: str, *, pip=run_pip,
                        python: str = sys.executable, python_version: str = platform.python_version(),
                        disk_free=lambda path: shutil.disk_usage(path).free) -> bool:
    """Install the requirements when the stamp differs; True when it installed. The stamp is written last."""
    if not requirements_path.is_file():
        raise BootstrapError(f"{requirements_path} is missing: the app folder is incomplete; download the app again.")
    requirements = requirements_path.read_text(encoding="utf-8")
    stamp, stamp_file = requirements_stamp(requirements, variant, python_version), venv_dir / STAMP_NAME
    if stamp_file.is_file() and stamp_file.read_text(encoding="utf-8").strip() == stamp:
        print(f"Requirements up to date (torch build: {variant}, Python {python_version}); nothing to install.")
        return False
    for warning in preflight(python_version, str(requirements_path.parent), system, disk_free(venv_dir)):
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"Installing the requirements (torch build: {variant}); the first time takes several minutes.", flush=True)
    first, rest = install_plan(system, variant, requirements)
    for pip_args in first:
        pip(python, pip_args)
    if rest != requirements:
        requirements_path = venv_dir / "apertis-requirements.txt"
        requirements_path.write_text(rest, encoding="utf-8")
    pip(python, ["-r", str(requirements_path)])
    stamp_file.write_text(stamp + "\n", encoding="utf-8")
    return True


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


def run_studio(command: list[str], env: dict, cwd: Path, expected, open_browser: bool,
               opener=webbrowser.open, start_timeout: float = 600) -> int:
    """Run the studio until it exits; returns its exit code (128+N when it died of signal N)."""
    port_taken_before = port_answers(expected[1], expected[2])
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, encoding="utf-8", errors="replace")
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
        if target:
            opened = open_browser and opener(target[0])
            how = "it is open in your browser" if opened else "open it in your browser"
            print(f"\nApertis Studio is ready at {target[0]}: {how}. Ctrl-C here stops it.", flush=True)
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
            raise BootstrapError("bootstrap.py runs in the app's virtual environment: start with launchers/start.sh "
                                 "(Windows: launchers\\start.bat, macOS: launchers/start.command).")
        variant, why = choose_torch(system, args.torch or os.environ.get("APERTIS_TORCH"), nvidia_gpu_present)
        print(f"PyTorch build: {variant} ({why}).")
        ensure_requirements(Path(sys.prefix), app_dir / "requirements.txt", variant, system)
    except BootstrapError as err:
        print(f"\nERROR: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInstall interrupted. Start again to finish it; what is already installed is kept.", file=sys.stderr)
        return 130
    command, env = studio_command(sys.executable, args.studio_args, dict(os.environ))
    code = run_studio(command, env, app_dir, args.target, args.open_browser and browser_available(system, os.environ))
    if code not in (0, 130):
        print(f"\nThe studio stopped with exit code {code}; its messages above say why.", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
