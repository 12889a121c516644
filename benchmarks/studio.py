"""`python -m benchmarks.studio`: how fast the studio starts, shows a training step, and answers in chat.

Everything goes through the real processes a user runs: `python -m studio --no-browser` in a temporary
workspace, training in the studio's own worker process (started with the API's /start_run), chat through
the /chat endpoint.

(a) start-up: from starting the studio's process to HTTP 200 on `/`, median of --starts fresh workspaces.
(b) metrics latency, while a run trains: from the trainer logging a step (the wall-clock `time` its
    metrics.jsonl records for that step) to the moment a poller (every 10 ms) sees the step's `train/loss`
    row in the workspace registry (studio.db), i.e. what the Metrics tab can draw on its next tick.
(c) chat time to first token, while that run trains, for a freshly initialised apertis-nano bundle: from
    sending a message to its first streamed reply arriving, over the page's own protocol (POST queue/join,
    then the server-sent events of queue/data), and through gradio_client (which adds its own overhead);
    also the handler's own first-token time. The first message loads the model and is shown apart.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from .common import describe_machine, format_seconds, format_table, report_machine

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"startup": 6.0, "metrics": 2.0, "ttft": 0.3}  # seconds
PROMPT = "Once upon a time"
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_studio(
    workspace: Path, root: Path = REPO, timeout: float = 120.0
) -> tuple[subprocess.Popen, str, float, float]:
    """(process, url, seconds from process start to HTTP 200 on /, CPU seconds the process used by then).

    On a busy machine the wall time grows with the load; the CPU time is about what an idle one would take."""
    import psutil

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "-m", "studio", "--no-browser", "--port", str(port), "--workspace", str(workspace)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.perf_counter() - started < timeout and proc.poll() is None:
        try:
            with DIRECT.open(url, timeout=2) as response:
                if response.status == 200:
                    wall, cpu = time.perf_counter() - started, psutil.Process(proc.pid).cpu_times()
                    return proc, url, wall, cpu.user + cpu.system
        except OSError:  # not listening yet
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"the studio did not serve {url} within {timeout:.0f} s (exit code {proc.poll()})")


def import_seconds(module: str) -> float:
    """Wall seconds of `python -c "import module"`: the floor under the studio's start-up."""
    started = time.perf_counter()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")  # as the studio sets it (no update check)
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, env=env)
    return time.perf_counter() - started


