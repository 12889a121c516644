"""FSDP2 (`train.parallel=fsdp`): 2 torchrun processes on CPU (gloo) do the math of one, write sharded
checkpoints that resume the same trajectory, and the studio starts a run on every GPU through torchrun.

This file is also the torchrun entry point of the tests: `python -m torch.distributed.run ... test_fsdp.py
RUN.yaml [CHECKPOINT]` trains RUN.yaml, resuming from CHECKPOINT when given.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_ddp import DENSE_APERTIS
from test_studio_jobs import _wait_status, tiny_run_yaml
from test_training import tiny_run

from apertis_core import ApertisModel
from apertis_core.bundle import load_bundle, save_weights
from apertis_core.configio import ConfigError
from apertis_core.training import RunConfig, TrainConfig, read_metrics, train
from apertis_core.training.checkpoint import SHARDS_DIR, checkpoint_dir
from apertis_core.training.distributed import DistContext
from apertis_core.training.session import restore_state
from studio import gpus, jobs, run_plan
from studio.jobs import JobManager
from studio.store import Store

from conftest import HANG_GUARD_S, REPO

STEPS = 4
# Per step: 2 processes x batch 1 x 2 micro-batches == 1 process x batch 2 x 2 micro-batches. lr 5e-5 as in
# test_ddp.py: the weights move far beyond the tolerance while summation-order rounding stays below it.
# Every path that must be collective under FSDP runs: evaluation, samples, checkpoints, the final bundle.
RUN = dict(
    model=DENSE_APERTIS,
    max_steps=STEPS,
    grad_accum=2,
    eval_every=2,
    save_every=2,
    sample_every=2,
    sample_prompts=["The"],
    sample_tokens=4,
    warmup_steps=1,
    lr=5e-5,
    threads=1,
)


def torchrun(config: Path, *args: str, nproc: int = 2) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run(
        [*command, __file__, str(config), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def curve(run_dir: Path, key: str) -> list[tuple[int, object]]:
    return [(m["step"], m[key]) for m in read_metrics(run_dir / "metrics.jsonl") if key in m]


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    model_a, _ = load_bundle(a)
    model_b, _ = load_bundle(b)
    for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-process FSDP run of STEPS steps, with a sharded checkpoint every 2 steps."""
    tmp = tmp_path_factory.mktemp("fsdp")
    config = tiny_run(tmp, "fsdp", batch_size=1, parallel="fsdp", **RUN)
    config.save(tmp / "fsdp.yaml")
    torchrun(tmp / "fsdp.yaml")
    return tmp / "fsdp"


def test_two_fsdp_processes_match_one_process_with_the_same_global_batch(fsdp_run, tmp_path):
    single = tiny_run(tmp_path, "single", batch_size=2, **RUN)
    train(single)
    single_dir = tmp_path / "single"

    assert_same_weights(single_dir / "final", fsdp_run / "final", atol=1e-5)  # the gathered, full weights
    trained, _ = load_bundle(single_dir / "final")
    torch.manual_seed(single.train.seed)  # the trainer seeds like this before building the model
    assert (ApertisModel(trained.config).embed.weight - trained.embed.weight).abs().max() > 1e-4  # moved far
    for key in ("train/loss", "val/loss"):
        one, two = curve(single_dir, key), curve(fsdp_run, key)
        assert [s for s, _ in one] == [s for s, _ in two] and len(one) >= 2
        assert [v for _, v in two] == pytest.approx([v for _, v in one], abs=1e-5)
    assert curve(fsdp_run, "sample/text") == curve(single_dir, "sample/text")  # generated from gathered weights

    checkpoint = checkpoint_dir(fsdp_run, 2)
    shards = sorted(p.name for p in (checkpoint / SHARDS_DIR).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own part
    model, _ = load_bundle(checkpoint)  # and the checkpoint still loads like a bundle, with the full weights
    assert model.embed.weight.shape == (model.config.vocab_size, model.config.d_model)
    assert not list((fsdp_run / "checkpoints").glob(".*"))  # no temporary folder left behind


def test_sharded_checkpoint_resumes_the_same_trajectory(fsdp_run, tmp_path):
    # A copy of the step-2 checkpoint whose model.safetensors is replaced by other weights: the resume must
    # take the weights (and Adam moments) from the shards, or it could not continue the trajectory.
    checkpoint = tmp_path / "copied" / "step_0000002"
    shutil.copytree(checkpoint_dir(fsdp_run, 2), checkpoint)
    torch.manual_seed(123)
    save_weights(checkpoint / "model.safetensors", ApertisModel(load_bundle(checkpoint)[0].config))

    resumed = tiny_run(tmp_path, "resumed", batch_size=1, parallel="fsdp", **RUN)
    resumed.save(tmp_path / "resumed.yaml")
    torchrun(tmp_path / "resumed.yaml", str(checkpoint))
    assert_same_weights(fsdp_run / "final", tmp_path / "resumed" / "final", atol=1e-6)
    after = [(s, v) for s, v in curve(fsdp_run, "train/loss") if s > 2]
    assert curve(tmp_path / "resumed", "train/loss") == pytest.approx(after, abs=1e-6) and len(after) == 2


def test_one_process_with_fsdp_trains_plainly(tmp_path):
    config = tiny_run(tmp_path, "alone", model=DENSE_APERTIS, max_steps=2, parallel="fsdp", threads=1)
    result = train(config)  # nothing to shard over: the ordinary single-process run and checkpoints
    assert result.steps == 2 and not (checkpoint_dir(result.out_dir, 2) / SHARDS_DIR).exists()


def test_bad_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="gpus=all needs device auto or cuda"):
        TrainConfig(gpus="all", device="cpu")
    with pytest.raises(ConfigError, match="parallel"):
        RunConfig().override(["train.parallel=zero3"])
    with pytest.raises(ConfigError, match="LoRA adapters .* use train.parallel=ddp"):
        RunConfig().override(["train.parallel=fsdp", "finetune.base=some/bundle", "finetune.method=lora"])
    cpu = torch.device("cpu")
    state = {"version": 1, "world_size": 2, "sharded": True}
    ddp = SimpleNamespace(ctx=DistContext(0, 2, 0, cpu, parallel="ddp"))
    with pytest.raises(ConfigError, match="written with train.parallel=fsdp; resume it with --set train.parallel=fsdp"):
        restore_state(ddp, state, Path("ck"))
    fsdp = SimpleNamespace(ctx=DistContext(0, 2, 0, cpu, parallel="fsdp"))
    with pytest.raises(ConfigError, match="written with train.parallel=ddp"):
        restore_state(fsdp, {**state, "sharded": False}, Path("ck"))


