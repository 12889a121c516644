"""`python -m benchmarks.plan_accuracy`: how close the Train tab's plan comes to the real run.

For each preset: a fresh workspace with the studio's demo text (what a newcomer adds first), the Train
form at its defaults except the steps, the plan made by the studio's own service (`studio.run_plan`,
which the Plan and Start buttons call: a few real steps timed in a fresh process like a worker), then the
run started through the job manager in a real worker process. Actual = from the submit (Start) to the
registry's `ended` (the worker recorded the finish); planned = the plan's ETA. Prints both and their ratio
(target: 0.7-1.3), with the machine's load average around each run, since other programs on the machine
change both numbers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

PRESETS = ["apertis-nano", "transformer-nano"]


def measure(preset: str, steps: int, workdir: Path, extra: str) -> dict:
    """Plan, then train, one run of `preset`; the figures for the table."""
    import yaml

    from studio import run_config, run_plan
    from studio.app import Services
    from studio.jobs import JobManager
    from studio.store import Store
    from studio.tabs import dataset, train

    store = Store(workdir / preset)
    services = Services(store=store, jobs=JobManager(store))
    _, data_id = dataset.add_demo(services, "text")
    values = {**train.BASIC_DEFAULTS, **train.ADVANCED_DEFAULTS, "max_steps": steps, "extra": extra}
    mapping = run_config.run_mapping(services, data_id, preset, values)
    load_before = os.getloadavg()[0]
    planned = run_plan.plan_for(services, mapping)
    pressed = time.time()  # Start: the worker's start-up counts (the registry's `started` is set after it)
    run = services.jobs.submit(f"{preset} plan check", yaml.safe_dump(mapping, sort_keys=False), data_id)
    while (row := store.get_run(run["id"]))["status"] in ("queued", "running", "stopping"):
        time.sleep(0.5)
        services.jobs.poll()
    if row["status"] != "finished":
        raise RuntimeError(f"{preset}: the run ended {row['status']}: {row['exit_reason']}")
    actual = row["ended"] - pressed
    first = store.events(run["id"], kinds=["train_start"])[0]["t"]  # the worker's first step begins
    return {
        "preset": preset,
        "steps": steps,
        "threads": planned.plan.threads,
        "planned_s": planned.train_s,
        "step_s": planned.plan.step_seconds,
        "actual_s": actual,
        "ratio": actual / planned.train_s,
        "start": (planned.plan.start_seconds, first - pressed),
        "load": (load_before, os.getloadavg()[0]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plan_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default: the nanos)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per run (default 100)")
    parser.add_argument(
        "--threads", type=int, default=0, help="train.threads for plan and run (0: the worker's default)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="plan-and-run rounds per preset")
    args = parser.parse_args(argv)
    extra = f"train.threads={args.threads}" if args.threads else ""
    print(
        f"{'preset':<18} {'threads':>7} {'s/step':>7} {'planned':>8} {'actual':>8} {'actual/planned':>14}  "
        "start planned/actual  load before/after"
    )
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        for round_ in range(args.repeats):
            for preset in args.presets.split(","):
                r = measure(preset, args.steps, Path(tmp) / str(round_), extra)
                print(
                    f"{r['preset']:<18} {r['threads']:>7} {r['step_s']:>7.3f} {r['planned_s']:>7.1f}s "
                    f"{r['actual_s']:>7.1f}s {r['ratio']:>14.2f}  {r['start'][0]:>8.1f}s / {r['start'][1]:.1f}s  "
                    f"{r['load'][0]:>8.1f} / {r['load'][1]:.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
