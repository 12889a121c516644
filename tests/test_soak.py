"""Soak tests (slow): kill -9 training twenty times and check nothing is lost, torn or changed.

1. `python -m apertis_core train` killed 20 times at seeded, event-chosen moments (inside checkpoint writes,
   best.json and start-up writes, the final bundle write, and after a random number of steps), re-run on its
   run folder after each kill: the final model.safetensors holds bit-identical weights to an uninterrupted
   run's (same header, same tensor bytes), the metrics and model card are the uninterrupted run's, and no
   temporary or torn file is left (every checkpoint loads).
2. The same through the studio: kill -9 the worker right after a checkpoint, kill -9 the studio, restart
   it, resume; then kill the studio while the worker trains, restart (it re-attaches the worker), kill the
   worker, resume. The run finishes and its train/loss rows in the registry are steps 1..N exactly once.

Moments are counted in events (files appearing, steps logged), never in seconds; every kill freezes the
process first (SIGSTOP) so what it leaves is known. `python3 -m pytest -q -m slow tests/test_soak.py`.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from soak_support import (
    BEST_TMP,
    CHECKPOINT_TMP,
    FINAL_TMP,
    STARTUP_TMP,
    check_run_folder,
    freeze,
    kill9,
    last_logged_step,
    metric_lines,
    names,
    series,
    step_dirs,
    temp_entries,
    thaw,
    weights_difference,
)

from conftest import HANG_GUARD_S, REPO, SHAKESPEARE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="SIGSTOP/SIGKILL"),
    pytest.mark.timeout(6 * HANG_GUARD_S),  # only a hang guard: each wait below has its own
]

KILLS = 20
SEED = 20240613
SAVE_EVERY = 2
MAX_STEPS = 90  # enough for every kill to find its moment before the end (each costs at most a few saves)

# The model of tests/test_resume.py: experts (router noise), STRC, SLA and dropout, so RNG state matters.
RUN = {
    "model": {"preset": "apertis-nano", "d_model": 32, "n_layers": 2, "n_heads": 2, "n_experts": 4, "moe_every": 1,
              "strc_every": 2, "sla_chunk_size": 8, "dropout": 0.1, "router_noise": 0.1},
    "data": {"seq_len": 32, "vocab_size": 300},
    "train": {"batch_size": 2, "grad_accum": 2, "max_steps": MAX_STEPS, "warmup_steps": 4, "lr": 3e-3,
              "eval_every": 6, "eval_batches": 2, "log_every": 1, "save_every": SAVE_EVERY, "keep_last": 2,
              "precision": "fp32", "device": "cpu", "threads": 1, "seed": 7},
}  # fmt: skip


def write_config(tmp_path: Path, name: str) -> Path:
    data = tmp_path / "data.txt"
    if not data.exists():
        data.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    mapping = {**RUN, "data": {**RUN["data"], "path": str(data)}, "out_dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False), encoding="utf-8")
    return path


def launch(config: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    """The real entry point: a fresh run from the config, or (once a checkpoint exists) `apertis train
    RUN_DIR`, which resumes the run folder from its latest checkpoint (what the CLI tells a user to run)."""
    source = run_dir if step_dirs(run_dir) else config
    with log.open("ab") as out:
        out.write(f"\n=== apertis train {source}\n".encode())
        out.flush()
        return subprocess.Popen(
            [sys.executable, "-m", "apertis_core", "train", str(source), "--no-plan"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


# ---- kill moments ---------------------------------------------------------------------------------------
@dataclass
class Moment:
    """When to kill one process. `due` looks at cheap signs (file names, the logged step) on every poll;
    when it says yes the process is frozen and `confirm` checks the frozen run folder."""

    kind: str
    run_dir: Path
    start: int  # the latest checkpoint's step when the process was launched (0: fresh)
    rng: random.Random
    misses: int = 0
    detail: dict = field(default_factory=dict)
    stale: set = field(default_factory=set)  # temporary entries left by earlier kills: not this process's writes

    def __post_init__(self):
        self.stale = set(temp_entries(self.run_dir))
        metrics = self.run_dir / "metrics.jsonl"
        self.metrics_inode = metrics.stat().st_ino if metrics.exists() else None
        rng = self.rng
        if self.kind == "checkpoint":  # in a later write, at a chosen phase of it
            self.detail = {"after_saves": rng.randint(0, 2), "phase": rng.choice(["empty", "weights", "state", "any"])}
        elif self.kind == "steps":
            self.detail = {"k": rng.randint(0, 2 * SAVE_EVERY)}

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def new(self, folder: Path, pattern) -> bool:
        """Does `folder` hold a temporary entry matching `pattern` that this process made?"""
        prefix = "" if folder == self.run_dir else f"{folder.relative_to(self.run_dir)}/"
        return any(pattern.match(n) and prefix + n not in self.stale for n in names(folder))

    def fresh(self, entries: list[str]) -> list[str]:
        """The entries this process made (not left by an earlier kill)."""
        return [e for e in entries if not any(e == s or e.startswith(s + "/") for s in self.stale)]

    def saves(self) -> int:
        done = step_dirs(self.run_dir)
        return (max(done) - self.start) // SAVE_EVERY if done and max(done) > self.start else 0

    def due(self) -> bool:
        kind = self.kind
        if kind in ("first-checkpoint", "checkpoint"):
            if kind == "checkpoint" and self.saves() < self.detail["after_saves"]:
                return False
            return self.new(self.checkpoints, CHECKPOINT_TMP)
        if kind == "best":
            if self.misses >= 3:  # the validation loss stopped improving: take this save's checkpoint write
                return self.new(self.checkpoints, CHECKPOINT_TMP)
            return self.new(self.checkpoints, BEST_TMP)
        if kind == "startup":
            return self.new(self.run_dir, STARTUP_TMP) or self._training()
        if kind == "final":
            return self.new(self.run_dir, FINAL_TMP)
        if kind == "steps":  # this process saved at least once (start + SAVE_EVERY), then k more steps
            logged = last_logged_step(self.run_dir / "metrics.jsonl")
            return (
                max(step_dirs(self.run_dir), default=0) > self.start
                and logged >= self.start + SAVE_EVERY + self.detail["k"]
            )
        raise ValueError(kind)

    def _training(self) -> bool:
        """Has this process begun training (its start-up writes are over)? It replaces metrics.jsonl when
        training starts, so lines left by the killed process before it do not count."""
        metrics = self.run_dir / "metrics.jsonl"
        try:
            replaced = metrics.stat().st_ino != self.metrics_inode
        except OSError:
            return False
        return replaced and last_logged_step(metrics) > self.start

    def confirm(self, frozen: list[str]) -> bool:
        """`frozen`: the temporary entries of the frozen run folder. True: kill now."""
        kind = self.kind
        if kind == "steps":
            return True
        if kind == "startup":
            if not any(STARTUP_TMP.match(Path(e).name) for e in frozen):
                self.detail["missed"] = True  # the writes ended between the poll and the freeze: kill anyway
            return True
        if kind == "final":
            return any(FINAL_TMP.match(e) for e in frozen)
        if kind == "best" and self.misses < 3:
            hit = any(BEST_TMP.match(Path(e).name) for e in frozen)
            self.misses += not hit
            return hit
        writes = [e for e in frozen if CHECKPOINT_TMP.match(e.removeprefix("checkpoints/"))]
        if not writes:
            self.misses += self.kind == "best"
            return False
        inside = [Path(e).name for e in frozen if e.startswith(writes[0] + "/")]
        phase = self.detail.get("phase", "any") if self.misses < 3 else "any"
        hit = {
            "empty": not inside,
            "weights": any(n.startswith(".model.safetensors.") for n in inside),
            "state": "trainer_state.pt" in inside and "meta.json" not in inside,
            "any": True,
        }[phase]
        self.misses += not hit
        return hit


def kill_at(proc: subprocess.Popen, moment: Moment, log: Path) -> dict | None:
    """Poll until `moment` is due and confirmed, then SIGKILL the frozen process; what it left, for the record.
    None: the run finished before the final bundle write could be caught (the caller runs it again)."""
    deadline = time.monotonic() + HANG_GUARD_S
    metrics = moment.run_dir / "metrics.jsonl"
    while True:
        if proc.poll() == 0 and moment.kind == "final":
            return None
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended (exit {proc.returncode}) before its {moment.kind} kill; "
                f"MAX_STEPS is too small or the run failed:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no {moment.kind} moment within {HANG_GUARD_S} s:\n{log.read_text()[-3000:]}")
        if moment.due() and freeze(proc.pid):
            frozen = moment.fresh(temp_entries(moment.run_dir))
            if moment.confirm(frozen):
                step = last_logged_step(metrics)
                kill9(proc)
                return {"kind": moment.kind, "from": moment.start, "step": step, "left": frozen, **moment.detail}
            thaw(proc.pid)
        time.sleep(0.001)


def kill_plan(rng: random.Random) -> list[str]:
    """The first kill is inside the very first checkpoint write (the next start is a fresh one), the last
    inside the final bundle write; in between, a seeded mix of the other moments."""
    middle = ["checkpoint"] * 6 + ["best"] * 2 + ["startup"] * 3 + ["steps"] * 7
    rng.shuffle(middle)
    return ["first-checkpoint", *middle, "final"]


def test_kill_9_twenty_times_and_the_resumed_model_equals_the_uninterrupted_one(tmp_path):
    straight = write_config(tmp_path, "straight")
    done = subprocess.run(
        [sys.executable, "-m", "apertis_core", "train", str(straight), "--no-plan"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    config, run_dir, log = write_config(tmp_path, "soak"), tmp_path / "soak", tmp_path / "soak.log"
    rng = random.Random(SEED)
    kills = []
    for kind in kill_plan(rng):
        for _attempt in range(5):  # more than one only when a finished run's bundle write slipped past the poll
            moment = Moment(kind, run_dir, max(step_dirs(run_dir), default=0), rng)
            proc = launch(config, run_dir, log)
            try:
                kill = kill_at(proc, moment, log)
            finally:
                if proc.poll() is None:
                    kill9(proc)
            if kill is not None:
                kills.append(kill)
                break
        else:
            raise AssertionError("five runs wrote their final bundle without the poll seeing it")
    proc = launch(config, run_dir, log)
    assert proc.wait(HANG_GUARD_S) == 0, log.read_text()[-3000:]

    report = "\n".join(f"kill {i:2d}: {k}" for i, k in enumerate(kills, 1))
    print(report)
    assert len(kills) == KILLS
    inside = [k for k in kills if k["left"] and not k.get("missed")]
    assert kills[0]["left"] and any(CHECKPOINT_TMP.match(e.removeprefix("checkpoints/")) for e in kills[0]["left"])
    assert any(FINAL_TMP.match(e) for e in kills[-1]["left"]), report
    assert len(inside) >= 10, f"only {len(inside)} kills landed inside a write:\n{report}"

    # Everything that is wrong, at once: left-over or torn files, other weights, other or repeated metrics.
    problems = check_run_folder(run_dir)
    difference = weights_difference(
        run_dir / "final" / "model.safetensors", tmp_path / "straight" / "final" / "model.safetensors"
    )
    if difference:
        problems.append(f"final/model.safetensors: {difference}")
    cards = [
        (folder / "final" / "README.md").read_text(encoding="utf-8").splitlines()[1:]
        for folder in (tmp_path / "straight", run_dir)
    ]
    if cards[0] != cards[1]:  # the same but for the title (the run folder's name)
        problems.append(f"final/README.md differs: {sorted(set(cards[0]) ^ set(cards[1]))}")
    a, b = metric_lines(tmp_path / "straight" / "metrics.jsonl"), metric_lines(run_dir / "metrics.jsonl")
    steps = [s for s, _ in series(b, "train/loss")]
    if steps != list(range(1, MAX_STEPS + 1)):
        problems.append(f"metrics.jsonl train/loss steps are not 1..{MAX_STEPS} once each: {steps}")
    for key in ("train/loss", "grad_norm", "lr", "val/loss"):
        if series(a, key) != series(b, key):
            extra = sorted(set(series(b, key)) - set(series(a, key)))
            repeated = sorted({s for s, _ in series(b, key) if [t for t, _ in series(b, key)].count(s) > 1})
            problems.append(
                f"metrics.jsonl {key} differs from the uninterrupted run's (steps repeated: "
                f"{repeated}, records not in it: {extra[:3]})"
            )
    assert not problems, "\n".join(problems) + "\n" + report


# ---- through the studio ---------------------------------------------------------------------------------
STUDIO_STEPS = 200  # a few seconds of training a round: time enough to catch it training
TINY = "model.d_model=32\nmodel.n_layers=2\nmodel.n_heads=2\nmodel.max_seq_len=32\ntrain.threads=1\ntrain.device=cpu"


class Studio:
    """`python -m studio` on one workspace, started again after each kill -9; output to a log file."""

    def __init__(self, workspace: Path, log: Path):
        self.workspace, self.log, self.proc, self.port = workspace, log, None, None

    def start(self):
        from gradio_client import Client

        from conftest import _free_port

        self.port = self.port or _free_port()  # a restart asks for the same port
        offset = self.log.stat().st_size if self.log.exists() else 0
        command = [
            sys.executable,
            "-m",
            "studio",
            "--no-browser",
            "--port",
            str(self.port),
            "--workspace",
            str(self.workspace),
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            text = self.log.read_bytes()[offset:].decode("utf-8", errors="replace")
            if "is running at " in text:
                url = text.split("is running at ", 1)[1].split()[0]
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the studio did not start (exit {self.proc.poll()}):\n{text[-3000:]}")
            time.sleep(0.1)
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(url, timeout=HANG_GUARD_S) as response:
            assert response.status == 200
        self.client = Client(url, verbose=False)
        return self.client

    def kill9(self):
        kill9(self.proc)

    def stop(self):
        from benchmarks.studio import stop_studio

        if self.proc is not None and self.proc.poll() is None:
            stop_studio(self.proc)


def wait_until(predicate, what: str, poll: float = 0.05):
    deadline = time.monotonic() + HANG_GUARD_S
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {HANG_GUARD_S} s for {what}")
        time.sleep(poll)
    return value


def status_of(client, run_id) -> dict:
    return client.predict(run_id, api_name="/run_status")[0]


def kill_worker_after_a_checkpoint(pid: int, run_dir: Path, after: int, store, run_id: str) -> dict:
    """SIGKILL the worker the moment a checkpoint beyond step `after` is complete (its folder renamed into
    place): the registry may not have received the last steps' metrics yet, which the resume must not lose."""
    step = wait_until(lambda: max([s for s in step_dirs(run_dir) if s > after], default=0), "a checkpoint", poll=0.002)
    os.kill(pid, 9)
    wait_until(lambda: not psutil_alive(pid), "the worker to die")
    in_registry = store.series(run_id, "train/loss")[0]
    return {"killed": "worker", "after checkpoint": step, "train/loss steps in the registry then": _spans(in_registry)}