# ---- the studio: "GPUs to use: all" -------------------------------------------------------------------
def test_all_gpus_is_refused_without_two_gpus(monkeypatch, tmp_path):
    monkeypatch.setattr(gpus, "local_gpu_count", lambda: 1)
    refusal = gpus.gpu_refusal({"gpus": "all"})
    assert "needs two or more CUDA GPUs" in refusal and "this computer has 1" in refusal and "set it to one" in refusal
    assert gpus.gpu_refusal({"gpus": "one"}) is None and gpus.gpu_processes("train: {gpus: one}") == (1, None)
    services = SimpleNamespace(store=SimpleNamespace(get_dataset=lambda _: {"path": str(tmp_path), "summary": {}}))
    check = run_plan.check_start(services, "data", {"train": {"gpus": "all"}})
    assert not check.ok and check.message == refusal
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(gpus, "local_gpu_count", lambda: 8)
    assert "packaged app" in gpus.gpu_refusal({"gpus": "all"})  # no torchrun in the frozen app


def test_all_gpus_command_starts_the_worker_once_per_gpu_through_torchrun(monkeypatch, tmp_path):
    monkeypatch.setattr(gpus, "local_gpu_count", lambda: 4)
    assert gpus.gpu_processes("train: {gpus: all}") == (4, None)
    command = gpus.torchrun_command(jobs.worker_command(tmp_path, "run-1"), 4)
    assert command == [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"),
        *("-m", "studio.worker", "--workspace", str(tmp_path), "--run-id", "run-1"),
    ]


def test_studio_run_on_all_gpus_trains_under_torchrun_and_resumes(monkeypatch, tmp_path):
    """The real worker, started by the job manager through torchrun: 2 gloo processes stand in for 2 GPUs."""
    from apertis_core.data.demo_text import write_demo_text

    monkeypatch.setattr(gpus, "local_gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # device auto trains on the CPU, whatever this machine has
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    manager = JobManager(Store(tmp_path / "ws"))
    mapping = yaml.safe_load(tiny_run_yaml(write_demo_text(tmp_path / "data.txt", lines=200), steps=STEPS))
    mapping["train"].update(device="auto", gpus="all", parallel="fsdp")
    run = manager.submit("two", yaml.safe_dump(mapping))
    _wait_status(manager, run["id"], ["finished", "failed", "interrupted"])
    done = manager.store.get_run(run["id"])
    assert done["status"] == "finished" and done["step"] == STEPS, done["log_tail"]
    log = (Path(done["out_dir"]) / "worker.log").read_text()
    assert log.count(f"run {run['id']} finished") == 1  # rank 0 alone records and reports the run
    assert (checkpoint_dir(done["out_dir"], 2) / SHARDS_DIR / "__1_0.distcp").is_file()  # rank 1 trained too
    assert manager.store.series(run["id"], "train/loss")[0] == list(range(1, STEPS + 1))
    assert len(manager.store.list_models()) == 1

    manager.train_more(run["id"], 2)  # resumes the sharded checkpoint, again through torchrun
    _wait_status(manager, run["id"], ["finished", "failed", "interrupted"])
    more = manager.store.get_run(run["id"])
    assert more["status"] == "finished" and more["step"] == STEPS + 2, more["log_tail"]


if __name__ == "__main__":  # one torchrun worker
    train(RunConfig.load(sys.argv[1]), resume_from=sys.argv[2] if len(sys.argv) > 2 else None)
