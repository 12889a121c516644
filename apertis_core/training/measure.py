"""Timing a run's start before it trains: data, tokenizer, model, a few real steps, a few sample tokens.

An ETA is only as good as what was timed. `measure_run` does what `train()` will do first: it reads the
run's data, gets its tokenizer, builds its model (with the image encoder, if the data has images), trains a
few real steps on real batches and generates a few sample tokens, all with the thread count `train()` will
use (`train_threads`). `measure_in_fresh_process` runs it in a new process of this program, as a training
worker is, so the caller's own thread setting, imports and memory do not colour the figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..model import ApertisModel, ModelConfig
from ..tokenizer import Tokenizer
from .build import fresh_model_config, image_cache, start_model
from .config import RunConfig, TrainConfig
from .hardware import peak_flops, pick_device
from .optim import build_optimizer
from .precision import Precision, resolve_precision

MEASURED_STEPS = 4  # timed steps after the warm-up one; their median is the pace, so one odd step moves it little
MEASURED_CHARS = 1_000_000  # data the measurement reads; the setup time of more data is scaled from it
SAMPLE_TOKENS_TIMED = 8  # tokens generated to time sample generations
IGNORE_INDEX = -100  # the trainer's label for positions without a loss (see trainer.py)
FRESH_PROCESS_TIMEOUT_S = 600.0  # a measurement this slow means something is wrong; say so instead of waiting


@dataclass
class Measurement:
    """What timing the start of a run found; `plan_run` builds the ETA from it."""

    step_s: float  # median seconds per optimizer step after the first
    first_step_s: float  # the first step: allocation and kernel choice make it slower than the rest
    setup_s: float  # reading the data, training the tokenizer, building the model: the trainer's start
    sample_token_s: float = 0.0  # seconds per generated token of a sample generation (0 = not timed)
    threads: int = 0  # torch threads the steps ran with
    startup_s: float = 0.0  # starting a fresh process and importing torch (0 = timed in a running process)
    where: str = "in this process"
    val_batches: int | None = None  # batches in one pass over the validation set (None = not known)


@contextlib.contextmanager
def train_threads(cfg: TrainConfig) -> Iterator[int]:
    """torch's threads while training: `cfg.threads`, or the process's own default when 0; yields the count.

    One helper for `train()` and for the measurement, so a plan times its steps with the threads the run
    will have. The setting is process-wide, so the caller's comes back afterwards."""
    before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def measure_run(run_config: RunConfig, steps: int = MEASURED_STEPS, max_chars: int = MEASURED_CHARS) -> Measurement:
    """Time the start of `train(run_config)` in this process: data, tokenizer and model, then one warm-up
    and `steps` timed training steps on real batches, then a few sample tokens when the run writes samples.

    Data beyond `max_chars` is not read into the tokenizer or windows; their time is scaled from the part
    read. The global RNG is forked, so a run that is measured first trains exactly like one that is not.
    Raises what the trainer would raise on a config or data it cannot train (ConfigError says what to do).
    """
    cfg = run_config.train
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    with train_threads(cfg) as threads, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        started = time.perf_counter()
        model, tokenizer, step, data_s, val_batches = _measured_setup(run_config, device, precision, max_chars)
        setup_s = time.perf_counter() - started + data_s
        first_s, step_s = _time_steps(step, steps, device)
        token_s = _time_sampling(model, tokenizer, precision) if cfg.sample_every > 0 and cfg.sample_prompts else 0.0
    return Measurement(step_s, first_s, setup_s, token_s, threads, val_batches=val_batches)


def _measured_setup(run_config: RunConfig, device: torch.device, precision: Precision, max_chars: int):
    """(model, tokenizer, one training step, seconds the unread data would have added, batches in one pass
    over the validation set) for `measure_run`."""
    from ..data import BatchLoader, build_datasets, corpus_texts, load_dataset

    cfg = run_config.train
    records, _ = load_dataset(run_config.data.path)
    part, share = leading_part(records, max_chars)
    started = time.perf_counter()
    base = start_model(run_config)
    if base:
        tokenizer = base[1]
    elif run_config.data.tokenizer:
        tokenizer = Tokenizer.load(run_config.data.tokenizer)
    else:
        tokenizer = Tokenizer.train(corpus_texts(part), run_config.data.vocab_size)
    model_config = base[0].config if base else fresh_model_config(run_config.model, tokenizer)
    images = image_cache(model_config, run_config.data.image_augment)
    train_data, val_data = build_datasets(part, tokenizer, run_config.data, images.file_tokens if images else None)
    unread_s = (time.perf_counter() - started) * (1 / share - 1)  # tokenizer and windows grow with the data
    val_batches = math.ceil(len(val_data) / share / cfg.batch_size)
    model = (base[0] if base else ApertisModel(model_config)).to(device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, device)
    loader = BatchLoader(train_data, cfg.batch_size, seed=cfg.seed)
    peak_flops(device, precision.dtype)  # the trainer measures it before its first step (once per process)
    step = _training_step(model, optimizer, loader, images, cfg, precision, device)
    return model, tokenizer, step, unread_s, val_batches


