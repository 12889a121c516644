"""CUDA paths of the trainer: bf16 autocast, fp16 with loss scaling, torch.compile, planning on the GPU.

Skipped without a CUDA GPU; run them on a GPU machine with `python -m pytest tests/test_training_cuda.py`.
"""

import pytest
import torch
from test_training import tiny_run

from apertis_core.bundle import load_bundle
from apertis_core.training import plan_run, read_metrics, train
from apertis_core.training.hardware import peak_flops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

APERTIS_TINY = {
    "preset": "apertis-nano",
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 2,
    "n_experts": 4,
    "strc_every": 2,
    "sla_chunk_size": 16,
}


def train_losses(run_dir):
    return [m["train/loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in m]


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_mixed_precision_training_on_cuda_learns(tmp_path, precision):
    run = tiny_run(
        tmp_path,
        model=APERTIS_TINY,
        device="cuda",
        precision=precision,
        max_steps=60,
        lr=3e-3,
        warmup_steps=5,
        eval_every=30,
        batch_size=8,
    )
    result = train(run)
    losses = train_losses(tmp_path / "run")
    assert result.steps == 60 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    # The bundle is written from GPU tensors and loads on the CPU with the same outputs (fp32 weights).
    model, _ = load_bundle(tmp_path / "run" / "final")
    assert model.embed.weight.device.type == "cpu" and result.final_val_loss is not None


def test_compiled_training_on_cuda_matches_the_eager_loss_curve(tmp_path):
    eager = tiny_run(tmp_path, "eager", device="cuda", precision="fp32", max_steps=8)
    compiled = tiny_run(tmp_path, "compiled", device="cuda", precision="fp32", max_steps=8, compile=True)
    train(eager)
    train(compiled)
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), abs=2e-3)
    assert "_orig_mod" not in (tmp_path / "compiled" / "final" / "model.safetensors").read_bytes()[:20000].decode(
        "latin1"
    )


def test_plan_on_cuda_picks_bf16_and_measures_the_gpu(tmp_path):
    plan = plan_run(tiny_run(tmp_path, device="auto", precision="auto"))
    assert plan.device == "cuda" and plan.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert plan.step_seconds > 0
    assert peak_flops(torch.device("cuda"), torch.bfloat16) > 1e12
