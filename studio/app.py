"""Builds the studio's gr.Blocks from the five tab modules and launches it over one workspace.

The services (registry, job manager, loaded chat models) are created per app and handed to each tab's
`build`; nothing is module-global, so two apps in one process (as in tests) never share a run or a model.
"""

from __future__ import annotations

import importlib
import sys
import threading
import webbrowser
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gradio as gr

from . import run_states
from .jobs import JobManager
from .model_cache import ModelCache
from .store import Store
from .tabs import chat, dataset, metrics, models, train

TITLE = "Apertis Studio"
TIMER_S = 2.0  # the Metrics and Train tabs refresh this often: with the worker's 0.5 s flush, a step is on a chart within ~2.5 s
STUDIO_THREADS = 1  # torch threads for chat and exports in the studio process (see _prepare_torch)


@dataclass
class Services:
    store: Store
    jobs: JobManager
    model_cache: ModelCache = field(default_factory=ModelCache)


def make_services(workspace: str | Path) -> Services:
    store = Store(workspace)
    services = Services(store=store, jobs=JobManager(store))
    models.register_bundled_models(services)
    return services


def build_app(services: Services) -> gr.Blocks:
    """The whole UI; each tab wires its own handlers, and the few cross-tab links are made here."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE}\nWorkspace: `{services.store.root}`")
        with gr.Tabs() as tabs:
            with gr.Tab("Dataset", id="dataset") as dataset_tab:
                data_ui = dataset.build(services)
            with gr.Tab("Train", id="train") as train_tab:
                train_ui = train.build(services, TIMER_S)
            with gr.Tab("Metrics", id="metrics") as metrics_tab:
                metrics_ui = metrics.build(services, TIMER_S)
            with gr.Tab("Models", id="models") as models_tab:
                models_ui = models.build(services)
            with gr.Tab("Chat", id="chat") as chat_tab:
                chat_ui = chat.build(services)
        # Lists go stale when another tab (or a worker) adds something: refresh them on entering a tab.
        dataset_tab.select(data_ui["refresh"], None, data_ui["refresh_outputs"], api_visibility="private")
        train_tab.select(train_ui["refresh"], None, train_ui["refresh_outputs"], api_visibility="private")
        metrics_tab.select(metrics_ui["refresh"], None, metrics_ui["refresh_outputs"], api_visibility="private")
        models_tab.select(models_ui["refresh"], None, models_ui["refresh_outputs"], api_visibility="private")
        chat_tab.select(chat_ui["refresh"], None, chat_ui["refresh_outputs"], api_visibility="private")
        models_ui["to_chat"].click(
            partial(chat.select_model, services),
            models_ui["selected"],
            [chat_ui["model"], tabs],
            api_visibility="private",
        )
    return app


def _prepare_torch() -> None:
    """Run once the page is up. Imports torch and the trainer in the background: the page needs neither
    (they cost about 2 s of start-up), but the first Plan, Start or chat message would wait for them.

    Also keeps this process's torch to STUDIO_THREADS. Training workers use every core; a chat reply
    computed with several threads next to one waits for busy cores at every parallel region (first token of
    apertis-nano on a busy 2-core machine: 1.6 s with 2 threads, 24 ms with 1). With no run training, 2
    threads would be a little faster (first token 35 against 60 ms, 7% more tokens/s). Threads that run
    torch later (Gradio's workers) take this count when they first use torch."""
    import torch

    torch.set_num_threads(STUDIO_THREADS)
    for module in ("apertis_core.training", "apertis_core.generation"):
        importlib.import_module(module)


def launch(
    workspace: Path,
    host: str,
    port: int,
    auth: tuple[str, str] | None,
    open_browser: bool,
    max_upload: str,
    shutdown,
    say=print,
) -> None:
    """Start the job watcher, build the UI and serve it until `shutdown.wait()` returns, then shut down in
    order: stop watching (workers keep training, to be re-attached by the next start), close the server and
    the registry, and say so in one line."""
    services = make_services(workspace)
    services.jobs.poll()  # re-attach live workers and mark dead ones before the first page is drawn
    services.jobs.start_watcher()
    app = build_app(services)
    app.queue(default_concurrency_limit=4)
    app.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        inbrowser=False,
        share=False,
        prevent_thread_lock=True,
        max_file_size=max_upload,
        enable_monitoring=False,
        footer_links=["api"],
        show_error=True,
        quiet=True,
        ssr_mode=False,
        **serving_options(services.store, auth is not None),
    )
    threading.Thread(target=_prepare_torch, name="prepare-torch", daemon=True).start()
    if not shutdown.event.is_set():  # a Ctrl+C during start-up: no ready line, no browser, straight to the end
        url = f"http://{_url_host(host)}:{port}/"
        say(f"Apertis Studio is running at {url} (workspace {services.store.root}). Press Ctrl+C to quit.")
        if open_browser:
            webbrowser.open(url)
    reason = shutdown.wait()
    say(close_studio(services, app, reason))


def serving_options(store: Store, throttle_logins: bool) -> dict:
    """What the server may serve, as launch() takes it. Gradio copies each file a handler returns into its
    upload folder and serves it from there, and copies only from `allowed_paths`: the folders handlers return
    files from (dataset previews, exports). StudioGuard then serves from the upload folder alone, so nothing
    else in the workspace (runs, models, the registry) is ever downloadable; the registry is also blocked
    outright, which stops it even being copied. With a password, StudioGuard throttles sign-in attempts."""
    from starlette.middleware import Middleware

    from .security import REGISTRY_FILES, LoginThrottle, StudioGuard

    returned_from = [store.datasets_dir, store.tmp_dir / "unzipped", store.tmp_dir / "exports"]
    throttle = LoginThrottle() if throttle_logins else None
    return {
        "allowed_paths": [str(folder) for folder in returned_from],
        "blocked_paths": [str(store.root / name) for name in REGISTRY_FILES],
        "app_kwargs": {"middleware": [Middleware(StudioGuard, throttle=throttle)]},
    }


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"  # listening everywhere: this machine reaches it on loopback
    return f"[{host}]" if ":" in host else host


def close_studio(services: Services, app: gr.Blocks, reason: str) -> str:
    """Shut the studio down and return the one line that says so, with what goes on without it. The server
    and the registry are closed even if reading the runs fails (a registry locked for longer than its timeout):
    the registry is crash-safe, so what is lost then is only the summary."""
    try:
        training = [run["name"] for run in services.jobs.close()]
        queued = len(services.store.list_runs([run_states.QUEUED]))
    except Exception as exc:
        print(
            f"studio: could not read the runs while shutting down ({exc}); they are as the registry last recorded them",
            file=sys.stderr,
        )
        training, queued = [], 0
    finally:
        app.close(verbose=False)
        services.store.close()
    return shutdown_line(reason, training, queued)


def shutdown_line(reason: str, training: list[str], queued: int) -> str:
    line = f"Apertis Studio shut down ({reason})."
    if len(training) == 1:
        line += (
            f" 1 run is still training in the background ({training[0]}); start the studio again to follow or stop it."
        )
    elif training:
        line += (
            f" {len(training)} runs are still training in the background ({', '.join(training)}); start the "
            "studio again to follow or stop them."
        )
    if queued:
        line += f" {queued} queued run{'s wait' if queued > 1 else ' waits'} for the next start."
    return line
