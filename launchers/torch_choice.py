"""Launcher torch choice: which PyTorch build this machine gets, from which index, and whether that index answers.

Standard library only, like bootstrap.py, which imports it (a script's own folder is first on sys.path).
- Linux/Windows with an NVIDIA GPU (nvidia-smi lists one): "cuda", PyPI's build on Linux, PyTorch's CUDA index on
  Windows (PyTorch publishes its Windows CUDA builds there only).
- Linux/Windows without one: "cpu". On Linux from PyTorch's CPU index, because PyPI's Linux build needs ~3 GB of
  CUDA libraries just to import. On Windows from PyPI, because PyPI's Windows build already is the CPU-only one: no
  second index to reach, and PyPI's torchvision is the one built against it.
- macOS: "default", PyPI's build, which also uses Apple's GPU.
When PyTorch's index does not answer or pip fails on it, bootstrap.py falls back to PyPI's build (see fall_back).
A CUDA build on Linux also gets fla-core, the Triton kernels SLA and STRC use on NVIDIA GPUs (docs/KERNELS.md).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Only these combinations need PyTorch's own index; everywhere else PyPI's build is the one wanted.
TORCH_INDEX = {("Linux", "cpu"): CPU_INDEX, ("Windows", "cuda"): "https://download.pytorch.org/whl/cu130"}
PROBE_SECONDS = 10.0
# Installed beside a CUDA build on Linux, pinned like requirements.txt: PyPI's Linux torch brings Triton, which
# these kernels need; Windows has no official Triton build, and elsewhere they could not run.
LINUX_CUDA_KERNELS = ("fla-core==0.6.0", "einops==0.8.2")
# A torch or torchvision requirement line: (name, ==/===, version); the version is left out when it has a local
# label (+cpu) already or is not pinned.
TORCH_PIN = re.compile(r"\s*(torch|torchvision)(?![\w.-])\s*(?:(={2,3})\s*([\w.]+)(?![\w.+*]))?")


class BootstrapError(Exception):
    """A failure the user can act on; the message says what went wrong and what to do."""


def nvidia_gpu_present(run=subprocess.run, which=shutil.which) -> bool:
    """True when nvidia-smi exists and lists a GPU (with a broken driver it fails or lists none)."""
    try:
        done = which("nvidia-smi") and run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(done) and done.returncode == 0 and "GPU" in done.stdout


def choose_torch(system: str, requested: str | None, gpu_present) -> tuple[str, str]:
    """(variant, why): the requested one if any, else as the module docstring says."""
    if requested:
        variant = requested.strip().lower()
        if variant not in ("cpu", "cuda", "default"):
            raise BootstrapError(f"--torch / APERTIS_TORCH must be cpu, cuda or default, not {requested!r}.")
        if variant == "cuda" and system == "Darwin":
            raise BootstrapError("PyTorch has no CUDA build for macOS: use --torch default (it uses Apple's GPU).")
        return variant, "as asked"
    if system == "Darwin":
        return "default", "macOS: the standard build, which uses Apple's GPU"
    if gpu_present():
        return "cuda", "an NVIDIA GPU was found"
    if system == "Windows":
        return "cpu", "no NVIDIA GPU found; the standard Windows build is the CPU-only one"
    return "cpu", "no NVIDIA GPU found; the CPU-only build is ~3 GB smaller than the standard one"


def torch_index(system: str, variant: str) -> str | None:
    """PyTorch's index that torch and torchvision come from, or None for PyPI's build."""
    return TORCH_INDEX.get((system, variant))


def install_plan(system: str, variant: str, requirements: str) -> tuple[list[list[str]], str]:
    """(pip install argument lists to run first, requirements text to install after them).

    Pins name the build exactly, so that a change of variant replaces the installed torch: from PyTorch's index
    torch and torchvision come first as `==VERSION+LABEL` (a plain `==2.13.0` would be satisfied by PyPI's 2.13.0
    already installed) and are left out of the rest; for PyPI's build they stay in the rest as `===VERSION`
    (a plain `==0.28.0` would keep an installed 0.28.0+cpu, a torchvision built for another torch)."""
    if (system, variant) == ("Linux", "cuda"):
        requirements = "".join(line + "\n" for line in [*requirements.splitlines(), *LINUX_CUDA_KERNELS])
    index, lines = torch_index(system, variant), requirements.splitlines()
    found = [TORCH_PIN.match(line) for line in lines]
    if index is None:
        rest = [
            line if not pin or pin[2] != "==" else line[: pin.start(2)] + "===" + line[pin.end(2) :]
            for line, pin in zip(lines, found, strict=True)
        ]
        return [], requirements if rest == lines else "\n".join(rest) + "\n"
    label = index.rstrip("/").rsplit("/", 1)[1]
    pins = [f"{pin[1]}=={pin[3]}+{label}" if pin[3] else pin[1] for pin in found if pin]
    rest = [line for line, pin in zip(lines, found, strict=True) if not pin]
    return ([["--index-url", index, *pins]] if pins else []), "\n".join(rest) + "\n"


def index_problem(index: str, timeout: float = PROBE_SECONDS, opener=urllib.request.urlopen) -> str | None:
    """None when the index's torch page answers, else why not in a few words. The wait runs in a thread because
    urlopen's timeout does not cover the name lookup, which can hang for minutes with a broken DNS setup."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with opener(f"{index}/torch/", timeout=timeout) as response:  # only the status; the page is not read
                outcome.append(None if response.status < 400 else f"HTTP {response.status}")
        except urllib.error.HTTPError as err:
            outcome.append(f"HTTP {err.code}")
        except Exception as err:  # refused, no such name, TLS, a garbled reply...: all mean "not reachable"
            outcome.append(str(getattr(err, "reason", None) or err) or type(err).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 2)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def index_name(variant: str) -> str:
    return "PyTorch's CPU index" if variant == "cpu" else "PyTorch's CUDA index"


def fall_back(variant: str, went_wrong: str, asked: bool, kept: bool = False) -> str:
    """ "default" (PyPI's build) after PyTorch's index `went_wrong`, saying so (`kept`: it is installed already); an
    error instead when the build was asked for by name (--torch / APERTIS_TORCH), e.g. for a small desktop bundle,
    which PyPI's build would not give."""
    problem = f"{index_name(variant)} {went_wrong}"
    if asked:
        raise BootstrapError(
            f"{problem}. Check the internet connection (and any proxy) and start again, or start "
            "with --torch default for the standard build from PyPI."
        )
    result = "which is larger but runs the same" if variant == "cpu" else "which runs on the CPU only"
    print(
        f"{problem}; {'keeping' if kept else 'installing'} the standard build instead, {result}. The next start "
        f"tries {index_name(variant)} again.",
        flush=True,
    )
    return "default"
