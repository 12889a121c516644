"""Plans, Start checks and live ETAs for the Train tab: how long a run will take on this computer, measured
the way its worker will train it, and the refusals that keep Start from queueing a run that cannot work.

tabs/train.py draws the form and calls these; the tests call them directly.

How a plan is measured, and why:
- In a fresh process (`measure_in_fresh_process`), not in the studio's. The studio keeps torch at one thread
  so chat stays quick, while a worker trains with its run's own thread count (`train.threads`, 0 = torch's
  default for a new process, usually every core); timing in the studio would time the wrong thing. The
  fresh process also pays the worker's start-up (imports), so that is in the ETA too.
- On the run's own data and model: real batches (with images, when the data has them), its tokenizer, the
  sample generations it will write.
- Under the load of this moment. Runs already training on the same device share it with the measurement
  exactly as they will share it with the new run, if it starts now. If the new run has to wait in the
  queue, it will train without them, so its measured step time is scaled by (1 + runs it will train
  beside) / (1 + runs it was measured beside) when they compete: runs that want more than the device has
  (a GPU; a CPU when their threads outnumber its cores) split it about evenly, while runs whose threads
  fit in the cores barely slow each other and are not scaled. That is an estimate (oversubscribed CPU
  threads lose more than an even split, so it stays on the slow side); the live ETA, from the run's own
  measured pace, replaces it once the run trains.
"""

from __future__ import annotations

import dataclasses
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import run_states
from .gpus import gpu_refusal, local_gpu_count

LONG_RUN_S = 7 * 86400  # a plan longer than this needs the user's explicit confirmation
ABSURD_RUN_S = 365 * 86400  # refused outright: nobody trains a year on one computer; the number was mistyped
PLAN_TTL_S = 600.0  # Start reuses the Plan button's measurement this long, if the queue has not changed
PROBLEMS_SHOWN = 5  # validation problems quoted in a refusal; the Dataset tab lists them all
PACE_WINDOW_S = 60.0  # the live ETA uses the pace of this much of the trainer's recent time

CONFIRM_PHRASE = "I understand this run will take about {days} days"

# Train settings that change how many steps there are, or what they learn, but not how long one takes.
PACE_NEUTRAL = frozenset(
    {
        "max_steps",
        "max_minutes",
        "warmup_steps",
        "schedule",
        "decay_fraction",
        "lr",
        "min_lr_ratio",
        "eval_every",
        "eval_batches",
        "save_every",
        "keep_last",
        "log_every",
        "rewarm_fraction",
        "sample_every",
        "weight_decay",
        "betas",
        "grad_clip",
    }
)

# Store -> {key: (time.time(), Measurement)}: one cache per workspace, so two apps in a process never share.
_measurements: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class RunPlan:
    """A measured plan and the queue it was measured in."""

    plan: Any  # apertis_core.training.TrainPlan (imported lazily: the page must build without torch)
    sharing: int  # other runs training on the same device while the steps were timed
    ahead: int  # runs this one waits for before it starts (0: it starts at once)
    wait_s: float | None  # until the runs ahead end, at their measured pace (None: not known yet)
    made: float  # time.time() of the measurement it was built from
    trains: str = ""  # a fine-tune's line: what it trains of which model (fine_tune_line)

    @property
    def train_s(self) -> float:
        """The run's own time, from its start to its end."""
        return self.plan.eta_seconds

    def to_text(self) -> str:
        return "\n".join([self.plan.to_text(), *([self.trains] if self.trains else []), *self.load_lines()])

    def load_lines(self) -> list[str]:
        from apertis_core.training.planning import format_duration

        lines = []
        if self.sharing and not self.ahead:
            lines.append(
                f"shared CPU/GPU  measured while {_runs(self.sharing)} trained; this run starts now "
                "and shares the device with them, so it speeds up when they end"
            )
        if self.ahead:
            wait = f", about {format_duration(self.wait_s)} from now" if self.wait_s is not None else ""
            lines.append(f"queue           starts after {_runs(self.ahead)} ahead of it{wait}")
            if self.sharing:
                lines.append(
                    f"                (its speed was measured beside {_runs(self.sharing)} and scaled to "
                    "the device it will have then: an estimate until it trains)"
                )
        return lines


