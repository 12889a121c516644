"""End to end through the real entry point: `python -m apertis_core train` on a slice of tinyshakespeare,
the validation loss well below the characters' unigram entropy, `generate` prints text, and
`export` -> `load_bundle` gives the trained model's logits exactly."""

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

from apertis_core.bundle import load_bundle
from apertis_core.training import read_metrics

from conftest import HANG_GUARD_S, SHAKESPEARE

REPO = Path(__file__).resolve().parents[1]
SLICE_CHARS = 200_000

# Tiny apertis-nano family model (SLA, experts, STRC), byte-level tokenizer (vocab_size <= 262).
CONFIG = """\
model:
  preset: apertis-nano
  d_model: 64
  n_layers: 2
  n_heads: 4
  n_experts: 4
  sla_chunk_size: 16
  max_seq_len: 64
data:
  path: {data}
  seq_len: 64
  vocab_size: 262
  split: tail
train:
  batch_size: 16
  lr: 3.0e-3
  warmup_steps: 20
  max_steps: 300
  eval_every: 150
  eval_batches: 10
  save_every: 0
  precision: fp32
  device: cpu
  threads: 1
out_dir: {out}
"""


def apertis(*args, timeout=HANG_GUARD_S):
    done = subprocess.run(
        [sys.executable, "-m", "apertis_core", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"apertis {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr[-2000:]}"
    )
    return done.stdout


def unigram_entropy(text: str) -> float:
    """Nats per character of the best model that ignores context: the bar a language model must clear."""
    counts, total = Counter(text), len(text)
    return -sum(n / total * math.log(n / total) for n in counts.values())


def test_train_generate_export_on_tinyshakespeare(tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:SLICE_CHARS]
    data = tmp_path / "shakespeare.txt"
    data.write_text(text, encoding="utf-8")
    config = tmp_path / "tiny.yaml"
    run = tmp_path / "run"
    config.write_text(CONFIG.format(data=data.as_posix(), out=run.as_posix()))

    out = apertis("train", config, "--set", "train.log_every=25")
    assert "total steps     300" in out and "Model bundle:" in out  # the plan, then where the model is
    val_losses = [r["val/loss"] for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r]
    entropy = unigram_entropy(text[: int(len(text) * 0.9)])  # the training split (tail split: first 90%)
    assert val_losses[-1] < entropy - 0.6, f"val loss {val_losses[-1]:.3f} vs unigram entropy {entropy:.3f}"

    generated = apertis(
        "generate", "--model", run / "final", "--prompt", "ROMEO:", "--max-new-tokens", "60", "--seed", "0"
    )
    assert generated.startswith("ROMEO:") and len(generated.strip()) > len("ROMEO:") + 20

    exported = tmp_path / "exported"
    apertis("export", "--checkpoint", run, "--out", exported)
    trained, tokenizer = load_bundle(run / "final")
    loaded, loaded_tokenizer = load_bundle(exported)
    ids = torch.tensor([tokenizer.encode(text[:64])])
    with torch.no_grad():
        assert torch.equal(trained(ids).logits, loaded(ids).logits)
    assert loaded_tokenizer.to_json_str() == tokenizer.to_json_str()