def leading_part(records: list, max_chars: int) -> tuple[list, float]:
    """The first records up to `max_chars` characters (a long plain text is cut), and their share of all."""
    total = sum(r.characters for r in records)
    if total <= max_chars:
        return records, 1.0
    part, taken = [], 0
    for record in records:
        left = max_chars - taken
        if left <= 0:
            break
        if record.characters > left and record.kind == "text" and not record.images:
            record = dataclasses.replace(record, text=record.text[:left])
        part.append(record)
        taken += record.characters
    return part, taken / total


def _training_step(
    model, optimizer, loader, images, cfg: TrainConfig, precision: Precision, device
) -> Callable[[], None]:
    """One optimizer step as the trainer takes it: grad_accum micro-batches, clipping, the optimizer."""
    scaler = precision.grad_scaler()
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf

    def step() -> None:
        for _ in range(cfg.grad_accum):
            batch = next(loader)
            pixels = images.batch(batch.images, train=True, device=device) if images else None
            with precision.autocast():
                out = model(batch.input_ids.to(device), images=pixels)
            labels = batch.labels.to(device).flatten()
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX)
            scaler.scale(loss + out.aux_loss / cfg.grad_accum).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def _time_steps(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first call, median seconds of the `steps` calls after it)."""
    times = []
    for _ in range(steps + 1):
        start = _now(device)
        step()
        times.append(_now(device) - start)
    return times[0], statistics.median(times[1:])


def _time_sampling(model: ApertisModel, tokenizer: Tokenizer, precision: Precision) -> float:
    """Seconds per generated token, as the trainer's sample generations make them (batch 1)."""
    from ..generation import GenerationConfig, generate

    config = GenerationConfig(max_new_tokens=SAMPLE_TOKENS_TIMED, seed=0)  # no stop ids: always that many tokens
    ids = tokenizer.encode("The") or [tokenizer.eot_id]
    model.eval()
    start = time.perf_counter()
    with precision.autocast():
        produced = sum(1 for _ in generate(model, ids, config))
    model.train()
    return (time.perf_counter() - start) / max(produced, 1)


def measure_step_seconds(
    model_config: ModelConfig,
    cfg: TrainConfig,
    seq_len: int,
    device: torch.device,
    precision: Precision,
    steps: int = 3,
) -> float:
    """Median seconds per optimizer step on a throwaway copy of the model with random tokens: the trainer's
    quick measurement for a time budget, taken after its own setup (which it already holds).

    The global RNG is forked so a run that measures first trains exactly like one that does not.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model = ApertisModel(model_config).to(device)
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, device)
        ids = torch.randint(0, model_config.vocab_size, (cfg.batch_size, seq_len + 1), device=device)

        def step() -> None:
            for _ in range(cfg.grad_accum):
                with precision.autocast():
                    out = model(ids[:, :-1])
                loss = F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return _time_steps(step, steps, device)[1]


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ---- measuring in a fresh process ---------------------------------------------------------------------
def measure_in_fresh_process(run_config: RunConfig, steps: int = MEASURED_STEPS) -> Measurement:
    """`measure_run` in a new process of this program, started the way a training worker is (spawned, not
    forked: a fresh interpreter with this environment, its own default threads, nothing else loaded).

    Also times that process's start (interpreter and torch imports), which a worker pays before its first
    step. The frozen app supports this through multiprocessing.freeze_support in its entry script. A config
    or data error comes back as a ValueError with the trainer's message; a crash as a RuntimeError.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=_measure_child, args=(send, run_config.to_dict(), steps, time.time()), name="apertis-plan", daemon=True
    )
    process.start()
    send.close()  # only the child writes: a child that dies closes the pipe and poll() answers at once
    try:
        if not receive.poll(FRESH_PROCESS_TIMEOUT_S):
            raise RuntimeError(
                f"measuring the run took over {FRESH_PROCESS_TIMEOUT_S:.0f} s; try again when the computer is less busy"
            )
        outcome = receive.recv()
    except EOFError:
        process.join(5)
        raise RuntimeError(_crash_message(process.exitcode)) from None
    finally:
        receive.close()
        if process.is_alive():
            process.terminate()
        process.join(5)
    kind, payload = outcome
    if kind == "config":
        raise ValueError(payload)
    if kind == "error":
        raise RuntimeError(payload)
    return Measurement(**payload)


def _crash_message(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return (
            f"the test steps were killed (signal {-exitcode}), most likely for lack of memory; "
            "lower the batch size or sequence length"
        )
    return f"the test steps ended without an answer (exit code {exitcode}); see the studio's console output"


def _measure_child(send: Any, mapping: dict, steps: int, spawned_at: float) -> None:
    """Runs in the spawned process: measure, then send ("ok", Measurement fields) or the error's kind and text."""
    startup_s = time.time() - spawned_at  # this module's imports (torch) are done by now, as in a worker
    try:
        measured = measure_run(RunConfig.from_dict(mapping), steps)
        send.send(
            (
                "ok",
                dataclasses.asdict(
                    dataclasses.replace(measured, startup_s=startup_s, where="in a fresh process, as the worker trains")
                ),
            )
        )
    except (ValueError, FileNotFoundError) as exc:  # ConfigError is a ValueError: the config or the data
        send.send(("config", str(exc)))
    except Exception as exc:  # out of memory and the like: the message is still the best explanation
        send.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        send.close()


# ---- the plan's arithmetic ----------------------------------------------------------------------------