@dataclass
class StartCheck:
    """Whether Start may queue a run: the refusal says what is wrong and what to do; a pass carries the plan."""

    ok: bool
    message: str
    plan: RunPlan | None = None


Measure = Callable[[Any], Any]  # RunConfig -> Measurement


# ---- plans --------------------------------------------------------------------------------------------
def plan_for(services, mapping: dict[str, Any], measure: Measure | None = None) -> RunPlan:
    """The plan of the run `mapping` describes, measured now (or reused from the last PLAN_TTL_S, when the
    queue is as it was). `measure` times the run; the default runs it in a fresh process like a worker."""
    from apertis_core.training import RunConfig
    from apertis_core.training.planning import plan_run

    run_config = RunConfig.from_dict(mapping)
    device = _device_type(run_config.train.device)
    beside, ahead, wait_s = _queue(services, device)
    cache = _measurements.setdefault(services.store, {})
    key = (_measurement_key(mapping), len(beside), ahead)
    if key not in cache or time.time() - cache[key][0] >= PLAN_TTL_S:
        cache[key] = (time.time(), (measure or _measure_like_a_worker)(run_config))
    made, measurement = cache[key]
    if ahead:  # it trains later, beside fewer runs than it was measured beside (see the module docstring)
        measurement = _scaled(measurement, _later_factor(services, device, beside, measurement))
    processes = local_gpu_count() if run_config.train.gpus == "all" else 1  # each GPU trains its own batches
    plan = plan_run(run_config, world_size=processes, measurement=measurement)
    return RunPlan(plan, len(beside), ahead, wait_s, made, fine_tune_line(run_config, plan.parameters))


def fine_tune_line(run_config, parameters: int) -> str:
    """For a run that starts from a model: which one, and how much of it trains; "" for a new model."""
    from apertis_core.model_card import card_title
    from apertis_core.training.build import planned_model_config, start_bundle, uses_lora

    base = start_bundle(run_config)
    if not base:
        return ""
    if not uses_lora(run_config):
        return f"fine-tune       all weights of {card_title(base)}"
    from apertis_core.finetune import lora_parameter_count

    tune = run_config.finetune
    trained = lora_parameter_count(planned_model_config(run_config), tune.target_modules, tune.rank)
    return (
        f"fine-tune       LoRA rank {tune.rank} on {card_title(base)}: {trained / 1e6:.3f}M trainable "
        f"({trained / max(parameters, 1):.1%} of the weights; the base stays frozen)"
    )


def _later_factor(services, device: str, beside: list[dict[str, Any]], measurement) -> float:
    """Step time when a queued run trains, over its step time measured beside the runs `beside`."""
    if not beside:
        return 1.0
    if device == "cpu":  # a run with threads 0 takes the process default, which the measurement found
        wanted = measurement.threads + sum(_train_setting(run, "threads", 0) or measurement.threads for run in beside)
        if wanted <= (os.cpu_count() or 1):
            return 1.0
    later = min(len(beside), services.jobs.max_concurrent - 1)
    return (1 + later) / (1 + len(beside))


def _measurement_key(mapping: dict[str, Any]) -> str:
    """The settings a step's time depends on: Plan at 300 steps and Start at 3,000 share one measurement."""
    train = mapping.get("train") or {}
    kept = {key: value for key, value in train.items() if key not in PACE_NEUTRAL}
    kept["writes_samples"] = bool(train.get("sample_every")) and bool(train.get("sample_prompts"))
    return yaml.safe_dump({**mapping, "train": kept}, sort_keys=True)


def _measure_like_a_worker(run_config):
    """In a fresh process, as the worker will train; in this one (with the run's threads) if none can start."""
    from apertis_core.training.measure import measure_in_fresh_process, measure_run

    try:
        return measure_in_fresh_process(run_config)
    except OSError:  # no new process allowed here: still time the real steps, with the run's threads
        return dataclasses.replace(measure_run(run_config), where="in the studio's process")


