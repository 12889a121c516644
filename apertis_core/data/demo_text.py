"""Demo text: a small English-like corpus made from templates, deterministic, license-free and quick to learn."""

from __future__ import annotations

import random
from pathlib import Path

from ..fileio import atomic_write_text


def write_demo_text(path: str | Path, lines: int = 3000, seed: int = 0) -> Path:
    """Write `lines` template sentences (one a line) to `path` and return it; the same seed, the same text."""
    rng = random.Random(seed)
    who = ["the cat", "a small robot", "my sister", "the old sailor", "a curious fox", "the teacher"]
    did = ["found", "painted", "carried", "lost", "counted", "described"]
    what = ["a red box", "three blue stones", "the map", "a green kite", "two yellow apples", "the key"]
    where = ["near the river", "in the garden", "on the hill", "under the bridge", "at the market"]
    when = ["in the morning", "after lunch", "at night", "before the rain"]
    text = []
    for _ in range(lines):
        sentence = f"{rng.choice(who)} {rng.choice(did)} {rng.choice(what)} {rng.choice(where)} {rng.choice(when)}."
        text.append(sentence[0].upper() + sentence[1:])
    atomic_write_text(path, "\n".join(text) + "\n")
    return Path(path)
