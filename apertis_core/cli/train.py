"""`apertis train CONFIG.yaml [--set key=value ...]`: plan, train with a progress bar, write the bundle.

Ctrl-C asks for a graceful stop (the trainer saves a checkpoint after the current step, then exits);
a second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..training import RunConfig

from ..filenames import STOP_FILE


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description=(
            "Train a model. CONFIG is a YAML/JSON run config (see assets/configs/) or a run folder (its "
            "run.yaml). Settings are changed with --set section.key=value, e.g. --set train.lr=1e-3 "
            "--set model.preset=transformer-nano --set data.path=my.txt. Ctrl-C stops after the current "
            "step with a checkpoint; a second Ctrl-C stops at once."
        ),
    )
    parser.add_argument("config", metavar="CONFIG", help="run config file (.yaml/.json) or a run folder")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting (repeatable), e.g. --set train.max_steps=500",
    )
    parser.add_argument(
        "--resume", metavar="PATH", help="continue from a checkpoint folder or a run folder (its latest checkpoint)"
    )
    parser.add_argument(
        "--more",
        type=int,
        default=0,
        metavar="N",
        help="train N steps beyond where the resumed run ended (re-plans the schedule)",
    )
    parser.add_argument("--out", metavar="DIR", help="run folder to write (same as --set out_dir=DIR)")
    parser.add_argument("--no-plan", action="store_true", help="skip the timed warm-up that estimates speed and ETA")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training import ProgressBar, plan_run, train

    if args.more < 0:
        raise ValueError(f"--more must be a positive number of steps, got {args.more}")
    run_config, resume = load_run_config(args)
    check_memory(run_config, resume)  # before the plan: its timed steps build the model
    plan = plan_run(run_config, measure=not args.no_plan)
    if resume:
        plan = resumed_plan(plan, resume, args.more)
    print(f"Run {run_config.out_dir} ({model_words(run_config)})")
    if resume:
        print(f"Resuming from {resume}" + (f" for {args.more} more steps" if args.more else ""))
    print(plan.to_text(), flush=True)
    with GracefulInterrupt(Path(run_config.out_dir) / STOP_FILE) as interrupt:
        # In a log file (not a terminal) a redraw every few seconds keeps the output readable.
        bar = ProgressBar(mininterval=0.2 if sys.stderr.isatty() else 5.0)
        result = train(run_config, callbacks=[bar, interrupt.callback()], resume_from=resume, extra_steps=args.more)
    print(describe_result(result))
    return 0


def load_run_config(args: argparse.Namespace) -> tuple[RunConfig, str | None]:
    """The RunConfig with every override applied, and the checkpoint or run folder to resume from."""
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    source = Path(args.config)
    resume = args.resume
    if source.is_dir():  # a run folder: its resolved config, and by default a resume of it
        if not (source / "run.yaml").is_file():
            raise FileNotFoundError(
                2, "not a run folder (no run.yaml in it); give a config file or a run folder", str(source)
            )
        config = read_run_config(source / "run.yaml", overrides)
        resume = resume or str(source)
    elif not source.is_file():
        raise FileNotFoundError(2, "no such config file", str(source))
    else:
        config = read_run_config(source, overrides)
    if args.more and not resume:
        resume = config.out_dir  # "train N more" continues the run in the config's folder
    return config, resume


def read_run_config(path: Path, overrides: list[str]) -> RunConfig:
    """RunConfig.load, with the model settings checked for absurd values first (n_heads 0, a negative or
    million-wide d_model), so they are refused with a message rather than failing inside the config."""
    from ..configio import read_mapping
    from ..sizing import check_model_mapping
    from ..training import RunConfig
    from ..training.config import merge_overrides

    mapping = merge_overrides(read_mapping(path), overrides)
    if isinstance(mapping.get("model"), dict):
        check_model_mapping(mapping["model"], where=f"{path}: model")
    return RunConfig.from_dict(mapping)


def check_memory(run_config: RunConfig, resume: str | None) -> None:
    """Refuse a run whose model is absurd or will not fit in free memory, before anything is built. A resumed
    run trains its checkpoint's model, a fine-tune its base bundle's, so that is the one sized."""
    from ..bundle import read_model_config
    from ..sizing import check_run
    from ..training.build import planned_model_config, start_bundle
    from ..training.checkpoint import resolve_checkpoint

    model = None
    if resume:
        model = read_model_config(resolve_checkpoint(resume) / "config.json")
    elif start_bundle(run_config):
        model = planned_model_config(run_config)
    check_run(run_config, model)


def model_words(run_config: RunConfig) -> str:
    """What the run trains, for its first line: a preset, or the bundle it fine-tunes and how."""
    from ..training.build import start_bundle, uses_lora

    base, tune = start_bundle(run_config), run_config.finetune
    if not base:
        return run_config.model.preset
    return f"fine-tuning {base}: " + (f"LoRA rank {tune.rank}" if uses_lora(run_config) else "all weights")


def resumed_plan(plan, resume: str, more: int):
    """The plan of a resumed run: the steps left from the checkpoint, not the config's max_steps."""
    import dataclasses
    import json

    from ..training.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(resume)
    try:
        meta = json.loads((checkpoint / "meta.json").read_text(encoding="utf-8"))
        done, total = int(meta["step"]), int(meta["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return plan  # an older checkpoint without meta: the config's plan is the best estimate
    total = done + more if more else total
    left = max(total - done, 0)
    per_step = plan.eta_seconds / max(plan.total_steps, 1)
    return dataclasses.replace(plan, total_steps=total, eta_seconds=per_step * left)


def describe_result(result) -> str:
    """Where the model is, and the final losses."""
    losses = [
        ("train loss", result.final_train_loss),
        ("val loss", result.final_val_loss),
        ("best val loss", result.best_val_loss),
    ]
    summary = ", ".join(
        [f"{result.steps} steps"] + [f"{name} {value:.4f}" for name, value in losses if value is not None]
    )
    if result.stopped or not result.bundle_dir:
        return f"Stopped after {summary}. Checkpoint in {result.out_dir}/checkpoints; continue with: apertis train {result.out_dir}"
    return (
        f"Done: {summary}.\nModel bundle: {result.bundle_dir}\n"
        f'Try it: apertis generate --model {result.bundle_dir} --prompt "..."   (or apertis chat --model {result.bundle_dir})'
    )


class GracefulInterrupt:
    """First Ctrl-C: ask the trainer to stop after this step (flag + STOP file); second: stop now."""

    def __init__(self, stop_file: Path):
        self.stop_file = stop_file
        self.requested = False
        self._previous = None

    def __enter__(self) -> GracefulInterrupt:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (embedded use): keep the default Ctrl-C behaviour
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nStopping after this step and saving a checkpoint (Ctrl-C again to stop at once)...",
            file=sys.stderr,
            flush=True,
        )
        try:
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)
            self.stop_file.touch()
        except OSError:
            pass  # the flag below still stops this process

    def callback(self):
        from ..training import Callback

        interrupt = self

        class StopOnInterrupt(Callback):
            def on_step_end(self, state) -> None:
                if interrupt.requested:
                    state.request_stop()

        return StopOnInterrupt()