def _spans(steps: list[int]) -> str:
    """[1, 2, 3, 7, 8] -> '1-3, 7-8'."""
    spans: list[list[int]] = []
    for step in steps:
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans) or "none"


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_soak_run(client) -> str:
    """Start a tiny STUDIO_STEPS-step run on the demo text through the API; its id."""
    from studio.tabs import train

    _, dataset_id = client.predict("text", api_name="/add_demo_data")
    values = dict(train.BASIC_DEFAULTS, **train.ADVANCED_DEFAULTS)
    values.update(max_steps=STUDIO_STEPS, batch_size=2, seq_len=32, vocab_size=262, log_every=1, save_every=4,
                  eval_every=10, sample_every=0, warmup_steps=1, precision="fp32", device="cpu", extra=TINY)  # fmt: skip
    message, run_id = client.predict(
        "soak", dataset_id, "apertis-nano", *[values[f] for f in train.FIELDS], api_name="/start_run"
    )
    assert run_id, message
    return run_id


def metric_problems(store, run_id: str, run_dir: Path) -> list[str]:
    """Steps missing or repeated in the registry or metrics.jsonl, and where the two disagree."""
    problems = []
    steps, losses = store.series(run_id, "train/loss")
    if steps != list(range(1, STUDIO_STEPS + 1)):
        missing = sorted(set(range(1, STUDIO_STEPS + 1)) - set(steps))
        repeated = sorted({s for s in steps if steps.count(s) > 1})
        problems.append(f"registry train/loss: steps missing {missing}, repeated {repeated}")
    val_steps, _ = store.series(run_id, "val/loss")
    if len(val_steps) != len(set(val_steps)):
        problems.append(f"registry val/loss repeated: steps {val_steps}")
    on_disk = series(metric_lines(run_dir / "metrics.jsonl"), "train/loss")
    if [s for s, _ in on_disk] != list(range(1, STUDIO_STEPS + 1)):
        problems.append("metrics.jsonl train/loss steps are not 1..N once each")
    differing = [s for s, v in zip(steps, losses, strict=True) if dict(on_disk).get(s) != v]
    if differing:
        problems.append(f"registry train/loss differs from metrics.jsonl at steps {differing[:10]}")
    return problems