def stop_studio(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RegistryPoller(threading.Thread):
    """Records when each step's train/loss row first shows in the registry (wall-clock, as the trainer)."""

    def __init__(self, workspace: Path, interval: float = 0.01):
        super().__init__(name="registry-poller", daemon=True)
        self.workspace, self.interval = workspace, interval
        self.run_id: str | None = None
        self.seen: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        from studio.store import Store

        store, last = Store(self.workspace), -1
        while not self.done.wait(self.interval):
            if self.run_id is None:
                continue
            rows = store.metrics(self.run_id, ["train/loss"], after_step=last)
            now = time.time()
            for row in rows:
                self.seen.setdefault(row["step"], now)
                last = max(last, row["step"])


def start_run(client, dataset_id: str, steps: int) -> str:
    from studio.tabs import train

    # The nano preset at the form's defaults, logging every step so every step is a sample; no evals,
    # samples or checkpoints, which would pause the steps but not change how metrics reach the registry.
    values = dict(train.BASIC_DEFAULTS, **train.ADVANCED_DEFAULTS)
    values.update(max_steps=steps, batch_size=4, seq_len=64, log_every=1, eval_every=0, sample_every=0, save_every=0,
                  vocab_size=262)  # fmt: skip
    message, run_id = client.predict(
        "bench", dataset_id, "apertis-nano", *[values[f] for f in train.FIELDS], api_name="/start_run"
    )
    if not run_id:
        raise RuntimeError(message)
    return run_id


def nano_bundle(workspace: Path) -> str:
    """A freshly initialised apertis-nano bundle registered in the workspace; its model id."""
    from apertis_core import ApertisModel, ModelConfig, Tokenizer, save_bundle
    from studio.store import Store

    tokenizer = Tokenizer.byte_level()
    model = ApertisModel(ModelConfig.from_preset("apertis-nano", vocab_size=tokenizer.vocab_size))
    folder = workspace / "models" / "bench-nano"
    save_bundle(folder, model, tokenizer, {"steps": 0})
    return Store(workspace).add_model("bench nano", folder, kind="bundle")


def _handler_seconds(speed: str) -> float | None:
    """The chat handler's own first-token time, from its speed line ("... first token after 0.04 s")."""
    return float(speed.split("first token after ")[1].split(" s")[0]) if "first token after" in speed else None


def chat_over_http(url: str, fn_index: int, model_id: str, max_new: int, session: str) -> tuple[float, float | None]:
    """(seconds from sending the message to its first streamed reply, the handler's own time), as the page does."""
    import httpx

    data = [{"text": PROMPT, "files": []}, [], model_id, "", 0.8, 50, 0.95, max_new, 1.1]
    first, output = float("nan"), ["", ""]
    with httpx.Client(timeout=120, trust_env=False) as http:
        started = time.perf_counter()
        join = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
        http.post(url + "gradio_api/queue/join", json=join).raise_for_status()
        with http.stream("GET", url + f"gradio_api/queue/data?session_hash={session}") as events:
            for line in events.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_generating" and first != first:
                    first = time.perf_counter() - started
                if message.get("msg") == "process_completed":
                    output = message["output"].get("data") or output
                    break
    return first, _handler_seconds(output[1])


def chat_with_client(client, model_id: str, max_new: int) -> float:
    """Seconds from `client.submit` to its first streamed reply (gradio_client's own overhead included)."""
    started, first = time.perf_counter(), float("nan")
    for history, _ in client.submit({"text": PROMPT, "files": []}, [], model_id, "", 0.8, 50, 0.95, max_new, 1.1,
                                    api_name="/chat"):  # fmt: skip
        if first != first and history and history[-1]["role"] == "assistant":
            first = time.perf_counter() - started
    return first


def wait_steps(store, run_id: str, steps: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (store.get_run(run_id)["step"] or 0) < steps:
        if time.monotonic() > deadline or store.get_run(run_id)["status"] not in ("queued", "running"):
            raise RuntimeError(f"run {run_id} did not reach step {steps}: {store.get_run(run_id)}")
        time.sleep(0.2)


def time_startups(args, tmp: Path) -> tuple[dict, subprocess.Popen, str, Path]:
    """(a): the timings, and the last studio (process, url, workspace), left running for (b) and (c)."""
    result, proc = {"startup_s": [], "startup_cpu_s": [], "import_gradio_s": []}, None
    for i in range(args.starts):
        if proc is not None:
            stop_studio(proc)
        result["import_gradio_s"].append(import_seconds("gradio"))  # in turns with the starts: the same load
        proc, url, seconds, cpu_seconds = start_studio(tmp / f"ws{i}", args.studio_root)
        result["startup_s"].append(seconds)
        result["startup_cpu_s"].append(cpu_seconds)
        print(f"start-up {i + 1}/{args.starts}: {seconds:.2f} s ({cpu_seconds:.2f} CPU s); "
              f"import gradio alone {result['import_gradio_s'][-1]:.2f} s", flush=True)  # fmt: skip
    return result, proc, url, tmp / f"ws{args.starts - 1}"


def measure_live(args, url: str, workspace: Path) -> dict:
    """(b) and (c) on a running studio: train, chat meanwhile, train on alone, stop; then match the steps."""
    from gradio_client import Client

    from studio.store import Store

    client, store = Client(url, verbose=False), Store(workspace)
    model_id, poller = nano_bundle(workspace), RegistryPoller(workspace)
    poller.start()
    _, dataset_id = client.predict("text", api_name="/add_demo_data")
    run_id = poller.run_id = start_run(client, dataset_id, steps=100_000)  # stopped when done measuring
    wait_steps(store, run_id, args.warm_steps, timeout=300)
    config = json.loads(DIRECT.open(url + "config", timeout=30).read())
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "chat")
    cold = chat_over_http(url, fn_index, model_id, args.max_new, "bench-cold")[0]
    http, via_client = [], []
    for i in range(args.chats):  # in turns, so both ways see the same load
        http.append(chat_over_http(url, fn_index, model_id, args.max_new, f"bench-{i}"))
        via_client.append(chat_with_client(client, model_id, args.max_new))
    print(f"chat: {2 * args.chats + 1} messages while the run trained", flush=True)
    time.sleep(args.train_seconds)  # more steps for (b), with nothing else going on
    client.predict(run_id, api_name="/stop_run")
    deadline = time.monotonic() + 120
    while store.get_run(run_id)["status"] in ("running", "stopping") and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # the poller's last rounds
    poller.done.set()
    poller.join()
    logged = {}
    with open(Path(store.get_run(run_id)["out_dir"]) / "metrics.jsonl", encoding="utf-8") as lines:
        for record in map(json.loads, lines):
            if "train/loss" in record:
                logged[record["step"]] = record["time"]
    return {"metrics_latency_s": [poller.seen[step] - t for step, t in logged.items() if step in poller.seen],
            "steps_logged": len(logged), "chat_cold_s": cold, "chat_http_s": [first for first, _ in http],
            "chat_handler_s": [h for _, h in http if h is not None], "chat_client_s": via_client}  # fmt: skip


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # NaN: a reply with no tokens
    return statistics.median(values) if values else float("nan")


def _span(values: list[float], what: str) -> str:
    return f"{len(values)} {what}, {format_seconds(min(values))} to {format_seconds(max(values))}" if values else "none"


def summarise(result: dict) -> list[list[str]]:
    """Table rows: measurement, target, median, spread, met/missed (the metrics target holds for the worst step)."""
    startup, latency, http = result["startup_s"], sorted(result["metrics_latency_s"]), result["chat_http_s"]
    p95, worst = latency[min(len(latency) - 1, int(0.95 * len(latency)))], latency[-1]
    a, b, c, fmt = _median(startup), _median(latency), _median(http), format_seconds
    steps = f"{len(latency)} of {result['steps_logged']} steps; p95 {fmt(p95)}, max {fmt(worst)}"
    return [
        ["(a) start-up to HTTP 200 on /", f"<= {TARGETS['startup']} s", fmt(a), _span(startup, "starts"),
         _met(a, TARGETS["startup"])],
        ["(a) CPU time the studio used by then", "", fmt(_median(result["startup_cpu_s"])),
         "user + system: about the wall time on an idle machine", ""],
        ["(a) for scale: python -c 'import gradio'", "", fmt(_median(result["import_gradio_s"])),
         _span(result["import_gradio_s"], "runs"), ""],
        ["(b) step logged -> row in registry", f"<= {TARGETS['metrics']} s", fmt(b), steps, _met(worst, TARGETS["metrics"])],
        ["(c) chat first token, as the page sees it", f"<= {TARGETS['ttft']} s", fmt(c), _span(http, "messages"),
         _met(c, TARGETS["ttft"])],
        ["(c) the same, through gradio_client", "", fmt(_median(result["chat_client_s"])),
         _span(result["chat_client_s"], "messages"), ""],
        ["(c) the same, in the handler", "", fmt(_median(result["chat_handler_s"])), "its own timer: no HTTP, no queue", ""],
        ["(c) first message (loads the model)", "", fmt(result["chat_cold_s"]), "as the page sees it", ""],
    ]  # fmt: skip


def _met(value: float, target: float) -> str:
    return "met" if value <= target else "missed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studio", description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5, help="studio start-ups to time (median reported)")
    parser.add_argument("--chats", type=int, default=10, help="chat messages timed each way, after one that loads")
    parser.add_argument("--max-new", type=int, default=16, help="tokens per chat reply")
    parser.add_argument("--warm-steps", type=int, default=3, help="training steps before chatting starts")
    parser.add_argument("--train-seconds", type=float, default=20.0, help="training time after the chats, for (b)")
    parser.add_argument("--studio-root", type=Path, default=REPO, help="run the studio from this checkout (to compare)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    machine = describe_machine("cpu")
    with tempfile.TemporaryDirectory(prefix="apertis-bench-studio-") as tmp:
        result, proc, url, workspace = time_startups(args, Path(tmp))
        try:
            result.update(measure_live(args, url, workspace))
        finally:
            stop_studio(proc)
    header = ["measurement", "target", "median", "spread", ""]
    print(format_table("Studio (while an apertis-nano run trains for (b) and (c))", header, summarise(result)))
    print("\nThe Metrics tab reads the registry every 2 s (studio.app.TIMER_S): a point reaches the chart at")
    print("most that much after it reaches the registry.")
    machine["load average at the end"] = describe_machine("cpu").get("load average (1/5/15 min)", "?")
    report_machine(machine, result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