def _scaled(measurement, factor: float):
    return dataclasses.replace(
        measurement,
        step_s=measurement.step_s * factor,
        first_step_s=measurement.first_step_s * factor,
        sample_token_s=measurement.sample_token_s * factor,
    )


def _queue(services, device: str) -> tuple[list[dict[str, Any]], int, float | None]:
    """(runs training on `device` now, runs a new one would wait for, seconds until those end or None)."""
    active = services.store.list_runs(run_states.ACTIVE)
    queued = services.store.list_runs([run_states.QUEUED])
    beside = [run for run in active if _device_type(_train_setting(run, "device", "auto")) == device]
    if len(active) + len(queued) < services.jobs.max_concurrent:
        return beside, 0, 0.0
    lefts = [live_eta(services, run)[0] for run in active]
    wait_s = None if queued or any(left is None for left in lefts) else min(lefts, default=0.0)
    return beside, len(active) + len(queued), wait_s


def _train_setting(run: dict[str, Any], key: str, default: Any) -> Any:
    try:
        return ((yaml.safe_load(run["config"]) or {}).get("train") or {}).get(key, default)
    except (yaml.YAMLError, AttributeError):
        return default


def _device_type(preference: str) -> str:
    """'cpu', 'cuda' or 'mps': where a run with this train.device setting trains on this computer."""
    from apertis_core.training.hardware import pick_device

    try:
        return pick_device(preference).type
    except ValueError:  # an unavailable device: that run fails at once and shares nothing
        return f"unavailable {preference}"


def _runs(n: int) -> str:
    return f"{n} other run{'s' if n != 1 else ''}"


def plan_text(services, dataset_id: str | None, mapping: dict[str, Any], measure: Measure | None = None) -> str:
    """What the Plan button shows: the plan, and what Start would say about it."""
    check = check_start(services, dataset_id, mapping, confirmed_long=False, measure=measure)
    if check.plan is None:
        return f"Cannot plan this run: {check.message}"
    text = check.plan.to_text()
    return text if check.ok else f"{text}\n\n{check.message}"


# ---- Start checks -------------------------------------------------------------------------------------
def check_start(
    services,
    dataset_id: str | None,
    mapping: dict[str, Any],
    confirmed_long: bool = False,
    measure: Measure | None = None,
) -> StartCheck:
    """Refuse what cannot work (no usable data, a config or data error the trainer would hit, a run longer
    than a year) and a run longer than LONG_RUN_S unless `confirmed_long`; otherwise pass with the plan."""
    refusal = dataset_refusal(services, dataset_id) or gpu_refusal(mapping.get("train") or {})
    if refusal:
        return StartCheck(False, refusal)
    try:
        from apertis_core.sizing import check_run_mapping

        check_run_mapping(mapping)  # absurd sizes, or more memory than this machine has, before anything is built
        run_plan = plan_for(services, mapping, measure)
    except ValueError as exc:  # ConfigError included: its message says which setting and what to do
        return StartCheck(False, str(exc))
    except RuntimeError as exc:
        return StartCheck(False, f"its test steps failed: {exc}")
    return _length_check(run_plan, mapping, confirmed_long)


def _length_check(run_plan: RunPlan, mapping: dict[str, Any], confirmed_long: bool) -> StartCheck:
    from apertis_core.training.planning import format_duration

    plan, seconds = run_plan.plan, run_plan.train_s
    took = f"about {format_duration(seconds)} on this computer ({plan.step_seconds:.2f} s per step)"
    budget = float((mapping.get("train") or {}).get("max_minutes") or 0)
    what = f"a time budget of {budget:,.0f} minutes" if budget > 0 else f"{plan.total_steps:,} steps"
    if seconds > ABSURD_RUN_S:
        return StartCheck(
            False,
            f"{what} would take {took}; a run that long cannot be started. Lower Training "
            "steps (a few hundred is a good first run) or set a Time budget in minutes.",
            run_plan,
        )
    if seconds > LONG_RUN_S and not confirmed_long:
        days = confirm_days(seconds)
        return StartCheck(
            False,
            f"{what} would take {took}. To start it anyway, tick '{CONFIRM_PHRASE.format(days=days)}' "
            "and press Start; or lower Training steps, or set a Time budget.",
            run_plan,
        )
    return StartCheck(True, f"planned: {format_duration(seconds)}", run_plan)