def test_studio_worker_and_studio_killed_twice_the_resumed_run_has_every_step_once(tmp_path):
    from studio.store import Store

    workspace = tmp_path / "ws"
    studio, kills = Studio(workspace, tmp_path / "studio.log"), []
    try:
        client = studio.start()
        run_id = start_soak_run(client)
        store = Store(workspace)
        run_dir = Path(store.get_run(run_id)["out_dir"])

        # Round 1: the worker dies right after a checkpoint, then the studio; a new studio resumes the run.
        pid = wait_until(lambda: store.get_run(run_id)["pid"], "the worker's pid")
        kills.append(kill_worker_after_a_checkpoint(pid, run_dir, after=0, store=store, run_id=run_id))
        studio.kill9()
        kills.append({"killed": "studio"})
        client = studio.start()
        wait_until(lambda: status_of(client, run_id)["status"] in ("failed", "interrupted"), "the run written off")
        resumed_from = max(step_dirs(run_dir))
        before = (run_dir / "metrics.jsonl").stat().st_ino
        assert "queued to resume from step_" in client.predict(run_id, api_name="/resume_run")

        # Round 2: the studio dies while the worker trains (frozen meanwhile, so it cannot finish first); the
        # next studio re-attaches it; then the worker dies right after a checkpoint and is resumed once more.
        def training_again():  # the resumed worker replaced metrics.jsonl at its start and logged a new step
            run = store.get_run(run_id)
            assert run["status"] in ("queued", "running"), f"the resumed run is {run['status']}: {run['exit_reason']}"
            metrics = run_dir / "metrics.jsonl"
            fresh = metrics.exists() and metrics.stat().st_ino != before
            return fresh and last_logged_step(metrics) > resumed_from and run["status"] == "running" and run["pid"]

        pid = wait_until(training_again, "the resumed worker to train", poll=0.005)
        assert freeze(pid)
        after = max(step_dirs(run_dir))
        studio.kill9()
        kills.append({"killed": "studio", "worker frozen at step": last_logged_step(run_dir / "metrics.jsonl")})
        client = studio.start()
        assert status_of(client, run_id)["status"] == "running"  # re-attached, not written off
        thaw(pid)
        kills.append(kill_worker_after_a_checkpoint(pid, run_dir, after=after, store=store, run_id=run_id))
        wait_until(lambda: status_of(client, run_id)["status"] in ("failed", "interrupted"), "the studio to see it die")
        assert "queued to resume from step_" in client.predict(run_id, api_name="/resume_run")
        final = wait_until(
            lambda: (s := status_of(client, run_id))["status"] in ("finished", "failed") and s, "the run to end"
        )
        assert final["status"] == "finished", final
    finally:
        studio.stop()

    report = "\n".join(f"{k}" for k in kills)
    print(report)
    problems = metric_problems(store, run_id, run_dir)
    problems += check_run_folder(run_dir)
    assert not problems, "\n".join(problems) + "\nkills:\n" + report
