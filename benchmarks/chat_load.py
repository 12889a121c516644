"""`python -m benchmarks.chat_load`: the studio under chat load while a run trains.

A real studio (`python -m studio --no-browser` over a fresh temporary workspace) trains apertis-nano on the
demo text in its worker process (started with the API's /start_run) while chat requests go to /chat
through gradio_client: first --requests one after another, then --requests again from --concurrency
clients at once. Each request is a whole reply of --max-new tokens from a freshly initialised
apertis-nano bundle. Reported per phase: errors (an exception, or a reply that says it could not answer),
latency percentiles of the whole reply, and the studio process's resident memory (RSS) before and after,
measured after one warm-up request that loads the model (so loading is not counted as growth). The run
must still be training at the end: the load must not stop it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import describe_machine, format_table, report_machine
from benchmarks.studio import PROMPT, nano_bundle, start_run, start_studio, stop_studio, wait_steps

ERROR_PREFIXES = ("Cannot answer", "Cannot load", "Pick a model")


def chat_once(client, model_id: str, max_new: int) -> tuple[float, str | None]:
    """(seconds for the whole reply, the error or None)."""
    started = time.perf_counter()
    try:
        history, speed = client.predict({"text": PROMPT, "files": []}, [], model_id, "", 0.8, 50, 0.95, max_new, 1.1,
                                        api_name="/chat")  # fmt: skip
    except Exception as exc:  # whatever went wrong is what the benchmark counts
        return time.perf_counter() - started, f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    if speed.startswith(ERROR_PREFIXES) or not history or history[-1].get("role") != "assistant":
        return seconds, speed
    return seconds, None


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def run_phase(url: str, model_id: str, requests: int, concurrency: int, max_new: int) -> dict:
    """`requests` chats from `concurrency` clients at once (one client each: a Client is one session)."""
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in range(concurrency)]  # connected before the clock starts
    results: list[tuple[float, str | None]] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker(client) -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            outcome = chat_once(client, model_id, max_new)
            with lock:
                results.append(outcome)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, clients))
    for client in clients:
        client.close()
    latencies = sorted(seconds for seconds, _ in results)
    errors = [error for _, error in results if error]
    return {"requests": len(results), "concurrency": concurrency, "errors": len(errors), "error_samples": errors[:3],
            "wall_s": time.perf_counter() - started, "latency_s": latencies}  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def measure(args, workspace: Path) -> dict:
    from gradio_client import Client

    from studio.store import Store

    proc, url, _, _ = start_studio(workspace)
    try:
        client, store = Client(url, verbose=False), Store(workspace)
        model_id = nano_bundle(workspace)
        _, dataset_id = client.predict("text", api_name="/add_demo_data")
        run_id = start_run(client, dataset_id, steps=20_000)  # stopped when done measuring
        wait_steps(store, run_id, args.warm_steps, timeout=600)
        result = {"rss_start": rss(proc.pid)}
        _, error = chat_once(client, model_id, args.max_new)  # loads the model
        if error:
            raise RuntimeError(f"the warm-up chat failed: {error}")
        phases = []
        for concurrency in (1, args.concurrency):
            before, step_before = rss(proc.pid), store.get_run(run_id)["step"]
            phase = run_phase(url, model_id, args.requests, concurrency, args.max_new)
            phase.update(
                rss_before=before, rss_after=rss(proc.pid), steps_trained=store.get_run(run_id)["step"] - step_before
            )
            phases.append(phase)
            print(f"{args.requests} chats, {concurrency} at a time: {phase['errors']} errors", flush=True)
        result.update(phases=phases, run_status=store.get_run(run_id)["status"])
        client.predict(run_id, api_name="/stop_run")
        return result
    finally:
        stop_studio(proc)


def summarise(result: dict) -> list[list[str]]:
    rows = []
    for phase in result["phases"]:
        latencies = phase["latency_s"]
        growth = (phase["rss_after"] - phase["rss_before"]) / 2**20
        rows.append([
            f"{phase['requests']} requests, {phase['concurrency']} at a time", str(phase["errors"]),
            " / ".join(f"{percentile(latencies, q) * 1000:.0f}" for q in (50, 90, 99)) + f" / {max(latencies) * 1000:.0f}",
            f"{phase['requests'] / phase['wall_s']:.1f}",
            f"{phase['rss_before'] / 2**20:.0f} -> {phase['rss_after'] / 2**20:.0f} MiB ({growth:+.1f})",
            str(phase["steps_trained"]),
        ])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chat_load", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="chat requests in each phase")
    parser.add_argument("--concurrency", type=int, default=4, help="clients at once in the second phase")
    parser.add_argument("--max-new", type=int, default=16, help="tokens per reply")
    parser.add_argument("--warm-steps", type=int, default=3, help="training steps before the chats start")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="apertis-bench-chat-load-") as tmp:
        result = measure(args, Path(tmp) / "ws")
    header = ["phase", "errors", "latency p50 / p90 / p99 / max (ms)", "replies/s", "studio RSS", "steps trained"]
    title = f"Chat while a run trains (apertis-nano, {args.max_new} new tokens a reply)"
    print(format_table(title, header, summarise(result)))
    print(
        f"\nstudio RSS when the run had started, before any chat: {result['rss_start'] / 2**20:.0f} MiB; "
        f"run status at the end: {result['run_status']}"
    )
    machine = describe_machine("cpu")
    report_machine(machine, result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