def confirm_days(seconds: float) -> int:
    return max(round(seconds / 86400), 7)


def dataset_refusal(services, dataset_id: str | None) -> str | None:
    """Why this dataset cannot be trained on (naming its validation problems), or None when it can."""
    row = services.store.get_dataset(dataset_id) if dataset_id else None
    if row is None:
        return "pick a dataset first (add one in the Dataset tab)"
    if not Path(row["path"]).exists():
        return (
            f"the files of dataset {row['name']!r} are no longer in the workspace ({row['path']}); "
            "add them again in the Dataset tab"
        )
    summary = row.get("summary") or {}
    if summary.get("records", 1) > 0:  # no count stored (an older workspace): the trainer still checks
        return None
    problems = validation_problems(services, row["path"])
    listed = "\n".join(f"- {p}" for p in problems[:PROBLEMS_SHOWN])
    more = (
        f"\n- ... and {len(problems) - PROBLEMS_SHOWN} more (the Dataset tab lists them all)"
        if len(problems) > PROBLEMS_SHOWN
        else ""
    )
    found = (
        f"Its validation found:\n{listed}{more}\n"
        if problems
        else "Nothing in it could be read as text or conversations.\n"
    )
    return (
        f"dataset {row['name']!r} has no usable records, so there is nothing to train on. {found}"
        "Fix these in your files and add them again in the Dataset tab, or pick another dataset."
    )


def validation_problems(services, path: str) -> list[str]:
    """The validation report's problems for `path`, one line each: where, what is wrong, what to do."""
    from apertis_core.data import validate_dataset

    report = validate_dataset(path, cache_dir=services.store.tmp_dir / "unzipped")
    return [str(problem) for problem in report.problems]


# ---- the live ETA -------------------------------------------------------------------------------------
def recent_pace(rows: list[dict[str, Any]], window_s: float = PACE_WINDOW_S) -> float | None:
    """Steps per second over the last `window_s` of the trainer's clock, from its `time/elapsed_s` rows
    (step order, one worker's); None until two rows exist."""
    points = [(int(r["step"]), float(r["value"])) for r in rows if isinstance(r.get("value"), (int, float))]
    if len(points) < 2:
        return None
    last_step, last_t = points[-1]
    recent = [p for p in points if p[1] >= last_t - window_s]
    first_step, first_t = recent[0] if len(recent) > 1 else points[-2]  # too few in the window: the last two
    if last_step <= first_step or last_t <= first_t:
        return None
    return (last_step - first_step) / (last_t - first_t)


def live_eta_text(services, run: dict[str, Any]) -> str:
    """ " · N steps/s · ETA D" for a training run's progress line (from live_eta); "" when there is none."""
    seconds, pace = live_eta(services, run)
    if seconds is None:
        return ""
    from apertis_core.training.planning import format_duration

    return f" · {pace:.2f} steps/s · ETA {format_duration(seconds)}"


def live_eta(services, run: dict[str, Any]) -> tuple[float | None, float | None]:
    """(seconds left, steps per second) of a training run at its own recent pace, never the plan's; Nones
    when it is not training or has not taken a step since its worker started."""
    step, total = int(run["step"] or 0), int(run["total_steps"] or 0)
    starts = services.store.events(run["id"], kinds=["train_start"])
    if run["status"] not in run_states.ACTIVE or not starts or step >= total:
        return None, None
    first_step, since = int(starts[-1]["payload"].get("step", 0)), starts[-1]["t"]
    if step <= first_step:
        return None, None
    # Rows after the worker's first step only: a resumed run's trainer clock starts again from zero.
    pace = recent_pace(services.store.metrics(run["id"], ["time/elapsed_s"], after_step=first_step))
    if pace is None:  # fewer than two logged records yet: the pace since this worker started
        pace = (step - first_step) / max(time.time() - since, 1e-9)
    return (total - step) / pace, pace
