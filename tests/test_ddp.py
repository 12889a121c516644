"""DDP: `torchrun --nproc_per_node 2` on CPU (gloo) does the same math as one process with the same global batch.

This file is also the torchrun entry point of the test: `python -m torch.distributed.run ... test_ddp.py RUN.yaml`.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import tiny_run

from apertis_core import ApertisModel
from apertis_core.bundle import load_bundle
from apertis_core.training import RunConfig, read_metrics, train

from conftest import HANG_GUARD_S, REPO

# SLA + STRC, no routed experts: the load-balancing loss of a batch is not the mean of its halves' losses,
# so only a dense model has exactly the same objective when the batch is split over processes.
DENSE_APERTIS = {
    "preset": "apertis-nano",
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "n_experts": 0,
    "strc_every": 2,
    "sla_chunk_size": 8,
}


def torchrun(config: Path, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
        str(config),
    ]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    steps = 4
    # Per step: 2 processes x batch 1 x 2 micro-batches == 1 process x batch 2 x 2 micro-batches.
    single = tiny_run(
        tmp_path,
        "single",
        model=DENSE_APERTIS,
        max_steps=steps,
        batch_size=2,
        grad_accum=2,
        eval_every=2,
        warmup_steps=1,
        lr=5e-5,
        threads=1,
    )
    ddp = tiny_run(
        tmp_path,
        "ddp",
        model=DENSE_APERTIS,
        max_steps=steps,
        batch_size=1,
        grad_accum=2,
        eval_every=2,
        warmup_steps=1,
        lr=5e-5,
        threads=1,
    )
    ddp.save(tmp_path / "ddp.yaml")
    done = torchrun(tmp_path / "ddp.yaml", nproc=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    train(single)

    model_1, _ = load_bundle(tmp_path / "single" / "final")
    model_2, _ = load_bundle(tmp_path / "ddp" / "final")
    for (name, a), b in zip(model_1.state_dict().items(), model_2.state_dict().values(), strict=True):
        # Summation order differs (two processes, then an all-reduce); where a gradient is a near-cancelling
        # sum, Adam's g / sqrt(v) turns that rounding into up to a few percent of lr. Hence lr = 5e-5 here:
        # the weights move by ~lr per step, far above the tolerance after 4 steps; the rounding stays below it.
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)
    torch.manual_seed(single.train.seed)  # the trainer seeds like this before building the model
    initial = ApertisModel(model_1.config)
    assert (initial.embed.weight - model_1.embed.weight).abs().max() > 1e-4  # moved well beyond the tolerance

    def curve(run, key):
        return [(m["step"], m[key]) for m in read_metrics(tmp_path / run / "metrics.jsonl") if key in m]

    for key in ("train/loss", "val/loss"):
        one, two = curve("single", key), curve("ddp", key)
        assert [s for s, _ in one] == [s for s, _ in two] and len(one) >= 2
        assert [v for _, v in two] == pytest.approx([v for _, v in one], abs=1e-5)
    assert curve("ddp", "progress/tokens")[-1][1] == curve("single", "progress/tokens")[-1][1]


if __name__ == "__main__":  # one torchrun worker
    train(RunConfig.load(sys.argv[1]))
