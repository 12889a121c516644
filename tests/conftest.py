"""Shared pytest fixtures: tiny model configs and the repository paths tests use."""

import json
import random
import signal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Waits and subprocess timeouts only catch a hung test; a slow, busy laptop must never reach them.
HANG_GUARD_S = 600
# The first 200,000 characters of tinyshakespeare (public domain), kept in the repository so a fresh clone tests.
SHAKESPEARE = REPO / "tests" / "data" / "shakespeare-excerpt.txt"

# A test run started with `&` from a script (no job control) inherits Ctrl-C as ignored, and so would every
# child it starts; the launcher tests press Ctrl-C as a terminal does, so take back Python's usual handler,
# which children do not inherit (they start with the default action).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(preset: str, **overrides):
    from apertis_core import ModelConfig

    base = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, sla_chunk_size=8, max_seq_len=64)
    if preset.startswith("apertis"):
        base.update(n_experts=4, moe_top_k=2, moe_every=2, strc_every=2, strc_hidden=24)
    base.update(overrides)
    return ModelConfig.from_preset(preset, **base)


def tiny_image_config(tokenizer):
    """A tiny hybrid model with a one-layer ViT: 8-pixel patches, at most 16 per image."""
    return tiny_config(
        "apertis-hybrid-nano",
        vocab_size=tokenizer.vocab_size,
        image_encoder="vit",
        image_patch_size=8,
        image_max_patches=16,
        image_encoder_layers=1,
        image_token_id=tokenizer.image_id,
    )


@pytest.fixture
def picture(tmp_path):
    """A 40 x 24 white picture with a red square in it."""
    from PIL import Image

    path = tmp_path / "red-square.png"
    image = Image.new("RGB", (40, 24), "white")
    image.paste((255, 0, 0), (8, 4, 24, 20))
    image.save(path)
    return path


@pytest.fixture
def services(tmp_path):
    """The studio's services over an empty workspace in tmp_path/ws: for handler tests without a browser."""
    from studio.app import Services
    from studio.jobs import JobManager
    from studio.store import Store

    store = Store(tmp_path / "ws")
    return Services(store=store, jobs=JobManager(store))


def studio_form(**changes):
    """The Train tab's form values at their defaults, with `changes`."""
    from studio.tabs import train

    return {**train.BASIC_DEFAULTS, **train.ADVANCED_DEFAULTS, **changes}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def studio_url(tmp_path):
    """The URL of a studio (`python -m studio --no-browser`) serving a fresh workspace in tmp_path.

    Its output goes to tmp_path/studio.log (a pipe nobody drains could block it); the fixture waits for
    HTTP 200 on / and stops the studio with Ctrl-C (SIGINT) afterwards, as a person would."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    url, log = f"http://127.0.0.1:{port}/", tmp_path / "studio.log"
    command = [sys.executable, "-m", "studio", "--no-browser", "--port", str(port), "--workspace", str(tmp_path / "ws")]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the studio did not serve {url} (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            try:
                with direct.open(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:  # not listening yet
                time.sleep(0.1)
        yield url
    finally:
        from benchmarks.studio import stop_studio  # one way to stop it, shared with the studio benchmark

        stop_studio(proc)


def write_colour_questions(folder, n: int, seed: int) -> None:
    """One shape per 32 px picture; "What colour is the shape?" -> its colour (learnable in a few dozen steps)."""
    from apertis_core.data.shapes import make_scene, render

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for index in range(n):
        scene = make_scene(rng, size=32, n_objects=1, radius=6)
        render(scene).save(folder / "images" / f"{index}.png")
        ask = {"role": "user", "content": "<image>\nWhat colour is the shape?"}
        rows.append(
            {
                "image": f"images/{index}.png",
                "messages": [ask, {"role": "assistant", "content": scene.objects[0].colour}],
            }
        )
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
